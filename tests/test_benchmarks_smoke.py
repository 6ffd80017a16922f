"""The benchmark commands of issue 8 run in their tiniest configuration and print well-formed
JSON. No timing assertions (figures live in benchmarks/README.md): only that every figure is
there and is a number, and that our metrics agree with pytorch-metric-learning's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "pytorch_metric_learning",
    reason="the benchmarks' peer needs pytorch-metric-learning: pip install -e '.[bench]'",
)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str, timeout: float = 600) -> list[dict]:
    """Run a benchmark script; its stdout's JSON lines (every '{' line must parse)."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=timeout,
    )
    assert done.returncode == 0, f"stdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.ray
def test_throughput_tiny(tmp_path):
    lines = _run("throughput.py", "--tiny", "--size", "cpu", "--losses", "softtriple",
                 "--set", f"data.cache_dir={tmp_path}/data")
    summary = lines[-1]["summary"]
    assert summary["size"] == "cpu" and summary["losses"] == ["softtriple"]
    assert summary["backbone_images_per_s"] and all(map(_positive, summary["backbone_images_per_s"].values()))
    assert _positive(summary["input_images_per_s"])
    assert _positive(summary["train_images_per_s"]["softtriple"])
    peer = summary["peer"]["softtriple"]
    assert peer["library"] == "pytorch-metric-learning"
    assert _positive(peer["images_per_s"]) and _positive(peer["ours_over_peer"])
    assert {row["storage"] for row in summary["decode"]} == {"full", "short_side_256"}
    for row in summary["decode"]:
        assert _positive(row["cpu_decode_images_per_cpu_s"])
        assert _positive(row["cpu_decode_crop_images_per_cpu_s"])


def test_refresh_cost_tiny():
    lines = _run("refresh_cost.py", "--sizes", "600", "--pool-sizes", "600,1000", "--dims", "8",
                 "--max-exact-pools", "700", "--pool-indexes", "Flat;IVF8,Flat:nprobe=8;IVF8,Flat:nprobe=1",
                 "--embed", "tiny_cnn:32:40", "--batch-size", "16", "--decode", "40:1,2",
                 "--cached-pass", "40:0,0.5,1")
    by_kind: dict[str, list[dict]] = {}
    for line in lines:
        for kind, row in line.items():
            by_kind.setdefault(kind, []).append(row)
    (clustering,) = by_kind["clustering"]
    assert clustering["n"] == 600 and clustering["dim"] == 8 and clustering["clusters"] > 0
    pools = {(row["n"], row["index"], row["search_params"]): row for row in by_kind["hard_pools"]}
    assert len(pools) == 6
    assert pools[600, "Flat", ""]["knn_seconds"] >= 0
    assert "N^2" in pools[1000, "Flat", ""]["skipped"]  # said, not extrapolated
    for n in (600, 1000):  # the approximate index runs at any size, scored against exact pools
        every_list, one_list = pools[n, "IVF8,Flat", "nprobe=8"], pools[n, "IVF8,Flat", "nprobe=1"]
        assert every_list["recall"] == 1.0 and every_list["recall_classes"] == every_list["classes"]
        assert 0 < one_list["recall"] < 1.0
    (embedding,) = by_kind["embedding"]
    assert _positive(embedding["images_per_s"]) and _positive(embedding["bare_inference_images_per_s"])
    decodes = {row["threads"]: row for row in by_kind["first_pass_decode"]}
    assert set(decodes) == {1, 2} and all(row["n"] == 40 and _positive(row["images_per_s"]) for row in decodes.values())
    cached = {row["cache_fraction_of_split"]: row for row in by_kind["cached_pass"]}
    assert [cached[f]["kept_images"] for f in (0, 0.5, 1)] == [0, 16, 40]  # whole batches of 16 that fit
    assert all(row["n"] == 40 and _positive(row["second_pass_images_per_s"]) for row in cached.values())


@pytest.mark.ray
def test_decode_memory_tiny():
    lines = _run("decode_memory.py", "--classes-per-batch", "4", "--samples-per-class", "2", "--image-size", "32",
                 "--classes", "8", "--images-per-class", "2", "--repeats", "1")
    assert [line["sub_batches_per_call"] for line in lines] == [1, 8]
    one, block = lines
    assert one["images_per_sub_batch"] == block["images_per_sub_batch"] == 8
    assert block["output_bytes"] == pytest.approx(8 * one["output_bytes"], rel=0.01)
    assert all(line["peak_rise_mb"] >= 0 and _positive(line["seconds"]) for line in lines)


def test_eval_gather_tiny():
    lines = _run("eval_gather.py", "--rows", "3001", "--dim", "8", "--ranks", "3")
    assert [line["path"] for line in lines] == ["merge_on_rank0", "pickled"]
    for line in lines:
        assert (line["ranks"], line["rows"], line["dim"]) == (3, 3001, 8)
        assert line["rank0_peak_rise_mib"] >= 0 and line["seconds"] >= 0


@pytest.mark.ray
def test_collect_memory_tiny():
    lines = _run("collect_memory.py", "--rows", "3001", "--dim", "8", "--blocks", "5")
    assert [line["path"] for line in lines] == ["collect_embeddings", "concat_sort"]
    for line in lines:
        assert (line["rows"], line["dim"], line["blocks"]) == (3001, 8, 5)
        assert line["peak_rise_mib"] >= 0 and line["seconds"] >= 0


def test_eval_metrics_agrees_with_pml():
    (report,) = _run("eval_metrics.py", "--num", "800", "--dim", "8", "--classes", "16",
                     "--compare-pml", "--gpu-num", "1000")
    pml = report["pml"]
    assert set(pml["metrics"]) == {"precision_at_1", "mean_average_precision_at_r", "r_precision", "NMI"}
    # Same exact search: the ranking metrics agree to float rounding.
    assert pml["max_abs_difference_ranking"] < 1e-4
    # NMI: PML runs its own k-means (other seed and iterations), so only roughly equal.
    assert pml["nmi_abs_difference"] < 0.1
    for side in (report["ours"], pml):
        assert _positive(side["peak_rss_mib"]) and side["seconds_total"] >= 0
    assert "not_measured" in report["gpu_run"] or _positive(report["gpu_run"]["seconds_total"])


def test_planner_costs_tiny():
    (row,) = _run("planner_costs.py", "--num", "3000", "--clusters", "40", "--batch", "32", "--repeats", "3")
    assert row["num"] == 3000 and row["clusters"] == 40
    assert all(map(_positive, row["shuffle_plan_ms"].values()))
    assert all(map(_positive, row["seed_weights_ms"].values()))
