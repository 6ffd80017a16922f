"""The papers' claims on the built-in dataset, from the runs of the claims sweep in MLflow.

Reads every child run of the sweep (`pipeline/sweeps/claims.yaml`) with MlflowClient: its
arm (loss, and triplet's mining), `data.synthetic.modes_per_class`, `train.seed` and the full
history of `test/recall@1` (1 - Recall@1 on the unseen test classes is the test error), or of
the metric --metric names: `seen/knn_accuracy` (a sweep with a seen-class hold-out, such as
claims_long.yaml) makes the error the seen-class classification error the Magnet paper
reports, and --magnet-metric seen/magnet_accuracy scores the Magnet arm by its own soft
cluster vote instead of the kNN vote. Then:

1. Magnet vs triplet (Rippel et al. 2016: Magnet reaches the error triplet ends at in 5-30x
   fewer iterations). Target E* = the mean final test error of the semi-hard triplet runs at
   that modes_per_class. For each run, the first evaluated step whose error is <= E*
   (`first_step_reaching`; None when never). Speed-up per seed = triplet's run length (the
   steps it took to end at E*) / Magnet's step, and, paired by seed, triplet's own first step
   at E* / Magnet's.
2. Multi-center (Magnet, SoftTriple) minus single-center normalised softmax, final Recall@1,
   paired by seed, at modes 3 and 1, and the difference of the two differences (the claim:
   positive at 3, about zero at 1).
3. PDDM vs Euclidean batch-hard triplet, for each PDDM arm the sweep ran: `pddm` (the pddm
   preset: semi-hard negatives, one quadruplet per positive pair; claims.yaml) and `pddm_paper`
   (the paper's hardest negative and one quadruplet per batch; claims_pddm.yaml): final
   Recall@1, the mean Recall@1 over all evaluations (area under the curve / steps: convergence
   speed), paired by seed, and the first step reaching the semi-hard triplet arm's mean final
   Recall@1.

Intervals: mean and a two-sided 95 % Student-t interval across seeds (`t_interval`; with 3
seeds t = 4.30, so the intervals are wide). Writes `recall_vs_step_modes<m>.png` (mean test
Recall@1 per arm, band = min..max over seeds) to --out and prints markdown tables.

    python benchmarks/claims.py --tracking-uri sqlite:///runs/claims/mlflow.db
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

METRIC = "test/recall_at_1"
"""The metric read by default (its MLflow name): accuracies, so error = 1 - value."""
CLAIMS_ARMS = ("triplet", "magnet", "softtriple", "normalized_softmax", "pddm", "triplet_batch_hard")
"""The arms of pipeline/sweeps/claims.yaml: what a report covers unless --arms says otherwise."""
ARMS = (*CLAIMS_ARMS, "pddm_paper")
"""Every arm a report knows (pddm_paper is claims_pddm.yaml's)."""
DESIGN = {"triplet": (3,), "triplet_batch_hard": (3,), "pddm": (3,), "pddm_paper": (3,),
          "magnet": (3, 1), "softtriple": (3, 1), "normalized_softmax": (3, 1)}
"""The arms of the claims sweeps (pipeline/sweeps/claims*.yaml) and the modes_per_class each
runs at."""
PDDM_FORMS = {("per_positive_pair", "semi_hard"): "pddm", ("hardest", "hardest"): "pddm_paper"}
"""(loss.pddm.quadruplets, loss.pddm.negatives) -> arm: the pddm preset's form and the paper's."""
PDDM_ARMS = tuple(PDDM_FORMS.values())
MULTI_CENTER = ("magnet", "softtriple")
SINGLE_CENTER = "normalized_softmax"

# Two-sided 95 % Student-t quantiles by degrees of freedom (scipy is not a dependency).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (table, conservative
    between entries; 1.96 beyond 30)."""
    if df < 1:
        raise ValueError("an interval needs at least 2 values")
    if df in _T975:
        return _T975[df]
    larger = [d for d in _T975 if d < df]
    return _T975[max(larger)] if df <= 30 else 1.96


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a"
        if self.n == 1:
            return f"{self.mean:.3f} (n=1)"
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def t_interval(values) -> Interval:
    """Mean and two-sided 95 % t-interval of `values` (None entries dropped)."""
    values = [float(v) for v in values if v is not None]
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def first_step_reaching(history, target_error: float):
    """The first step of `history` ([(step, recall@1), ...], any order) whose error
    1 - recall@1 is at most `target_error`; None when no evaluation gets there."""
    for step, recall in sorted(history):
        if 1.0 - recall <= target_error + 1e-12:
            return step
    return None


def curve_mean(history) -> float:
    """Mean Recall@1 over the evaluations (equally spaced: area under the curve / length)."""
    return sum(r for _, r in history) / len(history)


@dataclass
class Run:
    run_id: str
    arm: str
    modes: int
    seed: int
    status: str
    history: list = field(default_factory=list)
    """[(step, recall@1)], sorted, one value per step (the last logged)."""
    wall_s: float = math.nan

    @property
    def final(self) -> float:
        return self.history[-1][1]

    @property
    def final_step(self) -> int:
        return self.history[-1][0]


def arm_of(params: dict) -> str:
    """A run's arm, from its logged config: the loss, and the variant for triplet (its mining)
    and PDDM (its quadruplets and negatives; a form of neither arm is named by both)."""
    loss = params.get("loss.name", "?")
    if loss == "triplet" and params.get("loss.triplet.mining", "semi_hard") != "semi_hard":
        return f"triplet_{params['loss.triplet.mining']}"
    if loss == "pddm":
        form = (params.get("loss.pddm.quadruplets", "?"), params.get("loss.pddm.negatives", "?"))
        return PDDM_FORMS.get(form, "pddm_{}_{}".format(*form))
    return loss


def load_runs(tracking_uri: str, experiment: str, sweep: str, metric: str = METRIC,
              magnet_metric: str = "") -> list[Run]:
    """The sweep's child runs, each with the history of `metric` (of `magnet_metric` for the
    Magnet arm, when given). Metric names are MLflow's (`@` written `_at_`)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no MLflow experiment {experiment!r} in {tracking_uri}")
    runs = client.search_runs(
        [found.experiment_id], filter_string=f"tags.`sweep.name` = '{sweep}'", max_results=5000
    )
    out = []
    for r in runs:
        params = r.data.params
        if "loss.name" not in params:  # the sweep's parent run
            continue
        arm = arm_of(params)
        name = magnet_metric if arm == "magnet" and magnet_metric else metric
        by_step = {}
        for m in sorted(client.get_metric_history(r.info.run_id, name), key=lambda m: m.timestamp):
            by_step[m.step] = m.value
        end = r.info.end_time or r.info.start_time
        out.append(Run(
            run_id=r.info.run_id,
            arm=arm,
            modes=int(params["data.synthetic.modes_per_class"]),
            seed=int(params["train.seed"]),
            status=r.info.status,
            history=sorted(by_step.items()),
            wall_s=(end - r.info.start_time) / 1000.0,
        ))
    return out


