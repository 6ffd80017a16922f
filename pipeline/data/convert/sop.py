"""Stanford Online Products (Oh Song et al. 2016) as released: `Stanford_Online_Products/`
with Ebay_train.txt and Ebay_test.txt (header `image_id class_id super_class_id path`) and the
images under `<super class>_final/`.

The release's own split is the field's: 11,318 classes train, the other 11,316 test. The
super-class of every class is kept in metadata.json's `extra` (`super_class_ids`, one per
label, and `super_class_names`).
"""

from __future__ import annotations

import posixpath

from pipeline.data.convert.source import (
    RECALL_KS_SOP,
    ConversionPlan,
    SourceImage,
    SourceLayoutError,
    SourceTree,
    parse_int,
    text_rows,
)
from pipeline.data.format import EvaluationProtocol

SPLIT_FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}
HEADER = ["image_id", "class_id", "super_class_id", "path"]


def _check_header(tree: SourceTree, relative: str) -> None:
    where = tree.uri(relative)
    lines = tree.read_bytes(relative).decode("utf-8", errors="replace").splitlines()
    header = lines[0].split() if lines else []
    if header != HEADER:
        raise SourceLayoutError(
            f"{where}, line 1: expected the header {' '.join(HEADER)!r}, found "
            f"{' '.join(header)!r}"
        )


def read_sop(tree: SourceTree) -> ConversionPlan:
    """Parse Ebay_train.txt and Ebay_test.txt into a conversion plan (no image is read)."""
    rows: dict[str, list[tuple[int, str, int, str]]] = {}
    split_of_class: dict[int, tuple[str, int]] = {}  # class -> (file, line) where first seen
    super_of_class: dict[int, int] = {}
    super_names: dict[int, str] = {}
    for split, relative in SPLIT_FILES.items():
        where = tree.uri(relative)
        _check_header(tree, relative)
        rows[split] = []
        for line, (raw_image, raw_class, raw_super, path) in text_rows(
            tree, relative, 4, skip_lines=1
        ):
            class_id = parse_int(raw_class, where, line, "class_id")
            super_id = parse_int(raw_super, where, line, "super_class_id")
            parse_int(raw_image, where, line, "image_id")
            first = split_of_class.setdefault(class_id, (relative, line))
            if first[0] != relative:
                raise SourceLayoutError(
                    f"{where}, line {line}: class_id {class_id} is also in {first[0]} (line "
                    f"{first[1]}); the splits must be class-disjoint"
                )
            if super_of_class.setdefault(class_id, super_id) != super_id:
                raise SourceLayoutError(
                    f"{where}, line {line}: class_id {class_id} has super_class_id {super_id} "
                    f"here and {super_of_class[class_id]} on an earlier line"
                )
            directory = posixpath.dirname(path)
            super_names.setdefault(super_id, directory.removesuffix("_final"))
            rows[split].append((class_id, raw_image, super_id, path))

    class_ids = sorted(split_of_class)
    label_of = {class_id: index for index, class_id in enumerate(class_ids)}
    plan = ConversionPlan(
        name="sop",
        source="Stanford_Online_Products",
        class_names=[str(class_id) for class_id in class_ids],
        splits={
            split: [SourceImage(path, label_of[class_id], image_id)
                    for class_id, image_id, _, path in split_rows]
            for split, split_rows in rows.items()
        },  # fmt: skip
        evaluation=EvaluationProtocol(recall_ks=RECALL_KS_SOP),
        extra={
            "class_names": "the release's class_id",
            "super_class_ids": [super_of_class[class_id] for class_id in class_ids],
            "super_class_names": {str(k): v for k, v in sorted(super_names.items())},
        },
    )
    for directory in sorted({posixpath.dirname(r[3]) for split_rows in rows.values()
                             for r in split_rows}):  # fmt: skip
        tree.require_dir(directory, "Ebay_*.txt list images there")
    plan.check(tree.uri(SPLIT_FILES["train"]))
    return plan
