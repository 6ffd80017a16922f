"""Converters: tiny trees in each benchmark's ORIGINAL released layout, built here, parsed,
rejected when malformed (messages naming file and line), and converted end to end on Ray."""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipeline.data.convert import (
    SUMMARY_FILE,
    ConversionOptions,
    EncodeOptions,
    SourceLayoutError,
    convert_dataset,
    read_plan,
)
from pipeline.data.convert.encoding import encode_chunk
from pipeline.data.convert.source import SourceImage
from pipeline.data.format import (
    DatasetFormatError,
    DatasetMetadata,
    EvaluationProtocol,
    read_metadata,
    read_split,
    validate_dataset,
    write_dataset,
)

WIDTH, HEIGHT = 48, 36  # source images; converted with short side 24 -> 32 x 24


def _image_bytes(seed: int, fmt: str = "JPEG", size=(WIDTH, HEIGHT)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _put(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


def _truncated(seed: int) -> bytes:
    data = _image_bytes(seed)
    return data[: len(data) // 2]


# ----------------------------------------------------------------------------- layouts


def build_cub(root: Path, *, bad: bool = False) -> Path:
    """CUB_200_2011 with 4 classes x 3 images. `bad`: image 2 truncated, image 5 listed but
    missing, image 7 labelled with class 9 (not in classes.txt)."""
    root = root / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross",
               "004.Groove_billed_Ani"]  # fmt: skip
    images, labels = [], []
    for image_id in range(1, 13):
        class_id = (image_id - 1) // 3 + 1
        path = f"{classes[class_id - 1]}/{classes[class_id - 1][4:]}_{image_id:04d}.jpg"
        images.append(f"{image_id} {path}")
        labels.append(f"{image_id} {9 if bad and image_id == 7 else class_id}")
        if bad and image_id == 5:
            continue
        _put(root / "images" / path, _truncated(image_id) if bad and image_id == 2
             else _image_bytes(image_id))  # fmt: skip
    _put(root / "classes.txt", "".join(f"{i} {name}\n" for i, name in enumerate(classes, 1)))
    _put(root / "images.txt", "\n".join(images) + "\n")
    _put(root / "image_class_labels.txt", "\n".join(labels) + "\n")
    _put(root / "train_test_split.txt", "".join(f"{i} {i % 2}\n" for i in range(1, 13)))
    return root


CARS_FIELDS = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]


def build_cars196(root: Path, *, bad: bool = False, fields=CARS_FIELDS) -> Path:
    """cars_annos.mat as released (struct array `annotations`, cell array `class_names`):
    4 classes x 3 images. `bad`: annotation 4's image is not a JPEG, annotation 10 has
    class 7 (outside the 4 class names)."""
    root = root / "cars196"
    class_names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012",
                   "Acura TL Type-S 2008"]  # fmt: skip
    annotations = np.zeros((1, 12), dtype=[(name, "O") for name in fields])
    for index in range(12):
        path = f"car_ims/{index + 1:06d}.jpg"
        values = {
            "relative_im_path": path, "bbox_x1": np.array([[3]], dtype=np.uint8),
            "bbox_y1": np.array([[2]], dtype=np.uint8), "bbox_x2": np.array([[40]], dtype=np.uint8),
            "bbox_y2": np.array([[30]], dtype=np.uint8),
            "class": np.array([[7 if bad and index == 9 else index // 3 + 1]], dtype=np.uint8),
            "test": np.array([[index % 2]], dtype=np.uint8),
        }  # fmt: skip
        for name in fields:
            annotations[0, index][name] = values[name]
        _put(root / path, b"not an image" if bad and index == 3 else _image_bytes(100 + index))
    names = np.empty((1, len(class_names)), dtype=object)
    names[0, :] = class_names
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": names})
    return root


def build_sop(root: Path) -> Path:
    """Stanford_Online_Products: classes 1-3 train, 4-6 test, 2 images each, 2 super-classes."""
    root = root / "Stanford_Online_Products"
    supers = {1: "bicycle", 2: "chair"}
    lines = {"train": [], "test": []}
    image_id = 0
    for class_id in range(1, 7):
        super_id = 1 if class_id in (1, 2, 4) else 2
        for k in range(2):
            image_id += 1
            path = f"{supers[super_id]}_final/{class_id}11085122871_{k}.JPG"
            _put(root / path, _image_bytes(200 + image_id))
            split = "train" if class_id <= 3 else "test"
            lines[split].append(f"{image_id} {class_id} {super_id} {path}")
    for split, file in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        _put(root / file, "image_id class_id super_class_id path\n" + "\n".join(lines[split]) + "\n")
    return root


def build_inshop(root: Path) -> Path:
    """In-shop Clothes Retrieval: Eval/list_eval_partition.txt and Img/img/...; items 1-2
    train (2 images each), items 3-5 query (1 image) and gallery (2 images)."""
    root = root / "inshop"
    rows = []
    for item in range(1, 6):
        item_id = f"id_{item:08d}"
        statuses = ["train", "train"] if item <= 2 else ["query", "gallery", "gallery"]
        for k, status in enumerate(statuses):
            name = f"img/WOMEN/Dresses/{item_id}/{k + 1:02d}_{k + 1}_front.jpg"
            _put(root / "Img" / name, _image_bytes(300 + item * 10 + k))
            rows.append(f"{name} {item_id} {status}")
    header = f"{len(rows)}\nimage_name item_id evaluation_status\n"
    _put(root / "Eval" / "list_eval_partition.txt", header + "\n".join(rows) + "\n")
    return root


def build_folders(root: Path) -> Path:
    """Five class folders of 2 images (PNG and JPEG), a README at the root, a hidden file."""
    root = root / "my_products"
    for c, name in enumerate(["anchor", "bell", "clock", "drum", "easel"]):
        _put(root / name / "a.png", _image_bytes(400 + 2 * c, "PNG", size=(36, 48)))
        _put(root / name / "nested" / "b.jpg", _image_bytes(401 + 2 * c))
    _put(root / "README.txt", "not a class")
    _put(root / "bell" / ".DS_Store", b"\0\0")
    return root


# ----------------------------------------------------------------------------- plans (no Ray)


def test_cub_plan_splits_classes_by_id_and_sets_aside_unknown_labels(tmp_path):
    plan = read_plan("cub", str(build_cub(tmp_path, bad=True)), ConversionOptions())
    assert plan.class_names[0] == "001.Black_footed_Albatross" and len(plan.class_names) == 4
    assert {i.label for i in plan.splits["train"]} == {0, 1}  # class ids 1-2 of 4
    assert {i.label for i in plan.splits["test"]} == {2, 3}
    assert [len(plan.splits[s]) for s in ("train", "test")] == [6, 5]  # image 7 set aside
    (skipped,) = plan.skipped
    assert (skipped.source_id, skipped.reason) == ("7", "label outside the class table")
    assert "class id 9" in skipped.detail and skipped.path.startswith("images/003.")
    assert plan.evaluation.recall_ks == (1, 2, 4, 8)


def test_cars196_plan_reads_the_released_mat_structure(tmp_path):
    plan = read_plan("cars196", str(build_cars196(tmp_path, bad=True)), ConversionOptions())
    assert plan.class_names[1] == "Acura RL Sedan 2012"
    assert sorted({i.label for i in plan.splits["train"]}) == [0, 1]  # classes 1-2 of 4
    assert sorted({i.label for i in plan.splits["test"]}) == [2, 3]
    assert plan.splits["train"][0] == SourceImage("car_ims/000001.jpg", 0, "1")
    (skipped,) = plan.skipped
    assert skipped.source_id == "10" and "class 7 is outside class_names" in skipped.detail


def test_sop_plan_keeps_the_release_split_and_super_classes(tmp_path):
    plan = read_plan("sop", str(build_sop(tmp_path)), ConversionOptions())
    assert plan.class_names == ["1", "2", "3", "4", "5", "6"]
    assert {i.label for i in plan.splits["train"]} == {0, 1, 2}
    assert plan.extra["super_class_ids"] == [1, 1, 2, 1, 2, 2]
    assert plan.extra["super_class_names"] == {"1": "bicycle", "2": "chair"}
    assert plan.evaluation.recall_ks == (1, 10, 100, 1000)


def test_inshop_plan_keeps_query_and_gallery_apart(tmp_path):
    plan = read_plan("inshop", str(build_inshop(tmp_path)), ConversionOptions())
    assert [len(plan.splits[s]) for s in ("train", "query", "gallery")] == [4, 3, 6]
    assert plan.splits["query"][0].path == "Img/img/WOMEN/Dresses/id_00000003/01_1_front.jpg"
    assert {i.label for i in plan.splits["query"]} == {i.label for i in plan.splits["gallery"]}
    assert plan.evaluation == EvaluationProtocol((1, 10, 20, 30, 40, 50), "query", "gallery")


def test_folders_plan_is_a_seeded_class_disjoint_split(tmp_path):
    source = str(build_folders(tmp_path))
    plan = read_plan("folders", source, ConversionOptions(test_fraction=0.4, seed=3))
    assert plan.name == "my_products" and len(plan.class_names) == 5
    test_classes = {i.label for i in plan.splits["test"]}
    assert len(test_classes) == 2 and not test_classes & {i.label for i in plan.splits["train"]}
    assert plan.num_images == 10  # README.txt and .DS_Store are not images of a class
    again = read_plan("folders", source, ConversionOptions(test_fraction=0.4, seed=3))
    other = [read_plan("folders", source, ConversionOptions(test_fraction=0.4, seed=s))
             for s in range(4, 10)]  # fmt: skip
    assert again.splits == plan.splits
    assert any(o.splits != plan.splits for o in other)


# ----------------------------------------------------------------------------- bad metadata


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


BAD_METADATA = {
    "cub: wrong number of columns": (
        "cub", lambda r: _edit(r / "images.txt", "2 001.", "2 extra 001."),
        ["images.txt, line 2: expected 2 columns, found 3"],
    ),
    "cub: missing file": (
        "cub", lambda r: (r / "image_class_labels.txt").unlink(),
        ["image_class_labels.txt: file is missing"],
    ),
    "cub: label of an unknown image": (
        "cub", lambda r: _edit(r / "image_class_labels.txt", "12 4", "13 4"),
        ["image_class_labels.txt, line 12: image id 13 is not in images.txt"],
    ),
    "cub: class id not an integer": (
        "cub", lambda r: _edit(r / "image_class_labels.txt", "3 1\n", "3 one\n"),
        ["image_class_labels.txt, line 3: column 'class_id' must be an integer, found 'one'"],
    ),
    "cars196: no class field": (
        "cars196", lambda r: build_cars196(r.parent, fields=CARS_FIELDS[:5] + ["test"]),
        ["cars_annos.mat: 'annotations' has no field 'class'"],
    ),
    "cars196: not a MATLAB file": (
        "cars196", lambda r: (r / "cars_annos.mat").write_bytes(b"garbage" * 20),
        ["cars_annos.mat: not a readable MATLAB file"],
    ),
    "sop: header": (
        "sop", lambda r: _edit(r / "Ebay_test.txt", "image_id class_id", "image class"),
        ["Ebay_test.txt, line 1: expected the header"],
    ),
    "sop: class in both splits": (
        "sop", lambda r: _edit(r / "Ebay_test.txt", " 4 1 ", " 3 2 "),
        ["Ebay_test.txt, line 2: class_id 3 is also in Ebay_train.txt (line 6)"],
    ),
    "inshop: unknown status": (
        "inshop", lambda r: _edit(r / "Eval/list_eval_partition.txt", " query", " queries"),
        ["list_eval_partition.txt, line 7: column 'evaluation_status' is 'queries'"],
    ),
    "inshop: truncated list": (
        "inshop", lambda r: _edit(r / "Eval/list_eval_partition.txt", "13\n", "14\n"),
        ["list_eval_partition.txt, line 1: says 14 images, the file lists 13"],
    ),
    "folders: one class": (
        "folders", lambda r: [os.rename(r / n, r / "anchor" / n) for n in
                              ("bell", "clock", "drum", "easel")],  # fmt: skip
        ["found 1 class folder(s)", "needs at least 2"],
    ),
    "folders: source is a file": (
        "folders", lambda r: (shutil.rmtree(r), r.write_text("not a folder")),
        [": a file, not a directory"],
    ),
    "folders: source is missing": (
        "folders", lambda r: shutil.rmtree(r), [": directory is missing"],
    ),
    "cub: images is a file": (
        "cub", lambda r: (shutil.rmtree(r / "images"), (r / "images").write_text("x")),
        ["images: a file, not a directory (CUB-200-2011 keeps its images under images/)"],
    ),
}
BUILDERS = {"cub": build_cub, "cars196": build_cars196, "sop": build_sop, "inshop": build_inshop,
            "folders": build_folders}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_malformed_metadata_is_rejected_before_ray_naming_file_and_line(
    case, tmp_path, ray_must_not_start,
):  # fmt: skip
    layout, corrupt, expected = BAD_METADATA[case]
    source = BUILDERS[layout](tmp_path / "src")
    corrupt(source)
    destination = tmp_path / "out"
    with pytest.raises(SourceLayoutError) as raised:
        convert_dataset(layout, str(source), str(destination), printer=lambda *a, **k: None)
    for text in expected:
        assert text in str(raised.value)
    assert str(source) in str(raised.value)  # the path of the file, not just its name
    assert not destination.exists()


# ----------------------------------------------------------------------------- encoding (no Ray)


def test_encode_chunk_resizes_to_jpeg_and_skips_bad_files(tmp_path):
    _put(tmp_path / "good.png", _image_bytes(1, "PNG", size=(30, 60)))
    _put(tmp_path / "truncated.jpg", _truncated(2))
    _put(tmp_path / "notes.jpg", "hello")
    (tmp_path / "a_directory.jpg").mkdir()
    images = [SourceImage(name, label, str(label)) for label, name in enumerate(
        ["good.png", "truncated.jpg", "notes.jpg", "missing.jpg", "a_directory.jpg"])]
    records, skipped = encode_chunk(str(tmp_path), "train", images, EncodeOptions(24, 80))
    (record,) = records
    assert (record["label"], record["width"], record["height"]) == (0, 24, 48)
    with Image.open(io.BytesIO(record["image"])) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (24, 48))
    assert [(s.path, s.reason, s.split) for s in skipped] == [
        ("truncated.jpg", "corrupt image", "train"),
        ("notes.jpg", "corrupt image", "train"),
        ("missing.jpg", "unreadable file", "train"),
        ("a_directory.jpg", "unreadable file", "train"),
    ]
    assert "truncated" in skipped[0].detail
    kept, _ = encode_chunk(str(tmp_path), "train", images[:1], EncodeOptions(0, 80))
    assert (kept[0]["width"], kept[0]["height"]) == (30, 60)  # short side 0 keeps the size


# ----------------------------------------------------------------------------- destination


def test_a_mistyped_uri_is_refused_not_written_to_a_local_folder(
    tmp_path, monkeypatch, capsys, ray_must_not_start
):
    from jobs.prepare_data import main as prepare_main

    source = str(build_sop(tmp_path / "release"))
    monkeypatch.chdir(tmp_path)  # where pyarrow would have made the folder 's3:'
    assert prepare_main(["sop", source, "s3:/bucket/sop"]) == 2
    assert capsys.readouterr().err.strip() == (
        "prepare_data: destination: 's3:/bucket/sop' is neither a path nor a URI; "
        "did you mean 's3://bucket/sop'?"
    )
    # The library refuses it too, whoever calls it.
    with pytest.raises(ValueError, match="did you mean 's3://bucket/sop'"):
        convert_dataset("sop", source, "s3:/bucket/sop", printer=lambda *a, **k: None)
    assert sorted(os.listdir(tmp_path)) == ["release"]


def test_a_task_larger_than_a_local_ray_is_refused_before_ray(tmp_path, monkeypatch, capsys):
    """Ray would never schedule it: the conversion would wait for ever, having begun writing."""
    import ray

    from jobs.prepare_data import main as prepare_main

    def refuse(*args, **kwargs):
        raise AssertionError("the conversion started Ray")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh job process
    source = str(build_sop(tmp_path / "release"))
    cpus = os.cpu_count() or 1
    assert prepare_main(["sop", source, str(tmp_path / "out"), "--cpus-per-task", str(cpus + 1)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"--cpus-per-task: each encoding task would need {cpus + 1} CPUs but a local Ray has {cpus}; "
        "lower it, or set RAY_ADDRESS to run on a cluster"
    )
    assert not (tmp_path / "out").exists()


def test_an_existing_destination_is_refused_and_left_untouched(tmp_path):
    source = str(build_sop(tmp_path))
    destination = tmp_path / "sop_out"
    write_dataset(
        destination, name="old", source="test", class_names=["a"], image_format="png",
        splits={"train": [{"label": 0, "image": _image_bytes(0, "PNG"), "width": WIDTH,
                           "height": HEIGHT}]},
    )  # fmt: skip
    _put(destination / SUMMARY_FILE, "{}")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in destination.rglob("*")
              if p.is_file()}  # fmt: skip
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        convert_dataset("sop", source, str(destination), printer=lambda *a, **k: None)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in destination.rglob("*")
             if p.is_file()}  # fmt: skip
    assert after == before and len(before) == 3
    # Refused before the metadata is parsed: a broken source gives the same refusal.
    (Path(source) / "Ebay_train.txt").unlink()
    with pytest.raises(FileExistsError):
        convert_dataset("sop", source, str(destination), printer=lambda *a, **k: None)
    # A conversion stopped part-way (shards, no metadata.json) is named as such.
    (destination / "metadata.json").unlink()
    (destination / SUMMARY_FILE).unlink()
    with pytest.raises(FileExistsError, match=r"holds an unfinished conversion \(train, no metadata.json\); "
                       "pass --overwrite to convert into it again"):
        convert_dataset("sop", source, str(destination), printer=lambda *a, **k: None)


# ----------------------------------------------------------------------------- metadata protocol


def test_evaluation_protocol_is_optional_and_checked(tmp_path):
    record = {"label": 0, "image": _image_bytes(0, "PNG"), "width": WIDTH, "height": HEIGHT}
    old = write_dataset(tmp_path / "old", name="old", source="t", class_names=["a"],
                        image_format="png", splits={"train": [record]})  # fmt: skip
    assert old.evaluation is None and "evaluation" not in json.loads(old.to_json())
    protocol = EvaluationProtocol((1, 5), "query", "gallery")
    new = write_dataset(tmp_path / "new", name="new", source="t", class_names=["a"],
                        image_format="png", splits={"query": [record], "gallery": [record]},
                        evaluation=protocol)  # fmt: skip
    assert read_metadata(tmp_path / "new").evaluation == new.evaluation == protocol
    doc = json.loads(new.to_json())
    assert doc["evaluation"] == {"recall_ks": [1, 5], "query_split": "query",
                                 "gallery_split": "gallery"}  # fmt: skip
    for bad, message in [
        ({"recall_ks": []}, "field 'evaluation.recall_ks' must be a non-empty list"),
        ({"recall_ks": [1], "query_split": "query"}, "go together"),
        ({"recall_ks": [1], "query_split": "query", "gallery_split": "test"},
         "field 'evaluation.gallery_split' is 'test', not one of the splits"),
        ({"recall_ks": [1], "queries": "query"}, "unexpected field 'evaluation.queries'"),
    ]:
        with pytest.raises(DatasetFormatError, match=message):
            DatasetMetadata.from_json(json.dumps({**doc, "evaluation": bad}))


def test_driver_applies_the_dataset_protocol_unless_set(tmp_path):
    from pipeline.config import load_config
    from pipeline.evaluation.protocol import gallery_split, resolve_evaluation
    from pipeline.training.driver import resolve_dataset

    record = {"label": 0, "image": _image_bytes(0, "PNG"), "width": WIDTH, "height": HEIGHT}
    root = tmp_path / "inshop_like"
    meta = write_dataset(
        root, name="inshop", source="t", class_names=["a", "b"], image_format="png",
        splits={"train": [record], "query": [{**record, "label": 1}],
                "gallery": [{**record, "label": 1}]},
        evaluation=EvaluationProtocol((1, 10, 20), "query", "gallery"),
    )  # fmt: skip
    config = load_config("local", [f"data.root={root}"])
    applied = resolve_evaluation(config, meta)
    assert applied.eval.recall_ks == [1, 10, 20] and applied.data.test_split == "query"
    assert gallery_split(applied, meta) == "gallery" and gallery_split(config, meta) == ""
    assert resolve_dataset(config)[0] == str(root)  # no 'test' split: the query split is used
    explicit = load_config("local", [f"data.root={root}", "eval.recall_ks=[1, 3]",
                                     "data.test_split=gallery"])  # fmt: skip
    kept = resolve_evaluation(explicit, meta)
    assert (kept.eval.recall_ks, kept.data.test_split) == ([1, 3], "gallery")
    assert gallery_split(kept, meta) == ""
    unchanged = DatasetMetadata(**{**vars(meta), "evaluation": None})
    fallback = resolve_evaluation(config, unchanged)  # no protocol: Recall@1/2/4/8 on 'test'
    assert (fallback.eval.recall_ks, fallback.data.test_split) == ([1, 2, 4, 8], "test")


def test_query_gallery_evaluation_ranks_queries_against_the_gallery():
    import torch

    from pipeline.config import load_config
    from pipeline.evaluation.metrics import retrieval_metrics
    from pipeline.training.evaluate import embed_batches, retrieval_metrics_of

    rng = np.random.default_rng(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 8))

    def batches(labels):
        images = rng.integers(0, 256, (len(labels), 3, 4, 4), dtype=np.uint8)
        return [{"image": images, "label": np.asarray(labels), "id": np.arange(len(labels))}]

    queries, gallery = batches([0, 1, 2, 0]), batches([0, 0, 1, 1, 2, 3])
    eval_config = load_config("local", ["eval.recall_ks=[1, 2]"]).eval
    cpu = torch.device("cpu")
    metrics = retrieval_metrics_of(
        embed_batches(model, queries, cpu), eval_config, False, embed_batches(model, gallery, cpu)
    )
    with torch.no_grad():
        as_array = [model(torch.as_tensor(b[0]["image"]).float() / 255).numpy()
                    for b in (queries, gallery)]  # fmt: skip
    expected = retrieval_metrics(as_array[0], np.array([0, 1, 2, 0]), as_array[1],
                                 np.array([0, 0, 1, 1, 2, 3]), ks=(1, 2))  # fmt: skip
    assert metrics["num_queries"] == 4
    alone = retrieval_metrics_of(embed_batches(model, queries, cpu), eval_config, False)
    assert alone["map@r"] != metrics["map@r"]  # without the gallery: R differs for label 0
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key


