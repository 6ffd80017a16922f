"""Cars196 (Krause et al. 2013) as released: cars_annos.mat (a MATLAB struct array
`annotations` with fields relative_im_path, bbox_x1..bbox_y2, class, test, and the cell array
`class_names`) and the images under car_ims/.

The field's split is class-disjoint: classes 1-98 train, 99-196 test (the release's `test`
flag, a per-image split for classification, is not used). Bounding boxes are not applied.
"""

from __future__ import annotations

import io
import posixpath

import numpy as np
import scipy.io

from pipeline.data.convert.source import (
    LABEL_OUTSIDE_CLASS_TABLE,
    RECALL_KS_DEFAULT,
    ConversionPlan,
    SkippedImage,
    SourceImage,
    SourceLayoutError,
    SourceTree,
    first_half_split,
)
from pipeline.data.format import EvaluationProtocol

ANNOTATIONS_FILE = "cars_annos.mat"


def _load(tree: SourceTree) -> dict:
    where = tree.uri(ANNOTATIONS_FILE)
    try:
        return scipy.io.loadmat(io.BytesIO(tree.read_bytes(ANNOTATIONS_FILE)), squeeze_me=True)
    except (ValueError, TypeError, OSError, NotImplementedError) as err:
        # scipy raises these for a truncated file, a v7.3 (HDF5) file or garbage.
        raise SourceLayoutError(f"{where}: not a readable MATLAB file ({err})") from err


def _variable(mat: dict, name: str, where: str) -> np.ndarray:
    if name not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise SourceLayoutError(f"{where}: has no variable '{name}' (it has {found})")
    return np.atleast_1d(mat[name])


def _class_id(value, where: str, entry: int) -> int:
    number = np.asarray(value)
    if number.size != 1 or not np.issubdtype(number.dtype, np.number):
        raise SourceLayoutError(
            f"{where}: annotations({entry}).class must be one number, found {value!r}"
        )
    number = number.item()
    if number != int(number):
        raise SourceLayoutError(
            f"{where}: annotations({entry}).class must be an integer, found {number!r}"
        )
    return int(number)


def read_cars196(tree: SourceTree) -> ConversionPlan:
    """Parse cars_annos.mat into a conversion plan (no image is read)."""
    where = tree.uri(ANNOTATIONS_FILE)
    mat = _load(tree)
    annotations = _variable(mat, "annotations", where)
    fields = annotations.dtype.names or ()
    for needed in ("relative_im_path", "class"):
        if needed not in fields:
            raise SourceLayoutError(
                f"{where}: 'annotations' has no field '{needed}' (it has {list(fields)})"
            )
    class_names = [str(name) for name in _variable(mat, "class_names", where)]
    class_ids = list(range(1, len(class_names) + 1))  # MATLAB's 1-based index into class_names
    train_classes, _ = first_half_split(class_ids)
    plan = ConversionPlan(
        name="cars196",
        source="Cars196 (cars_annos.mat)",
        class_names=class_names,
        splits={"train": [], "test": []},
        evaluation=EvaluationProtocol(recall_ks=RECALL_KS_DEFAULT),
        extra={"split_rule": "class-disjoint: classes 1-98 train, 99-196 test (first half)"},
    )
    directories = set()
    for entry, annotation in enumerate(annotations, start=1):
        path = annotation["relative_im_path"]
        if not isinstance(path, str) or not path:
            raise SourceLayoutError(
                f"{where}: annotations({entry}).relative_im_path must be a path, found {path!r}"
            )
        class_id = _class_id(annotation["class"], where, entry)
        if not 1 <= class_id <= len(class_names):
            plan.skipped.append(SkippedImage(
                None, str(entry), path, LABEL_OUTSIDE_CLASS_TABLE,
                f"class {class_id} is outside class_names (1..{len(class_names)})",
            ))  # fmt: skip
            continue
        directories.add(posixpath.dirname(path))
        split = "train" if class_id in train_classes else "test"
        plan.splits[split].append(SourceImage(path, class_id - 1, str(entry)))
    for directory in sorted(directories):
        tree.require_dir(directory, f"{ANNOTATIONS_FILE} lists images there")
    plan.check(where)
    return plan
