"""End to end: img2dataset downloads photos from a local HTTP server into webdataset
shards, bad samples are planted, run_encode.py encodes everything on CPU Ray
workers, and a rerun changes nothing.

One Ray run (plus a no-op rerun that must not even start Ray), shared by the
tests of this module through a module-scoped fixture.
"""
from __future__ import annotations

import functools
import gzip
import http.server
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from encoder.strokes import FIELDS, validate
from pipeline.dataset import StrokeDataset
from pipeline.output_folder import OutputFolder
from pipeline_samples import REPO, bad_samples, photo, run_encode, tiny_config, write_tar

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _download_with_img2dataset(tmp: Path) -> Path:
    """Serve photos on 127.0.0.1 and let img2dataset build two shards of them."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports it; no update check offline
    import img2dataset

    www = tmp / "www"
    www.mkdir()
    urls, captions = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        for i, name in enumerate(PHOTOS):
            ext, fmt = ("png", "PNG") if i % 2 else ("jpg", "JPEG")
            photo(name, 120).save(www / f"{name}.{ext}", format=fmt)
            urls.append(f"http://127.0.0.1:{port}/{name}.{ext}")
            captions.append(f"a photo of {name}")
        urls.append(f"http://127.0.0.1:{port}/missing.jpg")  # img2dataset drops failed downloads itself
        captions.append("never downloaded")
        pq.write_table(pa.table({"url": urls, "caption": captions}), tmp / "urls.parquet")
        img2dataset.download(
            url_list=str(tmp / "urls.parquet"), input_format="parquet", url_col="url", caption_col="caption",
            output_format="webdataset", output_folder=str(tmp / "downloaded"), processes_count=1, thread_count=4,
            resize_mode="no", number_sample_per_shard=4, enable_wandb=False, timeout=10, retries=0, compute_hash=None,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    return tmp / "downloaded"


def _readable_members(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of the members a stream reader gets out of a (possibly broken) tar."""
    out: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if member.isfile():
                    data = tar.extractfile(member).read()
                    key, ext = member.name.split(".", 1)
                    out.setdefault(key, {})[ext] = data
    except (tarfile.TarError, OSError, EOFError):
        pass
    return out


