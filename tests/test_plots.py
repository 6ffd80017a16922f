"""The run plots without Ray: the numbers they show, the figures, and the PNGs a run gets."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluation.metrics import retrieval_metrics
from pipeline.reporting import plot_data, plots
from pipeline.reporting.run_report import PLOT_FILES, read_test_images, write_plots
from pipeline.reporting.test_embeddings import (
    EmbeddedSplit,
    load_test_embeddings,
    save_test_embeddings,
)


def _clustered(num_classes: int, per_class: int, noise: float, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    embeddings = rng.normal(size=(num_classes, dim))[labels] + noise * rng.normal(
        size=(len(labels), dim)
    )
    return embeddings.astype(np.float32), labels


def _png(figure) -> Image.Image:
    image = Image.open(io.BytesIO(plots.figure_png(figure)))
    image.load()
    return image


def test_recall_curve_is_the_evaluation_recall_at_powers_of_two():
    embeddings, labels = _clustered(5, 8, noise=2.0)
    ks, recalls = plot_data.recall_curve(embeddings, labels)
    assert ks.tolist() == [1, 2, 4, 8, 16, 32, 39]  # capped at the 39 other items
    expected = retrieval_metrics(embeddings, labels, ks=ks.tolist(), compute_nmi=False)
    np.testing.assert_allclose(recalls, [expected[f"recall@{k}"] for k in ks])
    assert np.all(np.diff(recalls) >= 0)
    assert recalls[-1] == 1.0  # every item has a same-class item among all the others
    assert recalls[0] < 1.0  # the noise is large enough that the check above means something


def test_projection_sample_keeps_at_most_the_asked_points_and_classes():
    labels = np.repeat(np.arange(30), 100)
    sample = plot_data.projection_sample(labels, max_points=2000, max_classes=20, seed=1)
    assert len(sample) == 2000
    assert len(np.unique(labels[sample])) == 20
    assert np.all(np.diff(sample) > 0)
    np.testing.assert_array_equal(sample, plot_data.projection_sample(labels, seed=1))
    small = np.repeat(np.arange(3), 4)
    np.testing.assert_array_equal(plot_data.projection_sample(small), np.arange(12))


def test_projections_are_two_dimensional_and_unknown_methods_are_named():
    embeddings, _ = _clustered(4, 10, noise=0.5)
    assert plot_data.project_2d(embeddings, "pca").shape == (40, 2)
    assert plot_data.project_2d(embeddings, "tsne").shape == (40, 2)
    with pytest.raises(ValueError, match="'umap'"):
        plot_data.project_2d(embeddings, "umap")


def test_nearest_neighbours_are_the_brute_force_ones_without_the_query():
    embeddings, _ = _clustered(3, 6, noise=1.0)
    embeddings[5] = embeddings[4]  # a duplicate: the query must still be the one removed
    queries = np.array([0, 4, 17])
    found = plot_data.nearest_neighbours(embeddings, queries, k=5)
    distances = ((embeddings[:, None] - embeddings[None]) ** 2).sum(-1)
    for row, q in zip(found, queries, strict=True):
        assert q not in row
        order = [i for i in np.argsort(distances[q], kind="stable") if i != q][:5]
        np.testing.assert_allclose(distances[q, row], distances[q, order], rtol=1e-5)


def test_queries_come_from_distinct_classes_that_have_a_second_item():
    labels = np.array([0, 0, 1, 2, 2, 2, 3, 3, 4])  # classes 1 and 4 have a single item
    picked = plot_data.pick_queries(labels, 3, seed=0)
    assert sorted(labels[picked].tolist()) == [0, 2, 3]
    with pytest.raises(ValueError, match="no class has two items"):
        plot_data.pick_queries(np.array([0, 1, 2]), 2)


def test_bordered_frames_the_image_in_the_colour():
    image = np.full((10, 8, 3), 7, np.uint8)
    framed = plots.bordered(image, plots.CORRECT, width=2)
    assert framed.shape == (14, 12, 3)
    assert tuple(framed[0, 0]) == plots.CORRECT and tuple(framed[-1, 5]) == plots.CORRECT
    np.testing.assert_array_equal(framed[2:-2, 2:-2], image)


def test_figures_render_as_png():
    recall = plots.recall_at_k_figure(np.array([1, 2, 4]), np.array([0.5, 0.7, 0.9]))
    assert recall.axes[0].get_ylabel() == "Recall@K"
    curves = plots.training_curves_figure(
        (np.arange(1, 9), np.linspace(1, 0.2, 8)),
        {"recall@1": (np.array([4, 8]), np.array([0.3, 0.5]))},
    )
    assert [a.get_title() for a in curves.axes] == ["training loss", "test split"]
    points = np.random.default_rng(0).normal(size=(30, 2))
    projection = plots.projection_figure(
        points, np.repeat(np.arange(3), 10), {0: "cat", 1: "dog", 2: "emu"}
    )
    assert [t.get_text() for t in projection.axes[0].get_legend().get_texts()] == [
        "cat",
        "dog",
        "emu",
    ]
    tile = np.zeros((8, 8, 3), np.uint8)
    grid = plots.retrieval_grid_figure(
        [tile, tile], [[tile] * 3, [tile] * 3], np.array([[1, 0, 1], [0, 0, 1]], bool)
    )
    assert len(grid.axes) == 2 * 4
    for figure in (recall, curves, projection, grid):
        image = _png(figure)
        assert image.format == "PNG" and min(image.size) > 100


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from pipeline.data.synthetic import SyntheticSpec, ensure_synthetic

    spec = SyntheticSpec(num_classes=6, modes_per_class=1, images_per_class=5, image_size=16)
    return ensure_synthetic(tmp_path_factory.mktemp("data"), spec)


def test_a_run_gets_four_plots_from_its_saved_test_embeddings(tiny_dataset, tmp_path):
    from pipeline.data.format import read_split

    table = read_split(tiny_dataset, "test", ["id", "label", "image"])
    ids, labels = table.column("id").to_numpy(), table.column("label").to_numpy()
    rng = np.random.default_rng(0)
    embeddings = np.eye(16, dtype=np.float32)[labels] + 0.05 * rng.normal(
        size=(len(ids), 16)
    ).astype(np.float32)
    save_test_embeddings(str(tmp_path), embeddings, labels, ids)
    split = load_test_embeddings(str(tmp_path))
    np.testing.assert_array_equal(split.ids, ids)
    assert load_test_embeddings(str(tmp_path / "elsewhere")) is None

    # Images come back by id, as evaluation sees them (resize 14, center crop 12).
    wanted = ids[[3, 0, 3]]
    images = read_test_images(tiny_dataset, "test", wanted, image_size=12, resize=14)
    assert [im.shape for im in images] == [(12, 12, 3)] * 3 and images[0].dtype == np.uint8
    np.testing.assert_array_equal(images[0], images[2])
    with pytest.raises(ValueError, match="no example ids \\[9999\\]"):
        read_test_images(tiny_dataset, "test", np.array([9999]), 12, 14)

    asked: list[np.ndarray] = []

    def read_images(wanted_ids):
        asked.append(np.asarray(wanted_ids))
        return read_test_images(tiny_dataset, "test", wanted_ids, 12, 14)

    curves = {
        "train/loss": (np.array([2, 4]), np.array([0.9, 0.5])),
        "test/recall_at_1": (np.array([4]), np.array([0.8])),
    }
    problems = write_plots(
        str(tmp_path / "plots"),
        EmbeddedSplit(embeddings, labels, ids),
        curves,
        read_images,
        {int(c): f"c{c}" for c in np.unique(labels)},
        queries=3,
        neighbours=4,
    )
    assert problems == []
    for name in PLOT_FILES:
        assert _png_file(tmp_path / "plots" / name).format == "PNG", name
    # The grid fetched 3 queries and their 4 neighbours each, all from the test split.
    assert len(asked) == 1 and len(asked[0]) == 3 + 3 * 4 and set(asked[0]) <= set(ids)

    # Without a loss history the other plots are still made, and the missing one is named.
    problems = write_plots(str(tmp_path / "partial"), split, {}, read_images, projection="pca")
    assert problems == ["plots/training_curves.png: not made (no train/loss history)"]
    assert sorted(p.name for p in (tmp_path / "partial").iterdir()) == sorted(
        set(PLOT_FILES) - {"training_curves.png"}
    )


def _png_file(path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image
