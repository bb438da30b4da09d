"""The summary accounts for every URL of the user's list (issue #26, 5): img2dataset's own stats files
beside the shards are summed into ``summary.json``'s ``upstream``, the terminal and the gallery."""
from __future__ import annotations

import functools
import http.server
import json
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.upstream import describe, stats_location, upstream_counts
from pipeline_samples import photo


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _serve(folder: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory) -> Path:
    """img2dataset itself, from a local server: 8 URLs, 3 of them missing (404), 2 per shard."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset

    tmp = tmp_path_factory.mktemp("upstream")
    (tmp / "www").mkdir()
    names = ["astronaut", "gone1", "gone2", "coffee", "chelsea", "rocket", "camera", "gone3"]
    for name in names:
        if not name.startswith("gone"):
            photo(name, 64).save(tmp / "www" / f"{name}.jpg", format="JPEG")
    server = _serve(tmp / "www")
    try:
        urls = [f"http://127.0.0.1:{server.server_address[1]}/{name}.jpg" for name in names]
        pq.write_table(pa.table({"url": urls, "caption": names}), tmp / "urls.parquet")
        img2dataset.download(url_list=str(tmp / "urls.parquet"), input_format="parquet", url_col="url",
                             caption_col="caption", output_format="webdataset", output_folder=str(tmp / "shards"),
                             processes_count=1, thread_count=2, resize_mode="no", number_sample_per_shard=2,
                             enable_wandb=False, timeout=10, retries=0, compute_hash=None)
    finally:
        server.shutdown()
        server.server_close()
    return tmp / "shards"


def test_upstream_counts_sum_img2dataset_stats(downloaded, tmp_path):
    tars = sorted(str(p) for p in downloaded.glob("*.tar"))
    assert len(tars) == 4 and stats_location(tars[0]) == tars[0][:-4] + "_stats.json"
    up = upstream_counts(tars + [str(tmp_path / "00009.tar")])  # one shard without a stats file
    assert (up["count"], up["successes"], up["failed_to_download"], up["failed_to_resize"]) == (8, 5, 3, 0)
    assert up["shards_with_stats"] == 4 and up["shards_without_stats"] == 1
    assert sum(n for _, n in up["errors"]) == 3 and all("404" in m or "Not Found" in m for m, _ in up["errors"])
    assert describe(up).startswith("8 URLs in img2dataset's lists: 5 downloaded, 3 failed to download")


def test_stats_files_are_data_and_never_an_error(tmp_path):
    (tmp_path / "00000_stats.json").write_text("[1, 2]")
    (tmp_path / "00001_stats.json").write_text(json.dumps({"count": -1, "successes": 1, "failed_to_download": 0,
                                                           "failed_to_resize": 0}))
    (tmp_path / "00002_stats.json").write_text("{" * 100_000)
    (tmp_path / "00003_stats.json").write_bytes(b" " * (2 << 20))
    up = upstream_counts([str(tmp_path / f"{i:05d}.tar") for i in range(5)] + ["http://h/00005.tar", "pipe:cat x.tar"])
    assert up["shards_with_stats"] == 0 and up["shards_without_stats"] == 7 and up["count"] == 0
    assert "no img2dataset stats files" in describe(up)


def test_a_run_accounts_for_every_url(downloaded, tmp_path, capsys):
    """The run's summary, its terminal lines and the gallery name img2dataset's failed downloads
    beside the run's own counts: 8 URLs in, 5 rows out, 3 failed to download."""
    from pipeline.driver import RunOptions, run
    from pipeline.gallery import build_report
    from pipeline_samples import tiny_config

    out = tmp_path / "out"
    options = RunOptions(shards=[str(downloaded)], output=str(out), config=str(tiny_config(tmp_path / "t.yaml")),
                         device="cpu", use_ray=False, progress=False)
    assert run(options) == 0
    summary = json.loads((out / "__painterbot__" / "summary.json").read_text())
    assert summary["images"] == summary["upstream"]["successes"] == 5
    assert summary["upstream"]["count"] == 8 and summary["upstream"]["failed_to_download"] == 3
    terminal = capsys.readouterr().out
    assert "upstream        8 URLs in img2dataset's lists: 5 downloaded, 3 failed to download" in terminal
    page, _ = build_report(out, thumb=16, frames=2)
    assert "Before the shards: img2dataset" in page and "3 failed to download" in page