# ----------------------------------------------------------------------------- on Ray


def _check_images(root: Path, split: str, short_side: int) -> None:
    for data in read_split(root, split, ["image"]).column("image").to_pylist():
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and min(image.size) == short_side


@pytest.mark.ray
def test_every_layout_converts_on_ray(ray_local, tmp_path):
    sources = {
        "cub": build_cub(tmp_path / "src", bad=True),
        "cars196": build_cars196(tmp_path / "src", bad=True),
        "sop": build_sop(tmp_path / "src"),
        "inshop": build_inshop(tmp_path / "src"),
        "folders": build_folders(tmp_path / "src"),
    }
    options = ConversionOptions(EncodeOptions(short_side=24, jpeg_quality=90), shard_size=4,
                                chunk_size=3)  # fmt: skip
    out, lines = {}, []
    for layout, source in sources.items():
        out[layout] = tmp_path / "out" / layout
        summary = convert_dataset(layout, str(source), str(out[layout]), options,
                                  printer=lambda text, **_: lines.append(text))  # fmt: skip
        assert json.loads((out[layout] / SUMMARY_FILE).read_text()) == summary
        meta = validate_dataset(out[layout], check_images=True, check_fingerprint=True)
        assert meta.image_format == "jpeg" and summary["dataset"]["fingerprint"] == meta.fingerprint
        for split in meta.splits:
            _check_images(out[layout], split, 24)
        classes = {split: set(info.classes) for split, info in meta.splits.items()}
        assert not classes["train"] & set().union(*(c for s, c in classes.items() if s != "train"))
    assert any("train: 6/6 images (100%), 0 skipped" in line for line in lines)  # progress

    cub = read_metadata(out["cub"])
    assert {s: i.num_images for s, i in cub.splits.items()} == {"train": 4, "test": 5}
    assert (cub.splits["train"].classes, cub.splits["test"].classes) == ((0, 1), (2, 3))
    cub_summary = json.loads((out["cub"] / SUMMARY_FILE).read_text())
    assert cub_summary["skipped"]["count"] == 3
    assert cub_summary["skipped"]["by_reason"] == {
        "corrupt image": 1, "label outside the class table": 1, "unreadable file": 1}
    assert {(s["id"], s["split"]) for s in cub_summary["skipped"]["images"]} == {
        ("2", "train"), ("5", "train"), ("7", None)}
    assert cub_summary["splits"]["train"] == {"images": 4, "classes": 2, "skipped": 2}

    cars = json.loads((out["cars196"] / SUMMARY_FILE).read_text())
    assert cars["splits"] == {"train": {"images": 5, "classes": 2, "skipped": 1},
                              "test": {"images": 5, "classes": 2, "skipped": 0}}
    assert sorted(s["path"] for s in cars["skipped"]["images"]) == ["car_ims/000004.jpg",
                                                                     "car_ims/000010.jpg"]

    sop = read_metadata(out["sop"])
    assert sop.extra["super_class_ids"] == [1, 1, 2, 1, 2, 2]
    assert sop.evaluation.recall_ks == (1, 10, 100, 1000)
    assert read_split(out["sop"], "test", ["label"]).column("label").to_pylist() == [3, 3, 4, 4, 5, 5]

    inshop = read_metadata(out["inshop"])
    assert {s: i.num_images for s, i in inshop.splits.items()} == {
        "train": 4, "query": 3, "gallery": 6}
    assert inshop.splits["query"].classes == inshop.splits["gallery"].classes == (2, 3, 4)
    assert (inshop.evaluation.query_split, inshop.evaluation.gallery_split) == ("query", "gallery")

    folders = read_metadata(out["folders"])
    assert sum(i.num_images for i in folders.splits.values()) == 10
    assert len(folders.splits["test"].classes) == 2  # round(5 x 0.5) of the 5 classes

    # --overwrite replaces a dataset, and its summary, whole (the new one is written beside the
    # old one first: test_format.py's failed-overwrite test), leaving no staging folder.
    summary = convert_dataset("folders", str(sources["folders"]), str(out["cub"]),
                              replace(options, overwrite=True), printer=lambda *a, **k: None)  # fmt: skip
    assert validate_dataset(out["cub"], check_fingerprint=True).fingerprint == folders.fingerprint
    assert json.loads((out["cub"] / SUMMARY_FILE).read_text()) == summary and summary["layout"] == "folders"
    assert sorted(p.name for p in out["cub"].iterdir()) == [SUMMARY_FILE, "metadata.json", "test", "train"]


