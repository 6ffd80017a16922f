"""The one on-disk dataset format: Parquet shards of encoded images plus a metadata.json.

Every dataset the pipeline reads (the built-in synthetic one; converters for CUB, Cars196, SOP,
In-Shop, image folders) is written in exactly this layout, specified in docs/dataset_format.md.
All IO goes through `pyarrow.fs`, so a root is a local path or any URI pyarrow understands
(`s3://bucket/prefix` gets the endpoint and retries of `pipeline.storage`). No Ray here: the driver, tests and converters
use this module without a cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import posixpath
import re
import struct
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.storage import filesystem_for

FORMAT_VERSION = 1
"""The `format_version` this module writes and reads."""
METADATA_FILE = "metadata.json"
"""Name of the metadata file at the dataset root."""
IMAGE_FORMATS = ("png", "jpeg")
"""Allowed values of `image_format`: how the `image` bytes are encoded."""
STANDARD_SPLITS = ("train", "test", "query", "gallery")
"""Split names the pipeline knows; other lower-case names are allowed but unused."""
DEFAULT_SHARD_SIZE = 1000
"""Rows per shard: small enough that Ray Data reads a split with several tasks."""
STAGING_PREFIX = ".overwrite-"
"""Name prefix of the folder inside a root where a dataset replacing it is written first."""

IMAGE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("label", pa.int32()),
        pa.field("image", pa.binary()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
)
"""The exact schema of every shard: one row per image."""

_SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_SHARD_FILE = re.compile(r"^part-\d{5}\.parquet$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_ROW_HEADER = struct.Struct("<qiiiq")  # id, label, width, height, len(image)


class DatasetFormatError(ValueError):
    """A dataset (or data about to be written) does not follow the format."""


@dataclass(frozen=True)
class EvaluationProtocol:
    """How a dataset is evaluated: metadata.json's optional `evaluation` object."""

    recall_ks: tuple[int, ...]
    """K values of Recall@K the field reports for this dataset (SOP: 1, 10, 100, 1000)."""
    query_split: str | None = None
    """With gallery_split: queries come from this split (In-Shop: "query")."""
    gallery_split: str | None = None
    """With query_split: queries are ranked against this split (In-Shop: "gallery")."""

    def to_dict(self) -> dict[str, Any]:
        """The `evaluation` object of metadata.json (split fields only when set)."""
        doc: dict[str, Any] = {"recall_ks": list(self.recall_ks)}
        if self.query_split is not None:
            doc.update(query_split=self.query_split, gallery_split=self.gallery_split)
        return doc


@dataclass(frozen=True)
class SplitInfo:
    """What metadata.json records about one split."""

    num_images: int
    """Rows in the split; ids run 0..num_images-1."""
    classes: tuple[int, ...]
    """Sorted labels present in the split (global indices into `class_names`)."""
    shards: tuple[str, ...]
    """Shard paths relative to the root, in id order: `<split>/part-00000.parquet`, ..."""

    @property
    def num_shards(self) -> int:
        """Number of shard files."""
        return len(self.shards)


