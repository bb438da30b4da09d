"""One bad value costs one row, never a shard (issue #25, A1-A2): a real encode of a shard holding
forged samples next to good ones; every key of the tar gets a row with a status, links included."""
from __future__ import annotations

import io
import json
import tarfile

import pyarrow.parquet as pq

from pipeline.driver import RunOptions, run
from pipeline_samples import good_samples, tiny_config


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_bad_values_and_links_cost_one_row_each(tmp_path):
    good = good_samples(2, size=40)
    jpeg = good[0]["files"]["jpg"]
    sizes = {"nan": b'{"original_width": NaN, "original_height": 300}',
             "inf": b'{"original_width": 1e400, "original_height": 300}',
             "huge": b'{"original_width": %d, "original_height": 300}' % 10**30,
             "int32": b'{"original_width": 3000000000, "original_height": -5}',
             "frac": b'{"original_width": 640.5, "original_height": 480, "sha256": 7}'}
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "00000.tar", "w") as tar:
        _add(tar, "good0000.jpg", jpeg)
        _add(tar, "good0000.txt", b"a caption")
        _add(tar, "deep.jpg", jpeg)
        _add(tar, "deep.json", b"[" * 10_000 + b"]" * 10_000)  # past the JSON parser's recursion limit
        _add(tar, "deepobj.jpg", jpeg)
        _add(tar, "deepobj.json", b'{"a": ' * 10_000 + b"1" + b"}" * 10_000)
        for key, meta in sizes.items():
            _add(tar, f"{key}.jpg", jpeg)
            _add(tar, f"{key}.json", meta)
        _add(tar, "symlinked.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")  # its only member
        _add(tar, "hardlinked.jpg", kind=tarfile.LNKTYPE, link="good0000.jpg")
        _add(tar, "hardlinked.txt", b"its caption")
        _add(tar, "good0001.jpg", good[1]["files"]["jpg"])
    out = tmp_path / "out"
    options = RunOptions(shards=[str(tmp_path / "in" / "00000.tar")], output=str(out),
                         config=str(tiny_config(tmp_path / "tiny.yaml")), device="cpu", use_ray=False, progress=False)
    assert run(options) == 0
    rows = {r["key"]: r for r in pq.read_table(out / "00000.parquet").to_pylist()}
    stats = json.loads((out / "__painterbot__" / "00000_stats.json").read_text())
    assert stats["complete"] and stats["total"] == len(rows) == 11
    for key in ("good0000", "good0001", "deep", "deepobj", *sizes):
        assert rows[key]["status"] == "ok", (key, rows[key]["error_message"])
    for key in sizes:
        extra = json.loads(rows[key]["extra"].replace("NaN", "null").replace("Infinity", "null"))
        assert rows[key]["original_width"] is None and "original_width" in extra, key  # null there, kept in extra
    assert rows["nan"]["original_height"] == 300 and rows["int32"]["original_height"] is None
    assert rows["frac"]["original_height"] == 480 and rows["frac"]["sha256"] is None
    assert json.loads(rows["frac"]["extra"])["sha256"] == 7
    assert rows["deep"]["extra"] is None  # the unparsable .json is dropped, the image kept
    for key, kind in (("symlinked", "symbolic link"), ("hardlinked", "hard link")):
        assert rows[key]["status"] == "link_member" and kind in rows[key]["error_message"], rows[key]
    assert rows["hardlinked"]["caption"] == "its caption"


def test_loaders_name_a_foreign_or_damaged_file_in_the_folder(tmp_path):
    """issue #25, 15: a Parquet file of another tool, or a damaged one, is named in one clear error."""
    import pyarrow as pa
    import pytest

    from pipeline.dataset import StrokeDataset
    from pipeline.stream import StrokeStream
    from pipeline_samples import write_tar

    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "00000.tar", good_samples(1, size=40))
    out = tmp_path / "out"
    options = RunOptions(shards=[str(tmp_path / "in" / "00000.tar")], output=str(out),
                         config=str(tiny_config(tmp_path / "tiny.yaml")), device="cpu", use_ray=False, progress=False)
    assert run(options) == 0
    assert len(StrokeDataset(str(out))) == 1
    pq.write_table(pa.table({"id": [1, 2]}), out / "foreign.parquet")
    for load in (lambda: StrokeDataset(str(out)), lambda: list(StrokeStream(str(out)))):
        with pytest.raises(ValueError, match=r"foreign\.parquet: not a PainterBot output file \(no key, status"):
            load()
    (out / "foreign.parquet").write_bytes((out / "00000.parquet").read_bytes()[:300])  # cut short
    for load in (lambda: StrokeDataset(str(out)), lambda: list(StrokeStream(str(out)))):
        with pytest.raises(ValueError, match=r"foreign\.parquet: not a readable Parquet file"):
            load()


