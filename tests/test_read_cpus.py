"""Every task of a split's read asks for `READ_CPUS`, so a read finishes on a cluster with less
than one CPU free: what a PDDM sweep trial leaves on a 2-core machine's 4 logical CPUs (driver 1,
two workers and two decode actors 0.5 each, refresh actor 0.5). With `ray.data.read_parquet`,
whose file listing task asks for a whole CPU, that trial's first evaluation waited forever."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.ray_datasets import read_shards

pytestmark = pytest.mark.ray


def test_a_split_is_read_with_half_a_cpu_free(ray_local, tmp_path):
    import ray

    paths = []
    for shard in range(3):
        ids = list(range(shard * 10, shard * 10 + 10))
        table = pa.table({"id": ids, "label": [i % 4 for i in ids], "image": [bytes([i]) * 8 for i in ids]})
        paths.append(str(tmp_path / f"part-{shard}.parquet"))
        pq.write_table(table, paths[-1])
    dataset = read_shards(paths)  # made (and its files listed) before the CPUs are taken

    @ray.remote
    class Hold:
        def ready(self):
            return True

    total = ray.cluster_resources()["CPU"]
    assert total >= 1.0  # else this test would not show the difference
    holder = Hold.options(num_cpus=total - 0.5).remote()
    try:
        ray.get(holder.ready.remote(), timeout=60)
        deadline = time.monotonic() + 30  # the resource view lags the actor's start
        while ray.available_resources().get("CPU", 0.0) != pytest.approx(0.5) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray.available_resources().get("CPU", 0.0) == pytest.approx(0.5)
        rows: list = []
        reader = threading.Thread(target=lambda: rows.extend(dataset.take_all()), daemon=True)
        reader.start()
        reader.join(timeout=120)
        assert not reader.is_alive(), "the read waited for a CPU that never came free"
        assert sorted(row["id"] for row in rows) == list(range(30))
        assert {row["image"] for row in rows if row["id"] == 7} == {bytes([7]) * 8}
    finally:
        ray.kill(holder)
