"""CUB-200-2011 (Wah et al. 2011) as released: `CUB_200_2011/` with images.txt,
image_class_labels.txt, classes.txt and the images under images/.

The field's split (Oh Song et al. 2016) is class-disjoint: classes 1-100 train, 101-200 test;
the release's train_test_split.txt (a per-image split for classification) is not used.
"""

from __future__ import annotations

import posixpath

from pipeline.data.convert.source import (
    LABEL_OUTSIDE_CLASS_TABLE,
    RECALL_KS_DEFAULT,
    ConversionPlan,
    SkippedImage,
    SourceImage,
    SourceLayoutError,
    SourceTree,
    first_half_split,
    parse_int,
    text_rows,
)
from pipeline.data.format import EvaluationProtocol


def _id_table(tree: SourceTree, relative: str, value_column: str) -> dict[int, tuple[int, str]]:
    """id -> (line, value) of a two-column `<id> <value>` file; ids must be unique integers."""
    where = tree.uri(relative)
    table: dict[int, tuple[int, str]] = {}
    for line, (raw_id, value) in text_rows(tree, relative, 2):
        key = parse_int(raw_id, where, line, "id")
        if key in table:
            raise SourceLayoutError(
                f"{where}, line {line}: id {key} repeats line {table[key][0]}"
            )
        table[key] = (line, value)
    if not table:
        raise SourceLayoutError(f"{where}: holds no {value_column} lines")
    return table


def read_cub(tree: SourceTree) -> ConversionPlan:
    """Parse CUB-200-2011's metadata into a conversion plan (no image is read)."""
    tree.require_dir("images", "CUB-200-2011 keeps its images under images/")
    classes = _id_table(tree, "classes.txt", "class")
    paths = _id_table(tree, "images.txt", "image")
    labels_where = tree.uri("image_class_labels.txt")
    labels: dict[int, int] = {}
    for image_id, (line, raw_class) in _id_table(tree, "image_class_labels.txt", "label").items():
        if image_id not in paths:
            raise SourceLayoutError(
                f"{labels_where}, line {line}: image id {image_id} is not in images.txt"
            )
        labels[image_id] = parse_int(raw_class, labels_where, line, "class_id")
    unlabelled = sorted(set(paths) - set(labels))
    if unlabelled:
        line = paths[unlabelled[0]][0]
        raise SourceLayoutError(
            f"{tree.uri('images.txt')}, line {line}: image id {unlabelled[0]} has no line in "
            f"image_class_labels.txt ({len(unlabelled)} images have none)"
        )

    class_ids = sorted(classes)
    label_of = {class_id: index for index, class_id in enumerate(class_ids)}
    train_classes, _ = first_half_split(class_ids)
    plan = ConversionPlan(
        name="cub200",
        source="CUB_200_2011",
        class_names=[classes[class_id][1] for class_id in class_ids],
        splits={"train": [], "test": []},
        evaluation=EvaluationProtocol(recall_ks=RECALL_KS_DEFAULT),
        extra={"split_rule": "class-disjoint: first half of classes.txt's ids train, rest test"},
    )
    for image_id in sorted(paths):
        path = posixpath.join("images", paths[image_id][1])
        class_id = labels[image_id]
        if class_id not in label_of:
            plan.skipped.append(SkippedImage(
                None, str(image_id), path, LABEL_OUTSIDE_CLASS_TABLE,
                f"class id {class_id} is not in classes.txt",
            ))  # fmt: skip
            continue
        split = "train" if class_id in train_classes else "test"
        plan.splits[split].append(SourceImage(path, label_of[class_id], str(image_id)))
    plan.check(tree.uri("classes.txt"))
    return plan