@dataclass(frozen=True)
class DatasetMetadata:
    """The parsed metadata.json of a dataset."""

    name: str
    """Short dataset name, e.g. "synthetic" or "cub200"."""
    source: str
    """Where the data came from (free text): "synthetic", "CUB_200_2011", ..."""
    image_format: str
    """Encoding of the `image` column: "png" or "jpeg"."""
    class_names: tuple[str, ...]
    """The global class table: `label` i names class_names[i]."""
    splits: dict[str, SplitInfo]
    """Split name -> its SplitInfo."""
    fingerprint: str
    """sha256 hex of the rows' content (see docs/dataset_format.md)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free JSON data: generator parameters, evaluation protocol, ..."""
    format_version: int = FORMAT_VERSION
    """Version of this format."""
    evaluation: EvaluationProtocol | None = None
    """The dataset's evaluation protocol, when its writer recorded one (optional)."""

    def split(self, name: str) -> SplitInfo:
        """The SplitInfo of split `name`; KeyError naming the splits there are."""
        if name not in self.splits:
            raise KeyError(
                f"dataset {self.name!r} has no split {name!r} (has {sorted(self.splits)})"
            )
        return self.splits[name]

    def num_classes(self, split: str | None = None) -> int:
        """Classes in the whole class table, or present in `split`."""
        return len(self.class_names) if split is None else len(self.split(split).classes)

    def num_images(self, split: str | None = None) -> int:
        """Images in `split`, or in all splits together."""
        if split is not None:
            return self.split(split).num_images
        return sum(info.num_images for info in self.splits.values())

    def to_json(self) -> str:
        """The metadata.json text."""
        splits = {
            name: {
                "num_images": info.num_images,
                "classes": list(info.classes),
                "shards": list(info.shards),
                "num_shards": info.num_shards,
            }
            for name, info in sorted(self.splits.items())
        }
        doc = {
            "format_version": self.format_version,
            "name": self.name,
            "source": self.source,
            "image_format": self.image_format,
            "class_names": list(self.class_names),
            "splits": splits,
            "fingerprint": self.fingerprint,
            "extra": self.extra,
        }
        if self.evaluation is not None:  # absent, not null: older files stay as they were
            doc["evaluation"] = self.evaluation.to_dict()
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = METADATA_FILE) -> DatasetMetadata:
        """Parse and check metadata.json text; errors name `where` and the field."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetFormatError(f"{where}: not valid JSON ({err})") from err
        return _parse_metadata(doc, where)


# ----------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class _Location:
    """A root resolved to a filesystem, a path inside it, and how to spell URIs again."""

    fs: pafs.FileSystem
    path: str
    scheme: str  # "" for a plain local path, else e.g. "s3://"

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def uri(self, path: str) -> str:
        return self.scheme + path


def _locate(root: str | os.PathLike[str]) -> _Location:
    root = os.fspath(root)
    # s3:// gets the configured endpoint and retries; relative local paths are made absolute.
    fs, path = filesystem_for(root)
    scheme = root.split("://", 1)[0] + "://" if "://" in root else ""
    return _Location(fs, path.rstrip("/") or "/", scheme)


def root_filesystem(root: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it of a dataset root (local path or URI)."""
    loc = _locate(root)
    return loc.fs, loc.path


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


# ----------------------------------------------------------------------------- metadata


def _get(obj: Mapping[str, Any], key: str, kind: type, where: str, name: str) -> Any:
    """obj[key] checked to be a `kind` (bools are not ints here)."""
    if key not in obj:
        raise DatasetFormatError(f"{where}: missing field '{name}'")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DatasetFormatError(
            f"{where}: field '{name}' must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _reject_unknown(
    obj: Mapping[str, Any], known: tuple[str, ...], where: str, prefix: str
) -> None:
    for key in obj:
        if key not in known:
            raise DatasetFormatError(f"{where}: unexpected field '{prefix}{key}'")


_METADATA_KEYS = (
    "format_version", "name", "source", "image_format", "class_names", "splits",
    "fingerprint", "extra", "evaluation",
)  # fmt: skip
_SPLIT_KEYS = ("num_images", "classes", "shards", "num_shards")
_EVALUATION_KEYS = ("recall_ks", "query_split", "gallery_split")


def _parse_metadata(doc: Any, where: str) -> DatasetMetadata:
    if not isinstance(doc, dict):
        raise DatasetFormatError(f"{where}: must hold a JSON object, got {type(doc).__name__}")
    _reject_unknown(doc, _METADATA_KEYS, where, "")
    version = _get(doc, "format_version", int, where, "format_version")
    if version != FORMAT_VERSION:
        raise DatasetFormatError(
            f"{where}: field 'format_version' is {version}; this reader knows {FORMAT_VERSION}"
        )
    name = _get(doc, "name", str, where, "name")
    if not name:
        raise DatasetFormatError(f"{where}: field 'name' is empty")
    source = _get(doc, "source", str, where, "source")
    image_format = _get(doc, "image_format", str, where, "image_format")
    if image_format not in IMAGE_FORMATS:
        raise DatasetFormatError(
            f"{where}: field 'image_format' is {image_format!r}, expected one of {IMAGE_FORMATS}"
        )
    class_names = _get(doc, "class_names", list, where, "class_names")
    _check_class_names(class_names, where)
    raw_splits = _get(doc, "splits", dict, where, "splits")
    if not raw_splits:
        raise DatasetFormatError(f"{where}: field 'splits' is empty")
    splits = {
        split: _parse_split(raw, split, len(class_names), where)
        for split, raw in raw_splits.items()
    }
    fingerprint = _get(doc, "fingerprint", str, where, "fingerprint")
    if not _FINGERPRINT.match(fingerprint):
        raise DatasetFormatError(f"{where}: field 'fingerprint' is not 64 lower-case hex digits")
    extra = _get(doc, "extra", dict, where, "extra")
    evaluation = None
    if "evaluation" in doc:
        raw = _get(doc, "evaluation", dict, where, "evaluation")
        _reject_unknown(raw, _EVALUATION_KEYS, where, "evaluation.")
        evaluation = EvaluationProtocol(
            recall_ks=tuple(_get(raw, "recall_ks", list, where, "evaluation.recall_ks")),
            query_split=raw.get("query_split"),
            gallery_split=raw.get("gallery_split"),
        )
        try:
            _check_evaluation(evaluation, splits)
        except ValueError as err:
            raise DatasetFormatError(f"{where}: {err}") from err
    return DatasetMetadata(
        name=name,
        source=source,
        image_format=image_format,
        class_names=tuple(class_names),
        splits=splits,
        fingerprint=fingerprint,
        extra=extra,
        format_version=version,
        evaluation=evaluation,
    )


