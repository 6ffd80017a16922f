"""The sweep in MLflow: one parent run per sweep with the trials' runs nested under it; at the
end a summary on the parent (a table, and a plot of the metric against the swept settings per
loss) and the best trial's model registered as a model version.
"""

from __future__ import annotations

import csv
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.sweep.space import SweepError, SweepSpec, space_params, trial_settings
from pipeline.sweep.trial import SWEEP_TAG, TRIAL_TAG, TrialSetup, trial_config

ROLE_TAG = "sweep.role"
PATH_TAG = "sweep.path"
FINGERPRINT_TAG = "sweep.fingerprint"
STATUS_TAG = "sweep.status"
SUMMARY_DIR = "summary"
TABLE_CSV = "trials.csv"
TABLE_MD = "trials.md"
PLOT_PNG = "metric_vs_params.png"


def open_parent_run(client, config, spec: SweepSpec, overrides: list[str], experiment_path: str,
                    fingerprint: str, resume: bool) -> str:
    """Create the sweep's parent run (the space as params and as `sweep/space.yaml`), or for a
    resumed sweep reopen it, refusing a sweep file or base settings that changed since."""
    from mlflow.entities import Param

    from pipeline import tracking

    experiment_id = tracking.experiment_id(client, config)
    if resume:
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PATH_TAG}` = '{experiment_path}' and tags.`{ROLE_TAG}` = 'parent'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found:
            parent = found[0]
            if parent.data.tags.get(FINGERPRINT_TAG) != fingerprint:
                raise SweepError(
                    f"--resume: {spec.path} or the --set settings differ from those the sweep "
                    f"started with (MLflow run {parent.info.run_id}, sweep/space.yaml); resume "
                    "with the same file and settings, or start a sweep under a new name"
                )
            client.update_run(parent.info.run_id, status="RUNNING")
            return parent.info.run_id
    run = client.create_run(
        experiment_id,
        run_name=spec.name,
        tags={
            ROLE_TAG: "parent",
            SWEEP_TAG: spec.name,
            PATH_TAG: experiment_path,
            FINGERPRINT_TAG: fingerprint,
            "git_commit": tracking.git_commit(),
        },
    )
    run_id = run.info.run_id
    params = [Param(k, v[:6000]) for k, v in space_params(spec, overrides).items()]
    for i in range(0, len(params), 100):  # MLflow's limit per batch
        client.log_batch(run_id, params=params[i : i + 100])
    client.log_text(run_id, spec.text, "sweep/space.yaml")
    return run_id


@dataclass
class TrialRecord:
    """One finished trial as the summary shows it."""

    trial_id: str
    loss: str
    settings: dict
    """The swept settings' values."""
    epochs_done: int
    epochs: int
    metric: float | None
    """The sweep metric at the trial's last epoch."""
    status: str
    """completed, stopped early (ASHA) or failed."""
    run_id: str = ""
    run_name: str = ""
    history: list[float] = field(default_factory=list)


def trial_records(results, setup: TrialSetup, spec: SweepSpec) -> list[TrialRecord]:
    """A record per trial of a finished Tune run (`ResultGrid`)."""
    records = []
    swept = spec.swept_keys()
    for result in results:
        trial_id = Path(result.path).name.removeprefix("trial-")  # see trial.trial_dirname
        config = trial_config(setup, result.config, trial_id)
        metrics = result.metrics or {}
        done = int(metrics.get("epoch", 0))
        status = "failed" if result.error else "completed" if done >= config.train.epochs else "stopped early"
        settings = trial_settings(result.config)
        frame = result.metrics_dataframe
        history = [] if frame is None or spec.metric not in frame else [float(v) for v in frame[spec.metric]]
        value = metrics.get(spec.metric)
        records.append(TrialRecord(
            trial_id=trial_id,
            loss=config.loss.name,
            settings={k: settings[k] for k in swept if k in settings},
            epochs_done=done,
            epochs=config.train.epochs,
            metric=None if value is None else float(value),
            status=status,
            history=history,
        ))
    return records


def link_child_runs(client, experiment_id: str, parent_run_id: str, records: list[TrialRecord]) -> None:
    """Find each trial's (child) run and close the runs of trials Tune ended: a trial stopped
    by ASHA is killed mid-run, so its run would otherwise stay RUNNING."""
    from pipeline.tracking import PARENT_RUN_TAG

    children = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'", max_results=5000
    )
    by_trial = {run.data.tags.get(TRIAL_TAG): run for run in children}
    for record in records:
        run = by_trial.get(record.trial_id)
        if run is None:
            continue
        record.run_id, record.run_name = run.info.run_id, run.info.run_name
        client.set_tag(record.run_id, STATUS_TAG, record.status)
        if run.info.status == "RUNNING":
            client.set_terminated(record.run_id, status="FAILED" if record.status == "failed" else "KILLED")


def best_trial(records: list[TrialRecord], mode: str, completed_only: bool = True) -> TrialRecord | None:
    """The trial with the best last-epoch metric (among trials that ran every epoch)."""
    pool = [r for r in records if r.metric is not None and not math.isnan(r.metric)
            and (r.status == "completed" or not completed_only)]
    if not pool:
        return None
    return (max if mode == "max" else min)(pool, key=lambda r: r.metric)


def sorted_records(records: list[TrialRecord], mode: str) -> list[TrialRecord]:
    """Best first; trials without the metric last."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(records, key=lambda r: (r.metric is None, sign * (r.metric or 0.0), r.trial_id))


def write_table(records: list[TrialRecord], spec: SweepSpec, directory: Path) -> list[Path]:
    """`trials.csv` and `trials.md`: one row per trial, best first."""
    keys = spec.swept_keys()
    header = ["run", "loss", "status", "epochs", spec.metric, *keys]
    rows = [
        [r.run_name or r.trial_id, r.loss, r.status, f"{r.epochs_done}/{r.epochs}",
         "" if r.metric is None else f"{r.metric:.4f}", *(_text(r.settings.get(k, "")) for k in keys)]
        for r in sorted_records(records, spec.mode)
    ]
    csv_path, md_path = directory / TABLE_CSV, directory / TABLE_MD
    with csv_path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
    lines = [f"# Sweep {spec.name}: {spec.metric} ({spec.mode}), {spec.search} search", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def _text(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_metric_vs_params(records: list[TrialRecord], spec: SweepSpec, path: Path) -> Path:
    """One row of panels per loss: the metric against each setting swept for that loss
    (hollow markers: trials stopped early)."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, no global state

    losses = [loss for loss in spec.losses if any(r.loss == loss for r in records)]
    columns = {
        loss: [k for k in spec.swept_keys()
               if (k in spec.space and spec.space[k].sampled) or (k in spec.losses[loss] and spec.losses[loss][k].sampled)]
        for loss in losses
    }
    width = max([len(keys) for keys in columns.values()] + [1])
    figure = Figure(figsize=(4 * width, 3 * max(len(losses), 1)), layout="constrained")
    axes = figure.subplots(max(len(losses), 1), width, squeeze=False)
    for row, loss in enumerate(losses):
        mine = [r for r in records if r.loss == loss and r.metric is not None]
        keys = columns[loss] or ["trial"]
        for col in range(width):
            ax = axes[row][col]
            if col >= len(keys):
                ax.set_visible(False)
                continue
            key = keys[col]
            dim = spec.space.get(key) or spec.losses[loss].get(key)
            values = [r.settings.get(key, i) if key != "trial" else i for i, r in enumerate(mine)]
            if any(isinstance(v, (str, bool)) for v in values):
                labels = sorted({str(v) for v in values})
                values = [labels.index(str(v)) for v in values]
                ax.set_xticks(range(len(labels)), labels)
            elif dim is not None and dim.kind == "loguniform":
                ax.set_xscale("log")
            for done in (True, False):
                pts = [(v, r.metric) for v, r in zip(values, mine, strict=True) if (r.status == "completed") == done]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.scatter(xs, ys, s=36, label="completed" if done else "stopped early",
                               facecolors=None if done else "none", edgecolors="C0")
            ax.set_xlabel(key)
            ax.set_ylabel(spec.metric)
            ax.set_title(loss, fontsize=10)
            if col == 0 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    figure.suptitle(f"sweep {spec.name}: {spec.metric} at each trial's last epoch")
    figure.savefig(path, dpi=90)
    return path


def register_best(client, record: TrialRecord, model_name: str) -> str | None:
    """Register the trial's `model/` artifact (its final checkpoint) as a version of
    `model_name`; returns the version, or None when the run did not log a whole model (no
    `MODEL_LOGGED_TAG`: an outage can cut the file-by-file upload short). Registering the same
    run again returns its existing version."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import MODEL_LOGGED_TAG

    if not record.run_id:
        return None
    existing = client.search_model_versions(f"name = '{model_name}' and run_id = '{record.run_id}'")
    if existing:
        return str(existing[0].version)
    if client.get_run(record.run_id).data.tags.get(MODEL_LOGGED_TAG) != "true":
        return None
    try:
        client.create_registered_model(model_name, description="Best trials of sweep runs (dml-pipeline).")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(record.run_id).info.artifact_uri}/model"
    version = client.create_model_version(
        model_name, source=source, run_id=record.run_id,
        description=f"{record.run_name}: {record.metric:.4f}",
    )
    return str(version.version)


def finish_parent(client, parent_run_id: str, spec: SweepSpec, records: list[TrialRecord],
                  best: TrialRecord | None, registered: str | None) -> None:
    """Put the summary on the parent run (table, plot, best metrics and tags) and close it."""
    from mlflow.entities import Metric

    from pipeline.tracking import metric_name

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_table(records, spec, directory)
        plot_metric_vs_params(records, spec, directory / PLOT_PNG)
        client.log_artifacts(parent_run_id, tmp, SUMMARY_DIR)
    name = metric_name(spec.metric)
    now = int(time.time() * 1000)
    metrics = []
    for loss in spec.losses:
        top = best_trial([r for r in records if r.loss == loss], spec.mode, completed_only=False)
        if top is not None:
            metrics.append(Metric(f"best/{loss}/{name}", top.metric, now, 0))
    tags = {
        "sweep.trials": str(len(records)),
        "sweep.stopped_early": str(sum(r.status == "stopped early" for r in records)),
        "sweep.failed": str(sum(r.status == "failed" for r in records)),
    }
    if best is not None:
        metrics.append(Metric(f"best/{name}", best.metric, now, 0))
        tags.update({"sweep.best_trial_id": best.trial_id, "sweep.best_run_id": best.run_id,
                     "sweep.best_run_name": best.run_name})
    if registered is not None:
        tags.update({"sweep.registered_model": spec.registered_model_name, "sweep.registered_version": registered})
    client.log_batch(parent_run_id, metrics=metrics)
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, value)
    client.set_terminated(parent_run_id, status="FINISHED")
