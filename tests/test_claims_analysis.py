"""The claims analysis (benchmarks/claims.py): its arithmetic on hand-made histories, and its
reading of a sweep from a real (sqlite) MLflow store. No Ray."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "claims.py"
_spec = importlib.util.spec_from_file_location("claims_analysis", _PATH)
claims = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = claims  # dataclasses look their module up
_spec.loader.exec_module(claims)


def test_first_step_reaching_a_target_error():
    history = [(30, 0.70), (10, 0.40), (20, 0.61), (40, 0.65)]  # unsorted on purpose
    assert claims.first_step_reaching(history, 0.40) == 20   # error 0.39 at step 20
    assert claims.first_step_reaching(history, 0.30) == 30   # exactly 1 - 0.70
    assert claims.first_step_reaching(history, 0.60) == 10
    assert claims.first_step_reaching(history, 0.25) is None  # never that low


def test_t_interval_by_hand():
    ci = claims.t_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, 2) = 4.303: half width 4.303 / sqrt(3) = 2.4843
    assert ci.mean == pytest.approx(2.0)
    assert ci.high - ci.mean == pytest.approx(4.303 / math.sqrt(3), rel=1e-6)
    assert ci.mean - ci.low == pytest.approx(ci.high - ci.mean)
    assert claims.t_interval([5.0, None]).n == 1
    assert claims.t_interval([]).n == 0
    assert claims.t_quantile(12) == claims.t_quantile(10)  # conservative between table entries


def _run(arm, modes, seed, history):
    return claims.Run(run_id=f"{arm}{modes}{seed}", arm=arm, modes=modes, seed=seed, status="FINISHED",
                      history=sorted(history))


def test_magnet_speedup_and_paired_differences():
    steps = [10, 20, 30, 40, 50, 60]
    triplet = {s: _run("triplet", 3, s, list(zip(steps, [0.4, 0.5, 0.55, 0.6, 0.65, 0.7], strict=True))) for s in (0, 1)}
    magnet = {
        0: _run("magnet", 3, 0, list(zip(steps, [0.5, 0.7, 0.72, 0.72, 0.73, 0.74], strict=True))),  # 0.3 error at 20
        1: _run("magnet", 3, 1, list(zip(steps, [0.5, 0.6, 0.62, 0.64, 0.66, 0.68], strict=True))),  # never
    }
    groups = {("triplet", 3): triplet, ("magnet", 3): magnet}
    s = claims.magnet_speedup(groups, 3)
    assert s["target_error"] == pytest.approx(0.3)
    assert s["magnet_first"] == {0: 20, 1: None}
    assert s["triplet_first"] == {0: 60, 1: 60}
    assert s["speedup_vs_length"].mean == pytest.approx(3.0) and s["speedup_vs_length"].n == 1
    assert s["not_reached"] == [1] and s["at_first_eval"] == []
    diffs = claims.paired_differences(magnet, triplet, lambda r: r.final)
    assert list(diffs) == [0, 1] and list(diffs.values()) == pytest.approx([0.04, -0.02])


def test_multi_center_difference_of_differences_pairs_by_seed():
    def final(arm, modes, seeds_values):
        return {s: _run(arm, modes, s, [(60, v)]) for s, v in seeds_values.items()}

    groups = {
        ("magnet", 3): final("magnet", 3, {0: 0.60, 1: 0.62, 2: 0.64}),
        ("normalized_softmax", 3): final("normalized_softmax", 3, {0: 0.50, 1: 0.52, 2: 0.54}),
        ("magnet", 1): final("magnet", 1, {0: 0.70, 2: 0.72}),  # seed 1 missing
        ("normalized_softmax", 1): final("normalized_softmax", 1, {0: 0.68, 1: 0.69, 2: 0.70}),
    }
    d = claims.multi_center(groups)["magnet"]
    assert d[3].mean == pytest.approx(0.10) and d[3].n == 3 and d[3].high - d[3].low == pytest.approx(0.0, abs=1e-9)
    assert d[1].mean == pytest.approx(0.02) and d[1].n == 2
    assert d["3-1"].mean == pytest.approx(0.08) and d["3-1"].n == 2  # seeds 0 and 2 only


def test_report_of_a_sweep_of_some_arms_at_its_own_length():
    steps = list(range(10, 301, 10))
    runs = [_run(arm, 3, seed, [(s, 0.5 + s / 1000) for s in steps]) for arm in ("triplet", "magnet") for seed in (0, 1, 2)]
    text = claims.report(runs, 300, arms=("triplet", "magnet"), modes_run=(3,))
    assert "6 complete runs of 6 found" in text and "Missing: none" in text
    assert "R@1 at step 150 | R@1 at step 300" in text
    assert "| triplet | 3 | 3 | 0.800" in text and "softtriple" not in text.split("**Claim 1")[0]
    assert "**Claim 2" not in text and "**Claim 3" not in text
    # Against the full design the other arms are missing; a run short of its length is not complete.
    assert "softtriple modes=3 seed=0" in claims.report(runs, 300)
    assert "0 complete runs of 6" in claims.report(runs, 310, arms=("triplet", "magnet"), modes_run=(3,))


def test_load_runs_reads_the_chosen_metric_per_arm(tmp_path):
    # A real (sqlite) MLflow store with a sweep's parent and two children, as the sweep logs them.
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("claims", artifact_location=str(tmp_path / "artifacts"))
    client.create_run(experiment, tags={"sweep.name": "long"})  # the parent: no loss.name
    for loss, seen_knn, seen_magnet in (("triplet", (0.7, 0.8), None), ("magnet", (0.8, 0.9), (0.9, 1.0))):
        run = client.create_run(experiment, tags={"sweep.name": "long"}).info.run_id
        for key, value in {"loss.name": loss, "data.synthetic.modes_per_class": 3, "train.seed": 1}.items():
            client.log_param(run, key, value)
        for i, step in enumerate((10, 20)):
            client.log_metric(run, "test/recall_at_1", 0.5, step=step)
            client.log_metric(run, "seen/knn_accuracy", seen_knn[i], step=step)
            if seen_magnet is not None:
                client.log_metric(run, "seen/magnet_accuracy", seen_magnet[i], step=step)
        client.set_terminated(run)
    by_arm = lambda runs: {r.arm: r.history for r in runs}  # noqa: E731
    assert by_arm(claims.load_runs(uri, "claims", "long")) == {
        "triplet": [(10, 0.5), (20, 0.5)], "magnet": [(10, 0.5), (20, 0.5)]}
    assert by_arm(claims.load_runs(uri, "claims", "long", "seen/knn_accuracy")) == {
        "triplet": [(10, 0.7), (20, 0.8)], "magnet": [(10, 0.8), (20, 0.9)]}
    runs = claims.load_runs(uri, "claims", "long", "seen/knn_accuracy", magnet_metric="seen/magnet_accuracy")
    assert by_arm(runs) == {"triplet": [(10, 0.7), (20, 0.8)], "magnet": [(10, 0.9), (20, 1.0)]}
    assert {(r.modes, r.seed, r.status) for r in runs} == {(3, 1, "FINISHED")}


def test_arms_name_triplet_mining_and_the_pddm_form():
    assert claims.arm_of({"loss.name": "triplet", "loss.triplet.mining": "semi_hard"}) == "triplet"
    assert claims.arm_of({"loss.name": "triplet", "loss.triplet.mining": "batch_hard"}) == "triplet_batch_hard"
    preset = {"loss.name": "pddm", "loss.pddm.quadruplets": "per_positive_pair", "loss.pddm.negatives": "semi_hard"}
    assert claims.arm_of(preset) == "pddm"
    assert claims.arm_of({**preset, "loss.pddm.quadruplets": "hardest", "loss.pddm.negatives": "hardest"}) == "pddm_paper"
    # A form that is neither arm is named by both settings, never counted as one of them.
    assert claims.arm_of({**preset, "loss.pddm.negatives": "hardest"}) == "pddm_per_positive_pair_hardest"


def test_claim_3_compares_each_pddm_arm_with_batch_hard_by_seed():
    def runs(arm, finals):
        return {s: _run(arm, 3, s, [(10, 0.1), (20, v)]) for s, v in enumerate(finals)}

    groups = {("triplet", 3): runs("triplet", [0.5, 0.5, 0.5]),
              ("triplet_batch_hard", 3): runs("triplet_batch_hard", [0.2, 0.3, 0.4]),
              ("pddm", 3): runs("pddm", [0.6, 0.6, 0.6]),
              ("pddm_paper", 3): runs("pddm_paper", [0.1, 0.3, 0.4])}
    preset, paper = (claims.pddm_vs_batch_hard(groups, 3, arm) for arm in ("pddm", "pddm_paper"))
    assert preset["final_diff"].mean == pytest.approx(0.3) and preset["final_diff"].n == 3
    # Paper form: diffs -0.1, 0, 0 -> mean -1/30; curve means (0.1 + final) / 2 -> half that.
    assert paper["final_diff"].mean == pytest.approx(-0.1 / 3)
    assert paper["auc_diff"].mean == pytest.approx(-0.05 / 3)
    assert preset["target_recall"] == pytest.approx(0.5)
    assert preset["first"]["pddm"] == {0: 20, 1: 20, 2: 20}
    assert paper["first"]["pddm"] == {0: None, 1: None, 2: None}
    assert claims.pddm_vs_batch_hard(groups, 1, "pddm_paper") == {}  # no runs at modes 1
    text = claims.report([r for g in groups.values() for r in g.values()], 20,
                         arms=("triplet", "triplet_batch_hard", "pddm_paper"), modes_run=(3,))
    claim3 = text.split("**Claim 3")[1]
    assert "| pddm_paper | 3 |" in claim3 and "| pddm | 3 |" not in claim3  # only the arms the sweep ran
    assert "Missing: none" in text
    assert "**Claim 1" not in text and "**Claim 2" not in text  # arms this sweep did not run


def test_a_report_of_the_claims_sweep_expects_its_own_arms_only():
    steps = [10, 20]
    runs = [_run(arm, modes, seed, [(s, 0.5) for s in steps])
            for arm, all_modes in claims.DESIGN.items() if arm != "pddm_paper"
            for modes in all_modes for seed in (0, 1, 2)]
    text = claims.report(runs, 20)  # claims.yaml's 27 runs, default arms
    assert "27 complete runs of 27 found" in text and "Missing: none" in text
    assert "| pddm | 3 |" in text.split("**Claim 3")[1] and "| pddm_paper |" not in text
