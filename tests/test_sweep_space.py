"""Sweep files without Ray: parsing, the errors they give, per-loss spaces for every search,
trial concurrency and the summary table and plot."""

from __future__ import annotations

import csv
import itertools
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.sweep.records import TrialRecord, best_trial, plot_metric_vs_params, write_table
from pipeline.sweep.search import LOSS_BRANCH, basic_param_space, build_search, planned_trials
from pipeline.sweep.space import (
    SweepError,
    base_overrides,
    candidate_configs,
    load_sweep,
    override,
    resource_need,
    space_params,
    trial_concurrency,
    trial_settings,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "pipeline" / "sweeps" / "seeds_vs_baselines.yaml"
CLAIMS_PATH = EXAMPLE.parent / "claims.yaml"

SMALL = """\
name: small
preset: local
fixed: {{train.epochs: 2}}
metric: test/recall@1
search: {search}
num_samples: 2
asha: {{grace_period: 1, reduction_factor: 2}}
space:
  optim.lr: {lr}
losses:
  triplet:
    loss.triplet.margin: {margin}
  contrastive:
    loss.contrastive.neg_margin: {{choice: [0.4, 0.6]}}
"""


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def _small(tmp_path, search="random", lr="{loguniform: [1e-4, 1e-2]}", margin="{uniform: [0.1, 0.3]}"):
    return load_sweep(_write(tmp_path, SMALL.format(search=search, lr=lr, margin=margin)))


def test_example_sweep_is_valid_for_every_loss():
    spec = load_sweep(EXAMPLE)
    configs = candidate_configs(spec, base_overrides(spec, []))
    assert set(configs) == {"triplet", "multi_similarity", "proxy_anchor", "softtriple", "pddm", "magnet"}
    magnet = configs["magnet"][0]
    assert (magnet.loss.name, magnet.sampler.name) == ("magnet", "neighbourhoods")
    # Each loss's own setting reaches only that loss's configs.
    assert {c.loss.triplet.margin for c in configs["triplet"]} == {0.1, 0.3}
    assert {c.loss.triplet.margin for c in configs["magnet"]} == {0.2}
    params = space_params(spec, [])
    assert params["space.optim.lr"] == "loguniform(0.0005, 0.005)"
    # A trial whose driver dies (its node lost) is retried once unless the file says otherwise.
    assert spec.max_failures == 1 and params["sweep.max_failures"] == "1"
    assert params["losses.magnet.sampler.name"] == "'neighbourhoods'"


def test_exponent_numbers_are_floats_and_overrides_round_trip(tmp_path):
    spec = _small(tmp_path)
    assert spec.space["optim.lr"].values == (1e-4, 1e-2)
    config = load_config("local", [override("optim.lr", 1e-5), override("optim.name", "sgd")])
    assert (config.optim.lr, config.optim.name) == (1e-5, "sgd")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nlosses: {triplet: {}}\nserach: grid\n", "serach: unknown key (did you mean 'search'?)"),
        ("name: x\nlosses: {triplet: {loss.triplet.margin: {normal: [0, 1]}}}\n",
         "losses.triplet.loss.triplet.margin: expected one of choice, grid"),
        ("name: x\nsearch: grid\nlosses: {triplet: {loss.triplet.margin: {uniform: [0.1, 0.3]}}}\n",
         "a grid search cannot sample uniform"),
        ("name: x\nlosses: {triplet: {loss.triplet.margin: [0.1, 0.2]}}\n", "a list is ambiguous"),
        ("name: x\nlosses: {triplet: {loss.contrastive.neg_margin: 0.5}}\n", "belongs to another loss"),
        ("name: x\nlosses: {triplet: {}}\nspace: {optim.lr: {loguniform: [0, 1]}}\n", "needs low > 0"),
        ("name: x\n", "losses: required"),
        ("name: a/b\nlosses: {triplet: {}}\n", "name: 'a/b' must be"),
        ("name: x\nlosses: {triplet: {}}\nmax_failures: -1\n", "max_failures: must be >= 0"),
    ],
)
def test_bad_sweep_files_name_the_field(tmp_path, text, message):
    with pytest.raises(SweepError, match="space.yaml") as err:
        load_sweep(_write(tmp_path, text))
    assert message in str(err.value)


