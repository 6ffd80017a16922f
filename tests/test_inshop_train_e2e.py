"""A short run on Ray (2 ranks) on a converted In-Shop tree: its queries are ranked against its
gallery at In-Shop's cut-offs, checked against a float64 computation from the final checkpoint,
and so are those of `jobs.evaluate` on that checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from short_runs import SHORT_RUN
from test_convert_layouts import build_inshop

from pipeline.config import load_config
from pipeline.data.convert import ConversionOptions, EncodeOptions, convert_dataset
from pipeline.data.decoding import decode_rgb, eval_transform
from pipeline.data.format import read_split
from pipeline.reporting.test_embeddings import load_test_embeddings
from pipeline.training.checkpoint import load_embedding_model

pytestmark = pytest.mark.ray

INSHOP_KS = (1, 10, 20, 30, 40, 50)


def _embed(model, root, split: str, config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, labels and float64 embeddings of a split, preprocessed as the evaluation does."""
    table = read_split(root, split, ["id", "label", "image"])
    transform = eval_transform(config.data.image_size, config.data.eval_resize)
    images = torch.stack([transform(decode_rgb(b.as_py())) for b in table.column("image")])
    with torch.no_grad():
        embeddings = model(images.float().div(255)).double().numpy()
    return table.column("id").to_numpy(), table.column("label").to_numpy(), embeddings


def test_an_inshop_run_ranks_queries_against_the_gallery(ray_local, tmp_path):
    from mlflow import MlflowClient

    from pipeline.training.driver import run_training

    # 2 training items of 2 images; 3 unseen items of 1 query and 2 gallery images each.
    root = tmp_path / "inshop"
    options = ConversionOptions(EncodeOptions(short_side=24), cpus_per_task=0.25)
    convert_dataset("inshop", str(build_inshop(tmp_path / "src")), str(root), options,
                    printer=lambda *a, **k: None)  # fmt: skip
    config = load_config("local", SHORT_RUN + [
        f"data.root={root}", f"train.storage_path={tmp_path / 'runs'}",
        "train.num_workers=2", "train.epochs=1", "train.steps_per_epoch=2",
        "sampler.classes_per_batch=2", "sampler.samples_per_class=2",
    ])  # fmt: skip
    summary = run_training(config, printer=lambda *a, **k: None)

    recalls = {k: summary.metrics[f"test/recall@{k}"] for k in INSHOP_KS}
    assert sorted(k for k in summary.metrics if k.startswith("test/recall@")) == sorted(
        f"test/recall@{k}" for k in INSHOP_KS
    )
    run = MlflowClient(summary.tracking_uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.test_split"] == "query"
    assert run.data.params["eval.recall_ks"] == str(list(INSHOP_KS))
    assert run.data.metrics["test/recall_at_50"] == recalls[50]

    # The same numbers from the final weights, independently: every query against the gallery.
    model, saved = load_embedding_model(summary.checkpoint_path)
    q_ids, q_labels, queries = _embed(model, root, "query", saved)
    _, g_labels, gallery = _embed(model, root, "gallery", saved)
    evaluated = load_test_embeddings(summary.checkpoint_path)  # what rank 0 evaluated: the queries
    order = np.argsort(evaluated.ids)
    np.testing.assert_array_equal(evaluated.ids[order], q_ids)
    np.testing.assert_allclose(evaluated.embeddings[order], queries, atol=1e-5)

    distances = ((queries[:, None, :] - gallery[None, :, :]) ** 2).sum(-1)
    ranked = g_labels[np.argsort(distances, axis=1, kind="stable")] == q_labels[:, None]
    for k in INSHOP_KS:
        assert recalls[k] == pytest.approx(ranked[:, :k].any(axis=1).mean()), k
    r = ranked.sum(axis=1)  # 2 gallery images per query's item
    precision_at = np.cumsum(ranked, axis=1) / np.arange(1, ranked.shape[1] + 1)
    map_at_r = np.mean([(precision_at[i, :n] * ranked[i, :n]).sum() / n for i, n in enumerate(r)])
    assert summary.metrics["test/map@r"] == pytest.approx(map_at_r)
    # Ranked against each other the queries would find nothing: each is its item's only query.
    assert recalls[10] == 1.0

    # The evaluate job follows the dataset's protocol too: the same numbers from the checkpoint.
    from jobs.evaluate import main as evaluate_main

    assert evaluate_main([summary.checkpoint_path, "--set", f"train.storage_path={tmp_path / 'runs'}"]) == 0
    client = MlflowClient(summary.tracking_uri)
    [evaluation] = client.search_runs(
        [run.info.experiment_id], filter_string="tags.`pipeline.kind` = 'evaluation'"
    )
    assert evaluation.data.tags["evaluation.source_run"] == run.info.run_name
    for k in INSHOP_KS:
        assert evaluation.data.metrics[f"query/recall_at_{k}"] == pytest.approx(recalls[k]), k
    assert evaluation.data.metrics["query/map_at_r"] == pytest.approx(map_at_r)