def _check_evaluation(evaluation: EvaluationProtocol, splits: Iterable[str]) -> None:
    """ValueError naming the `evaluation.*` field that is wrong."""
    ks = evaluation.recall_ks
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(
            f"field 'evaluation.recall_ks' must be a non-empty list of ints >= 1, got {list(ks)}"
        )
    named = (evaluation.query_split, evaluation.gallery_split)
    if (named[0] is None) != (named[1] is None):
        raise ValueError(
            "fields 'evaluation.query_split' and 'evaluation.gallery_split' go together"
        )
    for key, split in zip(("query_split", "gallery_split"), named, strict=True):
        if split is not None and (not isinstance(split, str) or split not in splits):
            raise ValueError(
                f"field 'evaluation.{key}' is {split!r}, not one of the splits {sorted(splits)}"
            )


def _check_class_names(class_names: list[Any], where: str) -> None:
    if not class_names:
        raise DatasetFormatError(f"{where}: field 'class_names' is empty")
    seen: set[str] = set()
    for i, class_name in enumerate(class_names):
        if not isinstance(class_name, str):
            raise DatasetFormatError(
                f"{where}: field 'class_names[{i}]' must be str, got {type(class_name).__name__}"
            )
        if class_name in seen:
            raise DatasetFormatError(f"{where}: field 'class_names' repeats {class_name!r}")
        seen.add(class_name)


def _parse_split(raw: Any, split: str, num_classes: int, where: str) -> SplitInfo:
    prefix = f"splits.{split}"
    if not _SPLIT_NAME.match(split):
        raise DatasetFormatError(f"{where}: split name '{split}' must match {_SPLIT_NAME.pattern}")
    if not isinstance(raw, dict):
        raise DatasetFormatError(
            f"{where}: field '{prefix}' must be dict, got {type(raw).__name__}"
        )
    _reject_unknown(raw, _SPLIT_KEYS, where, prefix + ".")
    num_images = _get(raw, "num_images", int, where, f"{prefix}.num_images")
    if num_images <= 0:
        raise DatasetFormatError(f"{where}: field '{prefix}.num_images' must be > 0")
    classes = _get(raw, "classes", list, where, f"{prefix}.classes")
    for i, label in enumerate(classes):
        if not isinstance(label, int) or isinstance(label, bool):
            raise DatasetFormatError(f"{where}: field '{prefix}.classes[{i}]' must be int")
        if not 0 <= label < num_classes:
            raise DatasetFormatError(
                f"{where}: field '{prefix}.classes' holds label {label}, outside class_names "
                f"(0..{num_classes - 1})"
            )
    if not classes or any(a >= b for a, b in itertools.pairwise(classes)):
        raise DatasetFormatError(
            f"{where}: field '{prefix}.classes' must be a non-empty, strictly ascending list"
        )
    shards = _get(raw, "shards", list, where, f"{prefix}.shards")
    for i, shard in enumerate(shards):
        if not isinstance(shard, str) or shard != _shard_name(split, i):
            raise DatasetFormatError(
                f"{where}: field '{prefix}.shards[{i}]' is {shard!r}, expected "
                f"{_shard_name(split, i)!r}"
            )
    num_shards = _get(raw, "num_shards", int, where, f"{prefix}.num_shards")
    if not shards:
        raise DatasetFormatError(f"{where}: field '{prefix}.shards' is empty")
    if num_shards != len(shards):
        raise DatasetFormatError(
            f"{where}: field '{prefix}.num_shards' is {num_shards} but '{prefix}.shards' lists "
            f"{len(shards)}"
        )
    return SplitInfo(num_images=num_images, classes=tuple(classes), shards=tuple(shards))


