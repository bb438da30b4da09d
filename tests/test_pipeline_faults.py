"""Faults: the driver SIGKILLed mid-run, a worker process dying mid-shard, shards that never succeed.

The killed run and its rerun are the only two Ray runs here; the retry bound is
checked through the same dispatch loop without Ray (--no-ray).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.driver import RunOptions, run
from pipeline.output_folder import OutputFolder
from pipeline_samples import REPO, good_samples, sigkill_driver_when, tar_samples, tiny_config, write_tar


def _shards(folder: Path, count: int, per_shard: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_tar(folder / f"{i:05d}.tar", good_samples(per_shard, prefix=f"s{i}k")) for i in range(count)]


def _check_final_files(out: Path, tars: list[Path]) -> int:
    """Every file under a final name is complete; returns how many shards are done."""
    done = 0
    for tar in tars:
        sid = tar.stem
        parquet, stats = out / f"{sid}.parquet", OutputFolder(out).stats(sid)
        if parquet.exists():
            keys = pq.read_table(parquet, columns=["key"])["key"].to_pylist()
            assert keys == list(tar_samples(tar)), f"{parquet} is not complete"
        if stats.exists():
            assert parquet.exists() and json.loads(stats.read_text())["rows"] == len(tar_samples(tar))
            done += 1
    return done


def test_killed_driver_then_crashing_worker_still_ends_exactly_once(tmp_path):
    # More shards than the two workers hold at once (2 each), so some are left after the kill.
    tars = _shards(tmp_path / "in", count=8, per_shard=6)
    out = tmp_path / "out"
    config = tiny_config(tmp_path / "tiny.yaml", batch_size=2, max_retries=2)
    args = [sys.executable, str(REPO / "run_encode.py"), "--shards", str(tmp_path / "in" / "*.tar"),
            "--output", str(out), "--config", str(config), "--gpus", "0", "--workers", "2", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Kill once the first shard is committed and others are still being written.
    sigkill_driver_when(args, env, tmp_path / "killed.log",
                        lambda: bool(OutputFolder(out).stats_files() and list(out.glob(".*.tmp"))))
    done_before = _check_final_files(out, tars)  # nothing partial under a final name
    assert 1 <= done_before < len(tars)
    # Interrupted shards were written under hidden temporary names (the workers may have
    # deleted them on their way down, or not): the rerun must redo them from scratch.

    # Rerun; its first worker to finish a batch dies (os._exit) once, mid-shard.
    marker = tmp_path / "crashed"
    rerun = subprocess.run(args, cwd=REPO, env={**env, "PAINTERBOT_CRASH_ONCE": str(marker)},
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert marker.exists(), "the fault was not injected"
    assert f"{done_before} already done (skipped)" in rerun.stderr
    assert "worker died" in rerun.stderr
    assert _check_final_files(out, tars) == len(tars)  # every shard exactly once
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    summary = json.loads(OutputFolder(out).summary_path.read_text())
    # One worker died once and was replaced once; each shard it held (shards_per_worker: up to 2) went
    # round again, once.
    assert summary["workers_replaced"] == 1 and summary["shards_failed"] == 0
    retried = summary["retried_shards"]
    assert 1 <= summary["retries"] == len(retried) <= 2
    assert all(info["attempts"] == 2 and "worker died" in info["errors"][0] for info in retried.values())
    assert summary["shards_encoded"] == len(tars) - done_before
    attempts = {t.stem: json.loads(OutputFolder(out).stats(t.stem).read_text())["attempt"] for t in tars}
    assert sorted(sid for sid, n in attempts.items() if n == 2) == sorted(retried)


def test_a_shard_that_keeps_failing_is_retried_then_reported(tmp_path):
    tars = _shards(tmp_path / "in", count=1, per_shard=2)
    config = tiny_config(tmp_path / "tiny.yaml", max_retries=1)
    out = tmp_path / "out"
    missing = tmp_path / "in" / "00009.tar"
    missing.write_bytes(b"")  # a download that never happened (a missing file is refused before the run)
    options = RunOptions(shards=[str(tars[0]), str(missing)], output=str(out), config=str(config),
                         device="cpu", use_ray=False, progress=False)  # fmt: skip
    assert run(options) == 1
    folder = OutputFolder(out)
    summary = json.loads(folder.summary_path.read_text())
    assert summary["failed_shards"]["00009"]["attempts"] == 2  # 1 + max_retries
    assert "empty file" in summary["failed_shards"]["00009"]["error"]
    assert folder.stats("00000").exists() and not folder.stats("00009").exists()
    assert not list(out.glob(".*"))
    # The next run tries only the failed shard again.
    missing.write_bytes((tmp_path / "in" / "00000.tar").read_bytes())
    assert run(options) == 0
    assert json.loads(folder.summary_path.read_text())["shards_skipped"] == 1
