"""The built-in generated dataset: determinism, the split, counts, images and distinct modes."""

from __future__ import annotations

import io
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline.data import synthetic
from pipeline.data.format import read_metadata, read_split, validate_dataset
from pipeline.data.synthetic import (
    SyntheticSpec,
    design_modes,
    ensure_synthetic,
    generate_synthetic,
    render_class,
    render_prototype,
    split_classes,
)

SMALL = SyntheticSpec(num_classes=10, modes_per_class=3, images_per_class=6, image_size=32, seed=1)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic") / "small")
    generate_synthetic(root, SMALL)
    return root


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() / 255)


def test_dataset_is_valid_with_expected_counts(small_root):
    meta = validate_dataset(small_root, check_images=True, check_fingerprint=True)
    assert meta.source == "synthetic" and meta.image_format == "png"
    assert meta.class_names == tuple(f"class_{i:03d}" for i in range(10))
    assert meta.extra["spec"] == SMALL.to_dict()
    assert len(meta.extra["modes"]["class_004"]) == 3
    for split, labels in split_classes(SMALL).items():
        assert meta.splits[split].classes == tuple(labels)
        assert meta.num_images(split) == len(labels) * SMALL.images_per_class
        counts = Counter(read_split(small_root, split, columns=["label"])["label"].to_pylist())
        assert counts == {label: SMALL.images_per_class for label in labels}


def test_split_is_class_disjoint_and_covers_all_classes():
    for spec in (SMALL, SyntheticSpec(), SyntheticSpec(num_classes=9, test_fraction=0.34)):
        split = split_classes(spec)
        train, test = set(split["train"]), set(split["test"])
        assert not train & test and train | test == set(range(spec.num_classes))
        assert len(test) == spec.num_test_classes
    # The held-out classes are drawn by the seed, not simply the last ones.
    assert split_classes(SyntheticSpec())["test"] != list(range(64, 128))


def test_every_image_decodes_at_the_right_size(small_root):
    table = read_split(small_root, "train", columns=["image", "width", "height"])
    for data in table["image"].to_pylist():
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.size == (SMALL.image_size, SMALL.image_size)
    assert set(table["width"].to_pylist()) == {SMALL.image_size}


def test_deterministic_from_the_seed(small_root, tmp_path):
    again = generate_synthetic(str(tmp_path / "again"), SMALL)
    assert again.fingerprint == read_metadata(small_root).fingerprint
    other_seed = SyntheticSpec(**{**SMALL.to_dict(), "seed": 2})
    assert generate_synthetic(str(tmp_path / "other"), other_seed).fingerprint != again.fingerprint


def test_unimodal_control(tmp_path):
    spec = SyntheticSpec(num_classes=4, modes_per_class=1, images_per_class=3, image_size=16)
    meta = generate_synthetic(str(tmp_path / "uni"), spec)
    validate_dataset(str(tmp_path / "uni"), check_images=True)
    assert meta.num_images() == 12
    assert all(len(modes) == 1 for modes in meta.extra["modes"].values())


def test_default_spec_shape():
    spec = SyntheticSpec()
    assert spec.num_classes >= 100 and spec.modes_per_class == 3
    assert 7000 <= spec.num_classes * spec.images_per_class <= 9000
    assert spec.image_size == 64


def test_modes_unique_and_distinct_within_each_class():
    modes = design_modes(SyntheticSpec())
    keys = [mode.key for class_modes in modes for mode in class_modes]
    assert len(keys) == len(set(keys)) == 128 * 3
    for class_modes in modes:
        for attribute in ("shape", "pattern", "primary"):
            assert len({getattr(m, attribute) for m in class_modes}) == 3, class_modes
        prototypes = [render_prototype(m, 32) for m in class_modes]
        for i in range(3):
            for j in range(i + 1, 3):
                # A mode's shape covers about a third of the image: 0.03 is a clear change.
                assert _mean_abs_diff(prototypes[i], prototypes[j]) > 0.03, class_modes


def test_no_two_modes_render_alike():
    flat = [mode for class_modes in design_modes(SyntheticSpec()) for mode in class_modes]
    prototypes = np.stack([render_prototype(m, 24).reshape(-1) for m in flat]).astype(np.int16)
    for i in range(len(prototypes) - 1):
        diffs = np.abs(prototypes[i + 1 :] - prototypes[i]).mean(axis=1) / 255
        assert diffs.min() > 0.005, (flat[i], flat[i + 1 + int(diffs.argmin())])