def _shard_name(split: str, index: int) -> str:
    return f"{split}/part-{index:05d}.parquet"


def read_metadata(root: str | os.PathLike[str]) -> DatasetMetadata:
    """Read and check `<root>/metadata.json` (not the shards: see `validate_dataset`)."""
    loc = _locate(root)
    path = loc.join(METADATA_FILE)
    where = loc.uri(path)
    try:
        with loc.fs.open_input_stream(path) as stream:
            raw = stream.read()
    except (FileNotFoundError, NotADirectoryError) as err:  # (the root itself may be a file)
        raise DatasetFormatError(f"{where}: no such file (not a dataset root?)") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetFormatError(f"{where}: not UTF-8 text ({err})") from err
    return DatasetMetadata.from_json(text, where)


# ----------------------------------------------------------------------------- row checks


def _check_schema(schema: pa.Schema, where: str) -> None:
    for expected in IMAGE_SCHEMA:
        indices = schema.get_all_field_indices(expected.name)
        if not indices:
            raise DatasetFormatError(
                f"{where}: column '{expected.name}' is missing (expected {expected.type})"
            )
        if len(indices) > 1:
            raise DatasetFormatError(
                f"{where}: column '{expected.name}' appears {len(indices)} times"
            )
        actual = schema.field(indices[0]).type
        if actual != expected.type:
            raise DatasetFormatError(
                f"{where}: column '{expected.name}' has type {actual}, expected {expected.type}"
            )
    for name in schema.names:
        if name not in IMAGE_SCHEMA.names:
            raise DatasetFormatError(
                f"{where}: unexpected column '{name}' (the schema is exactly {IMAGE_SCHEMA.names})"
            )


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _check_rows(
    table: pa.Table,
    where: str,
    *,
    first_id: int | None = None,
    num_classes: int | None = None,
    split_classes: Iterable[int] | None = None,
) -> None:
    """Row checks shared by writing, `validate_shard` and reading a split.

    first_id: when given, ids must be exactly first_id, first_id+1, ... (the split's shards
    hold consecutive id ranges in order); otherwise they need only be ascending and >= 0.
    """
    for name in table.column_names:
        nulls = table.column(name).null_count
        if nulls:
            raise DatasetFormatError(f"{where}: column '{name}' has {nulls} null values")
    ids = table.column("id").to_numpy()
    if first_id is not None:
        expected = np.arange(first_id, first_id + len(ids))
        if not np.array_equal(ids, expected):
            row = _first(ids != expected)
            raise DatasetFormatError(
                f"{where}: column 'id' holds {ids[row]} at row {row}, expected {expected[row]} "
                "(ids run 0..N-1 through the split's shards in order)"
            )
    elif len(ids) and (ids[0] < 0 or np.any(np.diff(ids) <= 0)):
        raise DatasetFormatError(f"{where}: column 'id' is not strictly ascending from >= 0")
    labels = table.column("label").to_numpy()
    limit = np.iinfo(np.int32).max if num_classes is None else num_classes
    bad = (labels < 0) | (labels >= limit)
    if bad.any():
        raise DatasetFormatError(
            f"{where}: column 'label' holds {labels[_first(bad)]}, outside the class table "
            f"(0..{limit - 1})"
        )
    if split_classes is not None:
        bad = ~np.isin(labels, np.asarray(list(split_classes)))
        if bad.any():
            raise DatasetFormatError(
                f"{where}: column 'label' holds {labels[_first(bad)]}, which is not among the "
                "split's classes in metadata.json"
            )
    for name in ("width", "height"):
        sizes = table.column(name).to_numpy()
        if len(sizes) and sizes.min() <= 0:
            raise DatasetFormatError(f"{where}: column '{name}' holds {sizes.min()}, must be > 0")


