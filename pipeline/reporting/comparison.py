"""The best runs of an MLflow experiment side by side: one row per run with its loss, that
loss's settings, the retrieval metrics and the wall time (`python -m jobs.compare`)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.tracking import RUN_NAME_TAG, metric_name

DEFAULT_METRIC = "test/recall_at_1"
SHOWN_METRICS = {"test/recall_at_1": "R@1", "test/map_at_r": "MAP@R", "test/nmi": "NMI"}
"""Metrics every table shows (MLflow name -> column title)."""


@dataclass
class RunRow:
    """One run in the comparison."""

    name: str
    status: str
    loss: str
    loss_params: str
    """The run's `loss.<its loss>.*` params, `key=value` joined by spaces."""
    metrics: dict[str, float]
    wall_seconds: float | None
    """End minus start; for a run still going, the time since it started."""


def best_runs(client, experiment: str, metric: str = DEFAULT_METRIC, top: int = 10) -> list[RunRow]:
    """The `top` runs of `experiment` with the highest final value of `metric` (MLflow name,
    `@` allowed: test/recall@1); runs without it come last. Clear errors for an unknown
    experiment or a metric no run has."""
    import time

    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking import SEARCH_MAX_RESULTS_THRESHOLD

    if not 1 <= top <= SEARCH_MAX_RESULTS_THRESHOLD:
        raise ValueError(f"--top must be between 1 and {SEARCH_MAX_RESULTS_THRESHOLD} (MLflow's most "
                         f"per search), got {top}")
    metric = metric_name(metric)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no experiment {experiment!r} (there are: {', '.join(names) or 'none'})")
    try:
        runs = client.search_runs(
            [found.experiment_id], order_by=[f"metrics.`{metric}` DESC"], max_results=top
        )
    except MlflowException as err:  # a name MLflow cannot order by (a backquote in it)
        raise ValueError(f"--metric {metric!r}: {err.message}") from err
    if runs and all(metric not in run.data.metrics for run in runs):
        names = sorted({m for run in runs for m in run.data.metrics if m.startswith("test/")})
        raise ValueError(
            f"no run of experiment {experiment!r} has metric {metric!r} (test metrics: {', '.join(names) or 'none'})"
        )
    now_ms = time.time() * 1000
    rows = []
    for run in runs:
        params = run.data.params
        loss = params.get("loss.name", "?")
        prefix = f"loss.{loss}."
        own = " ".join(
            f"{k.removeprefix(prefix)}={v}"
            for k, v in sorted(params.items())
            if k.startswith(prefix)
        )
        start, end = run.info.start_time, run.info.end_time
        wall = None if start is None else ((end if end else now_ms) - start) / 1000
        rows.append(
            RunRow(
                name=run.data.tags.get(RUN_NAME_TAG) or run.info.run_name or run.info.run_id,
                status=run.info.status,
                loss=loss,
                loss_params=own,
                metrics=dict(run.data.metrics),
                wall_seconds=wall,
            )
        )
    return rows


def _duration(seconds: float | None, status: str) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    text = (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )
    ended = {"RUNNING": "running", "KILLED": "stopped", "FAILED": "failed"}
    return f"{text} ({ended[status]})" if status in ended else text


def format_table(rows: list[RunRow], metric: str = DEFAULT_METRIC) -> str:
    """The rows as an aligned text table; the ranking metric gets a column too when it is not
    one of the shown ones."""
    metric = metric_name(metric)
    metric_columns = dict(SHOWN_METRICS)
    if metric not in metric_columns:
        metric_columns[metric] = metric.removeprefix("test/")
    header = ["#", "run", "loss", "loss params", *metric_columns.values(), "wall time"]
    table = [header]
    for rank, row in enumerate(rows, 1):
        values = [f"{row.metrics[m]:.4f}" if m in row.metrics else "-" for m in metric_columns]
        table.append(
            [
                str(rank),
                row.name,
                row.loss,
                row.loss_params or "-",
                *values,
                _duration(row.wall_seconds, row.status),
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    numeric = {0, *range(4, len(header))}
    lines = [
        "  ".join(
            cell.rjust(w) if i in numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
