"""`jobs.compare`: the best runs of an experiment as a table, from a real MLflow server.

The runs are made with MlflowClient exactly as the driver records them (every setting as a
param, metric names from `metric_name`), without training.
"""

from __future__ import annotations

import uuid

import pytest

from jobs.compare import main
from pipeline.config import flatten, load_config
from pipeline.reporting.comparison import best_runs, format_table
from pipeline.tracking import RUN_NAME_TAG, metric_name

MINUTE_MS = 60_000


@pytest.fixture(scope="module")
def experiment(mlflow_server):
    """An experiment with three ended runs (two losses; one stopped with Ctrl+C), one running
    run without metrics."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(mlflow_server)
    name = f"compare-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(name)
    runs = [
        (
            "triplet-a",
            ["loss.triplet.margin=0.2"],
            {"recall@1": 0.50, "map@r": 0.30, "nmi": 0.60},
            5,
        ),
        (
            "ms-b",
            ["loss.name=multi_similarity", "loss.multi_similarity.alpha=3.0"],
            {"recall@1": 0.70, "map@r": 0.25, "nmi": 0.65},
            125,
        ),
        (
            "triplet-c",
            ["loss.triplet.margin=0.1", "loss.triplet.mining=batch_hard"],
            {"recall@1": 0.60, "map@r": 0.35, "nmi": 0.55},
            61,
        ),
        ("still-going", [], {}, None),
    ]
    start = 1_700_000_000_000
    for run_name, overrides, metrics, minutes in runs:
        run = client.create_run(
            experiment_id, start_time=start, run_name=run_name, tags={RUN_NAME_TAG: run_name}
        )
        params = [Param(k, str(v)) for k, v in flatten(load_config("local", overrides)).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run.info.run_id, params=params[i : i + 100])
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(metric_name(f"test/{k}"), v, start, 8) for k, v in metrics.items()]
            + [Metric("test/recall_at_1", 0.01, start, 4)] * bool(metrics),
        )  # an earlier, worse epoch
        if minutes is not None:
            status = "KILLED" if run_name == "triplet-a" else "FINISHED"
            client.set_terminated(run.info.run_id, status=status, end_time=start + minutes * MINUTE_MS)
    return name


def test_runs_are_ranked_by_the_final_metric_with_their_loss_settings(mlflow_server, experiment):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    rows = best_runs(client, experiment)
    assert [r.name for r in rows] == ["ms-b", "triplet-c", "triplet-a", "still-going"]
    ms, triplet_c = rows[0], rows[1]
    assert ms.loss == "multi_similarity" and "alpha=3.0" in ms.loss_params.split()
    assert "margin" not in ms.loss_params  # only the run's own loss's settings
    assert triplet_c.loss_params.split() == ["margin=0.1", "mining=batch_hard"]
    assert triplet_c.metrics["test/map_at_r"] == 0.35 and triplet_c.wall_seconds == 61 * 60
    assert rows[3].status == "RUNNING" and rows[3].metrics == {}

    by_map = best_runs(client, experiment, metric="test/map@r", top=2)
    assert [r.name for r in by_map] == ["triplet-c", "triplet-a"]

    table = format_table(rows).splitlines()
    assert table[0].split() == [
        "#",
        "run",
        "loss",
        "loss",
        "params",
        "R@1",
        "MAP@R",
        "NMI",
        "wall",
        "time",
    ]
    assert table[2].split()[:3] == ["1", "ms-b", "multi_similarity"]
    assert table[2].split()[-4:] == ["0.7000", "0.2500", "0.6500", "2h05m"]
    # A run that did not finish says so: its metric is from the epoch it stopped at.
    assert table[3].split()[-1] == "1h01m" and table[4].endswith("5m00s (stopped)")
    assert table[5].split()[-5:-2] == ["-", "-", "-"] and table[5].endswith("(running)")
    # A ranking metric outside the usual three gets its own column.
    assert format_table(rows, "test/r_precision").splitlines()[0].split()[-3:] == [
        "r_precision",
        "wall",
        "time",
    ]


def test_the_command_prints_the_table_and_names_what_is_wrong(
    mlflow_server, experiment, capsys, tmp_path
):
    assert main(["--experiment", experiment, "--tracking-uri", mlflow_server, "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert f"best 2 runs of experiment '{experiment}' by test/recall_at_1" in out
    assert "ms-b" in out and "triplet-c" in out and "triplet-a" not in out

    assert main(["--experiment", "no-such-experiment", "--tracking-uri", mlflow_server]) == 2
    assert "no experiment 'no-such-experiment'" in capsys.readouterr().err
    assert (
        main(
            [
                "--experiment",
                experiment,
                "--tracking-uri",
                mlflow_server,
                "--metric",
                "test/recal_at_1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "has metric 'test/recal_at_1'" in err and "test/recall_at_1" in err
    # More runs than MLflow returns in one search, and a name it cannot order by: one line each.
    assert main(["--experiment", experiment, "--tracking-uri", mlflow_server, "--top", "100000"]) == 2
    assert "--top must be between 1 and 50000" in capsys.readouterr().err
    assert main(["--experiment", experiment, "--tracking-uri", mlflow_server, "--metric", "bad`name"]) == 2
    assert "--metric 'bad`name': " in capsys.readouterr().err
    # A folder where the sqlite file should be: refused at once, and nothing written beside it.
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert main(["--tracking-uri", f"sqlite:///{folder}"]) == 2
    assert f"no MLflow store at {folder}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [folder]
    missing = tmp_path / "nothing" / "mlflow.db"
    assert main(["--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert f"no MLflow store at {missing}" in capsys.readouterr().err
    assert not missing.parent.exists()
    # A server that does not answer (nothing listens on port 1), or a malformed URI: one line.
    assert main(["--tracking-uri", "http://127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: --tracking-uri: the MLflow store at http://127.0.0.1:1 does not answer (")
    assert main(["--tracking-uri", "sqlite://runs/mlflow.db"]) == 2
    assert "Invalid SQLite URL" in capsys.readouterr().err
