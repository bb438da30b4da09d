"""Several machines, simulated on one: a Ray cluster of several nodes (ray.cluster_utils.Cluster).

run_encode.py joins it with --address, as on a real cluster. A node leaves mid-run
(its worker dies mid-shard: the shard is retried elsewhere) and another joins
(it gets workers and shards); the output holds every sample exactly once and
__painterbot__/summary.json says what was retried, why, and where the workers ran.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline_samples import REPO, good_samples, tar_samples, tiny_config, write_tar

cluster_utils = pytest.importorskip("ray.cluster_utils")


def _wait_for(what: str, check, deadline: float, driver: subprocess.Popen, log: Path):
    """Poll ``check`` until it returns something truthy; fail with the driver's log past ``deadline``."""
    while time.time() < deadline:
        value = check()
        if value:
            return value
        if driver.poll() is not None:
            pytest.fail(f"the driver ended (rc {driver.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


@pytest.fixture
def ray_env(monkeypatch):
    """Environment for the cluster's processes and the driver.

    RAY_TMPDIR: the Cluster writes its address to TMP/ray/ray_current_cluster, where a plain
    ray.init() elsewhere on this machine would find and join it; a private (short: socket paths
    are limited to 107 bytes) temp dir keeps it to this test. PYTHONPATH: the nodes' workers
    must import this checkout, not whatever the venv has installed.
    """
    tmp = tempfile.mkdtemp(prefix="pbr", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    yield dict(os.environ)
    shutil.rmtree(tmp, ignore_errors=True)


def test_node_leaves_and_node_joins_mid_run_exactly_once(tmp_path, ray_env):
    folder = tmp_path / "in"
    folder.mkdir()
    tars = {f"{i:05d}": write_tar(folder / f"{i:05d}.tar", good_samples(3, prefix=f"s{i}k")) for i in range(30)}
    out = tmp_path / "out"
    config = tiny_config(tmp_path / "tiny.yaml", batch_size=2, max_retries=2, cluster_check_interval=0.5,
                         worker_start_timeout=120)  # fmt: skip
    log_path = tmp_path / "driver.log"

    # Two one-CPU nodes: the 3 workers asked for (one CPU each) do not fit, so 2 start, one per node.
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    driver = None
    try:
        node_b = cluster.add_node(num_cpus=1)
        args = [sys.executable, str(REPO / "run_encode.py"), "--shards", str(folder / "*.tar"), "--output", str(out),
                "--config", str(config), "--workers", "3", "--no-progress",
                "--address", cluster.address]  # no --gpus: 'auto' asks the cluster, which has none  # fmt: skip
        with open(log_path, "w") as log:
            driver = subprocess.Popen(args, cwd=REPO, env={**ray_env, "PYTHONUNBUFFERED": "1"}, stdout=log,
                                      stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + 240

        def worker_on(node) -> str | None:
            found = re.search(rf"(worker-\d+) on node {node.node_id[:12]} \S+ is up", log_path.read_text())
            return found.group(1) if found else None

        def shards_done_by(worker: str) -> list[str]:
            return [p.name for p in (out / "__painterbot__").glob("*_stats.json") if json.loads(p.read_text())["worker"] == worker]

        worker_b = _wait_for("a worker on node B", lambda: worker_on(node_b), deadline, driver, log_path)
        _wait_for(f"{worker_b} to finish a shard", lambda: shards_done_by(worker_b), deadline, driver, log_path)
        # A two-CPU node joins: the pool grows to the 3 workers asked for (one lands there), ...
        node_c = cluster.add_node(num_cpus=2)
        # ... and node B goes, its worker with it (mid-shard: it took the next one at once).
        cluster.remove_node(node_b)
        driver.wait(timeout=max(1, deadline - time.time()))
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
        cluster.shutdown()
    text = log_path.read_text()
    assert driver.returncode == 0, text[-4000:]

    # Every sample exactly once, nothing temporary left behind.
    for sid, tar in tars.items():
        assert pq.read_table(out / f"{sid}.parquet", columns=["key"])["key"].to_pylist() == list(tar_samples(tar))
        assert json.loads((out / "__painterbot__" / f"{sid}_stats.json").read_text())["rows"] == 3
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    summary = json.loads((out / "__painterbot__" / "summary.json").read_text())
    assert summary["shards_encoded"] == len(tars) and summary["shards_failed"] == 0
    # The shard node B held was retried, and the summary says so and why.
    retried = summary["retried_shards"]
    assert retried and all(info["done"] for info in retried.values()), retried
    assert any(worker_b in err and "died" in err for info in retried.values() for err in info["errors"]), retried
    # Workers ran on all three nodes, this checkout's code on each; the joined node did shards.
    nodes = summary["cluster"]["nodes"]
    assert {node_b.node_id, node_c.node_id} <= set(nodes) and len(nodes) == 3, nodes
    assert all(Path(info["code"]).is_relative_to(REPO) for info in nodes.values()), nodes
    by_worker = {json.loads(p.read_text())["worker"] for p in (out / "__painterbot__").glob("*_stats.json")}
    assert by_worker & set(nodes[node_c.node_id]["workers"]), (by_worker, nodes)
    assert worker_b in by_worker and summary["cluster"]["workers_lost"] >= 1
    assert summary["cluster"]["workers_peak"] == 3


# -- the pool's bookkeeping, on a stand-in for Ray (no processes, a fake clock) ----------------
class _Ref:
    def __init__(self, value=None):
        self.value, self.done = value, False


class _FakeRay:
    """available_resources / wait / get / kill, as WorkerPool uses them."""

    def __init__(self, free: dict):
        self.free = dict(free)
        self.actors: list = []
        self.killed: list = []

    def available_resources(self):
        return dict(self.free)

    def wait(self, refs, num_returns, timeout):
        return [r for r in refs if r.done], [r for r in refs if not r.done]

    def get(self, ref, timeout=None):
        if isinstance(ref.value, Exception):
            raise ref.value
        return ref.value

    def kill(self, actor, no_restart=True):
        self.killed.append(actor.worker_id)


def _fake_actor_class(fake: _FakeRay):
    class Actor:
        def __init__(self, worker_id):
            self.worker_id = worker_id
            node = f"node-{len(fake.actors)}"
            self.placement = type("M", (), {"remote": lambda _: self.probe})()
            self.probe = _Ref({"node": node, "host": "h", "code": str(REPO)})
            fake.actors.append(self)

    return type("Cls", (), {"remote": staticmethod(lambda worker_id: Actor(worker_id))})


def test_pool_grows_with_room_replaces_lost_workers_and_gives_up_in_bounded_time(monkeypatch):
    from pipeline import cluster

    clock = [1000.0]
    monkeypatch.setattr(cluster.time, "monotonic", lambda: clock[0])
    fake = _FakeRay({"CPU": 2.0})
    logs: list[str] = []
    pool = cluster.WorkerPool(fake, _fake_actor_class(fake), lambda wid: (wid,), {"CPU": 1.0, "GPU": 0}, want=3,
                              check_interval=1.0, start_timeout=5.0, log=logs.append)  # fmt: skip
    assert len(fake.actors) == 2  # room for two of the three wanted
    assert pool.refresh() == [] and not pool.ready(0)  # not up yet: no work for them
    for actor in fake.actors:
        actor.probe.done = True
    assert pool.refresh() == [0, 1] and pool.ready(1)

    fake.free = {"CPU": 1.0}  # a node joined: room for the third, started at the next check
    assert pool.refresh() == [] and len(fake.actors) == 2
    clock[0] += 1.0
    pool.refresh()
    assert len(fake.actors) == 3
    fake.actors[2].probe.done = True
    assert pool.refresh() == [2] and pool.report()["workers_peak"] == 3

    fake.free = {"CPU": 0.0}
    pool.lost_worker(1)  # its node died: the slot waits for room
    assert not pool.ready(1) and pool.refresh() == [] and len(fake.actors) == 3
    fake.free = {"CPU": 1.0}
    clock[0] += 1.0
    pool.refresh()
    assert len(fake.actors) == 4 and fake.actors[3].worker_id == "worker-3"
    clock[0] += 6.0  # never answered: given up after start_timeout, its slot free again
    pool.refresh()
    assert "worker-3" in fake.killed and any("did not start" in line for line in logs)

    fake.free = {"CPU": 0.0}
    pool.lost_worker(0)
    pool.lost_worker(2)
    pool.refresh()  # no worker up since now
    clock[0] += 5.5
    with pytest.raises(cluster.NoWorkers, match="no worker has been up"):
        pool.refresh()
    assert pool.report()["workers_lost"] == 3 and set(pool.report()["nodes"]) == {"node-0", "node-1", "node-2"}


def test_pool_gives_up_at_once_when_every_worker_fails_to_start(monkeypatch):
    from pipeline import cluster

    fake = _FakeRay({"CPU": 8.0})
    pool = cluster.WorkerPool(fake, _fake_actor_class(fake), lambda wid: (wid,), {"CPU": 1.0}, want=2,
                              check_interval=0.01, start_timeout=300.0, log=lambda line: None)  # fmt: skip
    with pytest.raises(cluster.NoWorkers, match="in a row failed to start, the last: ModuleNotFoundError"):
        for _ in range(10):  # 2 actors at a time, each failing: gives up after 3, long before 300 s
            for actor in fake.actors:
                actor.probe.value, actor.probe.done = ModuleNotFoundError("No module named 'pipeline'"), True
            pool.refresh()
            time.sleep(0.02)
    assert len(fake.actors) <= 4