def test_a_sweep_file_that_is_missing_or_a_folder_says_which(tmp_path):
    with pytest.raises(SweepError, match=f"sweep file {tmp_path / 'none.yaml'} does not exist"):
        load_sweep(tmp_path / "none.yaml")
    with pytest.raises(SweepError, match=f"sweep file {tmp_path} is a folder"):
        load_sweep(tmp_path)


@pytest.mark.parametrize(
    ("text", "cli", "message"),
    [
        ("losses: {triplet: {loss.triplet.margn: 0.1}}", [], "loss.triplet.margn: unknown setting (did you mean 'margin'?)"),
        ("losses: {trplet: {}}", [], "losses.trplet: loss.name: 'trplet' is not one of"),
        ("losses: {triplet: {loss.triplet.margin: {choice: [0.1, -1.0]}}}", [],
         "with loss.triplet.margin=-1.0: loss.triplet.margin: must be >= 0"),
        ("losses: {triplet: {}}\nmetric: test/recall@3", [], "'test/recall@3' is not reported"),
        ("losses: {triplet: {}}\nmetric: seen/knn_accuracy", [], "'seen/knn_accuracy' is not reported"),
        ("losses: {triplet: {}}", ["eval.every_epochs=2"], "needs the metric every epoch"),
        ("losses: {triplet: {}}\nasha: {grace_period: 2}", [], "asha.grace_period: 2 epochs leaves no epoch"),
        ("losses: {triplet: {loss.triplet.margin: {choice: [0.1, 0.2]}}}", ["loss.triplet.margin=0.3"],
         "--set loss.triplet.margin: the sweep"),
    ],
)
def test_configs_a_sweep_would_run_are_checked_first(tmp_path, text, cli, message):
    spec = load_sweep(_write(tmp_path, "name: x\nfixed: {train.epochs: 2}\n" + text + "\n"))
    with pytest.raises(SweepError) as err:
        candidate_configs(spec, base_overrides(spec, cli))
    assert message in str(err.value)
    assert "space.yaml" in str(err.value)


def test_the_seen_class_accuracy_is_a_sweep_metric_with_a_hold_out(tmp_path):
    spec = load_sweep(_write(tmp_path, "name: x\nfixed: {train.epochs: 2, data.seen_holdout_fraction: 0.2}\n"
                                       "metric: seen/knn_accuracy\nlosses: {triplet: {}, softtriple: {}}\n"))
    configs = candidate_configs(spec, base_overrides(spec, []))
    assert {c.data.seen_holdout_fraction for cs in configs.values() for c in cs} == {0.2}


def _variants(space):
    from ray.tune.search.variant_generator import generate_variants

    return [trial_settings(v) for _, v in generate_variants(space)]


def test_grid_search_expands_each_losses_own_grid(tmp_path):
    spec = _small(tmp_path, search="grid", lr="{choice: [1e-3, 2e-3]}", margin="{choice: [0.1, 0.2]}")
    trials = _variants(basic_param_space(spec))
    # (2 margins for triplet + 2 negative margins for contrastive) x 2 learning rates
    assert len(trials) == 8
    for settings in trials:
        own = "loss.triplet.margin" if settings["loss.name"] == "triplet" else "loss.contrastive.neg_margin"
        assert set(settings) == {"loss.name", "optim.lr", own}
    assert sorted({(s["loss.name"], s.get("loss.triplet.margin")) for s in trials}) == [
        ("contrastive", None), ("triplet", 0.1), ("triplet", 0.2)]


