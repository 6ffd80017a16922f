"""The end of a successful run, in the driver: plots from the final evaluation, then the
MLflow record completed (rank 0's unsent metrics resent, checkpoint and plots attached, run
closed), and a clear account of anything the tracking server did not get.

The plots (PNG, under `plots/` in the run's artifacts):
`recall_at_k.png` Recall against K at the final evaluation; `training_curves.png` loss and
test Recall@1 / MAP@R against step, from the run's metric history; `embedding_projection.png`
a t-SNE of up to 2,000 test embeddings of up to 20 classes; `retrieval_grid.png` a few test
queries with their nearest test images (green border: same class, red: other class).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from pipeline import tracking
from pipeline.reporting import plot_data, plots
from pipeline.reporting.test_embeddings import EmbeddedSplit, load_test_embeddings

PLOT_FILES = (
    "recall_at_k.png",
    "training_curves.png",
    "embedding_projection.png",
    "retrieval_grid.png",
)
CURVE_METRICS = ("train/loss", "test/recall_at_1", "test/map_at_r")
"""MLflow metric names the training curves show."""


def write_plots(
    out_dir: str,
    split: EmbeddedSplit,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    read_images,
    class_names: dict[int, str] | None = None,
    *,
    queries: int = 6,
    neighbours: int = 6,
    projection: str = "tsne",
    seed: int = 0,
) -> list[str]:
    """Write the run's plots into `out_dir`; returns one line per plot not made and why.

    `curves` maps MLflow metric names to (steps, values); `read_images(ids)` returns RGB
    uint8 images [H, W, 3] of those test example ids, in order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    problems = []

    ks, recalls = plot_data.recall_curve(split.embeddings, split.labels)
    _save(plots.recall_at_k_figure(ks, recalls), out / "recall_at_k.png")

    if "train/loss" in curves:
        test = {
            name.removeprefix("test/").replace("_at_", "@"): curves[name]
            for name in CURVE_METRICS[1:]
            if name in curves
        }
        _save(plots.training_curves_figure(curves["train/loss"], test), out / "training_curves.png")
    else:
        problems.append("plots/training_curves.png: not made (no train/loss history)")

    sample = plot_data.projection_sample(split.labels, seed=seed)
    points = plot_data.project_2d(split.embeddings[sample], projection, seed=seed)
    method = {"tsne": "t-SNE", "pca": "PCA"}[projection]
    _save(
        plots.projection_figure(points, split.labels[sample], class_names, method),
        out / "embedding_projection.png",
    )

    picked = plot_data.pick_queries(split.labels, queries, seed=seed)
    found = plot_data.nearest_neighbours(split.embeddings, picked, neighbours)
    images = read_images(np.concatenate([split.ids[picked], split.ids[found].ravel()]))
    query_images, rest = images[: len(picked)], images[len(picked) :]
    width = found.shape[1]
    titles = [
        (class_names or {}).get(int(split.labels[q]), f"class {split.labels[q]}") for q in picked
    ]
    figure = plots.retrieval_grid_figure(
        query_images,
        [rest[i * width : (i + 1) * width] for i in range(len(picked))],
        split.labels[found] == split.labels[picked][:, None],
        titles,
    )
    _save(figure, out / "retrieval_grid.png")
    return problems


def _save(figure, path: Path) -> None:
    path.write_bytes(plots.figure_png(figure))


def read_test_images(
    root: str, split: str, ids: np.ndarray, image_size: int, resize: int
) -> list[np.ndarray]:
    """The images of example `ids` of a dataset split, as the model saw them at evaluation
    (resize + center crop), RGB uint8 [H, W, 3]. Reads only the rows asked for (Parquet
    row-group statistics on `id`); local paths or s3:// (the pipeline's endpoint settings)."""
    import pyarrow.parquet as pq

    from pipeline.data.decoding import decode_rgb, eval_transform
    from pipeline.data.format import shard_uris
    from pipeline.storage import filesystem_for

    wanted = np.unique(ids)
    encoded: dict[int, bytes] = {}
    for uri in shard_uris(root, split):
        filesystem, path = filesystem_for(uri)
        table = pq.read_table(
            path,
            filesystem=filesystem,
            columns=["id", "image"],
            filters=[("id", "in", wanted.tolist())],
        )
        encoded.update(
            zip(table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True)
        )
    missing = [int(i) for i in wanted if int(i) not in encoded]
    if missing:
        raise ValueError(f"{root}: split {split!r} has no example ids {missing[:5]}")
    transform = eval_transform(image_size, resize)
    return [transform(decode_rgb(encoded[int(i)])).permute(1, 2, 0).numpy() for i in ids]


def metric_curves(
    uri: str, run_id: str, names=CURVE_METRICS
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(steps, values) of each metric in `names` the run has, from its MLflow history."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    curves = {}
    for name in names:
        history = sorted(
            client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp)
        )
        if history:
            curves[name] = (
                np.array([m.step for m in history]),
                np.array([m.value for m in history]),
            )
    return curves


def record_finished_run(
    config,
    root: str,
    uri: str,
    run_id: str,
    checkpoint_dir: str,
    printer=print,
    retry_s: float = 60.0,
) -> list[str]:
    """Complete the MLflow record of a run that trained to the end, from its final checkpoint:
    resend what rank 0 could not log, make the plots, attach checkpoint and plots, close the
    run. Prints and returns one line per thing MLflow did not get (empty when it got all)."""
    from pipeline.data.format import read_metadata
    from pipeline.evaluation.protocol import gallery_split

    not_logged = []
    unlogged = tracking.load_unlogged(checkpoint_dir)
    if unlogged.held:
        resender = tracking.MetricsLogger(uri, run_id)
        resender.resend(unlogged.held)
        unlogged.held = resender.close(timeout_s=retry_s).held
    not_logged += unlogged.describe()

    with tempfile.TemporaryDirectory() as plot_dir:
        split = load_test_embeddings(checkpoint_dir)
        metadata = read_metadata(root)
        if split is None:
            not_logged.append(f"plots/: not made ({checkpoint_dir} holds no test embeddings)")
        elif gallery_split(config, metadata):
            # The saved embeddings are the queries only; plots of queries ranked against each
            # other would contradict the logged query-vs-gallery metrics.
            not_logged.append(
                "plots/: not made (query/gallery evaluation such as In-Shop is not plotted yet)"
            )
        else:
            try:
                class_names = dict(enumerate(metadata.class_names))
                history_error = ""
                try:
                    curves = metric_curves(uri, run_id)
                except Exception as err:  # noqa: BLE001 - the server may be gone: plot the rest
                    curves, history_error = {}, tracking.describe_error(err)
                problems = write_plots(
                    plot_dir,
                    split,
                    curves,
                    lambda ids: read_test_images(
                        root,
                        config.data.test_split,
                        ids,
                        config.data.image_size,
                        config.data.eval_resize,
                    ),
                    class_names,
                    seed=config.train.seed,
                )
                if history_error:
                    problems = [
                        p.replace("no train/loss history", f"history unreadable: {history_error}")
                        for p in problems
                    ]
                not_logged += problems
            except Exception as err:  # noqa: BLE001 - plots must never cost the run its record
                not_logged.append(f"plots/: not made ({tracking.describe_error(err)})")
        not_logged += tracking.finish_run(
            uri,
            run_id,
            checkpoint_dir if config.tracking.log_model else None,
            failed=False,
            artifacts={"plots": plot_dir} if any(Path(plot_dir).iterdir()) else None,
            retry_s=retry_s,
        )
    tracking.print_not_recorded(not_logged, uri, run_id, printer)
    return not_logged