def test_a_failed_attempt_leaves_no_temporary_file(tmp_path):
    """issue #25, 8: a worker that dies mid-shard leaves its hidden temporary Parquet file behind; the
    driver removes it when the attempt fails, not when a later run retries the shard."""
    import os
    import subprocess
    import sys

    from pipeline_samples import REPO, write_tar

    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "00000.tar", good_samples(4, size=32))
    out = tmp_path / "out"
    config = tiny_config(tmp_path / "tiny.yaml", batch_size=1, max_retries=0, row_group_size=1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PAINTERBOT_CRASH_ONCE": str(tmp_path / "crashed")}
    proc = subprocess.run([sys.executable, str(REPO / "run_encode.py"), "--shards", str(tmp_path / "in"),
                           "--output", str(out), "--config", str(config), "--device", "cpu", "--gpus", "0",
                           "--workers", "1", "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and (tmp_path / "crashed").exists(), proc.stderr[-3000:]
    assert "worker died" in json.loads((out / "__painterbot__" / "summary.json").read_text())[
        "failed_shards"]["00000"]["error"]
    assert not list(out.glob(".*")), list(out.iterdir())


def test_an_output_store_that_cannot_be_listed_fails_the_shards_it_touches(tmp_path, monkeypatch):
    """issue #25, 11: the store failing under the driver's listing is a failure of that shard,
    retried like any other, then reported in a summary; the run goes on with the other shards."""
    from pipeline.output_folder import OutputFolder
    from pipeline_samples import write_tar

    (tmp_path / "in").mkdir()
    for i in range(3):
        write_tar(tmp_path / "in" / f"{i:05d}.tar", good_samples(1, prefix=f"s{i}", size=32))
    real = OutputFolder.clean_temp

    def outage_for_00001(self, sid):
        if sid == "00001":
            raise OSError("When listing objects under key 'out/': AWS Error NETWORK_CONNECTION")
        return real(self, sid)

    monkeypatch.setattr(OutputFolder, "clean_temp", outage_for_00001)
    out = tmp_path / "out"
    options = RunOptions(shards=[str(tmp_path / "in")], output=str(out), progress=False, use_ray=False,
                         config=str(tiny_config(tmp_path / "tiny.yaml", max_retries=1)), device="cpu")
    assert run(options) == 1
    summary = json.loads((out / "__painterbot__" / "summary.json").read_text())
    assert summary["shards_encoded"] == 2 and list(summary["failed_shards"]) == ["00001"]
    failed = summary["failed_shards"]["00001"]
    assert failed["attempts"] == 2 and "could not be listed" in failed["error"]


def test_the_runs_own_error_is_not_masked_by_the_lock(tmp_path, monkeypatch, capsys):
    """issue #25, 14: when the output fails under a run (made read-only), the error reported is the
    run's own, not the lock's that could not be removed after it."""
    import pytest

    from pipeline import lock as L
    from pipeline import output_folder
    from pipeline_samples import write_tar

    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "00000.tar", good_samples(1, size=32))

    def read_only(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    def lock_stays(self):
        raise PermissionError(1, "Operation not permitted", str(self.path))

    monkeypatch.setattr(output_folder, "write_json_atomic", read_only)
    monkeypatch.setattr("pipeline.driver.write_json_atomic", read_only)
    monkeypatch.setattr(L.OutputLock, "release", lock_stays)
    options = RunOptions(shards=[str(tmp_path / "in" / "00000.tar")], output=str(tmp_path / "out"), progress=False,
                         config=str(tiny_config(tmp_path / "tiny.yaml")), device="cpu", use_ray=False)
    with pytest.raises(OSError, match="Permission denied") as exc:
        run(options)
    assert "driver.lock" not in str(exc.value)
    assert "could not remove the lock" in capsys.readouterr().err


def test_an_output_made_read_only_mid_run_reports_the_runs_own_error_real(tmp_path):
    """issue #25, 14, as a real run: after the first shard the output folder is made immutable under the
    driver (``chattr +i``: file permissions would not bind root, and a read-only remount is refused
    while the writers hold files open). The shards after it fail on their own error, which the error
    line names with what to do; that the lock could not be removed is said beside it, never instead."""
    import os
    import subprocess
    import sys
    import time

    import pytest

    from pipeline.output_folder import OutputFolder
    from pipeline_samples import REPO, write_tar

    probe = tmp_path / "probe"
    probe.mkdir()
    made = subprocess.run(["chattr", "+i", str(probe)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"needs chattr +i (root, a filesystem with the immutable flag): {made.stderr.strip()}")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    (tmp_path / "in").mkdir()
    for i in range(8):  # more than can finish in the moment the change takes
        write_tar(tmp_path / "in" / f"{i:05d}.tar", good_samples(2, prefix=f"s{i}", size=32))
    out = tmp_path / "out"
    config = tiny_config(tmp_path / "tiny.yaml", batch_size=1, max_retries=1)
    proc = subprocess.Popen([sys.executable, str(REPO / "run_encode.py"), "--shards", str(tmp_path / "in"),
                             "--output", str(out), "--config", str(config), "--device", "cpu", "--no-ray",
                             "--no-progress"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    folder = OutputFolder(out)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not folder.stats_files():
            time.sleep(0.02)
        subprocess.run(["chattr", "+i", str(out), str(out / "__painterbot__")], check=True)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["chattr", "-i", str(out), str(out / "__painterbot__")])
    assert proc.returncode == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Operation not permitted" in errors[0] and "driver.lock" not in errors[0], text[-3000:]
    assert "summary could not be written" in errors[0] and "rerun the same command" in errors[0]
    assert "could not remove the lock" in text
    assert 1 <= len(folder.stats_files()) < 8  # the shards done before are kept
