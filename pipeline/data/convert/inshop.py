"""In-Shop Clothes Retrieval (Liu et al. 2016, DeepFashion) as released: the evaluation
partition `Eval/list_eval_partition.txt` (a count line, the header
`image_name item_id evaluation_status`, then one image per line) and the images under
`Img/img/` (paths in the file start with `img/`). A root holding list_eval_partition.txt and
img/ directly is accepted too.

Splits are the release's: `train` (3,997 items), and `query` and `gallery` (the other 3,985
items), kept apart: evaluation ranks every query against the gallery.
"""

from __future__ import annotations

import posixpath

from pipeline.data.convert.source import (
    RECALL_KS_INSHOP,
    ConversionPlan,
    SourceImage,
    SourceLayoutError,
    SourceTree,
    parse_int,
    text_rows,
)
from pipeline.data.format import EvaluationProtocol

PARTITION_CANDIDATES = ("Eval/list_eval_partition.txt", "list_eval_partition.txt")
HEADER = ["image_name", "item_id", "evaluation_status"]
SPLITS = ("train", "query", "gallery")


def _locate(tree: SourceTree) -> tuple[str, str]:
    """The partition file and the directory its image paths are relative to."""
    partition = next((p for p in PARTITION_CANDIDATES if tree.exists(p)), PARTITION_CANDIDATES[0])
    image_base = "Img" if tree.is_dir("Img/img") else ""
    return partition, image_base


def _check_head(tree: SourceTree, partition: str, num_rows: int) -> None:
    """Line 1 is the number of images, line 2 the header."""
    where = tree.uri(partition)
    lines = tree.read_bytes(partition).decode("utf-8", errors="replace").splitlines()
    count = parse_int(lines[0].strip() if lines else "", where, 1, "number of images")
    header = lines[1].split() if len(lines) > 1 else []
    if header != HEADER:
        raise SourceLayoutError(
            f"{where}, line 2: expected the header {' '.join(HEADER)!r}, found "
            f"{' '.join(header)!r}"
        )
    if count != num_rows:
        raise SourceLayoutError(
            f"{where}, line 1: says {count} images, the file lists {num_rows} (truncated?)"
        )


def read_inshop(tree: SourceTree) -> ConversionPlan:
    """Parse list_eval_partition.txt into a conversion plan (no image is read)."""
    partition, image_base = _locate(tree)
    where = tree.uri(partition)
    rows = []
    train_items: dict[str, int] = {}  # item -> first line
    eval_items: dict[str, int] = {}
    for line, (image_name, item, status) in text_rows(tree, partition, 3, skip_lines=2):
        if status not in SPLITS:
            raise SourceLayoutError(
                f"{where}, line {line}: column 'evaluation_status' is {status!r}, expected one "
                f"of {', '.join(SPLITS)}"
            )
        mine, other = (train_items, eval_items) if status == "train" else (eval_items, train_items)
        if item in other:
            raise SourceLayoutError(
                f"{where}, line {line}: item {item} is in train and in query/gallery (line "
                f"{other[item]}); the splits must be item-disjoint"
            )
        mine.setdefault(item, line)
        rows.append((image_name, item, status))
    _check_head(tree, partition, len(rows))
    tree.require_dir(posixpath.join(image_base, "img"), f"{partition} lists images there")

    items = sorted(set(train_items) | set(eval_items))
    label_of = {item: index for index, item in enumerate(items)}
    plan = ConversionPlan(
        name="inshop",
        source="In-shop Clothes Retrieval Benchmark (DeepFashion)",
        class_names=items,
        splits={split: [] for split in SPLITS},
        evaluation=EvaluationProtocol(
            recall_ks=RECALL_KS_INSHOP, query_split="query", gallery_split="gallery"
        ),
        extra={"class_names": "the release's item_id"},
    )
    for image_name, item, status in rows:
        path = posixpath.join(image_base, image_name)
        plan.splits[status].append(SourceImage(path, label_of[item], image_name))
    plan.check(where)
    return plan