def _files(out: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    downloaded = _download_with_img2dataset(tmp)
    inputs = tmp / "inputs"
    inputs.mkdir()
    shutil.copy(downloaded / "00000.tar", inputs / "00000.tar")
    shutil.copy(downloaded / "00000_stats.json", inputs / "00000_stats.json")
    # Bad samples appended to a copy of a real img2dataset shard.
    shutil.copy(downloaded / "00001.tar", inputs / "00001.tar")
    planted = bad_samples()
    write_tar(inputs / "00001.tar", planted, mode="a")
    # A gzip-compressed copy (read by its magic bytes), and an empty shard. Damaged shards fail
    # their shard (test_pipeline_reliability.py), so none is here: this run must end with exit 0.
    (inputs / "00002.tar.gz").write_bytes(gzip.compress((downloaded / "00000.tar").read_bytes()))
    write_tar(inputs / "00003.tar", [])

    config = tiny_config(tmp / "tiny.yaml", batch_size=3)
    out = tmp / "out"
    args = ["--shards", str(inputs / "{00000..00001}.tar"), str(inputs / "00002.tar.gz"), str(inputs / "00003.tar"),
            "--output", str(out), "--config", str(config),
            "--gpus", "0", "--workers", "2", "--num-cpus", "2", "--no-dashboard",
            "--strokes", "10", "--size", "32", "--batch-size", "4"]  # fmt: skip
    first = run_encode(args)
    print(first.stdout[-3000:], first.stderr[-6000:])
    snapshot = _files(out)
    second = run_encode(args)
    after = _files(out)
    return {"tmp": tmp, "inputs": inputs, "out": out, "planted": planted, "first": first, "second": second,
            "snapshot": snapshot, "after": after}  # fmt: skip


def _rows(out: Path, sid: str) -> list[dict]:
    return pq.read_table(out / f"{sid}.parquet").to_pylist()


def test_every_sample_once_with_its_caption(run):
    assert run["first"].returncode == 0, run["first"].stderr[-4000:]
    out, inputs = run["out"], run["inputs"]
    assert sorted(_files(out)) == sorted(
        [f"{i:05d}.parquet" for i in range(4)] + [f"__painterbot__/{i:05d}_stats.json" for i in range(4)]
        + ["__painterbot__/summary.json", "__painterbot__/settings.json"]
    )  # no temporary file, no lock left behind: the layout users read (docs/output_schema.md)
    for sid in ("00000", "00001", "00002", "00003"):
        members = _readable_members(inputs / (f"{sid}.tar.gz" if sid == "00002" else f"{sid}.tar"))
        rows = _rows(out, sid)
        assert [r["key"] for r in rows] == list(members), sid  # exactly once, in tar order
        for row in rows:
            files = members[row["key"]]
            caption = files["txt"].decode() if "txt" in files else None
            assert row["caption"] == caption
            if "json" in files:
                assert row["url"] == json.loads(files["json"]).get("url")


def test_bad_samples_become_rows_with_messages(run):
    rows = {r["key"]: r for r in _rows(run["out"], "00001")}
    for sample in run["planted"]:
        row = rows[sample["key"]]
        assert row["status"] == sample["status"], (sample["key"], row["error_message"])
        if sample["status"] == "ok":
            assert (row["width"], row["height"]) == sample["size"] and row["error_message"] is None
        else:
            assert row["error_message"] and row["strokes"] is None and row["psnr"] is None
    assert rows[next(s["key"] for s in run["planted"] if s["caption"] is None)]["caption"] is None
    stats = json.loads(OutputFolder(run["out"]).stats("00001").read_text())
    assert stats["status_counts"]["decode_error"] == 3 and stats["status_counts"]["too_small"] == 1
    assert stats["status_counts"]["too_large"] == 1 and stats["status_counts"]["missing_image"] == 1
    assert len(stats["sample_errors"]) == stats["failed"] and not stats["errors"] and stats["complete"]


def test_ok_rows_hold_valid_strokes(run):
    out = run["out"]
    meta = pq.read_schema(out / "00001.parquet").metadata
    config = json.loads(meta[b"painterbot.encoder_config"])
    assert (config["strokes"], config["size"]) == (10, 32)  # the flags won over the config file
    assert json.loads(meta[b"painterbot.stroke_fields"]) == list(FIELDS)
    assert meta[b"painterbot.format_version"] == b"2"
    downloaded = 0
    for sid in ("00000", "00001", "00002"):
        for row in _rows(out, sid):
            if row["status"] != "ok":
                continue
            strokes = torch.tensor(row["strokes"], dtype=torch.float32)
            assert strokes.shape == (10, 10)
            validate(strokes)  # finite and inside every field's range
            assert all(0 <= c <= 1 for c in row["background"])
            assert math.isfinite(row["psnr"]) and row["psnr"] > 8 and row["fit_seconds"] > 0
            downloaded += row["url"].startswith("http://127.0.0.1")
    assert downloaded >= 7  # every photo img2dataset fetched (some twice: 00002 is a gzipped copy of 00000)


def test_compressed_and_empty_shards_and_summary(run):
    out = run["out"]
    folder = OutputFolder(out)
    gz = json.loads(folder.stats("00002").read_text())
    assert gz["compression"] == "gzip" and gz["complete"] and gz["total"] == len(_rows(out, "00000")) > 0
    empty = json.loads(folder.stats("00003").read_text())
    assert empty["total"] == 0 and pq.read_table(out / "00003.parquet").num_rows == 0 and not empty["errors"]
    summary = json.loads(folder.summary_path.read_text())
    stats = [json.loads(folder.stats(f"{i:05d}").read_text()) for i in range(4)]
    assert summary["shards_encoded"] == 4 and summary["shards_failed"] == 0
    assert summary["images"] == sum(s["total"] for s in stats) and summary["ok"] == sum(s["ok"] for s in stats)
    assert all(s["complete"] and not s["errors"] for s in stats)
    assert json.loads(folder.settings_path.read_text()) == {"format_version": "2", "strokes": 10, "size": 32}
    assert "PainterBot summary" in run["first"].stdout
    data = StrokeDataset(out)
    assert len(data) == summary["ok"] and data[0]["strokes"].shape == (10, 10)


def test_rerun_skips_and_changes_nothing(run):
    second = run["second"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "4 already done (skipped)" in second.stderr and "nothing to do" in second.stderr
    assert "Ray" not in second.stderr  # no cluster is started for nothing
    assert run["after"] == run["snapshot"]  # same files, same bytes, same mtimes


def test_cli_renders_a_row_of_the_output(run):
    out, tmp = run["out"], run["tmp"]
    key = next(r["key"] for r in _rows(out, "00000") if r["status"] == "ok")
    png = tmp / "painting.png"
    result = subprocess.run([sys.executable, "-m", "pipeline", "render", str(out / "00000.parquet"), "--key", key,
                             "--size", "32", "-o", str(png)], cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    from PIL import Image

    assert Image.open(png).size == (32, 32)