def _check_images(table: pa.Table, where: str, image_format: str) -> None:
    """Decode each image's header: the encoding and size must match the row."""
    from PIL import Image  # only this optional check needs Pillow

    pil_name = {"png": "PNG", "jpeg": "JPEG"}[image_format]
    rows = zip(
        table.column("id").to_pylist(),
        table.column("image").to_pylist(),
        table.column("width").to_pylist(),
        table.column("height").to_pylist(),
        strict=True,
    )
    for image_id, data, width, height in rows:
        try:
            with Image.open(io.BytesIO(data)) as image:
                found, size = image.format, image.size
        except Exception as err:  # Pillow raises many types for bad bytes
            raise DatasetFormatError(
                f"{where}: column 'image' of id {image_id} does not decode ({err})"
            ) from err
        if found != pil_name or size != (width, height):
            raise DatasetFormatError(
                f"{where}: column 'image' of id {image_id} is {found} {size[0]}x{size[1]}, the row "
                f"says {pil_name} {width}x{height}"
            )


def _read_shard(loc: _Location, path: str, columns: list[str] | None) -> pa.Table:
    where = loc.uri(path)
    if not _exists(loc.fs, path):
        raise DatasetFormatError(f"{where}: shard file does not exist")
    try:
        with loc.fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            schema = parquet.schema_arrow
            _check_schema(schema, where)
            return parquet.read(columns=columns)
    except (pa.ArrowException, OSError) as err:
        raise DatasetFormatError(f"{where}: cannot read as Parquet ({err})") from err


def validate_shard(path_or_uri: str | os.PathLike[str], *, num_classes: int | None = None) -> int:
    """Check one shard file on its own: schema, no nulls, ids ascending, labels in range.

    Returns its number of rows. Checks that need the whole split (ids dense across shards,
    counts against metadata.json) are done by `validate_dataset`.
    """
    loc = _locate(path_or_uri)
    table = _read_shard(loc, loc.path, ["id", "label", "width", "height"])
    _check_rows(table, loc.uri(loc.path), num_classes=num_classes)
    return table.num_rows


# ----------------------------------------------------------------------------- reading


def shard_uris(root: str | os.PathLike[str], split: str) -> list[str]:
    """Full paths/URIs of a split's shards, in id order (e.g. for `ray.data.read_parquet`)."""
    loc = _locate(root)
    info = read_metadata(root).split(split)
    return [loc.uri(loc.join(shard)) for shard in info.shards]


def _iter_split(
    loc: _Location,
    meta: DatasetMetadata,
    split: str,
    columns: list[str],
    check_images: bool = False,
) -> Iterator[pa.Table]:
    """Yield a split's shards, each checked, then check the split as a whole."""
    info = meta.split(split)
    meta_where = loc.uri(loc.join(METADATA_FILE))
    # The small columns are always read, so every read checks the same things.
    needed = list(dict.fromkeys(["id", "label", "width", "height", *columns]))
    next_id, seen = 0, set()
    for shard in info.shards:
        path = loc.join(shard)
        table = _read_shard(loc, path, needed)
        where = loc.uri(path)
        _check_rows(
            table,
            where,
            first_id=next_id,
            num_classes=meta.num_classes(),
            split_classes=info.classes,
        )
        if check_images:
            _check_images(table, where, meta.image_format)
        next_id += table.num_rows
        if next_id > info.num_images:
            raise DatasetFormatError(
                f"{where}: ids reach {next_id - 1}, beyond field 'splits.{split}.num_images' = "
                f"{info.num_images} of {meta_where}"
            )
        seen.update(np.unique(table.column("label").to_numpy()).tolist())
        yield table
    if next_id != info.num_images:
        raise DatasetFormatError(
            f"{meta_where}: field 'splits.{split}.num_images' is {info.num_images}, the shards hold "
            f"{next_id} rows"
        )
    unused = sorted(set(info.classes) - seen)
    if unused:
        raise DatasetFormatError(
            f"{meta_where}: field 'splits.{split}.classes' lists {unused[:5]} but no row of the "
            "split has that label"
        )


def read_split(
    root: str | os.PathLike[str], split: str, columns: list[str] | None = None
) -> pa.Table:
    """Read a whole split into memory, validated (for small datasets, tests and the driver)."""
    loc = _locate(root)
    meta = read_metadata(root)
    columns = list(IMAGE_SCHEMA.names) if columns is None else list(columns)
    for name in columns:
        if name not in IMAGE_SCHEMA.names:
            raise ValueError(f"no column {name!r}; the columns are {IMAGE_SCHEMA.names}")
    tables = list(_iter_split(loc, meta, split, columns))
    return pa.concat_tables(tables).select(columns)


