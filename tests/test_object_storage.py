"""Object storage: shards in a bucket, output to a bucket, through moto's S3 server on 127.0.0.1.

Same semantics as local folders: one Parquet per shard that no reader sees
partially, the stats marker last, resume after the driver is SIGKILLed, the
done markers read with one listing, and the dataset loader over the bucket.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest

from pipeline import shards as S
from pipeline import storage
from pipeline.dataset import StrokeDataset, read_row
from pipeline.output_folder import OutputFolder, write_json_atomic
from pipeline.writer import ShardWriter
from pipeline_samples import (REPO, bad_samples, environment, good_samples, sigkill_driver_when, tar_samples,
                              tiny_config, write_tar)  # fmt: skip

moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
boto3 = pytest.importorskip("boto3")

BUCKET = "painterbot-test"


class _Requests(logging.Handler):
    """Counts the HTTP requests moto's server logs (werkzeug writes one line per request)."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server, its endpoint and fake credentials in this process's environment (and so in
    every subprocess the tests start), a bucket, and a boto3 client for looking behind pyarrow's back."""
    requests = _Requests()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.addHandler(requests)
    werkzeug.propagate = False  # one line per request would drown pytest's output
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    try:
        with environment(env):  # filesystems are cached per process: built with this endpoint inside
            client = boto3.client("s3")
            client.create_bucket(Bucket=BUCKET)
            yield client, requests
    finally:
        server.stop()
        werkzeug.removeHandler(requests)


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    # Keys ending in "/" are the empty folder markers pyarrow leaves after deleting a temporary object.
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/"))


def test_writer_commits_whole_objects_and_resume_lists_once(s3):
    client, requests = s3
    out = f"s3://{BUCKET}/unit/out"
    writer = ShardWriter(out, "00001", n_strokes=12, row_group_size=2)
    writer.add([{"key": f"k{i}", "status": "decode_error", "error_message": "x"} for i in range(5)])
    assert _keys(client, "unit/") == []  # nothing under any name until the commit
    stats = writer.commit({"total": 5})
    assert stats["rows"] == 5 and stats["parquet_bytes"] > 0
    assert _keys(client, "unit/") == ["unit/out/00001.parquet", "unit/out/__painterbot__/00001_stats.json"]
    assert read_row(f"{out}/00001.parquet", "k3")["status"] == "decode_error"

    aborted = ShardWriter(out, "00002", n_strokes=12)
    aborted.add([{"key": "a", "status": "decode_error"}])
    aborted.abort()
    assert _keys(client, "unit/out/.") == []  # the temporary object is gone too

    # A leftover temporary object (a killed attempt) is found and cleaned from one listing.
    client.put_object(Bucket=BUCKET, Key="unit/out/.00003.parquet.deadbeef.tmp", Body=b"partial")
    folder = OutputFolder(out)
    assert [p.name for p in folder.temp_files("00003")] == [".00003.parquet.deadbeef.tmp"]
    assert folder.clean_temp("00003") == 1 and not folder.temp_files("00003")

    # 400 shards, 300 of them done: the plan reads every marker from one listing.
    for i in range(300):
        for name in (f"{i:05d}.parquet", f"__painterbot__/{i:05d}_stats.json"):
            client.put_object(Bucket=BUCKET, Key=f"unit/many/{name}", Body=b"{}")
    shards = S.make_shards([f"s3://{BUCKET}/in/{{00000..00399}}.tar"])  # no request: names only
    before = len(requests.lines)
    todo, done = S.plan(shards, f"s3://{BUCKET}/unit/many")
    assert len(done) == 300 and [s.id for s in todo][:2] == ["00300", "00301"]
    assert len(requests.lines) - before <= 3, requests.lines[before:]  # one listing of the folder, one of __painterbot__ (+ a retry)

    storage.location(f"s3://{BUCKET}/a/new/prefix").mkdir(parents=True, exist_ok=True)  # nothing to create
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.location("s3://no-such-bucket-here/out").mkdir(parents=True, exist_ok=True)

    write_json_atomic(f"s3://{BUCKET}/unit/summary.json", {"a": 1})
    assert json.loads(client.get_object(Bucket=BUCKET, Key="unit/summary.json")["Body"].read()) == {"a": 1}