def complete_runs(runs: list[Run], steps: int) -> list[Run]:
    """Finished runs whose history reaches `steps` (the planned length)."""
    return [r for r in runs if r.status == "FINISHED" and r.history and r.final_step >= steps]


def group(runs: list[Run]) -> dict:
    """(arm, modes) -> {seed: Run}."""
    out = defaultdict(dict)
    for r in runs:
        out[(r.arm, r.modes)][r.seed] = r
    return out


def magnet_speedup(groups: dict, modes: int) -> dict:
    """Claim 1 at one modes_per_class: the target error, each run's first step at it, and the
    speed-ups across seeds."""
    triplet = groups.get(("triplet", modes), {})
    magnet = groups.get(("magnet", modes), {})
    if not triplet or not magnet:
        return {}
    target = t_interval([1.0 - r.final for r in triplet.values()]).mean
    t_first = {s: first_step_reaching(r.history, target) for s, r in triplet.items()}
    m_first = {s: first_step_reaching(r.history, target) for s, r in magnet.items()}
    length = t_interval([r.final_step for r in triplet.values()]).mean
    vs_length = [length / step if step else None for step in m_first.values()]
    paired = [t_first[s] / m_first[s] for s in m_first if s in t_first and t_first[s] and m_first[s]]
    return {
        "target_error": target,
        "triplet_first": t_first,
        "magnet_first": m_first,
        "triplet_length": length,
        "speedup_vs_length": t_interval(vs_length),
        "speedup_paired": t_interval(paired),
        "not_reached": sorted(s for s, v in m_first.items() if v is None),
        # Reached at the first evaluation: the true step may be earlier, so the speed-up is
        # a lower bound (the evaluation period limits what can be measured).
        "at_first_eval": sorted(s for s, r in magnet.items() if m_first[s] is not None and m_first[s] == r.history[0][0]),
    }


def paired_differences(a: dict, b: dict, value) -> dict:
    """{seed: value(a[seed]) - value(b[seed])} for every seed both have."""
    return {s: value(a[s]) - value(b[s]) for s in sorted(a) if s in b}