def validate_dataset(
    root: str | os.PathLike[str], *, check_images: bool = False, check_fingerprint: bool = False
) -> DatasetMetadata:
    """Check metadata.json and every shard against it; returns the metadata.

    check_images decodes every image header (format and size); check_fingerprint rehashes
    the rows. Both read the image bytes, so they cost a full pass over the data.
    """
    loc = _locate(root)
    meta = read_metadata(root)
    columns = ["width", "height"]
    if check_images or check_fingerprint:
        columns.append("image")
    digests = {}
    for split in meta.splits:
        digest = hashlib.sha256()
        for table in _iter_split(loc, meta, split, columns, check_images):
            if check_fingerprint:
                _hash_rows(digest, table)
        digests[split] = digest.hexdigest()
    if check_fingerprint and _combine_digests(digests) != meta.fingerprint:
        raise DatasetFormatError(
            f"{loc.uri(loc.join(METADATA_FILE))}: field 'fingerprint' does not match the rows "
            f"(they hash to {_combine_digests(digests)})"
        )
    return meta


# ----------------------------------------------------------------------------- fingerprint


def _hash_rows(digest: Any, table: pa.Table) -> None:
    """Feed rows, in id order, to a split's sha256: fixed-width header then the image bytes."""
    rows = zip(
        table.column("id").to_pylist(),
        table.column("label").to_pylist(),
        table.column("width").to_pylist(),
        table.column("height").to_pylist(),
        table.column("image").to_pylist(),
        strict=True,
    )
    for image_id, label, width, height, data in rows:
        digest.update(_ROW_HEADER.pack(image_id, label, width, height, len(data)))
        digest.update(data)


def _combine_digests(split_digests: Mapping[str, str]) -> str:
    """The dataset fingerprint: sha256 of "<split>:<split sha256>\\n" lines, splits sorted."""
    lines = "".join(f"{split}:{split_digests[split]}\n" for split in sorted(split_digests))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- writing

Record = Mapping[str, Any]
"""One image to write: label, image, width, height, and optionally id (its position)."""


def _record_tables(
    rows: Iterable[Record] | pa.Table, shard_size: int, where: str
) -> Iterator[pa.Table]:
    """Cut a table or a stream of records into shard-sized tables of IMAGE_SCHEMA."""
    if isinstance(rows, pa.Table):
        for offset in range(0, rows.num_rows, shard_size):
            yield _conform(rows.slice(offset, shard_size), offset, where)
        return
    buffer: list[Record] = []
    offset = 0
    for record in rows:
        buffer.append(record)
        if len(buffer) == shard_size:
            yield _records_to_table(buffer, offset, where)
            offset += len(buffer)
            buffer = []
    if buffer:
        yield _records_to_table(buffer, offset, where)


def _records_to_table(records: list[Record], offset: int, where: str) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in IMAGE_SCHEMA.names}
    for position, record in enumerate(records, start=offset):
        for key in record:
            if key not in columns:
                raise DatasetFormatError(f"{where}: record {position} has unknown key '{key}'")
        columns["id"].append(record.get("id", position))
        for name in ("label", "image", "width", "height"):
            if name not in record:
                raise DatasetFormatError(f"{where}: record {position} has no '{name}'")
            columns[name].append(record[name])
    try:
        return pa.Table.from_pydict(columns, schema=IMAGE_SCHEMA)
    except (pa.ArrowException, TypeError, OverflowError) as err:
        raise DatasetFormatError(
            f"{where}: records {offset}..{offset + len(records) - 1} do not fit {IMAGE_SCHEMA} "
            f"({err})"
        ) from err


def _conform(table: pa.Table, offset: int, where: str) -> pa.Table:
    """A user table in IMAGE_SCHEMA: ids added when absent, safe casts only."""
    if "id" not in table.column_names:
        table = table.append_column("id", pa.array(np.arange(offset, offset + table.num_rows)))
    for name in table.column_names:
        if name not in IMAGE_SCHEMA.names:
            raise DatasetFormatError(f"{where}: unexpected column '{name}'")
    for expected in IMAGE_SCHEMA:
        if expected.name not in table.column_names:
            raise DatasetFormatError(f"{where}: column '{expected.name}' is missing")
    try:
        return table.select(IMAGE_SCHEMA.names).cast(IMAGE_SCHEMA)
    except (pa.ArrowException, ValueError) as err:
        raise DatasetFormatError(f"{where}: table does not cast to {IMAGE_SCHEMA} ({err})") from err


