"""Never lose or silently drop a sample: one test (or a few) per fault of issue #10, numbered as there.

1 unreachable sources fail their shard    2 no user string reaches a shell   3 damaged containers are noticed
4 a run starts its own Ray                5 every wait is bounded            6 infrastructure errors are no rows
7 resume verifies and refuses mixing      8 one driver per output folder     9 duplicates, odd images, limits,
                                                                                SIGTERM, one-line errors
Most run the reader, the worker or the driver in process (--no-ray); the Ray
run of 4 and the drivers of 8 and 9 are subprocesses, as users start them.
"""
from __future__ import annotations

import bz2
import contextlib
import dataclasses
import errno
import gzip
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import encoder
import run_encode
from pipeline import driver as D
from pipeline import shards as S
from pipeline.config import load_pipeline_config
from pipeline.driver import RunOptions, run
from pipeline.lock import LockHeld
from pipeline.output_folder import OutputFolder
from pipeline.reader import ShardReader, ShardReadError
from pipeline.sources import Timeouts
from pipeline.worker import ShardEncoder, ShardIncomplete
from pipeline_samples import REPO, TINY, LocalServer, descendants, encode, good_samples, kill_pids, tiny_config, write_tar

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}  # subprocesses import this worktree


def _options(tmp_path, shards, **kw) -> RunOptions:
    config = tiny_config(tmp_path / "tiny.yaml", **kw.pop("pipeline", {}))
    return RunOptions(shards=[str(s) for s in shards], output=str(kw.pop("output", tmp_path / "out")),
                      config=str(config), device="cpu", use_ray=False, progress=False, **kw)  # fmt: skip


def _keys(path: Path) -> list[str]:
    return pq.read_table(path, columns=["key"])["key"].to_pylist()


