"""The dataset format: round trips, the fingerprint, overwrite safety, and every error message."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.format import (
    IMAGE_SCHEMA,
    STAGING_PREFIX,
    DatasetFormatError,
    DatasetMetadata,
    read_metadata,
    read_split,
    shard_uris,
    validate_dataset,
    validate_shard,
    write_dataset,
)

CLASS_NAMES = ["cat", "dog", "eel", "fox"]


def _png(seed: int, width: int = 5, height: int = 4) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _records(labels: list[int], seed: int = 0) -> list[dict]:
    return [
        {"label": label, "image": _png(seed * 1000 + i), "width": 5, "height": 4}
        for i, label in enumerate(labels)
    ]


TRAIN_LABELS = [0, 1, 0, 1, 1, 0, 1]  # 7 rows: three shards of size 3
TEST_LABELS = [2, 3, 3]


def _write(root, train=None, test=None, **kwargs) -> DatasetMetadata:
    kwargs = {
        "name": "tiny",
        "source": "unit test",
        "class_names": CLASS_NAMES,
        "image_format": "png",
        "shard_size": 3,
        "extra": {"protocol": "class-disjoint"},
        **kwargs,
    }
    splits = {
        "train": _records(TRAIN_LABELS) if train is None else train,
        "test": _records(TEST_LABELS, seed=1) if test is None else test,
    }
    return write_dataset(root, splits=splits, **kwargs)


@pytest.fixture
def root(tmp_path) -> str:
    path = str(tmp_path / "ds")
    _write(path)
    return path


# ----------------------------------------------------------------------------- round trip


def test_round_trip_rows_and_metadata(root):
    meta = read_metadata(root)
    assert meta == validate_dataset(root, check_images=True, check_fingerprint=True)
    assert meta.format_version == 1 and meta.source == "unit test"
    assert meta.class_names == tuple(CLASS_NAMES)
    assert meta.extra == {"protocol": "class-disjoint"}
    assert meta.splits["train"].shards == tuple(f"train/part-0000{i}.parquet" for i in range(3))
    assert meta.num_images("train") == 7 and meta.num_images() == 10
    assert meta.num_classes() == 4 and meta.num_classes("test") == 2
    assert meta.splits["test"].classes == (2, 3)
    for split, labels, seed in (("train", TRAIN_LABELS, 0), ("test", TEST_LABELS, 1)):
        table = read_split(root, split)
        assert table.schema == IMAGE_SCHEMA
        expected = _records(labels, seed)
        assert table.column("id").to_pylist() == list(range(len(labels)))
        assert table.column("label").to_pylist() == labels
        assert table.column("image").to_pylist() == [r["image"] for r in expected]
        assert set(table.column("width").to_pylist()) == {5}
    assert read_split(root, "test", columns=["label"]).column_names == ["label"]
    assert DatasetMetadata.from_json(meta.to_json()) == meta


def test_shard_uris_are_readable_parquet(root):
    uris = shard_uris(root, "train")
    assert [os.path.basename(u) for u in uris] == [f"part-0000{i}.parquet" for i in range(3)]
    assert sum(pq.read_table(u).num_rows for u in uris) == 7
    assert validate_shard(uris[0], num_classes=4) == 3


def test_file_uri_root_reads_like_a_path(root):
    uri = "file://" + os.path.abspath(root)
    assert read_metadata(uri) == read_metadata(root)
    assert shard_uris(uri, "test")[0].startswith("file:///")
    assert read_split(uri, "test").equals(read_split(root, "test"))


def test_table_input_writes_the_same_dataset(root, tmp_path):
    rows = _records(TRAIN_LABELS)
    table = pa.table(
        {
            "label": pa.array([r["label"] for r in rows], pa.int64()),  # cast safely to int32
            "image": [r["image"] for r in rows],
            "width": [5] * len(rows),
            "height": [4] * len(rows),
        }
    )
    meta = _write(str(tmp_path / "from_table"), train=table)
    assert meta.fingerprint == read_metadata(root).fingerprint


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_content_sensitive(root, tmp_path):
    fingerprint = read_metadata(root).fingerprint
    assert _write(str(tmp_path / "again")).fingerprint == fingerprint
    # Content, not layout: another shard size gives the same fingerprint.
    assert _write(str(tmp_path / "reshard"), shard_size=2).fingerprint == fingerprint

    one_image = _records(TRAIN_LABELS)
    one_image[4] = {**one_image[4], "image": _png(99)}
    one_label = [{**r, "label": 1 - r["label"]} for r in _records(TRAIN_LABELS)]
    changed = [
        _write(str(tmp_path / "image"), train=one_image).fingerprint,
        _write(str(tmp_path / "label"), train=one_label).fingerprint,
        _write(str(tmp_path / "split"), train=_records(TRAIN_LABELS[:-1])).fingerprint,
    ]
    assert fingerprint not in changed and len(set(changed)) == 3


# ----------------------------------------------------------------------------- overwrite


def test_overwrite_refused_and_earlier_dataset_intact(root):
    before = read_split(root, "train")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _write(root, train=_records([3, 3]))
    assert read_split(root, "train").equals(before)
    validate_dataset(root, check_fingerprint=True)


def test_overwrite_replaces_and_leaves_no_stale_shards(root):
    meta = write_dataset(
        root,
        name="smaller",
        source="unit test",
        class_names=CLASS_NAMES,
        splits={"query": _records([0, 1])},
        image_format="png",
        overwrite=True,
    )
    assert set(meta.splits) == {"query"}
    assert not any(name.endswith(".parquet") for name in os.listdir(os.path.join(root, "train")))
    validate_dataset(root, check_images=True, check_fingerprint=True)


def test_failed_overwrite_leaves_the_old_dataset_whole(root):
    """A replacement that fails part-way (here a bad record in its second split, "train", after
    the "test" split's shards were written) leaves the old dataset as it was, and no staging
    folder."""
    before = {split: read_split(root, split) for split in ("train", "test")}
    fingerprint = read_metadata(root).fingerprint
    with pytest.raises(DatasetFormatError, match="split 'train'.*label"):
        _write(root, train=_records([3, 3, 3, 99]), test=_records([2, 3]), overwrite=True)
    assert read_metadata(root).fingerprint == fingerprint
    assert all(read_split(root, split).equals(table) for split, table in before.items())
    validate_dataset(root, check_images=True, check_fingerprint=True)
    assert sorted(os.listdir(root)) == ["metadata.json", "test", "train"]


def test_overwrite_removes_a_killed_replacements_staging_folder(root):
    """A staging folder left by a replacement that was killed goes with the next one."""
    left = os.path.join(root, STAGING_PREFIX + "killed", "train")
    os.makedirs(left)
    with open(os.path.join(left, "part-00000.parquet"), "wb") as f:
        f.write(b"half a shard")
    meta = _write(root, train=_records([1, 1]), overwrite=True)
    assert sorted(os.listdir(root)) == ["metadata.json", "test", "train"]
    assert sorted(os.listdir(os.path.join(root, "train"))) == ["part-00000.parquet"]
    assert validate_dataset(root, check_images=True, check_fingerprint=True) == meta


def test_unfinished_write_is_not_silently_reused(root):
    os.remove(os.path.join(root, "metadata.json"))  # as if the writer died before finishing
    with pytest.raises(DatasetFormatError, match="metadata.json"):
        read_metadata(root)
    with pytest.raises(FileExistsError, match="already holds shards"):
        _write(root)
    assert _write(root, overwrite=True).num_images() == 10


# ----------------------------------------------------------------------------- errors


def _rewrite_shard(root: str, shard: str, edit: Callable[[pa.Table], pa.Table]) -> None:
    path = os.path.join(root, shard)
    pq.write_table(edit(pq.read_table(path)), path)


def _set_column(name: str, values: list, type_: pa.DataType) -> Callable[[pa.Table], pa.Table]:
    def edit(table: pa.Table) -> pa.Table:
        index = table.schema.get_field_index(name)
        return table.set_column(index, name, pa.array(values, type_))

    return edit


def _edit_metadata(root: str, edit: Callable[[dict], None]) -> None:
    path = os.path.join(root, "metadata.json")
    with open(path) as f:
        doc = json.load(f)
    edit(doc)
    with open(path, "w") as f:
        json.dump(doc, f)


def _write_text(root: str, name: str, text: str) -> None:
    with open(os.path.join(root, name), "w") as f:
        f.write(text)


SHARD0 = "train/part-00000.parquet"
CORRUPTIONS = {
    "missing column": (
        lambda r: _rewrite_shard(r, SHARD0, lambda t: t.drop_columns(["label"])),
        ["part-00000.parquet", "'label'", "missing", "int32"],
    ),
    "wrong column type": (
        lambda r: _rewrite_shard(r, SHARD0, _set_column("label", [0, 1, 0], pa.int64())),
        ["part-00000.parquet", "'label'", "int64", "int32"],
    ),
    "image stored as string": (
        lambda r: _rewrite_shard(r, SHARD0, _set_column("image", ["a", "b", "c"], pa.string())),
        ["part-00000.parquet", "'image'", "string", "binary"],
    ),
    "extra column": (
        lambda r: _rewrite_shard(r, SHARD0, lambda t: t.append_column("mode", pa.array([0] * 3))),
        ["part-00000.parquet", "'mode'", "unexpected"],
    ),
    "ids not dense": (
        lambda r: _rewrite_shard(r, SHARD0, _set_column("id", [0, 1, 3], pa.int64())),
        ["part-00000.parquet", "'id'", "expected 2"],
    ),
    "ids repeated across shards": (
        lambda r: _rewrite_shard(
            r, "train/part-00001.parquet", _set_column("id", [2, 3, 4], pa.int64())
        ),
        ["part-00001.parquet", "'id'", "expected 3"],
    ),
    "null label": (
        lambda r: _rewrite_shard(r, SHARD0, _set_column("label", [0, None, 0], pa.int32())),
        ["part-00000.parquet", "'label'", "null"],
    ),
    "label outside class table": (
        lambda r: _rewrite_shard(r, SHARD0, _set_column("label", [0, 17, 0], pa.int32())),
        ["part-00000.parquet", "'label'", "17", "class table"],
    ),
    "label outside the split's classes": (
        lambda r: _rewrite_shard(r, SHARD0, _set_column("label", [0, 3, 0], pa.int32())),
        ["part-00000.parquet", "'label'", "split's classes"],
    ),
    "image does not decode": (
        lambda r: _rewrite_shard(r, SHARD0, _set_column("image", [b"x", b"y", b"z"], pa.binary())),
        ["part-00000.parquet", "'image'", "id 0"],
    ),
    "image size differs from row": (
        lambda r: _rewrite_shard(r, SHARD0, _set_column("width", [6, 5, 5], pa.int32())),
        ["part-00000.parquet", "'image'", "6x4"],
    ),
    "missing shard file": (
        lambda r: os.remove(os.path.join(r, "train/part-00001.parquet")),
        ["train/part-00001.parquet", "does not exist"],
    ),
    "shard is not parquet": (
        lambda r: _write_text(r, "train/part-00001.parquet", "not parquet"),
        ["train/part-00001.parquet", "Parquet"],
    ),
    "metadata not JSON": (
        lambda r: _write_text(r, "metadata.json", '{"format_version": 1,'),
        ["metadata.json", "not valid JSON"],
    ),
    "metadata field missing": (
        lambda r: _edit_metadata(r, lambda d: d.pop("fingerprint")),
        ["metadata.json", "missing field 'fingerprint'"],
    ),
    "metadata field of wrong type": (
        lambda r: _edit_metadata(r, lambda d: d["splits"]["train"].update(num_images="7")),
        ["metadata.json", "'splits.train.num_images'", "int", "str"],
    ),
    "metadata unknown field": (
        lambda r: _edit_metadata(r, lambda d: d.update(version=2)),
        ["metadata.json", "unexpected field 'version'"],
    ),
    "metadata wrong version": (
        lambda r: _edit_metadata(r, lambda d: d.update(format_version=2)),
        ["metadata.json", "'format_version'", "2"],
    ),
    "split class outside class_names": (
        lambda r: _edit_metadata(r, lambda d: d["splits"]["test"]["classes"].append(9)),
        ["metadata.json", "'splits.test.classes'", "9"],
    ),
    "split class without rows": (
        lambda r: _edit_metadata(r, lambda d: d["splits"]["test"].update(classes=[1, 2, 3])),
        ["metadata.json", "'splits.test.classes'", "[1]"],
    ),
    "shard count mismatch": (
        lambda r: _edit_metadata(r, lambda d: d["splits"]["train"].update(num_shards=4)),
        ["metadata.json", "'splits.train.num_shards'", "4", "3"],
    ),
    "num_images mismatch": (
        lambda r: _edit_metadata(r, lambda d: d["splits"]["train"].update(num_images=8)),
        ["metadata.json", "'splits.train.num_images'", "8", "7 rows"],
    ),
    "fewer images than rows": (
        lambda r: _edit_metadata(r, lambda d: d["splits"]["train"].update(num_images=5)),
        ["part-00001.parquet", "'splits.train.num_images'", "5"],
    ),
    "shard path outside layout": (
        lambda r: _edit_metadata(r, lambda d: d["splits"]["test"].update(shards=["../x.parquet"])),
        ["metadata.json", "'splits.test.shards[0]'", "test/part-00000.parquet"],
    ),
    "fingerprint does not match rows": (
        lambda r: _edit_metadata(r, lambda d: d.update(fingerprint="0" * 64)),
        ["metadata.json", "'fingerprint'", "does not match"],
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_errors_name_the_file_and_the_column_or_field(root, case):
    corrupt, fragments = CORRUPTIONS[case]
    validate_dataset(root, check_images=True, check_fingerprint=True)
    corrupt(root)
    with pytest.raises(DatasetFormatError) as caught:
        validate_dataset(root, check_images=True, check_fingerprint=True)
    for fragment in fragments:
        assert fragment in str(caught.value), (fragment, str(caught.value))


def test_read_split_validates_too(root):
    _rewrite_shard(root, SHARD0, _set_column("label", [0, 1, 0], pa.int64()))
    with pytest.raises(DatasetFormatError, match=r"part-00000\.parquet: column 'label' has type"):
        read_split(root, "train", columns=["id"])
    assert read_split(root, "test").num_rows == 3  # the other split is fine


def test_validate_shard_alone(root):
    path = os.path.join(root, SHARD0)
    _rewrite_shard(root, SHARD0, _set_column("width", [5, 5, 5], pa.int64()))
    with pytest.raises(DatasetFormatError, match=r"part-00000\.parquet: column 'width'.*int64"):
        validate_shard(path)
    with pytest.raises(DatasetFormatError, match="does not exist"):
        validate_shard(os.path.join(root, "train/part-00009.parquet"))


def test_missing_root_names_metadata_file(tmp_path):
    with pytest.raises(DatasetFormatError, match=r"nowhere/metadata\.json: no such file"):
        read_metadata(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    ("train", "fragments"),
    [
        (_records([0, 4]), ["split 'train'", "'label'", "4"]),
        ([{"label": 0, "image": b"x", "width": 5}], ["split 'train'", "record 0", "'height'"]),
        (
            [{"label": 0, "image": b"x", "width": 5, "height": 4, "mode": 1}],
            ["split 'train'", "'mode'"],
        ),
        ([{"id": 3, "label": 0, "image": b"x", "width": 5, "height": 4}], ["'id'", "expected 0"]),
        ([], ["split 'train'", "no rows"]),
    ],
)
def test_write_rejects_bad_rows(tmp_path, train, fragments):
    with pytest.raises(DatasetFormatError) as caught:
        _write(str(tmp_path / "bad"), train=train)
    for fragment in fragments:
        assert fragment in str(caught.value), (fragment, str(caught.value))
    assert not os.path.exists(tmp_path / "bad" / "metadata.json")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_format": "gif"}, "image_format"),
        ({"class_names": ["a", "a"]}, "repeats 'a'"),
        ({"shard_size": 0}, "shard_size"),
        ({"extra": {"spec": object()}}, "JSON"),
        ({"name": ""}, "name"),
    ],
)
def test_write_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _write(str(tmp_path / "bad"), **kwargs)