def multi_center(groups: dict) -> dict:
    """Claim 2: (multi - single) final Recall@1 per modes_per_class, and its change 3 vs 1
    (paired by train.seed)."""
    out = {}
    for multi in MULTI_CENTER:
        per_mode = {
            modes: paired_differences(
                groups.get((multi, modes), {}), groups.get((SINGLE_CENTER, modes), {}), lambda r: r.final
            )
            for modes in (3, 1)
        }
        interaction = [per_mode[3][s] - per_mode[1][s] for s in per_mode[3] if s in per_mode[1]]
        out[multi] = {3: t_interval(per_mode[3].values()), 1: t_interval(per_mode[1].values()),
                      "3-1": t_interval(interaction)}
    return out


def pddm_vs_batch_hard(groups: dict, modes: int, arm: str = "pddm") -> dict:
    """Claim 3: the PDDM `arm` minus batch-hard (final and mean-over-curve Recall@1, paired by
    seed), and each run's first step at the semi-hard triplet arm's mean final Recall@1."""
    pddm = groups.get((arm, modes), {})
    bh = groups.get(("triplet_batch_hard", modes), {})
    semi = groups.get(("triplet", modes), {})
    if not pddm or not bh or not semi:
        return {}
    target = t_interval([r.final for r in semi.values()]).mean
    first = {  # "pddm": the PDDM arm compared, whichever it is
        side: {s: first_step_reaching(r.history, 1.0 - target) for s, r in runs.items()}
        for side, runs in (("pddm", pddm), ("triplet_batch_hard", bh))
    }
    return {
        "final_diff": t_interval(paired_differences(pddm, bh, lambda r: r.final).values()),
        "auc_diff": t_interval(paired_differences(pddm, bh, lambda r: curve_mean(r.history)).values()),
        "target_recall": target,
        "first": first,
    }