def test_random_search_samples_per_loss_settings_within_their_ranges(tmp_path):
    spec = _small(tmp_path)
    space = basic_param_space(spec)
    assert set(space) == {LOSS_BRANCH, "optim.lr"}
    trials = _variants(space)
    assert sorted(s["loss.name"] for s in trials) == ["contrastive", "triplet"]
    triplet = next(s for s in trials if s["loss.name"] == "triplet")
    assert 0.1 <= triplet["loss.triplet.margin"] <= 0.3 and "loss.contrastive.neg_margin" not in triplet
    assert all(1e-4 <= s["optim.lr"] <= 1e-2 for s in trials)


@pytest.mark.parametrize(
    ("search", "lr", "margin"),
    [
        ("grid", "{choice: [1e-3, 2e-3]}", "{choice: [0.1, 0.2, 0.3]}"),
        ("grid", "{grid: [1e-3, 2e-3, 3e-3]}", "0.2"),
        ("random", "{loguniform: [1e-4, 1e-2]}", "{uniform: [0.1, 0.3]}"),
        ("random", "{grid: [1e-3, 2e-3]}", "{choice: [0.1, 0.2]}"),
        ("optuna", "{loguniform: [1e-4, 1e-2]}", "{choice: [0.1, 0.2]}"),
    ],
)
def test_planned_trials_is_the_number_tune_creates(tmp_path, search, lr, margin):
    """What tells a sweep stopped between two trials from a finished one; counted here against
    Tune's own variant generator (which Tune runs `num_samples` times over)."""
    spec = _small(tmp_path, search=search, lr=lr, margin=margin)
    if search == "optuna":
        assert planned_trials(spec) == spec.num_samples == 2
    else:
        assert planned_trials(spec) == spec.num_samples * len(_variants(basic_param_space(spec)))


@pytest.mark.parametrize("path", [CLAIMS_PATH, EXAMPLE])
def test_planned_trials_of_the_shipped_sweeps(path):
    spec = load_sweep(path)
    assert planned_trials(spec) == spec.num_samples * len(_variants(basic_param_space(spec)))


def test_optuna_asks_only_for_the_chosen_losses_settings(tmp_path):
    pytest.importorskip("optuna")
    spec = _small(tmp_path, search="optuna")
    _, searcher = build_search(spec, concurrency=2)
    assert searcher.max_concurrent == 2
    own = {"triplet": "loss.triplet.margin", "contrastive": "loss.contrastive.neg_margin"}
    seen = set()
    for i in range(12):
        settings = trial_settings(searcher.suggest(f"t{i}"))
        searcher.on_trial_complete(f"t{i}", {"test/recall@1": 0.5})
        seen.add(settings["loss.name"])
        assert set(settings) == {"loss.name", "optim.lr", own[settings["loss.name"]]}
        load_config("local", [override(k, v) for k, v in settings.items()])
    assert seen == {"triplet", "contrastive"}


def test_a_missing_search_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # what an uninstalled package looks like
    spec = _small(tmp_path, search="optuna")
    with pytest.raises(SweepError, match=r"search: optuna needs the optuna package.*pip install -e '\.\[sweep\]' in the clone"):
        build_search(spec, concurrency=1)


def test_hyperopt_space_branches_per_loss(tmp_path):
    pytest.importorskip("hyperopt")
    spec = _small(tmp_path, search="hyperopt")
    _, searcher = build_search(spec, concurrency=1)
    searcher.searcher.set_search_properties("test/recall@1", "max", {})
    losses = set()
    for i in range(8):
        settings = trial_settings(searcher.suggest(f"t{i}"))
        searcher.on_trial_complete(f"t{i}", {"test/recall@1": 0.5})
        losses.add(settings["loss.name"])
        assert ("loss.triplet.margin" in settings) == (settings["loss.name"] == "triplet")
    assert losses == {"triplet", "contrastive"}