def _replaced_splits(loc: _Location, splits: Iterable[str], overwrite: bool) -> set[str] | None:
    """The splits whose shards a write to `loc` replaces, or None when the root holds no dataset
    and no shards. Refuses to clobber anything unless `overwrite` (nothing is changed here)."""
    meta_path = loc.join(METADATA_FILE)
    replaced: set[str] = set()
    holds_dataset = _exists(loc.fs, meta_path)
    if holds_dataset:
        if not overwrite:
            raise FileExistsError(
                f"{loc.uri(meta_path)}: a dataset already exists here; pass overwrite=True to "
                "replace it"
            )
        try:
            replaced = set(read_metadata(loc.uri(loc.path)).splits)
        except DatasetFormatError:
            pass  # a broken old dataset: replace what the new splits' directories hold
    for split in sorted(set(splits) | replaced):
        if _shard_paths(loc, split):
            if not overwrite:
                raise FileExistsError(
                    f"{loc.uri(loc.join(split))}: already holds shards (an unfinished earlier "
                    "write?); pass overwrite=True to replace them"
                )
            replaced.add(split)
    return replaced if holds_dataset or replaced else None


def _shard_paths(loc: _Location, split: str) -> list[str]:
    """The shard files in a split's directory (none when it is missing)."""
    selector = pafs.FileSelector(loc.join(split), allow_not_found=True)
    return [
        info.path for info in loc.fs.get_file_info(selector)
        if _SHARD_FILE.match(posixpath.basename(info.path))
    ]  # fmt: skip


def _swap_in(loc: _Location, staged: _Location, meta: DatasetMetadata, replaced: set[str]) -> None:
    """Replace the dataset at `loc` with the complete one written to `staged` (inside it).

    metadata.json goes first, so that a failure part-way leaves a root nothing reads; then the
    old shards; then the new shards move into place (a rename on a local disk, a copy inside
    the store on S3, whose objects cannot be renamed); metadata.json last. Any other staging
    folder there is a killed earlier replacement's, and goes too.
    """
    if _exists(loc.fs, loc.join(METADATA_FILE)):
        loc.fs.delete_file(loc.join(METADATA_FILE))  # fails with the old dataset still whole
    try:
        for split in sorted(replaced | set(meta.splits)):
            for path in _shard_paths(loc, split):
                loc.fs.delete_file(path)
        local = isinstance(loc.fs, pafs.LocalFileSystem)
        for split, info in sorted(meta.splits.items()):
            loc.fs.create_dir(loc.join(split), recursive=True)
            for shard in info.shards:
                (loc.fs.move if local else loc.fs.copy_file)(staged.join(shard), loc.join(shard))
        with loc.fs.open_output_stream(loc.join(METADATA_FILE)) as stream:
            stream.write(meta.to_json().encode("utf-8"))
    except (OSError, pa.ArrowException) as err:
        raise OSError(
            f"{loc.uri(loc.path)}: replacing the dataset failed part-way ({err}). The old dataset "
            f"is gone and the root has no {METADATA_FILE}, so nothing reads it; write it again"
        ) from err
    for info in loc.fs.get_file_info(pafs.FileSelector(loc.path)):
        if info.type == pafs.FileType.Directory and posixpath.basename(info.path).startswith(
            STAGING_PREFIX
        ):
            try:
                loc.fs.delete_dir(info.path)
            except (OSError, pa.ArrowException) as err:  # the new dataset is in place: not fatal
                warnings.warn(
                    f"{loc.uri(info.path)}: could not remove this staging folder ({err})",
                    stacklevel=3,
                )


def _check_write_args(
    name: str, class_names: list[str], splits: Mapping[str, Any], image_format: str,
    shard_size: int, extra: dict[str, Any],
) -> None:  # fmt: skip
    if not name:
        raise ValueError("name must be a non-empty string")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    _check_class_names(class_names, "class_names")
    if not splits:
        raise ValueError("splits is empty: a dataset has at least one split")
    for split in splits:
        if not isinstance(split, str) or not _SPLIT_NAME.match(split):
            raise ValueError(f"split name {split!r} must match {_SPLIT_NAME.pattern}")
    if not isinstance(shard_size, int) or shard_size <= 0:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as err:
        raise ValueError(f"extra must be JSON-serialisable ({err})") from err


