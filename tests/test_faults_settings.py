"""Settings no machine can hold, and flags that contradict each other, are one `error:` line and exit 2
within seconds, before Ray starts or the folder is locked (issue #25, A3-A4)."""
from __future__ import annotations

import time

import pytest

import run_encode
from pipeline_samples import good_samples, tiny_config, write_tar


@pytest.fixture
def shard(tmp_path):
    write_tar(tmp_path / "00000.tar", good_samples(1, size=32))
    return str(tmp_path / "00000.tar")


def _refused(argv, capsys) -> str:
    start = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        code = run_encode.main(argv)
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "error:" in err, err
    assert time.monotonic() - start < 20
    return err


@pytest.mark.parametrize("extra, says", [
    (["--demo"], "--demo builds and encodes its own shards"),
    (["--no-ray", "--address", "127.0.0.1:6379"], "--no-ray runs without Ray"),
    (["--no-ray", "--num-cpus", "2"], "--num-cpus sizes the local Ray"),
    (["--address", "auto", "--num-cpus", "2"], "--num-cpus sizes a local Ray"),
    (["--output", ""], "--output is empty"),
    (["--output", "  "], "--output is empty"),
], ids=["demo+shards", "no-ray+address", "no-ray+num-cpus", "address+num-cpus", "empty-output", "blank-output"])
def test_conflicting_flags_are_refused(shard, tmp_path, capsys, extra, says):
    argv = ["--shards", shard, "--device", "cpu", *extra]
    if "--output" not in extra:
        argv += ["--output", str(tmp_path / "out")]
    assert says in _refused(argv, capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, says", [
    (["--strokes", "1000000000"], "--strokes 1000000000: a fit needs about"),
    (["--size", "100000"], "--size 100000 x --strokes"),
    (["--batch-size", "100000000"], "--batch-size 100000000 x"),
    (["--num-cpus", "1000000"], "--num-cpus 1000000: this machine has"),
    (["--gpus", "0", "--workers", "1000000"], "--workers 1000000: this machine has"),
    (["--reader-threads", "100000"], "--reader-threads 100000: at most"),
    (["--seed", str(2**64)], "--seed 18446744073709551616: must be in"),
], ids=["strokes", "size", "batch", "num-cpus", "workers", "reader-threads", "seed"])
def test_sizes_no_machine_holds_are_refused(shard, tmp_path, capsys, flags, says):
    config = tiny_config(tmp_path / "tiny.yaml")
    err = _refused(["--shards", shard, "--output", str(tmp_path / "out"), "--config", str(config), "--device", "cpu",
                    *flags], capsys)
    assert says in err, err
    assert not (tmp_path / "out").exists()  # nothing started: no folder, no lock


def test_queued_batches_no_machine_holds_are_refused(shard, tmp_path, capsys):
    """Decoded batches wait in host memory for the fit, prefetch_batches per shard a worker holds."""
    config = tiny_config(tmp_path / "tiny.yaml", prefetch_batches=10**9)
    err = _refused(["--shards", shard, "--output", str(tmp_path / "out"), "--config", str(config), "--device", "cpu"],
                   capsys)
    assert "pipeline.prefetch_batches 1000000000 x pipeline.shards_per_worker 2" in err and "RAM available" in err
    assert not (tmp_path / "out").exists()


def test_an_empty_config_file_is_refused(shard, tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("# nothing here\n")
    err = _refused(["--shards", shard, "--output", str(tmp_path / "out"), "--config", str(tmp_path / "empty.yaml"),
                    "--device", "cpu"], capsys)
    assert "empty.yaml: the config is empty" in err


def test_a_shard_that_is_not_a_tar_is_refused_before_the_run(tmp_path, capsys):
    (tmp_path / "x.zip").write_bytes(b"PK\x03\x04 not a tar")
    err = _refused(["--shards", str(tmp_path / "x.zip"), "--output", str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert "x.zip is not a tar shard" in err and "Error" not in err.split("error:", 1)[1]