def test_concurrency_follows_the_clusters_resources(tmp_path):
    spec = _small(tmp_path)
    configs = [c for per_loss in candidate_configs(spec, base_overrides(spec, [])).values() for c in per_loss]
    # A trial: its driver (1 CPU) + 2 workers x 0.5 + 1 decode actor x 0.5 + a 0.25-CPU
    # Ray Data task = 2.75 CPUs.
    assert resource_need(configs[0]) == {"CPU": 2.75, "GPU": 0.0}
    assert trial_concurrency(configs, {"CPU": 4.0}) == 1
    assert trial_concurrency(configs, {"CPU": 11.0}) == 4
    assert trial_concurrency(configs, {"CPU": 11.0}, requested=2) == 2
    with pytest.raises(SweepError, match="a trial needs 2.75 CPU .* the cluster has 2$"):
        trial_concurrency(configs, {"CPU": 2.0})
    # A cluster whose autoscaler has not started its nodes yet (cluster.yaml: a CPU-0 head and
    # min_workers 0): the sweep file's number is used, and Tune's trials wait for the nodes.
    said = []
    assert trial_concurrency(configs, {"CPU": 0.0}, 3, nodes_may_come=True, printer=lambda *a, **k: said.append(a)) == 3
    assert said == [("warning: a trial needs 2.75 CPU but the cluster has 0 now: the sweep's 3 trial(s) wait for "
                     "the nodes an autoscaler starts; on a cluster of fixed size they would wait for ever (stop "
                     "the sweep)",)]
    with pytest.raises(SweepError, match="the cluster has 0; on an autoscaling cluster .* set max_concurrent_trials"):
        trial_concurrency(configs, {"CPU": 0.0}, nodes_may_come=True)
    # Magnet: each rank has its own decode actors, and the refresh actor has 0.5 CPU:
    # 1 + 2 x 0.5 + 2 x 1 x 0.5 + 0.25 + 0.5.
    assert resource_need(load_config("magnet", []))["CPU"] == 3.75
    gpu = [load_config("local", ["train.use_gpu=true", "train.num_workers=2"])]
    assert trial_concurrency(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4


def test_a_shared_gpu_counts_the_workers_share_and_the_refresh_actors():
    from pipeline.training.driver import scaling_config

    # One GPU shared by the worker (0.9) and Magnet's refresh actor (0.1): a trial per GPU.
    shared = load_config("magnet", ["train.use_gpu=true", "train.num_workers=1", "train.gpus_per_worker=0.9",
                                    "refresh.num_gpus=0.1"])
    assert resource_need(shared)["GPU"] == pytest.approx(1.0)
    assert trial_concurrency([shared], {"CPU": 64.0, "GPU": 2.0}) == 2
    assert scaling_config(shared).resources_per_worker == {"CPU": 0.5, "GPU": 0.9}
    # Shares that sum to whole GPUs but that Ray cannot place so: a 0.75 worker and a 0.5
    # actor never share a GPU (two actors do), so a trial of 2 such workers takes 3 GPUs.
    apart = load_config("magnet", ["train.use_gpu=true", "train.num_workers=2", "train.gpus_per_worker=0.75",
                                   "refresh.num_gpus=0.5"])
    assert resource_need(apart)["GPU"] == pytest.approx(2.0)
    assert trial_concurrency([apart], {"CPU": 64.0, "GPU": 4.0}) == 1  # (2 by their sum)
    assert trial_concurrency([apart], {"CPU": 64.0, "GPU": 5.0}) == 2
    with pytest.raises(SweepError, match=r"GPU shares \[0.5, 0.75, 0.75\] do not fit on the cluster's 2 GPUs"):
        trial_concurrency([apart], {"CPU": 64.0, "GPU": 2.0})
    # Without GPUs the share asks for nothing; with them the default is a whole GPU each.
    assert "GPU" not in scaling_config(load_config("local", ["train.gpus_per_worker=0.7"])).resources_per_worker
    whole = load_config("local", ["train.use_gpu=true", "train.num_workers=2"])
    assert scaling_config(whole).resources_per_worker["GPU"] == 1.0
    assert resource_need(whole)["GPU"] == 2.0


def _records():
    return [
        TrialRecord("a_00000", "triplet", {"optim.lr": 1e-3, "loss.triplet.margin": 0.1}, 2, 2, 0.50, "completed",
                    run_name="triplet-a_00000"),
        TrialRecord("a_00001", "triplet", {"optim.lr": 3e-3, "loss.triplet.margin": 0.2}, 1, 2, 0.70, "stopped early",
                    run_name="triplet-a_00001"),
        TrialRecord("a_00002", "contrastive", {"optim.lr": 2e-3, "loss.contrastive.neg_margin": 0.4}, 2, 2, 0.60,
                    "completed", run_name="contrastive-a_00002"),
        TrialRecord("a_00003", "contrastive", {"optim.lr": 5e-4, "loss.contrastive.neg_margin": 0.6}, 0, 2, None,
                    "failed", run_name="contrastive-a_00003"),
    ]


def test_summary_table_and_plot(tmp_path):
    spec = _small(tmp_path)
    records = _records()
    # The best model is the best trial that ran every epoch; a stopped one is not a model.
    assert best_trial(records, "max").trial_id == "a_00002"
    assert best_trial(records, "max", completed_only=False).trial_id == "a_00001"
    assert best_trial(records, "min").trial_id == "a_00000"
    write_table(records, spec, tmp_path)
    with (tmp_path / "trials.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert [r["run"] for r in rows] == ["triplet-a_00001", "contrastive-a_00002", "triplet-a_00000",
                                        "contrastive-a_00003"]
    assert rows[0]["status"] == "stopped early" and rows[0]["epochs"] == "1/2"
    assert rows[0]["loss.triplet.margin"] == "0.2" and rows[1]["loss.triplet.margin"] == ""
    assert "| triplet-a_00001 | triplet | stopped early |" in (tmp_path / "trials.md").read_text()
    png = plot_metric_vs_params(records, spec, tmp_path / "plot.png")
    from PIL import Image

    with Image.open(png) as image:
        # Two losses (rows) x two swept settings each (columns) at 90 dpi.
        assert image.size == (8 * 90, 6 * 90)


def test_asha_rungs_stop_before_the_last_epoch(tmp_path):
    from pipeline.sweep.search import build_scheduler

    spec = _small(tmp_path)
    # Epochs 2: one rung, at epoch 1; a trial at its last epoch is never stopped (it must log
    # its model), so there is no rung at epoch 2.
    assert "Iter 1.000" in build_scheduler(spec, 2).debug_string()
    assert "Iter 2.000" not in build_scheduler(spec, 2).debug_string()
    spec.asha = type(spec.asha)(grace_period=2, reduction_factor=2)
    rungs = build_scheduler(spec, 8).debug_string()
    assert "Iter 2.000" in rungs and "Iter 4.000" in rungs and "Iter 8.000" not in rungs


CLAIMS = Path(__file__).resolve().parent.parent / "pipeline" / "sweeps" / "claims.yaml"


def test_claims_sweep_grids_every_arm_over_its_modes_and_seeds():
    """The papers'-claims sweep: magnet, softtriple and normalized_softmax at modes_per_class
    3 and 1, triplet (semi-hard, batch-hard) and pddm at 3 only, x 3 seeds = 27 trials, each
    loss with its preset's settings, seed by seed."""
    from ray.tune.search.variant_generator import generate_variants

    spec = load_sweep(CLAIMS)
    assert spec.search == "grid" and spec.asha is None
    trials = [trial_settings(v) for _, v in generate_variants(basic_param_space(spec))]
    arms = [(t["loss.name"], t.get("loss.triplet.mining"), t["data.synthetic.modes_per_class"], t["train.seed"])
            for t in trials]
    assert len(trials) == len(set(arms)) == 27
    assert [a[3] for a in arms] == sorted(a[3] for a in arms)  # whole seeds first
    assert {a[2] for a in arms if a[0] in ("triplet", "pddm")} == {3}
    assert {a[2] for a in arms if a[0] in ("magnet", "softtriple", "normalized_softmax")} == {3, 1}
    magnet = next(t for t in trials if t["loss.name"] == "magnet")
    assert magnet["sampler.name"] == "neighbourhoods" and magnet["refresh.every_steps"] == 27
    pddm = next(t for t in trials if t["loss.name"] == "pddm")
    assert pddm["sampler.name"] == "hard_pools" and pddm["loss.pddm.negatives"] == "semi_hard"
    configs = candidate_configs(spec, base_overrides(spec, []))
    assert all(c.eval.nmi is False and c.train.steps_per_epoch == 10 for cs in configs.values() for c in cs)


def test_refresh_actor_is_started_outside_the_callers_placement_group(monkeypatch):
    """A sweep trial's driver runs in Tune's 1-CPU placement group, which refuses a child
    actor; the refresh actor asks for the default scheduling, so Magnet and PDDM trials start."""
    from types import SimpleNamespace

    import ray

    from pipeline.training import driver

    options = {}

    class FakeActorClass:
        def options(self, **kwargs):
            options.update(kwargs)
            return self

        def remote(self, *args):
            return "actor"

    monkeypatch.setattr(ray, "remote", lambda cls: FakeActorClass())
    data = SimpleNamespace(store=None, holdout_ids=None)
    assert driver.start_refresh_actor(load_config("magnet"), "a", data, "run", "uri") == "actor"
    assert options["scheduling_strategy"] == "DEFAULT"


CLAIMS_LONG = CLAIMS.parent / "claims_long.yaml"


def test_long_claims_sweep_runs_the_claims_sweeps_triplet_and_magnet_arms_longer():
    """claims_long.yaml: semi-hard triplet and Magnet at modes 3, 3 seeds, 200 steps with an
    evaluation every 10, and the same Magnet settings as the claims sweep."""
    from ray.tune.search.variant_generator import generate_variants

    spec, short = load_sweep(CLAIMS_LONG), load_sweep(CLAIMS)
    trials = [trial_settings(v) for _, v in generate_variants(basic_param_space(spec))]
    assert sorted((t["loss.name"], t["train.seed"]) for t in trials) == [
        (loss, seed) for loss in ("magnet", "triplet") for seed in (0, 1, 2)]
    assert {k: d for k, d in spec.losses["magnet"].items()} == {
        k: d for k, d in short.losses["magnet"].items() if k != "data.synthetic.modes_per_class"}
    configs = [c for cs in candidate_configs(spec, base_overrides(spec, [])).values() for c in cs]
    assert {(c.train.epochs * c.train.steps_per_epoch, c.data.synthetic.modes_per_class) for c in configs} == {(200, 3)}
    assert {c.loss.triplet.mining for c in configs if c.loss.name == "triplet"} == {"semi_hard"}


CLAIMS_PDDM = CLAIMS.parent / "claims_pddm.yaml"


def test_pddm_claims_sweep_runs_the_papers_form_beside_both_triplet_arms():
    """claims_pddm.yaml: PDDM with the paper's hardest negative and one quadruplet per batch,
    Euclidean batch-hard and semi-hard triplet, 3 seeds, with the claims sweep's run length,
    data and the same pools and refresh as its PDDM arm."""
    from ray.tune.search.variant_generator import generate_variants

    spec, short = load_sweep(CLAIMS_PDDM), load_sweep(CLAIMS)
    trials = [trial_settings(v) for _, v in generate_variants(basic_param_space(spec))]
    arms = [(t["loss.name"], t.get("loss.triplet.mining"), t["train.seed"]) for t in trials]
    assert sorted(arms) == sorted((*arm, seed) for seed in (0, 1, 2) for arm in (
        ("triplet", "semi_hard"), ("triplet", "batch_hard"), ("pddm", None)))
    assert [a[2] for a in arms] == sorted(a[2] for a in arms)  # whole seeds first
    forms = {k: v for k, v in spec.losses["pddm"].items() if not k.startswith("loss.pddm.")}
    assert forms == {k: v for k, v in short.losses["pddm"].items()
                     if not k.startswith("loss.pddm.") and k != "data.synthetic.modes_per_class"}
    configs = [c for cs in candidate_configs(spec, base_overrides(spec, [])).values() for c in cs]
    assert {(c.train.epochs * c.train.steps_per_epoch, c.train.steps_per_epoch, c.data.synthetic.modes_per_class)
            for c in configs} == {(60, 10, 3)}
    (pddm,) = {(c.loss.pddm.quadruplets, c.loss.pddm.negatives) for c in configs if c.loss.name == "pddm"}
    assert pddm == ("hardest", "hardest")


@pytest.mark.parametrize(
    ("text", "cli", "message"),
    [
        ("losses: {triplet: {storage.s3_max_attempts: {choice: [3, 5]}}}", [],
         "storage.s3_max_attempts: where records go, and how they are reached, cannot vary"),
        ("losses: {triplet: {}}", ["storage.s3_max_attempts=0"], "storage.s3_max_attempts: must be >= 1"),
    ],
)
def test_storage_settings_are_fixed_and_checked_before_ray_starts(
    tmp_path, text, cli, message, ray_must_not_start,
):  # fmt: skip
    from pipeline.sweep.runner import run_sweep

    spec = load_sweep(_write(tmp_path, "name: x\nfixed: {train.epochs: 2}\n" + text + "\n"))
    with pytest.raises(SweepError, match="space.yaml") as err:
        run_sweep(spec, cli)
    assert message in str(err.value)


MAGNET_REFRESH = """\
name: x
preset: magnet
search: {search}
fixed: {{train.epochs: 2}}
losses:
  magnet:
    refresh.lag_steps: {lag}
    refresh.max_plan_ahead_steps: {{choice: [8, 16]}}
"""


@pytest.mark.parametrize(
    ("search", "lag"),
    [("grid", "{choice: [0, 12]}"), ("random", "{randint: [0, 13]}")],  # a range's ends, 0 and 12
)
def test_a_bad_combination_of_valid_values_is_refused_before_ray_starts(
    tmp_path, search, lag, ray_must_not_start,
):  # fmt: skip
    """lag 12 is fine with plan-ahead 8 and plan-ahead 16 with lag 0; together they cannot run."""
    from pipeline.sweep.runner import run_sweep

    spec = load_sweep(_write(tmp_path, MAGNET_REFRESH.format(search=search, lag=lag)))
    with pytest.raises(SweepError) as err:
        run_sweep(spec, [])
    assert str(err.value) == (
        f"{tmp_path / 'space.yaml'}: losses.magnet with refresh.lag_steps=12, refresh.max_plan_ahead_steps=16: "
        "refresh.lag_steps: must be 0 (newest index) or > refresh.max_plan_ahead_steps = 16, got 12"
    )


def test_every_combination_of_a_valid_space_is_checked(tmp_path):
    text = MAGNET_REFRESH.format(search="random", lag="{choice: [0, 20]}")
    spec = load_sweep(_write(tmp_path, text + "space: {optim.lr: {loguniform: [1e-4, 1e-2]}}\n"))
    (configs,) = candidate_configs(spec, base_overrides(spec, [])).values()
    points = [(c.optim.lr, c.refresh.lag_steps, c.refresh.max_plan_ahead_steps) for c in configs]
    assert sorted(points) == sorted(itertools.product([1e-4, 1e-2], [0, 20], [8, 16]))


def test_a_space_past_the_cap_is_checked_pair_by_pair(tmp_path, monkeypatch):
    from pipeline.sweep import space

    monkeypatch.setattr(space, "COMBINATIONS_CHECKED", 26)  # 3 x 3 x 3 = 27 combinations
    text = MAGNET_REFRESH.format(search="grid", lag="{choice: [0, 20, 30]}").replace(
        "[8, 16]", "[8, 12, 16]") + "    loss.magnet.alpha: {choice: [0.5, 1.0, 2.0]}\n"
    spec = load_sweep(_write(tmp_path, text))
    (configs,) = candidate_configs(spec, base_overrides(spec, [])).values()
    points = [(c.refresh.lag_steps, c.refresh.max_plan_ahead_steps, c.loss.magnet.alpha) for c in configs]
    # The first values, 2 x 3 single changes and 3 pairs of settings x 2 x 2 changed values.
    assert len(points) == len(set(points)) == 1 + 6 + 12
    values = ([0, 20, 30], [8, 12, 16], [0.5, 1.0, 2.0])
    for i, j in itertools.combinations(range(3), 2):
        assert {(p[i], p[j]) for p in points} == set(itertools.product(values[i], values[j]))
    # A pair that cannot run is still found, with the third setting named as its first value.
    spec = load_sweep(_write(tmp_path, text.replace("[0, 20, 30]", "[0, 14, 30]")))
    with pytest.raises(SweepError) as err:
        candidate_configs(spec, base_overrides(spec, []))
    assert ("losses.magnet with refresh.lag_steps=14, refresh.max_plan_ahead_steps=16 (the other swept "
            "settings at their first value or lower bound): refresh.lag_steps: must be 0") in str(err.value)


def test_a_sweep_another_process_is_running_is_refused_before_ray_starts(tmp_path, ray_must_not_start):
    """Two sweeps of one name started together: Tune writes the experiment only later, so the
    name check alone lets both through into one experiment. The sweep's lock does not."""
    from lock_holder import lock_held_elsewhere
    from short_runs import TINY_BUILT_IN

    from pipeline.sweep.runner import LOCK_DIR, run_sweep

    spec = load_sweep(_write(tmp_path, "name: twice\nfixed: {train.epochs: 2}\nlosses: {triplet: {}}\n"))
    cli = [*TINY_BUILT_IN, f"data.cache_dir={tmp_path}/data", f"train.storage_path={tmp_path}/runs",
           f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    with lock_held_elsewhere(f"{tmp_path}/runs/{LOCK_DIR}", "twice") as holder:
        with pytest.raises(SweepError, match=(
            rf"^a sweep named 'twice' is being run by pid {holder.pid} on \S+; wait for it to end"
        )):  # fmt: skip
            run_sweep(spec, cli)
    with pytest.raises(AssertionError, match="reached for Ray"):  # ended: this one goes on
        run_sweep(spec, cli)


def test_a_trial_s_config_does_not_read_the_preset_file_where_it_runs(tmp_path):
    """A trial runs on any node of the cluster, where the YAML preset the sweep names (a path on
    the driver's machine) may not be: its settings travel with the trial, as the driver read them."""
    from pipeline.config import read_preset
    from pipeline.sweep.trial import TrialSetup, trial_config

    preset = tmp_path / "mine.yaml"
    preset.write_text("loss:\n  name: contrastive\noptim:\n  lr: 0.0042\n")
    setup = TrialSetup(str(preset), ("train.epochs=3",), "s", "parent", preset_settings=read_preset(str(preset)))
    preset.unlink()  # (not on this node)
    config = trial_config(setup, {"loss.name": "contrastive"}, "abc")
    assert (config.optim.lr, config.train.epochs, config.train.run_name) == (0.0042, 3, "contrastive-abc")
    assert setup.preset_settings == {"loss": {"name": "contrastive"}, "optim": {"lr": 0.0042}}  # not changed
