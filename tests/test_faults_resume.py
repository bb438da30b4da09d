"""Resume and the output folder's settings trust only what the files say (issue #25: 5, 6, 7, 12, --overwrite).

5  a done shard's file is checked against the shard: its footer must name the shard's source and the
   folder's settings, or the shard is redone (and the log says why)
6  a folder without its settings file takes its settings from its files' footers
7  a settings file that is JSON but not an object is one error line naming it and what to do
12 credentials that may not read the output are named as the problem (not the settings file)
-- --overwrite refuses a folder that is not an output folder
Real runs, in process (--no-ray), with the tiny config.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import run_encode
from pipeline import shards as S
from pipeline.driver import RunOptions, run
from pipeline.output_folder import OutputFolder
from pipeline_samples import LocalServer, environment, good_samples, tiny_config, write_tar


def _options(tmp_path: Path, shards, output: Path | str, **kw) -> RunOptions:
    config = tiny_config(tmp_path / "tiny.yaml")
    return RunOptions(shards=[str(s) for s in shards], output=str(output), config=str(config), device="cpu",
                      use_ray=False, progress=False, **kw)  # fmt: skip


def _keys(path: Path) -> list[str]:
    return pq.read_table(path, columns=["key"])["key"].to_pylist()


def _strokes(path: Path) -> str:
    return pq.read_schema(path).metadata[b"painterbot.n_strokes"].decode()


@pytest.fixture
def tars(tmp_path):
    """Shards 00003 and 00004, two samples each (the same row count: only the keys tell them apart)."""
    (tmp_path / "in").mkdir()
    return [write_tar(tmp_path / "in" / f"{i:05d}.tar", good_samples(2, prefix=f"s{i}k", size=32)) for i in (3, 4)]


# -- 5: a done file must be that shard's, made with the folder's settings -------------------------------------
def test_5_another_shard_s_file_copied_over_a_done_one_is_redone(tmp_path, tars, capsys):
    out = tmp_path / "out"
    options = _options(tmp_path, tars, out)
    assert run(options) == 0
    shutil.copyfile(out / "00004.parquet", out / "00003.parquet")  # same row count as 00003's stats say
    capsys.readouterr()
    assert run(options) == 0
    err = capsys.readouterr().err
    assert "shard 00003: redone: 00003.parquet was made from" in err and "00004.tar" in err, err
    assert "1 to encode, 1 already done" in err
    assert _keys(out / "00003.parquet") == ["s3k0000", "s3k0001"]
    assert _keys(out / "00004.parquet") == ["s4k0000", "s4k0001"]
    assert S.check_done(out, "00003", source=str(tars[0])) is None
    # Another dataset's 00003: the same shard id, another source.
    (tmp_path / "other_in").mkdir()
    other = write_tar(tmp_path / "other_in" / "00003.tar", good_samples(2, prefix="o3k", size=32))
    assert run(dataclasses.replace(options, shards=[str(other)], output=str(tmp_path / "other_out"))) == 0
    shutil.copyfile(tmp_path / "other_out" / "00003.parquet", out / "00003.parquet")
    capsys.readouterr()
    assert run(options) == 0
    err = capsys.readouterr().err
    assert f"shard 00003: redone: 00003.parquet was made from {other}, not from this run's {tars[0]}" in err, err
    assert _keys(out / "00003.parquet") == ["s3k0000", "s3k0001"]


def test_5_a_file_made_with_other_settings_is_redone(tmp_path, tars, capsys):
    out, other = tmp_path / "out", tmp_path / "other"
    options = _options(tmp_path, tars[:1], out)
    assert run(options) == 0
    # The same shard, the same source, 7 strokes: its file copied into the 12-stroke folder.
    assert run(dataclasses.replace(options, output=str(other), encoder_overrides={"strokes": 7})) == 0
    shutil.copyfile(other / "00003.parquet", out / "00003.parquet")
    capsys.readouterr()
    assert run(options) == 0
    err = capsys.readouterr().err
    assert "shard 00003: redone: 00003.parquet holds rows made with other settings than the folder's " \
           "(strokes 7 where the folder's is 12)" in err, err
    assert _strokes(out / "00003.parquet") == "12"


def test_5_a_new_token_in_the_same_url_still_resumes(tmp_path, tars, capsys):
    www = tmp_path / "in"
    server = LocalServer(www)
    try:
        out = tmp_path / "out"
        first = _options(tmp_path, [f"{server.url}/00003.tar?token=FIRSTTOKEN1"], out)
        assert run(first) == 0
        fetched = len(server.requests)
        capsys.readouterr()
        assert run(dataclasses.replace(first, shards=[f"{server.url}/00003.tar?token=SECONDTOKEN2"])) == 0
        assert "nothing to do" in capsys.readouterr().err
        assert len(server.requests) == fetched  # skipped: never fetched again
        # Another host's (or another path's) file is another source.
        assert S.check_done(out, "00003", source=f"{server.url}/elsewhere/00003.tar?token=X") is not None
    finally:
        server.close()


# -- 6: a folder that lost its settings file ------------------------------------------------------------------
def test_6_a_folder_without_settings_takes_them_from_its_footers(tmp_path, tars, capsys):
    out = tmp_path / "out"
    options = _options(tmp_path, tars[:1], out)
    assert run(options) == 0
    settings = OutputFolder(out).settings_path
    saved = json.loads(settings.read_text())
    settings.unlink()  # lost, or a folder older than the file
    more = dataclasses.replace(options, shards=[str(t) for t in tars], encoder_overrides={"strokes": 7})
    with pytest.raises(ValueError, match=r"other settings \(strokes 12 -> 7\).*footers.*missing.*--overwrite"):
        run(more)
    assert not (out / "00004.parquet").exists() and not settings.exists()
    # The same settings resume: the done shard is kept, the new one encoded, the file written back.
    capsys.readouterr()
    assert run(dataclasses.replace(more, encoder_overrides={})) == 0
    assert "1 to encode, 1 already done" in capsys.readouterr().err
    assert json.loads(settings.read_text()) == saved
    assert [_strokes(out / f"{t.stem}.parquet") for t in tars] == ["12", "12"]
    # --overwrite takes the new settings, as with a settings file.
    settings.unlink()
    assert run(dataclasses.replace(more, overwrite=True)) == 0
    assert json.loads(settings.read_text())["strokes"] == 7


def test_6_a_folder_without_settings_whose_files_disagree_is_refused(tmp_path, tars):
    out, other = tmp_path / "out", tmp_path / "other"
    options = _options(tmp_path, tars, out)
    assert run(options) == 0
    assert run(dataclasses.replace(options, output=str(other), encoder_overrides={"strokes": 7})) == 0
    shutil.copyfile(other / "00004.parquet", out / "00004.parquet")
    OutputFolder(out).settings_path.unlink()
    with pytest.raises(ValueError, match=r"no settings.json and its Parquet files were made with different settings"
                                         r".*00003.parquet.*00004.parquet.*--overwrite"):
        run(options)


# -- 7: a settings file that is not an object ------------------------------------------------------------------
@pytest.mark.parametrize("text", ["[]", "null", "12"])
def test_7_a_settings_file_that_is_not_an_object_is_one_error_line(tmp_path, tars, capsys, text):
    out = tmp_path / "out"
    assert run(_options(tmp_path, tars[:1], out)) == 0
    OutputFolder(out).settings_path.write_text(text)
    capsys.readouterr()
    argv = ["--shards", str(tars[0]), "--output", str(out), "--config", str(tmp_path / "tiny.yaml"),
            "--device", "cpu", "--no-ray", "--no-progress"]  # fmt: skip
    assert run_encode.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert f"{OutputFolder(out).settings_path} holds a JSON" in err and "not the object" in err and "delete it" in err


# -- 12: credentials that may not read the output ---------------------------------------------------------------
@pytest.fixture
def denying_s3():
    """moto's S3 server with a bucket, then checking every request's credentials (none are valid): what
    wrong credentials look like to pyarrow (ACCESS_DENIED, INVALID_ACCESS_KEY_ID)."""
    moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    boto3 = pytest.importorskip("boto3")
    requests = pytest.importorskip("requests")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    try:
        with environment(env):
            client = boto3.client("s3")
            client.create_bucket(Bucket="painterbot-denied")
            client.put_object(Bucket="painterbot-denied", Key="out/__painterbot__/settings.json", Body=b"{}")
            requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()  # auth on
            with environment({"AWS_ACCESS_KEY_ID": "AKIAWRONGKEY"}):
                yield "s3://painterbot-denied/out"
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)  # moto's settings are global
        server.stop()


def _names_the_credentials(message: str) -> None:
    assert "credentials" in message and "AWS_ACCESS_KEY_ID" in message and "AWS_PROFILE" in message, message
    assert "fix or delete" not in message and "AKIAWRONGKEY" not in message, message


def test_12_wrong_credentials_are_named_not_the_settings_file(tmp_path, tars, denying_s3):
    with pytest.raises(ValueError) as refused:
        run(_options(tmp_path, tars[:1], denying_s3))
    _names_the_credentials(str(refused.value))
    # Where the bucket is visible but its objects are not, the settings file is where it shows.
    with pytest.raises(ValueError) as refused:
        OutputFolder(denying_s3).check_settings({"strokes": 12}, overwrite=False)
    _names_the_credentials(str(refused.value))
    assert "settings.json" in str(refused.value)


def test_12_a_local_settings_file_this_user_may_not_read(tmp_path, tars, monkeypatch):
    out = tmp_path / "out"
    assert run(_options(tmp_path, tars[:1], out)) == 0
    settings = OutputFolder(out).settings_path
    real = Path.read_text

    def denied(self, *args, **kw):
        if self == settings:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kw)

    monkeypatch.setattr(Path, "read_text", denied)  # as chmod 000 would, for a user other than root
    with pytest.raises(ValueError, match=r"this user may not read or write it \(Permission denied\).*permissions"):
        run(_options(tmp_path, tars[:1], out))


# -- --overwrite only over an output folder ------------------------------------------------------------------------
def test_overwrite_refuses_a_folder_that_is_not_an_output_folder(tmp_path, tars):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("years of work")
    with pytest.raises(ValueError, match=r"--overwrite: .*mine holds files that are not a PainterBot output "
                                         r"folder's \(precious.txt\).*new or empty --output"):
        run(_options(tmp_path, tars[:1], out, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]  # nothing written, not even the lock
    # An output folder (its Parquet files, a leftover temporary, __painterbot__/) is overwritten as before.
    shutil.move(out / "precious.txt", tmp_path / "precious.txt")
    assert run(_options(tmp_path, tars[:1], out)) == 0
    (out / ".00003.parquet.deadbeef.tmp").write_bytes(b"partial")
    assert run(_options(tmp_path, tars[:1], out, overwrite=True)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00003.parquet", "__painterbot__"]