def _upload_shards(client, tmp: Path, count: int, per_shard: int) -> dict[str, Path]:
    """img2dataset-layout tars written locally (kept for checking) and uploaded under in/."""
    tars = {}
    for i in range(count):
        samples = good_samples(per_shard, prefix=f"s{i}k") + (bad_samples(f"b{i}")[:3] if i == 0 else [])
        tar = write_tar(tmp / f"{i:05d}.tar", samples)
        client.upload_file(str(tar), BUCKET, f"e2e/in/{tar.name}")
        tars[tar.stem] = tar
    return tars


def _check_bucket(client, tars: dict[str, Path], out: str = f"s3://{BUCKET}/e2e/out") -> int:
    """Every object under a final name is complete; returns how many shards are done."""
    done = 0
    for sid, tar in tars.items():
        parquet = storage.location(f"{out}/{sid}.parquet")
        if parquet.is_file():
            where, filesystem = storage.arrow_target(parquet)
            table = pq.read_table(where, filesystem=filesystem, columns=["key", "caption"])
            expected = tar_samples(tar)
            assert table["key"].to_pylist() == list(expected), f"{parquet} is not complete"
            captions = [files["txt"].decode() if "txt" in files else None for files in expected.values()]
            assert table["caption"].to_pylist() == captions
        stats = storage.location(f"{out}/__painterbot__/{sid}_stats.json")
        if stats.is_file():
            assert parquet.is_file() and json.loads(stats.read_text())["rows"] == len(tar_samples(tar))
            done += 1
    return done