def test_modes_of_a_class_differ_more_than_nuisance_within_a_mode():
    spec = SyntheticSpec(num_classes=8, images_per_class=60, image_size=32)
    modes = design_modes(spec)
    for label in range(spec.num_classes):
        images, mode_of = render_class(spec, label, modes[label])
        means = [images[mode_of == m].astype(np.float32).mean(axis=0) for m in range(3)]
        assert images.shape == (60, 32, 32, 3) and np.bincount(mode_of).tolist() == [20] * 3
        # Mode means differ, and images of one mode vary (nuisance is present).
        assert min(_mean_abs_diff(means[a], means[b]) for a, b in ((0, 1), (0, 2), (1, 2))) > 0.01
        assert _mean_abs_diff(images[mode_of == 0][0], images[mode_of == 0][1]) > 0.01


def test_ensure_synthetic_reuses_the_cached_copy(tmp_path, monkeypatch):
    spec = SyntheticSpec(num_classes=4, modes_per_class=2, images_per_class=2, image_size=16)
    root = ensure_synthetic(str(tmp_path), spec)
    assert os.path.basename(root) == f"synthetic-{spec.cache_key()}"
    fingerprint = validate_dataset(root).fingerprint

    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated a cached dataset")

    monkeypatch.setattr(synthetic, "generate_synthetic", no_generation)
    assert ensure_synthetic(str(tmp_path), spec) == root
    monkeypatch.undo()

    other = SyntheticSpec(**{**spec.to_dict(), "seed": 5})
    assert ensure_synthetic(str(tmp_path), other) != root
    # An unfinished copy (no metadata.json) is regenerated, not trusted.
    os.remove(os.path.join(root, "metadata.json"))
    assert ensure_synthetic(str(tmp_path), spec) == root
    assert read_metadata(root).fingerprint == fingerprint
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f"synthetic-{spec.cache_key()}", f"synthetic-{other.cache_key()}"]
    )


def test_generate_refuses_to_overwrite(small_root):
    with pytest.raises(FileExistsError):
        generate_synthetic(small_root, SMALL)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"modes_per_class": 0}, "modes_per_class"),
        ({"modes_per_class": 7}, "modes_per_class"),
        ({"images_per_class": 2}, "images_per_class"),
        ({"num_classes": 1}, "need >= 1 each"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"image_size": 8}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"num_classes": 12.5}, "num_classes must be an int"),
    ],
)
def test_spec_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        SyntheticSpec(**{**SMALL.to_dict(), **changes})


def test_too_many_classes_for_the_vocabulary_is_a_clear_error():
    with pytest.raises(ValueError, match="distinct modes"):
        design_modes(SyntheticSpec(num_classes=1200, modes_per_class=6, images_per_class=6))


def test_preview_contact_sheet(tmp_path):
    path = str(tmp_path / "preview.png")
    synthetic.main(["--preview", path, "--image-size", "32"])
    with Image.open(path) as sheet:
        assert sheet.size == (3 * 5 * 34 + 2, 6 * 34)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--test-fraction", "1.5"], "error: --test-fraction must be in (0, 1), got 1.5"),
        (["--images-per-class", "1"], "error: --images-per-class (1) must be >= --modes-per-class (3)"),
        (["--preview", "{tmp}/no_folder/x.png"], "error: --preview {tmp}/no_folder/x.png: "),
        (["--out", "{tmp}/a_file"], "error: --out {tmp}/a_file: "),
        (["--out", "{tmp}/data", "--num-classes", "4"], "a dataset already exists here; pass --overwrite"),
    ],
)
def test_the_command_line_names_the_flag_that_is_wrong(tmp_path, capsys, argv, says):
    """A usage error (exit 2) that names the flag, never a traceback; what is there is kept."""
    (tmp_path / "a_file").write_text("kept")
    generate_synthetic(str(tmp_path / "data"), SMALL)
    before = (tmp_path / "data" / "metadata.json").read_bytes()
    with pytest.raises(SystemExit) as stopped:
        synthetic.main([arg.format(tmp=tmp_path) for arg in argv])
    assert stopped.value.code == 2
    assert says.format(tmp=tmp_path) in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "kept"
    assert (tmp_path / "data" / "metadata.json").read_bytes() == before



def test_a_writer_never_writes_into_another_writers_scratch_folder(tmp_path):
    # Jobs in two containers that mount one cache folder can have the same pid: a scratch folder
    # named by pid was written by both at once and renamed into place with shards missing.
    spec = SyntheticSpec(num_classes=4, modes_per_class=2, images_per_class=2, image_size=16)
    other = tmp_path / f"synthetic-{spec.cache_key()}.tmp-{os.getpid()}"  # the other job's
    other.mkdir()
    (other / "train").mkdir()
    (other / "train" / "part-00000.parquet").write_bytes(b"half written")
    root = ensure_synthetic(str(tmp_path), spec)
    validate_dataset(root, check_images=True, check_fingerprint=True)
    assert (other / "train" / "part-00000.parquet").read_bytes() == b"half written"
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(root), other.name])  # ours is gone
