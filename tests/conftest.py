"""Fixtures shared by the tests that run real Ray jobs."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for every test that trains on Ray (4 logical CPUs on 2 cores:
    workers, decode actors and the refresh actor take fractions)."""
    import ray

    ray.init(num_cpus=4, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def metric_history():
    """`metric_history(client, run_id, name)`: a metric's MLflow history in step order."""

    def history(client, run_id, name):
        return sorted(client.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp))

    return history