def test_bucket_to_bucket_killed_and_resumed_then_loaded(s3, tmp_path):
    client, _ = s3
    # More shards than the two workers hold at once (2 each): the ones in flight when the driver is
    # killed may still commit before Ray ends its workers, and some must be left for the rerun.
    tars = _upload_shards(client, tmp_path, count=8, per_shard=5)
    config = tiny_config(tmp_path / "tiny.yaml", batch_size=2, max_retries=1)
    args = [sys.executable, str(REPO / "run_encode.py"), "--shards", f"s3://{BUCKET}/e2e/in/",
            "--output", f"s3://{BUCKET}/e2e/out", "--config", str(config), "--gpus", "0", "--workers", "2",
            "--no-progress"]  # fmt: skip
    # The worktree's code, whatever the venv has installed; credentials and endpoint travel by environment.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    log_path = tmp_path / "killed.log"
    # Kill after the first committed shard.
    sigkill_driver_when(args, env, log_path, lambda: any(k.endswith("_stats.json")
                                                         for k in _keys(client, "e2e/out/__painterbot__/")), poll=0.1)
    assert "8 shard(s): 8 to encode" in log_path.read_text()  # the folder spec was listed
    done_before = _check_bucket(client, tars)  # nothing partial under a final name
    assert 1 <= done_before < len(tars)

    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"{done_before} already done (skipped)" in rerun.stderr
    assert _check_bucket(client, tars) == len(tars)  # every shard exactly once
    assert not [k for k in _keys(client, "e2e/out/") if k.endswith(".tmp")]
    summary = json.loads(client.get_object(Bucket=BUCKET, Key="e2e/out/__painterbot__/summary.json")["Body"].read())
    assert summary["shards_encoded"] == len(tars) - done_before and summary["shards_failed"] == 0

    # The loader reads the bucket as it reads a folder: ok rows only, strokes a row group at a time.
    data = StrokeDataset(f"s3://{BUCKET}/e2e/out")
    captions = {key: files["txt"].decode() for tar in tars.values() for key, files in tar_samples(tar).items()
                if not key.startswith("b")}  # the planted bad samples all fail  # fmt: skip
    rows = [data[i] for i in range(len(data))]
    assert {row["key"]: row["caption"] for row in rows} == captions
    assert all(tuple(row["strokes"].shape) == (12, 10) and row["psnr"] > 0 for row in rows)
    pattern = StrokeDataset(f"s3://{BUCKET}/e2e/out/*.parquet")
    assert [pattern[i]["key"] for i in range(len(pattern))] == [row["key"] for row in rows]

    # The gallery reads the bucket too (issue #25, 13: it took the URI for a local path).
    from pipeline.__main__ import main

    assert main(["gallery", f"s3://{BUCKET}/e2e/out", "-o", str(tmp_path / "r.html"), "--thumb", "16"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert f"s3://{BUCKET}/e2e/out" in page and "<svg" in page and "Timelapse" in page


def test_subprocesses_import_this_checkout():
    """The runs above are only evidence for this code if their interpreter imports it."""
    code = "import pipeline.storage, run_encode; print(pipeline.storage.__file__)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and Path(proc.stdout.strip()).is_relative_to(REPO), proc.stdout + proc.stderr


def test_any_fsspec_filesystem_and_local_uris_take_the_same_paths(s3, tmp_path):
    """memory:// (fsspec, in this process) stands for the schemes pyarrow does not serve itself."""
    pytest.importorskip("fsspec")
    out = "memory://painterbot-test/out"
    writer = ShardWriter(out, "00007", n_strokes=12)
    writer.add([{"key": "k", "status": "too_small", "error_message": "3x3"}])
    writer.commit({"total": 1})
    names = sorted(p.name for p in storage.location(out).iterdir())
    assert names == ["00007.parquet", "__painterbot__"]
    assert [p.name for p in OutputFolder(out).meta.iterdir()] == ["00007_stats.json"]
    todo, done = S.plan(S.make_shards([f"{out}/0000{{6..7}}.tar"]), out)
    assert [s.id for s in todo] == ["00006"] and [s.id for s in done] == ["00007"]
    assert read_row(f"{out}/00007.parquet", "k")["status"] == "too_small"
    # file:// URIs and plain paths are local: pathlib and os, as before.
    assert storage.location(f"file://{tmp_path}") == tmp_path and not storage.is_fs_uri(str(tmp_path))
    assert storage.folder_of("http://host/00001.tar") is None and storage.folder_of("pipe:cat x.tar") is None
    assert storage.folder_of(f"s3://{BUCKET}/in/00001.tar") == f"s3://{BUCKET}/in"


def test_sources_open_object_store_shards_and_resume_sees_incomplete_shards(s3, tmp_path):
    """r10's sources open s3:// and fsspec URIs through storage.py; an incomplete shard on an
    object store is redone although resume there reads only the listing."""
    from pipeline.reader import ShardReader
    from pipeline.sources import ShardReadError, check_url, open_source

    client, _ = s3
    tar = write_tar(tmp_path / "00005.tar", good_samples(2, prefix="src"))
    client.upload_file(str(tar), BUCKET, "src/00005.tar")
    url = f"s3://{BUCKET}/src/00005.tar"
    check_url(url), check_url("memory://x/00001.tar")  # accepted before the run (no error)
    with pytest.raises(ValueError, match="no opener or filesystem"):
        check_url("nosuchscheme://x/00001.tar")
    stream = open_source(url)
    try:
        assert stream.read(512)[:512] == tar.read_bytes()[:512]
    finally:
        stream.close()
    assert [s["__key__"] for s in ShardReader(url, 16).samples()] == list(tar_samples(tar))
    with pytest.raises(ShardReadError, match="no-such-key"):
        open_source(f"s3://{BUCKET}/src/no-such-key.tar")

    out = f"s3://{BUCKET}/incomplete/out"
    writer = ShardWriter(out, "00005", n_strokes=12)
    writer.add([{"key": "k", "status": "decode_error", "error_message": "x"}])
    writer.commit({"total": 1, "complete": False, "errors": ["cut short"]})
    todo, done = S.plan(S.make_shards([f"s3://{BUCKET}/src/00005.tar"]), out)
    assert [s.id for s in todo] == ["00005"] and not done
    writer = ShardWriter(out, "00005", n_strokes=12)
    writer.commit({"total": 0, "complete": True})
    assert not OutputFolder(out).incomplete("00005").exists()
    assert S.plan(S.make_shards([f"s3://{BUCKET}/src/00005.tar"]), out)[1]


class _Outage:
    """A TCP relay on 127.0.0.1 in front of the moto server that can be cut: while it is down every
    connection, open or new, is reset, which is how a store's outage looks to its clients."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.up = target, threading.Event()
        self.up.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not self.up.is_set():
                self._reset(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                self._reset(client)
                continue
            with self.lock:
                self.open.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                self._reset(sock)

    def _reset(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
            sock.close()
        except OSError:
            pass
        with self.lock:
            self.open.discard(sock)

    def cut(self) -> None:
        self.up.clear()
        with self.lock:
            sockets = list(self.open)
        for sock in sockets:
            self._reset(sock)

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.mark.parametrize("where", [["--no-ray"], ["--gpus", "0", "--workers", "2"]], ids=["no-ray", "ray"])
def test_an_outage_of_the_output_store_fails_and_retries_the_shards_it_touches(s3, tmp_path, where):
    """issue #25, 11, as a real run: the output bucket goes away mid-run (its connections reset) and
    comes back. The shards it touched fail their attempts and are retried like any failed shard (or,
    their retries spent, are reported failed); the run ends with a summary, no shard is partial or
    doubled, no temporary object stays, and a rerun completes the dataset exactly once."""
    client, _ = s3
    name = where[0].strip("-")
    tars = {}
    (tmp_path / "in").mkdir()
    for i in range(6):
        tars[f"{i:05d}"] = write_tar(tmp_path / "in" / f"{i:05d}.tar", good_samples(3, prefix=f"s{i}k"))
    out = f"s3://{BUCKET}/outage-{name}/out"
    config = tiny_config(tmp_path / "tiny.yaml", batch_size=1, max_retries=4)
    moto = urlsplit(os.environ["AWS_ENDPOINT_URL"])
    relay = _Outage((moto.hostname, moto.port))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}"}
    args = [sys.executable, str(REPO / "run_encode.py"), "--shards", str(tmp_path / "in"), "--output", out,
            "--config", str(config), "--device", "cpu", "--no-progress", *where]
    log = (tmp_path / "run.log").open("w+")
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        prefix = f"outage-{name}/out/__painterbot__/"
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not any(
                k.endswith("_stats.json") for k in _keys(client, prefix)):
            time.sleep(0.1)
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        relay.cut()  # the first shard is committed; the store goes away under the others
        deadline = time.time() + 60
        while time.time() < deadline and "failed (" not in (tmp_path / "run.log").read_text():
            time.sleep(0.1)
        relay.restore()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        relay.close()
    text = (tmp_path / "run.log").read_text()
    assert "Traceback" not in text, text[-4000:]
    assert proc.returncode in (0, 1), text[-4000:]
    summary = json.loads(client.get_object(Bucket=BUCKET, Key=f"{prefix}summary.json")["Body"].read())
    assert summary["retried_shards"] or summary["failed_shards"], text[-4000:]  # the outage touched some shard
    assert summary["shards_failed"] == (proc.returncode == 1) * len(summary["failed_shards"])
    done = _check_bucket(client, tars, out)  # nothing partial under a final name
    assert done == summary["shards_encoded"] == len(tars) - summary["shards_failed"]
    assert not [k for k in _keys(client, f"outage-{name}/out/") if k.endswith(".tmp")]

    rerun = subprocess.run(args, cwd=REPO, env={**env, "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]},
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert _check_bucket(client, tars, out) == len(tars)  # every shard exactly once