def write_dataset(
    root: str | os.PathLike[str],
    *,
    name: str,
    source: str,
    class_names: Iterable[str],
    splits: Mapping[str, Iterable[Record] | pa.Table],
    image_format: str,
    shard_size: int = DEFAULT_SHARD_SIZE,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    evaluation: EvaluationProtocol | None = None,
) -> DatasetMetadata:
    """Write a dataset: each split's shards, then metadata.json with the fingerprint.

    A split is a pa.Table or an iterable of records (dicts with label, image, width, height and
    optionally id); records are streamed, so a split need not fit in memory. Ids are the row's
    position in its split. Refuses a root that already holds a dataset unless overwrite=True;
    with it, the new dataset is written whole into a staging folder inside the root
    (`STAGING_PREFIX` + a token) and only then swapped in, so a failed write leaves the old one
    intact. metadata.json is written last: a root without it is an unfinished write.
    `evaluation` records the dataset's evaluation protocol (optional).
    """
    loc = _locate(root)
    class_names = list(class_names)
    extra = dict(extra or {})
    _check_write_args(name, class_names, splits, image_format, shard_size, extra)
    if evaluation is not None:
        _check_evaluation(evaluation, splits)
    replaced = _replaced_splits(loc, splits, overwrite)
    if replaced is None:
        return _write_all(
            loc, name, source, class_names, splits, image_format, shard_size, extra, evaluation
        )
    # The old dataset stays whole and readable until the new one is: a write that fails
    # (a corrupt source image, a killed job) leaves it as it was.
    staged = _Location(loc.fs, loc.join(f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"), loc.scheme)
    try:
        meta = _write_all(
            staged, name, source, class_names, splits, image_format, shard_size, extra, evaluation
        )
    except BaseException:
        with contextlib.suppress(OSError, pa.ArrowException):
            staged.fs.delete_dir(staged.path)
        raise
    _swap_in(loc, staged, meta, replaced)
    return meta


def _write_all(
    loc: _Location, name: str, source: str, class_names: list[str],
    splits: Mapping[str, Iterable[Record] | pa.Table], image_format: str, shard_size: int,
    extra: dict[str, Any], evaluation: EvaluationProtocol | None,
) -> DatasetMetadata:  # fmt: skip
    """Write every split's shards into `loc`, then metadata.json."""
    infos, digests = {}, {}
    for split in sorted(splits):
        infos[split], digests[split] = _write_split(
            loc, split, splits[split], len(class_names), shard_size
        )
    meta = DatasetMetadata(
        name=name,
        source=source,
        image_format=image_format,
        class_names=tuple(class_names),
        splits=infos,
        fingerprint=_combine_digests(digests),
        extra=extra,
        evaluation=evaluation,
    )
    with loc.fs.open_output_stream(loc.join(METADATA_FILE)) as stream:
        stream.write(meta.to_json().encode("utf-8"))
    return meta


def _write_split(
    loc: _Location, split: str, rows: Iterable[Record] | pa.Table, num_classes: int,
    shard_size: int,
) -> tuple[SplitInfo, str]:  # fmt: skip
    loc.fs.create_dir(loc.join(split), recursive=True)
    digest = hashlib.sha256()
    shards: list[str] = []
    classes: set[int] = set()
    next_id = 0
    for table in _record_tables(rows, shard_size, f"split '{split}'"):
        shard = _shard_name(split, len(shards))
        where = f"split '{split}' ({shard})"
        _check_rows(table, where, first_id=next_id, num_classes=num_classes)
        pq.write_table(table, loc.join(shard), filesystem=loc.fs)
        _hash_rows(digest, table)
        classes.update(np.unique(table.column("label").to_numpy()).tolist())
        shards.append(shard)
        next_id += table.num_rows
    if next_id == 0:
        raise DatasetFormatError(f"split '{split}' has no rows")
    info = SplitInfo(num_images=next_id, classes=tuple(sorted(classes)), shards=tuple(shards))
    return info, digest.hexdigest()