@pytest.fixture
def server(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    srv = LocalServer(www, broken=True)
    yield srv, www
    srv.close()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # free once closed: nothing listens there


# -- 1: a source that cannot be fetched is a failed shard, retried, and redone by the next run ------------
def test_1_unfetchable_sources_fail_and_a_rerun_gets_every_row(tmp_path, server):
    srv, www = server
    samples = good_samples(3, size=48)
    write_tar(www / "00000.tar", samples)
    shards = [f"{srv.url}/00000.tar", f"http://127.0.0.1:{_closed_port()}/00001.tar",
              f"pipe:cat {tmp_path / 'nowhere' / '00002.tar'}"]  # fmt: skip
    options = _options(tmp_path, shards, pipeline={"max_retries": 1})
    assert run(options) == 1
    summary = json.loads(OutputFolder(tmp_path / "out").summary_path.read_text())
    failed = summary["failed_shards"]
    assert sorted(failed) == ["00000", "00001", "00002"] and summary["shards_encoded"] == 0
    assert "HTTP 404" in failed["00000"]["error"] and failed["00000"]["attempts"] == 2
    assert "Connection" in failed["00001"]["error"] and "exited with status 1" in failed["00002"]["error"]
    assert not list((tmp_path / "out").glob("0000*"))  # nothing read, nothing committed
    srv.broken = False  # the source recovers: the next run retries the shard and gets every row
    assert run(dataclasses.replace(options, shards=shards[:1])) == 0
    assert _keys(tmp_path / "out" / "00000.parquet") == [s["key"] for s in samples]
    assert S.is_done(tmp_path / "out", "00000")


# -- 2: no user-supplied string reaches a shell -------------------------------------------------------------
def test_2_urls_and_pipe_arguments_never_reach_a_shell(tmp_path, server):
    srv, www = server
    srv.broken = False
    marker = tmp_path / "MARKER"
    tar = write_tar(tmp_path / "00001.tar", good_samples(1, size=32))
    specs = [f"{srv.url}/a'$(touch {marker})'/00000.tar",  # a quote and a command substitution in the path
             f"pipe:cat '$(touch {marker})' {tar}"]  # an argument, not a command: cat gets a strange file name
    errors = []
    for spec in specs:
        try:
            list(ShardReader(spec, size=16).records())
        except Exception as exc:  # noqa: BLE001 - what matters first is that nothing ran
            errors.append(str(exc))
    time.sleep(0.2)
    assert not marker.exists()
    assert len(errors) == 2 and "HTTP 404" in errors[0] and "exited with status 1" in errors[1], errors
    assert S.shard_id(specs[0]) == "00000"


# -- 3: every damaged container is noticed ----------------------------------------------------------------
def _read(data: bytes, folder: Path, name: str = "00000.tar") -> tuple[list[str], ShardReadError | None]:
    path = folder / name
    path.write_bytes(data)
    keys = []
    try:
        for sample in ShardReader(str(path), size=16).samples():
            keys.append(sample["__key__"])
    except ShardReadError as exc:
        return keys, exc
    return keys, None


def _header_offsets(data: bytes) -> list[int]:
    offsets = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            offsets.append(member.offset)
    return offsets


def test_3_no_corrupt_or_truncated_container_reads_as_complete(tmp_path):
    samples = good_samples(4, size=24)
    data = write_tar(tmp_path / "whole.tar", samples).read_bytes()
    full = [s["key"] for s in samples]
    assert _read(data, tmp_path) == (full, None)
    end = len(data.rstrip(b"\0"))
    cases: dict[str, bytes] = {}
    for offset in _header_offsets(data):
        for field_at in (0, 124, 148, 156):  # name, size, checksum, type flag
            bad = bytearray(data)
            bad[offset + field_at] ^= 0x5A
            cases[f"header@{offset}+{field_at}"] = bytes(bad)
    for cut in sorted({*range(0, end + 1024, 512), *range(100, end + 1024, 512), len(data) - 1}):
        cases[f"cut@{cut}"] = data[:cut]
    gz, bz = gzip.compress(data), bz2.compress(data)
    for cut in (10, len(gz) // 3, len(gz) - 9, len(gz) - 1):
        cases[f"gzip cut@{cut}"] = gz[:cut]
    bad_gz = bytearray(gz)
    bad_gz[len(gz) // 2] ^= 0xFF
    cases["gzip corrupt"] = bytes(bad_gz)
    cases["bzip2 cut"] = bz[: len(bz) // 2]
    cases["zstd"] = b"\x28\xb5\x2f\xfd" + os.urandom(200)
    cases["not a tar"] = os.urandom(3000)
    cases["zero bytes"] = b""
    silent = []
    for name, blob in cases.items():
        keys, error = _read(blob, tmp_path)
        if error is None and keys != full:
            silent.append((name, len(keys)))
        if error is not None:
            assert keys == full[: len(keys)], name  # what was read is the start, in order
    assert not silent, f"rows missing without an error: {silent}"
    assert "zstd" in str(_read(cases["zstd"], tmp_path)[1])
    assert "gzip" in str(_read(cases["gzip cut@10"], tmp_path, "00000.tar.gz")[1])


def _encoder(**pipeline) -> ShardEncoder:
    fit = encoder.load_config("cpu_small", **TINY)
    return ShardEncoder(fit, load_pipeline_config(None, batch_size=2, row_group_size=4, **pipeline), device="cpu")


def test_3_a_damaged_shard_keeps_its_rows_marked_incomplete_until_it_reads_whole(tmp_path):
    samples = good_samples(5, size=32)
    whole = write_tar(tmp_path / "whole.tar", samples).read_bytes()
    tar = tmp_path / "00000.tar"
    tar.write_bytes(whole[: int(len(whole.rstrip(b"\0")) * 0.7)])  # inside a member, not in the padding
    out = tmp_path / "out"
    with pytest.raises(ShardIncomplete, match="truncated.*kept in 00000.parquet, marked incomplete"):
        _encoder().encode_shard(str(tar), "00000", str(out))
    stats = json.loads(OutputFolder(out).stats("00000").read_text())
    kept = _keys(out / "00000.parquet")
    assert 0 < len(kept) < len(samples) and kept == [s["key"] for s in samples][: len(kept)]
    assert stats["complete"] is False and stats["truncated"] and stats["rows"] == len(kept) and stats["errors"]
    assert "incomplete" in S.check_done(out, "00000")  # not done: a rerun replaces it
    tar.write_bytes(whole)
    assert _encoder().encode_shard(str(tar), "00000", str(out))["complete"]
    assert _keys(out / "00000.parquet") == [s["key"] for s in samples] and S.is_done(out, "00000")


# -- 4: the default run starts its own Ray, whatever cluster files or busy ports exist ------------------------
def _run_and_reap(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """run_encode.py in a subprocess; on a timeout, it and every helper it started are killed by pid."""
    proc = subprocess.Popen([sys.executable, str(REPO / "run_encode.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    helpers: set[int] = set()
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        helpers.update(descendants(proc.pid))
        time.sleep(0.5)
    if proc.poll() is None:
        kill_pids(sorted(helpers) + [proc.pid])
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_4_a_stale_cluster_file_and_a_busy_dashboard_port_do_not_stop_a_run(tmp_path):
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "00000.tar", good_samples(2, size=32))
    config = tiny_config(tmp_path / "tiny.yaml", include_dashboard=True)
    # Ray finds "the current cluster" in $RAY_TMPDIR/ray/ray_current_cluster (ray._common.utils); a short
    # folder, since Ray's socket paths must fit in 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # a cluster long gone
    env = {k: v for k, v in ENV.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
    busy = socket.socket()
    with contextlib.suppress(OSError):  # already taken by another run: busy all the same
        busy.bind(("127.0.0.1", 8265))
        busy.listen()
    try:
        result = _run_and_reap(["--shards", str(tmp_path / "in" / "00000.tar"), "--output", str(tmp_path / "out"),
                                "--config", str(config), "--gpus", "0", "--workers", "1", "--no-progress"],
                               env, timeout=180)  # fmt: skip
    finally:
        busy.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dashboard port 8265 is taken" in result.stderr and "Ray dashboard: http://127.0.0.1:" in result.stderr
    assert S.is_done(tmp_path / "out", "00000")


# -- 5: every wait has a bound ---------------------------------------------------------------------------
def test_5_a_source_that_never_answers_fails_in_bounded_time_and_leaves_no_process(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    before = set(descendants(os.getpid()))
    timeouts = Timeouts(connect=2, read=1)
    try:
        for url in (f"http://127.0.0.1:{listener.getsockname()[1]}/00000.tar", "pipe:sleep 60"):
            start = time.time()
            with pytest.raises(ShardReadError, match="(?i)timed out|timeout"):
                list(ShardReader(url, size=16, timeouts=timeouts).records())
            assert time.time() - start < 6, url
        time.sleep(0.2)
        assert set(descendants(os.getpid())) <= before  # the stalled command was ended with its session
    finally:
        listener.close()
        for conn, _ in accepted:
            conn.close()


def _main(argv: list[str], capsys) -> tuple[int, str]:
    code = run_encode.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "pipeline.workers must be >= 1"),
    (["--num-cpus", "0"], "pipeline.num_cpus must be >= 1"),
    (["--address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
])  # fmt: skip
def test_5_settings_that_used_to_hang_are_refused_at_once(tmp_path, capsys, flags, message):
    tar = write_tar(tmp_path / "00000.tar", [])
    start = time.time()
    gpus = [] if "--address" in flags else ["--gpus", "0"]
    code, err = _main(["--shards", str(tar), "--output", str(tmp_path / "out"), "--config", "cpu_small", *gpus, *flags],
                      capsys)  # fmt: skip
    assert code == 2 and message in err and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert time.time() - start < 35


def test_3_a_zstd_shard_is_refused_before_the_run(tmp_path, capsys):
    (tmp_path / "00000.tar.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(100))
    code, err = _main(["--shards", str(tmp_path / "00000.tar.zst"), "--output", str(tmp_path / "out"),
                       "--config", "cpu_small", "--gpus", "0"], capsys)  # fmt: skip
    assert code == 2 and "zstd-compressed shards are not supported" in err


def test_5_a_brace_range_of_missing_files_is_refused_at_once(tmp_path, capsys):
    start = time.time()
    code, err = _main(["--shards", str(tmp_path / "{000000..099999}.tar"), "--output", str(tmp_path / "out"),
                       "--config", "cpu_small", "--gpus", "0"], capsys)  # fmt: skip
    assert code == 2 and "100000 of 100000 local shards do not exist" in err
    assert time.time() - start < 20


# -- 6: infrastructure errors fail the batch or the shard, never become rows ---------------------------------
def test_6_out_of_memory_while_decoding_fails_the_shard(tmp_path, monkeypatch):
    import pipeline.reader as R

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(R, "center_crop_resize", no_memory)
    tar = write_tar(tmp_path / "00000.tar", good_samples(2, size=32))
    with pytest.raises(MemoryError):
        _encoder().encode_shard(str(tar), "00000", str(tmp_path / "out"))
    assert not list((tmp_path / "out").iterdir())


def test_6_out_of_memory_in_the_fit_splits_the_batch_then_fails_the_shard(tmp_path, monkeypatch):
    real = encoder.fit_batch
    tar = write_tar(tmp_path / "00000.tar", good_samples(4, size=32))

    def small_only(targets, config, device="cpu", seed=0):
        if targets.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(targets, config, device=device, seed=seed)

    monkeypatch.setattr(encoder, "fit_batch", small_only)
    stats = _encoder().encode_shard(str(tar), "00000", str(tmp_path / "a"))
    assert stats["ok"] == 4  # a smaller batch fitted

    def never(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(encoder, "fit_batch", never)
    with pytest.raises(torch.OutOfMemoryError):
        _encoder().encode_shard(str(tar), "00000", str(tmp_path / "b"))
    assert not (tmp_path / "b" / "00000.parquet").exists()  # no fit_error rows committed


@pytest.mark.parametrize("flags, preset, message", [
    ([], {"max_image_pixels": 0}, "pipeline.max_image_pixels must be >= 1"),
    ([], {"read_timeout": 0}, "pipeline.read_timeout must be > 0"),
    ([], {"batch_size": "four"}, "pipeline.batch_size must be"),
    (["--device", "banana"], {}, "--device must be auto, cpu, cuda or cuda:N"),
    (["--gpus", "3", "--device", "cuda"], {}, "no GPU is visible"),
    (["--gpus", "-1"], {}, "--gpus must be >= 0"),
    (["--strokes", "0"], {}, "strokes"),
])  # fmt: skip
def test_6_bad_settings_are_one_error_line_before_anything_starts(tmp_path, capsys, flags, preset, message):
    import ray

    if torch.cuda.is_available() and "no GPU" in message:
        pytest.skip("this machine has a GPU")
    config = tiny_config(tmp_path / "c.yaml", **preset)
    tar = write_tar(tmp_path / "00000.tar", [])
    code, err = _main(["--shards", str(tar), "--output", str(tmp_path / "out"), "--config", str(config), *flags], capsys)
    assert code == 2 and err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1, err
    assert not ray.is_initialized() and not OutputFolder(tmp_path / "out").lock_path.exists()


# -- 7: resume verifies what it skips and refuses to mix settings ------------------------------------------
def test_7_resume_redoes_a_damaged_shard_and_refuses_other_settings(tmp_path, capsys):
    tars = [write_tar(tmp_path / f"{i:05d}.tar", good_samples(2, prefix=f"s{i}", size=32)) for i in range(2)]
    out = tmp_path / "out"
    options = _options(tmp_path, tars, output=out)
    assert run(options) == 0
    parquet = out / "00000.parquet"
    parquet.write_bytes(parquet.read_bytes()[:-100])  # cut short after the stats file was written
    assert run(options) == 0
    assert "shard 00000: redone: 00000.parquet is missing or unreadable" in capsys.readouterr().err
    assert _keys(parquet) == ["s00000", "s00001"] and S.is_done(out, "00000")
    more = dataclasses.replace(options, encoder_overrides={"strokes": 30})
    with pytest.raises(ValueError, match=r"strokes 12 -> 30.*--overwrite.*new --output"):
        run(more)
    assert run(dataclasses.replace(more, overwrite=True)) == 0
    assert json.loads(OutputFolder(out).settings_path.read_text())["strokes"] == 30


# -- 8: one driver per output folder ------------------------------------------------------------------------
def test_8_a_second_driver_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    (tmp_path / "in").mkdir()
    tars = [write_tar(tmp_path / "in" / f"{i:05d}.tar", good_samples(3, prefix=f"s{i}", size=32)) for i in range(2)]
    out = tmp_path / "out"
    config = tiny_config(tmp_path / "tiny.yaml", batch_size=1)
    args = [sys.executable, str(REPO / "run_encode.py"), "--shards", str(tmp_path / "in"), "--output", str(out),
            "--config", str(config), "--device", "cpu", "--no-ray", "--no-progress"]  # fmt: skip
    lock = OutputFolder(out).lock_path
    first = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not lock.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.02)
        # The second driver, on the same folder while the first encodes: refused at once, naming the first.
        with pytest.raises(LockHeld, match=rf"in use by another driver \(host {socket.gethostname()}, pid {first.pid}"):
            run(_options(tmp_path, tars, output=out))
        assert first.poll() is None, "the first driver ended before the second one started: make its shards bigger"
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    assert [_keys(out / f"{t.stem}.parquet") for t in tars] == [[f"s{i}{j:04d}" for j in range(3)] for i in range(2)]
    assert not lock.exists()
    # A driver that died (same host, its pid gone) left its lock: the next run takes it over.
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started_at": "then"}))
    assert run(_options(tmp_path, tars[:1], output=out, overwrite=True)) == 0
    assert not lock.exists()
    # Another host's lock cannot be checked from here: refused, naming it; so is one being written.
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started_at": "then"}))
    with pytest.raises(LockHeld, match="host elsewhere, pid 1, started then"):
        run(_options(tmp_path, tars, output=out))
    lock.write_text("")
    with pytest.raises(LockHeld, match="is empty"):
        run(_options(tmp_path, tars, output=out))


# -- 9: duplicates, exotic images, member limits, SIGTERM, one-line errors --------------------------------------
def _sample(key: str, **files) -> dict:
    return {"key": key, "files": files}


def test_9_duplicate_keys_odd_modes_and_oversized_members(tmp_path):
    jpeg = good_samples(1, size=32)[0]["files"]["jpg"]
    ramp = np.tile(np.linspace(0, 1, 20, dtype=np.float32), (20, 1))  # 1.6 KB: under the member limit
    samples = [
        _sample("a", jpg=jpeg, txt=b"first a"),
        _sample("b", jpg=jpeg),
        _sample("a", jpg=jpeg, txt=b"second a"),  # not adjacent: the same key again
        _sample("f01", tiff=encode(Image.fromarray(ramp, mode="F"), "TIFF")),  # float in [0, 1]
        _sample("fbig", tiff=encode(Image.fromarray(ramp * 1000 - 500, mode="F"), "TIFF")),  # by its range
        _sample("fnan", tiff=encode(Image.fromarray(np.full((20, 20), np.nan, np.float32), mode="F"), "TIFF")),
        _sample("long", jpg=jpeg, txt=b"x" * 5000),  # over max_member_bytes
    ]
    tar = write_tar(tmp_path / "00000.tar", samples)
    records = {}
    for record in ShardReader(str(tar), size=16, max_member_bytes=4000).records():
        records.setdefault(record.key, []).append(record)
    assert [r.status for r in records["a"]] == ["ok", "duplicate_key"] and records["a"][0].caption == "first a"
    assert "already used" in records["a"][1].error_message
    for key in ("f01", "fbig"):
        target = records[key][0].target
        assert records[key][0].status == "ok" and float(target.min()) < 0.1 and float(target.max()) > 0.9, key
    assert records["fnan"][0].status == "decode_error" and "non-finite" in records["fnan"][0].error_message
    assert records["long"][0].status == "too_large" and "max_member_bytes" in records["long"][0].error_message


@pytest.mark.parametrize("where", [["--no-ray"], ["--gpus", "0", "--workers", "1"]], ids=["no-ray", "ray"])
def test_9_sigterm_stops_like_ctrl_c_with_a_summary(tmp_path, where):
    (tmp_path / "in").mkdir()
    for i in range(6):
        write_tar(tmp_path / "in" / f"{i:05d}.tar", good_samples(4, prefix=f"s{i}", size=32))
    out = tmp_path / "out"
    config = tiny_config(tmp_path / "tiny.yaml", batch_size=1)
    args = [sys.executable, str(REPO / "run_encode.py"), "--shards", str(tmp_path / "in"), "--output", str(out),
            "--config", str(config), "--device", "cpu", "--no-progress", *where]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not OutputFolder(out).stats_files() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    summary = json.loads(OutputFolder(out).summary_path.read_text())
    assert summary["interrupted"] and summary["stopped_by"] == "SIGTERM"
    # A shard whose result was not collected before the signal is counted by the next run, not this one.
    assert summary["shards_encoded"] <= sum(S.is_done(out, f"{i:05d}") for i in range(6))
    assert not list(out.glob(".*.tmp")) and not OutputFolder(out).lock_path.exists()


def test_9_output_errors_are_one_line(tmp_path, capsys, monkeypatch):
    tar = write_tar(tmp_path / "00000.tar", good_samples(1, size=32))
    config = tiny_config(tmp_path / "tiny.yaml")
    base = ["--shards", str(tar), "--config", str(config), "--device", "cpu", "--no-ray", "--no-progress"]
    (tmp_path / "afile").write_text("x")
    for output, message in ((tmp_path / "afile", "is a file"), ("/proc/painterbot-out", "cannot create")):
        code, err = _main([*base, "--output", str(output)], capsys)
        assert code == 2 and err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1, err
    real, summary = D.write_json_atomic, OutputFolder(tmp_path / "out").summary_path

    def full_disk_for_the_summary(path, data):
        if Path(str(path)).resolve() == summary.resolve():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(D, "write_json_atomic", full_disk_for_the_summary)
    code, err = _main([*base, "--output", str(tmp_path / "out")], capsys)
    assert code == 1 and err.strip().splitlines()[-1].startswith("error:") and "No space left" in err
    assert not OutputFolder(tmp_path / "out").lock_path.exists()
