"""A stroke dataset is safe to open and to share (docs/security.md).

1 data names nothing to run, fetch or read: forged output folders opened by every reader
2 no credential of the maker reaches the output folder, stdout or stderr
(3, a local Ray listening on loopback only, is tests/test_local_ray_binds_loopback.py.)
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import run_encode
from pipeline.dataset import StrokeDataset
from pipeline.driver import RunOptions, run
from pipeline.gallery import build_report
from pipeline.redact import redact
from pipeline.stream import StrokeStream
from pipeline_samples import LocalServer, good_samples, tiny_config, write_tar


@pytest.fixture
def server(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    srv = LocalServer(www)
    yield srv, www
    srv.close()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A real output folder of two shards (the worker and writer, in process)."""
    tmp = tmp_path_factory.mktemp("made")
    (tmp / "in").mkdir()
    samples = good_samples(4, size=40)
    write_tar(tmp / "in" / "00000.tar", samples[:2])
    write_tar(tmp / "in" / "00001.tar", samples[2:])
    options = RunOptions(shards=[str(tmp / "in" / "{00000..00001}.tar")], output=str(tmp / "out"),
                         config=str(tiny_config(tmp / "tiny.yaml")), device="cpu", use_ray=False, progress=False)
    assert run(options) == 0
    return tmp / "out"


def _forge(made: Path, folder: Path, source: str | None, key: str | None = None) -> Path:
    """A copy of ``made`` whose files name ``source`` (None: none, as a single-image fit's) and whose
    first row's key is ``key``."""
    import shutil

    shutil.copytree(made, folder)
    for path in folder.glob("*.parquet"):
        table = pq.read_table(path)
        meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"painterbot.source"}
        if source is not None:
            meta[b"painterbot.source"] = source.encode()
        if key is not None:
            keys = table["key"].to_pylist()
            keys[0] = key
            table = table.set_column(table.schema.get_field_index("key"), "key", [keys])
        pq.write_table(table.replace_schema_metadata(meta), path)
    return folder


def _read_everything(folder: Path, tmp_path: Path) -> str:
    """Every reader of the output, as a user would point it at someone else's folder."""
    from pipeline.__main__ import main

    page, _ = build_report(folder, thumb=16, frames=2)
    assert main(["gallery", str(folder), "-o", str(tmp_path / "r.html"), "--thumb", "16"]) == 0
    dataset = StrokeDataset(str(folder))
    assert all(dataset[i]["strokes"] is not None for i in range(len(dataset)))
    assert sum(1 for _ in StrokeStream(str(folder), columns=["key", "strokes"])) == 4
    key = pq.read_table(next(folder.glob("*.parquet")), columns=["key"])["key"][0].as_py()
    assert main(["render", str(next(folder.glob("*.parquet"))), "--key", key, "--size", "16",
                 "-o", str(tmp_path / "r.png")]) == 0
    return page


# -- 1: data names nothing to run, fetch or read ------------------------------------------------------------
def test_1_a_pipe_source_in_a_forged_folder_is_never_run(made, tmp_path):
    marker = tmp_path / "ran"
    folder = _forge(made, tmp_path / "forged", f"pipe:touch {marker}")
    page = _read_everything(folder, tmp_path)
    assert not marker.exists()
    assert "photo not shown" in page and "pipe:touch" in page  # shown as text, never run


def test_1_an_http_source_in_a_forged_folder_is_never_fetched(made, tmp_path, server):
    srv, www = server
    (www / "00000.tar").write_bytes((made.parent / "in" / "00000.tar").read_bytes())
    folder = _forge(made, tmp_path / "forged", f"{srv.url}/00000.tar")
    _read_everything(folder, tmp_path)
    assert srv.requests == []


def test_1_a_key_naming_a_local_image_is_never_read(made, tmp_path):
    from PIL import Image

    secret = tmp_path / "private.png"
    Image.new("RGB", (40, 40), (12, 34, 56)).save(secret)
    folder = _forge(made, tmp_path / "forged", None, key=str(secret))
    page = _read_everything(folder, tmp_path)
    pairs = [len(p) for p in __import__("re").findall(r'<div class=pair data-key="[^"]+">(.*?)</div></td>', page)]
    assert pairs and page.count('alt="photo ') == 0  # paintings only: nothing of private.png embedded


