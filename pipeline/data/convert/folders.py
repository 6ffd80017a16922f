"""Any folder tree with one sub-folder per class: `<root>/<class name>/**/<image>`.

The split is class-disjoint: a seeded shuffle of the class folders puts `test_fraction` of them
in `test`, the rest in `train`. Files directly under the root and hidden files are ignored;
every other file in a class folder is taken as an image (one that does not decode is skipped
and reported).
"""

from __future__ import annotations

import posixpath

import numpy as np

from pipeline.data.convert.source import (
    RECALL_KS_DEFAULT,
    ConversionPlan,
    SourceImage,
    SourceLayoutError,
    SourceTree,
)
from pipeline.data.format import EvaluationProtocol


def _hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.split("/"))


def read_folders(tree: SourceTree, *, test_fraction: float = 0.5, seed: int = 0) -> ConversionPlan:
    """List the class folders' files into a conversion plan (no image is read)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    tree.require_dir("")
    files_of: dict[str, list[str]] = {}
    for path in tree.files_below(""):
        if "/" in path and not _hidden(path):
            files_of.setdefault(path.split("/", 1)[0], []).append(path)
    if len(files_of) < 2:
        raise SourceLayoutError(
            f"{tree.root}: found {len(files_of)} class folder(s) holding files; a class-disjoint "
            "split needs at least 2"
        )
    class_names = sorted(files_of)
    order = np.random.default_rng(seed).permutation(len(class_names))
    num_test = min(max(1, round(len(class_names) * test_fraction)), len(class_names) - 1)
    test_labels = set(order[:num_test].tolist())
    plan = ConversionPlan(
        name=posixpath.basename(tree.path.rstrip("/")) or "folders",
        source=f"image folders at {tree.root}",
        class_names=class_names,
        splits={"train": [], "test": []},
        evaluation=EvaluationProtocol(recall_ks=RECALL_KS_DEFAULT),
        extra={
            "split_rule": "class-disjoint: seeded shuffle of the class folders",
            "test_fraction": test_fraction,
            "seed": seed,
        },
    )
    for label, class_name in enumerate(class_names):
        split = "test" if label in test_labels else "train"
        plan.splits[split].extend(SourceImage(path, label, path) for path in files_of[class_name])
    plan.check(tree.root)
    return plan
