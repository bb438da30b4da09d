"""Every stop leaves a state the user can see (issue #25, C9-C10): real signals to a real driver process,
with Ray and without, at moments that used to end without a summary: during the imports, while Ray
starts, mid-run (SIGHUP: a closed terminal), and just after the last shard."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.output_folder import OutputFolder
from pipeline_samples import REPO, descendants, good_samples, kill_pids, tiny_config, write_tar

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def _start(tmp_path: Path, where: list[str], shards: int = 4) -> tuple[subprocess.Popen, Path]:
    (tmp_path / "in").mkdir(exist_ok=True)
    for i in range(shards):
        write_tar(tmp_path / "in" / f"{i:05d}.tar", good_samples(3, prefix=f"s{i}", size=32))
    out = tmp_path / "out"
    config = tiny_config(tmp_path / "tiny.yaml", batch_size=1)
    args = [sys.executable, str(REPO / "run_encode.py"), "--shards", str(tmp_path / "in"), "--output", str(out),
            "--config", str(config), "--device", "cpu", "--no-progress", *where]
    proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # a closed terminal sends SIGHUP to its whole session
    return proc, out


def _finish(proc: subprocess.Popen, helpers: set[int]) -> str:
    try:
        text, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.time() + 20  # "no process of the run alive 20 s later"
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") and _alive(p) for p in helpers):
        time.sleep(0.5)
    left = [p for p in helpers if os.path.exists(f"/proc/{p}") and _alive(p)]
    kill_pids(left)
    assert not left, f"processes of the run still alive 20 s after it ended: {left}\n{text[-2000:]}"
    return text


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _clean(out: Path) -> None:
    assert not OutputFolder(out).lock_path.exists()
    assert not list(out.glob(".*.tmp")) if out.exists() else True


@pytest.mark.parametrize("where", [["--no-ray"], ["--gpus", "0", "--workers", "1"]], ids=["no-ray", "ray"])
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_during_the_imports_is_an_orderly_stop(tmp_path, signum, status, where):
    proc, out = _start(tmp_path, where)
    time.sleep(0.5)  # torch is still loading
    proc.send_signal(signum)
    text = _finish(proc, set())
    assert proc.returncode == status, text[-3000:]
    assert "Traceback" not in text and f"stopped by {signal.Signals(signum).name}" in text
    # The run locked its folder, planned, and stopped before its first shard: a summary, no rows, and
    # no settings recorded (a later run may still pick other settings for this empty folder).
    folder = OutputFolder(out)
    summary = json.loads(folder.summary_path.read_text())
    assert summary["stopped_by"] == signal.Signals(signum).name and summary["interrupted"]
    assert summary["shards_total"] == 4 and summary["shards_encoded"] == 0
    assert not folder.stats_files() and not folder.settings_path.exists()
    _clean(out)


@pytest.mark.parametrize("where", [["--no-ray"], ["--gpus", "0", "--workers", "1"]], ids=["no-ray", "ray"])
def test_sighup_mid_run_writes_the_summary_and_shuts_everything_down(tmp_path, where):
    proc, out = _start(tmp_path, where, shards=8)
    helpers: set[int] = set()
    deadline = time.time() + 120
    while not OutputFolder(out).stats_files() and time.time() < deadline and proc.poll() is None:
        helpers.update(descendants(proc.pid))
        time.sleep(0.05)
    helpers.update(descendants(proc.pid))
    os.killpg(proc.pid, signal.SIGHUP)  # what a closed terminal does: the whole session
    text = _finish(proc, helpers)
    assert proc.returncode == 129, text[-3000:]
    summary = json.loads(OutputFolder(out).summary_path.read_text())
    assert summary["stopped_by"] == "SIGHUP" and summary["interrupted"]
    _clean(out)


def test_sigterm_while_ray_starts_ends_with_a_summary(tmp_path):
    proc, out = _start(tmp_path, ["--gpus", "0", "--workers", "1"])
    helpers: set[int] = set()
    deadline = time.time() + 60
    # Ray is starting once the driver has children (its GCS, raylet) and no worker is up yet.
    while time.time() < deadline and proc.poll() is None and not descendants(proc.pid):
        time.sleep(0.02)
    time.sleep(0.3)
    helpers.update(descendants(proc.pid))
    proc.send_signal(signal.SIGTERM)
    text = _finish(proc, helpers)
    assert proc.returncode == 143, text[-3000:]
    summary = json.loads(OutputFolder(out).summary_path.read_text())
    assert summary["stopped_by"] == "SIGTERM"
    _clean(out)


def test_sigterm_just_after_the_last_shard_still_writes_the_summary(tmp_path):
    proc, out = _start(tmp_path, ["--no-ray"], shards=1)
    deadline = time.time() + 120
    while not OutputFolder(out).stats_files() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    text = _finish(proc, set())
    # Either the signal came while the summary was being written (143, named) or after the run ended (0).
    assert proc.returncode in (0, 143), text[-3000:]
    summary = json.loads(OutputFolder(out).summary_path.read_text())
    assert summary["stopped_by"] == ("SIGTERM" if proc.returncode == 143 else None)
    # A shard committed but not yet collected when the signal came is counted by the next run, not this one.
    assert summary["shards_encoded"] == (1 if proc.returncode == 0 else summary["shards_encoded"])
    assert OutputFolder(out).stats("00000").exists()  # done on disk either way
    _clean(out)
