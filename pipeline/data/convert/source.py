"""What a layout reader makes of a dataset's released metadata, and how it reads that metadata.

A reader (one module per layout) parses the original annotation files into a `ConversionPlan`:
the class table, each split's images with their labels, the evaluation protocol. It reads
only metadata, never image bytes, so every problem in the annotation files is found before any
Ray work starts. Malformed files raise `SourceLayoutError` naming the file, the line and what
is wrong; an image whose label is outside the class table is set aside as a `SkippedImage`.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from pipeline.data.format import EvaluationProtocol, root_filesystem

RECALL_KS_DEFAULT = (1, 2, 4, 8)
"""Recall@K reported for CUB-200-2011, Cars196 (and used for image folders)."""
RECALL_KS_SOP = (1, 10, 100, 1000)
"""Recall@K reported for Stanford Online Products."""
RECALL_KS_INSHOP = (1, 10, 20, 30, 40, 50)
"""Recall@K reported for In-Shop Clothes Retrieval (queries against the gallery)."""

LABEL_OUTSIDE_CLASS_TABLE = "label outside the class table"
UNREADABLE_FILE = "unreadable file"
CORRUPT_IMAGE = "corrupt image"


class SourceLayoutError(ValueError):
    """A dataset's annotation files do not have the layout of its original release."""


@dataclass(frozen=True)
class SourceImage:
    """One image to convert: where it is, its label and the dataset's own id for it."""

    path: str
    """Path relative to the source root, '/'-separated."""
    label: int
    """Index into the plan's class_names."""
    source_id: str
    """The release's id for the image (CUB/SOP image id, Cars196 annotation number, path)."""


@dataclass(frozen=True)
class SkippedImage:
    """An image left out of the conversion, and why (reported in the conversion summary)."""

    split: str | None
    """The split it was meant for; None when its label decides the split and is unknown."""
    source_id: str
    path: str
    reason: str
    """One of LABEL_OUTSIDE_CLASS_TABLE, UNREADABLE_FILE, CORRUPT_IMAGE."""
    detail: str = ""

    def to_dict(self) -> dict[str, str | None]:
        """JSON form for conversion_summary.json."""
        return {
            "split": self.split, "id": self.source_id, "path": self.path,
            "reason": self.reason, "detail": self.detail,
        }  # fmt: skip


@dataclass
class ConversionPlan:
    """Everything a reader found in the metadata: what to convert into which split."""

    name: str
    """Dataset name written to metadata.json ("cub200", "cars196", ...)."""
    source: str
    """Where the data came from (free text for metadata.json)."""
    class_names: list[str]
    splits: dict[str, list[SourceImage]]
    evaluation: EvaluationProtocol
    extra: dict[str, Any] = field(default_factory=dict)
    skipped: list[SkippedImage] = field(default_factory=list)
    """Images set aside while reading the metadata (label outside the class table)."""

    def check(self, where: str) -> None:
        """A reader's last check, naming its metadata file: class names unique, no split empty
        (write_dataset would refuse either, but only after the images were encoded)."""
        seen: dict[str, int] = {}
        for index, class_name in enumerate(self.class_names):
            if class_name in seen:
                raise SourceLayoutError(
                    f"{where}: class name {class_name!r} is used by two classes "
                    f"(entries {seen[class_name] + 1} and {index + 1})"
                )
            seen[class_name] = index
        for split, images in self.splits.items():
            if not images:
                raise SourceLayoutError(f"{where}: split '{split}' would hold no images")

    @property
    def num_images(self) -> int:
        """Images to encode, all splits together."""
        return sum(len(images) for images in self.splits.values())


class SourceTree:
    """A dataset's source directory (local path or URI), read through pyarrow filesystems."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = os.fspath(root)
        self.fs, self.path = root_filesystem(self.root)

    def uri(self, relative: str) -> str:
        """The path or URI of a file below the root, for messages."""
        return posixpath.join(self.root, relative) if relative else self.root

    def exists(self, relative: str) -> bool:
        """Whether a file or directory exists below the root."""
        info = self.fs.get_file_info(posixpath.join(self.path, relative))
        return info.type != pafs.FileType.NotFound

    def is_dir(self, relative: str) -> bool:
        """Whether `relative` is a directory below the root."""
        info = self.fs.get_file_info(posixpath.join(self.path, relative))
        return info.type == pafs.FileType.Directory

    def read_bytes(self, relative: str) -> bytes:
        """A metadata file's bytes; SourceLayoutError naming it when it is missing."""
        try:
            with self.fs.open_input_stream(posixpath.join(self.path, relative)) as stream:
                return stream.read()
        except FileNotFoundError as err:
            raise SourceLayoutError(f"{self.uri(relative)}: file is missing") from err
        except OSError as err:
            raise SourceLayoutError(f"{self.uri(relative)}: cannot be read ({err})") from err

    def files_below(self, relative: str) -> list[str]:
        """Every file below a directory, as paths relative to the root, sorted."""
        base = posixpath.join(self.path, relative) if relative else self.path
        selector = pafs.FileSelector(base, recursive=True)
        infos = self.fs.get_file_info(selector)
        found = [
            posixpath.relpath(info.path, self.path)
            for info in infos
            if info.type == pafs.FileType.File
        ]
        return sorted(found)

    def require_dir(self, relative: str, what: str = "") -> None:
        """SourceLayoutError unless `relative` is a directory (checked before any Ray work); it
        says whether the path is missing or a file."""
        # (no trailing "/" for the root: a local file named "x/" is not found)
        info = self.fs.get_file_info(posixpath.join(self.path, relative) if relative else self.path)
        if info.type == pafs.FileType.Directory:
            return
        problem = "a file, not a directory" if info.type == pafs.FileType.File else "directory is missing"
        raise SourceLayoutError(f"{self.uri(relative)}: {problem}" + (f" ({what})" if what else ""))


def text_rows(
    tree: SourceTree, relative: str, num_columns: int, *, skip_lines: int = 0
) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line of a whitespace-separated text file,
    after `skip_lines` header lines; another number of fields raises SourceLayoutError."""
    where = tree.uri(relative)
    try:
        text = tree.read_bytes(relative).decode("utf-8")
    except UnicodeDecodeError as err:
        raise SourceLayoutError(f"{where}: not UTF-8 text ({err})") from err
    for number, line in enumerate(text.splitlines(), start=1):
        if number <= skip_lines or not line.strip():
            continue
        fields = line.split()
        if len(fields) != num_columns:
            raise SourceLayoutError(
                f"{where}, line {number}: expected {num_columns} columns, found {len(fields)} "
                f"({line.strip()!r})"
            )
        yield number, fields


def parse_int(text: str, where: str, line: int, column: str) -> int:
    """int(text), or SourceLayoutError naming the file, line and column."""
    try:
        return int(text)
    except ValueError as err:
        raise SourceLayoutError(
            f"{where}, line {line}: column '{column}' must be an integer, found {text!r}"
        ) from err


def first_half_split(class_ids: list[int]) -> tuple[set[int], set[int]]:
    """The field's class-disjoint split of CUB and Cars196: the first half of the class ids
    (in order) trains, the second half tests (CUB: 1-100 / 101-200, Cars196: 1-98 / 99-196)."""
    ordered = sorted(class_ids)
    half = len(ordered) // 2
    return set(ordered[:half]), set(ordered[half:])