def test_a_training_run_records_the_conversion_summary(tmp_path):
    """What the converter skipped reaches the MLflow run of anything trained on the dataset."""
    import json

    from mlflow import MlflowClient

    from pipeline.data.convert.writer import SUMMARY_FILE
    from pipeline.training.driver import _record_conversion_summary

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x", str(tmp_path / "art"))).info.run_id
    root = tmp_path / "dataset"
    root.mkdir()
    printed = []
    _record_conversion_summary(uri, run_id, str(root), lambda *a, **k: printed.append(a[0]))
    assert "dataset.skipped_images" not in client.get_run(run_id).data.tags  # no summary: nothing

    summary = {"skipped": {"count": 2, "by_reason": {"corrupt image": 1, "unreadable file": 1},
                           "images": [{"id": 3}, {"id": 9}]}}
    (root / SUMMARY_FILE).write_text(json.dumps(summary))
    _record_conversion_summary(uri, run_id, str(root), lambda *a, **k: printed.append(a[0]))
    assert client.get_run(run_id).data.tags["dataset.skipped_images"] == "2"
    logged = client.download_artifacts(run_id, f"dataset/{SUMMARY_FILE}", str(tmp_path / "dl"))
    assert json.loads(open(logged).read()) == summary
    assert printed == [
        "dataset: 2 images were skipped at conversion (1 corrupt image, 1 unreadable file); "
        f"see dataset/{SUMMARY_FILE} in the MLflow run"
    ]

    # A summary cut short (the conversion was stopped while writing it) does not fail the run.
    (root / SUMMARY_FILE).write_text(json.dumps(summary)[:20])
    _record_conversion_summary(uri, run_id, str(root), lambda *a, **k: printed.append(a[0]))
    assert client.get_run(run_id).data.tags["dataset.skipped_images"] == "unknown"
    assert printed[-1].startswith(f"dataset: its {SUMMARY_FILE} does not read (")