# -- 2: no credential of the maker reaches the output, stdout or stderr ---------------------------------------
SECRETS = ("PASSWORD1", "SECRETTOKEN2", "AKIASECRETCRED3", "SECRETSIG3", "hf_SECRETBEARER4", "PASSWORD5",
           "SECRETTOKEN5")


def test_redact_masks_userinfo_query_values_and_pipe_options():
    assert redact("http://u:PASSWORD1@h:8/a/00000.tar") == "http://***@h:8/a/00000.tar"
    assert redact("https://h/00001.tar?token=SECRETTOKEN2&x") == "https://h/00001.tar?token=***&x"
    assert (redact("pipe:curl -s -H 'Authorization: Bearer hf_SECRETBEARER4' https://h/d/00003.tar?sig=S")
            == "pipe:curl ... https://h/d/00003.tar?sig=***")
    assert redact("s3://AKIAKEY:SECRETKEY@bucket/out") == "s3://***@bucket/out"
    assert redact("404 Not Found for url: http://h/x.tar?X-Amz-Signature=SECRETSIG3") == \
        "404 Not Found for url: http://h/x.tar?X-Amz-Signature=***"
    assert redact("headers: Authorization: Bearer hf_SECRETBEARER4") == "headers: Authorization: ***"
    for text in ("pipe:cat /data/00000.tar", "/data/00000.tar", "s3://bucket/a/00000.tar"):
        assert redact(text) == text  # nothing secret: left as it is
    for text in ("http://u:p@h/x.tar?a=1#frag", "pipe:curl -H 'X: y' http://h/00001.tar"):
        assert redact(redact(text)) == redact(text)


@pytest.mark.parametrize("where", [["--no-ray"], ["--gpus", "0", "--workers", "1"]], ids=["no-ray", "ray"])
def test_2_no_secret_in_any_byte_of_the_output_or_the_terminal(made, tmp_path, server, capfd, where):
    srv, www = server
    for i, sample in enumerate(good_samples(4, size=40)):
        write_tar(www / f"{i:05d}.tar", [sample])
    port_url = srv.url.replace("http://", "")
    shards = [f"http://user:PASSWORD1@{port_url}/00000.tar",
              f"{srv.url}/00001.tar?token=SECRETTOKEN2",
              f"{srv.url}/00002.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASECRETCRED3"
              f"&X-Amz-Signature=SECRETSIG3",
              f"pipe:curl -s -f -H 'Authorization: Bearer hf_SECRETBEARER4' {srv.url}/00003.tar",
              f"http://user:PASSWORD5@{port_url}/missing/00005.tar?token=SECRETTOKEN5"]  # a 404: a failed shard
    out = tmp_path / "out"
    code = run_encode.main(["--shards", *shards, "--output", str(out), "--config",
                            str(tiny_config(tmp_path / "tiny.yaml", max_retries=1)), "--device", "cpu", *where])
    terminal = "".join(capfd.readouterr())  # with Ray, the workers' lines too (Ray forwards them here)
    assert code == 1  # the missing shard failed; the others were read and encoded
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"{i:05d}.parquet" for i in range(4)]
    assert all(pq.read_table(p)["status"].to_pylist() == ["ok"] for p in out.glob("*.parquet"))
    summary = json.loads((out / "__painterbot__" / "summary.json").read_text())
    assert summary["failed_shards"]["00005"]["url"].startswith("http://***@")
    everything = terminal.encode() + b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert b"00005" in everything and b"token=***" in everything
    leaked = [s for s in SECRETS if s.encode() in everything]
    assert not leaked, leaked
    assert len(srv.requests) >= 5  # every source was fetched, with its credential


def test_2_an_output_uri_with_credentials_is_refused_without_echoing_them(tmp_path, capfd):
    code = run_encode.main(["--shards", str(tmp_path / "none.tar"), "--output", "s3://AKIAOUT:SECRETOUT6@bucket/x",
                            "--device", "cpu", "--no-ray"])
    err = "".join(capfd.readouterr())
    assert code == 2 and "error:" in err and "SECRETOUT6" not in err and "AKIAOUT" not in err