def plot_curves(groups: dict, modes: int, path: Path, arms=CLAIMS_ARMS, ylabel: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=90)
    for arm in arms:
        runs = groups.get((arm, modes), {})
        if not runs:
            continue
        steps = sorted(set.intersection(*(set(s for s, _ in r.history) for r in runs.values())))
        values = np.array([[dict(r.history)[s] for s in steps] for r in runs.values()])
        mean = values.mean(axis=0)
        (line,) = ax.plot(steps, mean, marker=".", label=f"{arm} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.18)
    ax.set_xlabel("training step (global batches)")
    ax.set_ylabel(ylabel or "test Recall@1 (unseen classes)")
    ax.set_title(f"modes_per_class = {modes}: mean over seeds, band = min..max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt_steps(d: dict) -> str:
    return ", ".join(f"s{s}: {'never' if v is None else v}" for s, v in sorted(d.items()))


def report(runs: list[Run], steps: int, expected_seeds=(0, 1, 2), arms=CLAIMS_ARMS, modes_run=(3, 1)) -> str:
    """The results as markdown: completeness, one row per arm and modes_per_class, then the
    three claims. `arms` and `modes_run` say what the sweep ran (a sweep of part of the
    design, such as claims_long.yaml's triplet and Magnet at modes 3, reports only that part
    as missing)."""
    done = complete_runs(runs, steps)
    groups = group(done)
    lines = [f"{len(done)} complete runs of {len(runs)} found (complete: FINISHED, {steps} steps).", ""]
    missing = [f"{arm} modes={m} seed={s}" for arm, modes in DESIGN.items() if arm in arms for m in modes
               if m in modes_run
               for s in expected_seeds if s not in groups.get((arm, m), {})]
    lines.append("Missing: " + ("none" if not missing else "; ".join(missing)))
    half = steps // 2
    lines += ["", f"| arm | modes | seeds | final R@1 (mean [95% t-CI]) | R@1 at step {half} | R@1 at step {steps} "
              "| wall s/run |", "|---|---:|---:|---|---|---|---:|"]
    for arm in arms:
        for modes in (3, 1):
            g = groups.get((arm, modes), {})
            if not g:
                continue
            at = {step: t_interval([dict(r.history).get(step) for r in g.values()]) for step in (half, steps)}
            wall = sum(r.wall_s for r in g.values()) / len(g)
            lines.append(f"| {arm} | {modes} | {len(g)} | {t_interval([r.final for r in g.values()])} "
                         f"| {at[half]} | {at[steps]} | {wall:.0f} |")
    ran = set(arms)  # a claim is reported only when the sweep ran the arms it compares
    if {"triplet", "magnet"} <= ran:
        lines += _claim_1(groups)
    if SINGLE_CENTER in ran and ran & set(MULTI_CENTER):
        lines += _claim_2(groups)
    if "triplet_batch_hard" in ran and ran & set(PDDM_ARMS):
        lines += _claim_3(groups, [a for a in PDDM_ARMS if a in ran])
    return "\n".join(lines)


def _claim_1(groups: dict) -> list[str]:
    lines = ["", "**Claim 1: Magnet reaches triplet's final test error in fewer steps**", "",
              "| modes | target error (triplet final, mean) | triplet first step at it | Magnet first step at it "
              "| speed-up vs triplet's length | speed-up vs triplet's first step (paired) |",
              "|---:|---:|---|---|---|---|"]
    for modes in (3, 1):
        s = magnet_speedup(groups, modes)
        if s:
            bound = ">= " if s["at_first_eval"] else ""
            lines.append(f"| {modes} | {s['target_error']:.3f} | {_fmt_steps(s['triplet_first'])} | "
                         f"{_fmt_steps(s['magnet_first'])} | {bound}{s['speedup_vs_length']} | "
                         f"{s['speedup_paired']} |")
            if s["at_first_eval"]:
                lines.append(f"|  | Magnet seeds {s['at_first_eval']} were there at the first evaluation: "
                             "speed-ups are lower bounds | | | | |")
    return lines


def _claim_2(groups: dict) -> list[str]:
    lines = ["", "**Claim 2: multi-center minus single-center (normalized_softmax), final R@1, paired by seed**", "",
              "| multi-center loss | modes=3 | modes=1 | (modes 3) - (modes 1) |", "|---|---|---|---|"]
    for multi, d in multi_center(groups).items():
        lines.append(f"| {multi} | {d[3]} | {d[1]} | {d['3-1']} |")
    return lines


def _claim_3(groups: dict, pddm_arms: list[str]) -> list[str]:
    lines = ["", "**Claim 3: PDDM minus triplet batch-hard, paired by seed** (pddm: the pddm preset's "
              "semi-hard form; pddm_paper: the paper's hardest-negative form)", "",
              "| PDDM arm | modes | final R@1 diff | mean-over-curve R@1 diff | target: semi-hard triplet's final R@1 "
              "| first step at target: PDDM | batch-hard |", "|---|---:|---|---|---:|---|---|"]
    for arm in pddm_arms:
        for modes in (3, 1):
            p = pddm_vs_batch_hard(groups, modes, arm)
            if p:
                lines.append(f"| {arm} | {modes} | {p['final_diff']} | {p['auc_diff']} | {p['target_recall']:.3f} | "
                             f"{_fmt_steps(p['first']['pddm'])} | {_fmt_steps(p['first']['triplet_batch_hard'])} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default="sqlite:///runs/claims/mlflow.db")
    parser.add_argument("--experiment", default="claims")
    parser.add_argument("--sweep", default="claims", help="the sweep's name (tag sweep.name)")
    parser.add_argument("--steps", type=int, default=120, help="planned steps per run (complete runs reach it)")
    parser.add_argument("--out", default="benchmarks/results/claims", help="folder for the plots")
    parser.add_argument("--arms", default=",".join(CLAIMS_ARMS),
                        help=f"the arms the sweep ran (of {', '.join(ARMS)}; default: claims.yaml's)")
    parser.add_argument("--modes", default="3,1", help="the modes_per_class values the sweep ran")
    parser.add_argument("--metric", default=METRIC,
                        help="the accuracy read for every arm (MLflow name), e.g. seen/knn_accuracy")
    parser.add_argument("--magnet-metric", default="",
                        help="read this for the Magnet arm instead, e.g. seen/magnet_accuracy")
    args = parser.parse_args(argv)
    if "://" in args.out:
        parser.error(f"--out: {args.out} is a URI; the plots go to a local folder")
    modes_run = tuple(int(m) for m in args.modes.split(",") if m.strip())
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"--arms: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")

    runs = load_runs(args.tracking_uri, args.experiment, args.sweep, args.metric, args.magnet_metric)
    if args.metric != METRIC or args.magnet_metric:
        print(f"Metric: {args.metric}" + (f" (Magnet: {args.magnet_metric})" if args.magnet_metric else "")
              + "; the tables' 'R@1' columns hold it, and error = 1 - it.\n")
    print(report(runs, args.steps, arms=arms, modes_run=modes_run))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = group(complete_runs(runs, args.steps))
    for modes in (3, 1):
        path = out / f"recall_vs_step_modes{modes}.png"
        if any((arm, modes) in groups for arm in arms):
            ylabel = "" if args.metric == METRIC and not args.magnet_metric else (
                args.metric + (f" (Magnet: {args.magnet_metric})" if args.magnet_metric else ""))
            plot_curves(groups, modes, path, arms, ylabel)
            print(f"\nplot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
