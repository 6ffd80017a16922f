"""The evaluation settings left to the dataset (`eval.recall_ks`, `data.test_split` empty) and
the ones set: resolved in one place, and what training, checkpoint evaluation and the sweep's
metric names see (no Ray)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline.config import ConfigError, describe, load_config
from pipeline.data.format import EvaluationProtocol, read_metadata, write_dataset
from pipeline.data.synthetic import SyntheticSpec, generate_synthetic
from pipeline.evaluation.protocol import gallery_split, planned_recall_ks, resolve_evaluation
from pipeline.training.driver import resolve_dataset


def _png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def _dataset(root, protocol: EvaluationProtocol, evaluated: tuple[str, ...] = ("test",)):
    """A two-class dataset whose metadata.json records `protocol`; `evaluated` are the
    splits holding the unseen class."""
    record = {"label": 0, "image": _png(10), "width": 8, "height": 8}
    unseen = {**record, "label": 1, "image": _png(200)}
    return write_dataset(
        root, name="protocol", source="test", class_names=["a", "b"], image_format="png",
        splits={"train": [record], **{name: [unseen] for name in evaluated}},
        evaluation=protocol,
    )  # fmt: skip


SOP_LIKE = EvaluationProtocol((1, 10, 100, 1000))
INSHOP_LIKE = EvaluationProtocol((1, 10, 20, 30, 40, 50), "query", "gallery")


def test_a_value_that_is_set_is_kept_even_when_it_equals_the_fallback(tmp_path):
    meta = _dataset(tmp_path / "sop", SOP_LIKE)
    root = f"data.root={tmp_path / 'sop'}"
    explicit = resolve_evaluation(load_config("local", [root, "eval.recall_ks=[1, 2, 4, 8]"]), meta)
    assert explicit.eval.recall_ks == [1, 2, 4, 8]
    left = resolve_evaluation(load_config("local", [root]), meta)
    assert left.eval.recall_ks == [1, 10, 100, 1000] and left.data.test_split == "test"
    assert resolve_evaluation(left, meta) == left  # resolving twice changes nothing


def test_an_empty_test_split_takes_the_query_split_and_test_stays_test(tmp_path):
    meta = _dataset(tmp_path / "inshop", INSHOP_LIKE, ("query", "gallery"))
    root = f"data.root={tmp_path / 'inshop'}"
    left = resolve_evaluation(load_config("local", [root]), meta)
    assert (left.data.test_split, gallery_split(left, meta)) == ("query", "gallery")
    assert left.eval.recall_ks == [1, 10, 20, 30, 40, 50]
    # 'test' set by hand is not mistaken for "left empty": this dataset has no such split.
    with pytest.raises(ValueError, match=r"data.test_split: .* no split 'test' \(it has gallery, query, train\)$"):
        resolve_dataset(load_config("local", [root, "data.test_split=test"]))
    _dataset(tmp_path / "no_test", SOP_LIKE, ("val",))
    with pytest.raises(ValueError, match="no split 'test' .*; it was left empty and the dataset names no query split"):
        resolve_dataset(load_config("local", [f"data.root={tmp_path / 'no_test'}"]))
    gallery_vs_itself = resolve_evaluation(load_config("local", [root, "data.test_split=gallery"]), meta)
    assert gallery_split(gallery_vs_itself, meta) == ""


def test_the_built_in_dataset_gets_recall_at_1_2_4_8_on_test(tmp_path):
    config = load_config("local", [f"data.cache_dir={tmp_path}"])
    assert (config.eval.recall_ks, config.data.test_split) == ([], "")  # left to the dataset
    spec = SyntheticSpec(**vars(config.data.synthetic))
    small = {**vars(spec), "num_classes": 4, "images_per_class": 3}  # the same generator, smaller
    meta = generate_synthetic(tmp_path / "built_in", SyntheticSpec(**small))
    assert meta.evaluation is None  # what planned_recall_ks assumes without generating it
    resolved = resolve_evaluation(config, meta)
    assert (resolved.eval.recall_ks, resolved.data.test_split) == ([1, 2, 4, 8], "test")
    assert planned_recall_ks(config) == [1, 2, 4, 8]


def test_the_sweep_names_the_metrics_of_the_dataset_protocol(tmp_path):
    from pipeline.sweep.space import reported_metrics

    _dataset(tmp_path / "sop", SOP_LIKE)
    recall = [m for m in reported_metrics(load_config("local", [])) if "recall" in m]
    assert recall == ["test/recall@1", "test/recall@2", "test/recall@4", "test/recall@8"]
    on_sop = load_config("local", [f"data.root={tmp_path / 'sop'}"])
    assert [m for m in reported_metrics(on_sop) if "recall" in m] == [
        "test/recall@1", "test/recall@10", "test/recall@100", "test/recall@1000"
    ]  # fmt: skip
    explicit = load_config("local", [f"data.root={tmp_path / 'sop'}", "eval.recall_ks=[1, 2]"])
    assert [m for m in reported_metrics(explicit) if "recall" in m] == ["test/recall@1", "test/recall@2"]


def test_a_checkpoint_pointed_at_another_dataset_follows_its_protocol(tmp_path):
    from pipeline.config import config_to_yaml
    from pipeline.serving.evaluation import evaluation_config

    meta = _dataset(tmp_path / "sop", SOP_LIKE)
    _dataset(tmp_path / "inshop", INSHOP_LIKE, ("query", "gallery"))
    # A checkpoint saves the config its training resolved (here on the SOP-like dataset).
    trained = resolve_evaluation(load_config("local", [f"data.root={tmp_path / 'sop'}"]), meta)
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(trained))

    same = evaluation_config(str(saved), trained, [])
    assert (same.eval.recall_ks, same.data.test_split) == ([1, 10, 100, 1000], "test")
    # The same dataset spelled another way is the same dataset.
    spelled = evaluation_config(str(saved), trained, [f"data.root={tmp_path}/./sop/"])
    assert (spelled.eval.recall_ks, spelled.data.test_split) == ([1, 10, 100, 1000], "test")
    other = evaluation_config(str(saved), trained, [f"data.root={tmp_path / 'inshop'}"])
    assert (other.eval.recall_ks, other.data.test_split) == ([], "")
    resolved = resolve_evaluation(other, read_metadata(tmp_path / "inshop"))
    assert resolved.data.test_split == "query" and resolved.eval.recall_ks[-1] == 50
    chosen = evaluation_config(
        str(saved), trained, [f"data.root={tmp_path / 'inshop'}", "eval.recall_ks=[1, 2, 4, 8]"]
    )
    assert (chosen.eval.recall_ks, chosen.data.test_split) == ([1, 2, 4, 8], "")


def test_validation_names_the_field_and_help_says_what_empty_means():
    assert load_config("local", ["eval.recall_ks=[]", "data.test_split="]).eval.recall_ks == []
    for bad in ("eval.recall_ks=[1, 0]", "eval.recall_ks=[1, true]", "eval.recall_ks=5"):
        with pytest.raises(ConfigError, match=r"^eval\.recall_ks: "):
            load_config("local", [bad])
    with pytest.raises(ConfigError, match=r"^data\.test_split: expected str"):
        load_config("local", ["data.test_split=3"])
    text = "\n".join(describe())
    assert "eval.recall_ks = []  # K values of Recall@K; empty = the dataset's protocol" in text
    assert "data.test_split = ''  # Split evaluated on (classes unseen in training); empty = the dataset's" in text
