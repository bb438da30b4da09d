"""Downstream of a run: standard readers on the output folder, the streaming loader, the tokenizer,
the gallery. CPU only and small; the run is a real one (img2dataset-layout shards, the real worker
and writer), with a tiny fit."""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

import encoder
from pipeline.columns import open_file
from pipeline.dataset import StrokeDataset
from pipeline.driver import RunOptions, run
from pipeline.gallery import build_report
from pipeline.output_folder import META_DIR, OutputFolder
from pipeline.stream import StrokeStream, collate_strokes
from pipeline.tokenizer import BOS, EOS, GROUP, PAD, StrokeTokenizer
from pipeline.writer import ParquetRowWriter
from pipeline_samples import TINY, bad_samples, good_samples, tiny_config, write_tar

N_STROKES = TINY["strokes"]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """Two shards of img2dataset layout (with LAION-style extra fields, a failure, a sample with
    neither caption nor url), encoded in-process by the real worker and writer."""
    tmp = tmp_path_factory.mktemp("downstream")
    (tmp / "in").mkdir()
    samples = good_samples(6, size=48)
    for i, s in enumerate(samples):
        s["files"]["json"] = json.dumps({"url": f"http://example.invalid/{s['key']}.jpg", "sha256": f"{i:064x}",
                                         "original_width": 480, "original_height": 360, "status": "success",
                                         "AESTHETIC_SCORE": 5.0 + i, "pwatermark": 0.1 if i != 2 else "unknown",
                                         "NSFW": "UNLIKELY"}).encode()  # fmt: skip
    del samples[1]["files"]["txt"], samples[1]["files"]["json"]
    write_tar(tmp / "in" / "00000.tar", samples[:3] + [bad_samples()[0]])
    write_tar(tmp / "in" / "00001.tar", samples[3:])
    out = tmp / "out"
    options = RunOptions(shards=[str(tmp / "in" / "{00000..00001}.tar")], output=str(out),
                         config=str(tiny_config(tmp / "tiny.yaml", extra_columns=TYPED)), device="cpu", use_ray=False,
                         progress=False)  # fmt: skip
    assert run(options) == 0
    return {"out": out, "tmp": tmp, "ok": 6, "rows": 7}


TYPED = {"AESTHETIC_SCORE": "float64", "pwatermark": "float64"}  # LAION's scores as columns of their own


# -- every standard reader, pointed at the folder ------------------------------------------------
def test_layout_keeps_bookkeeping_out_of_the_data(real_run):
    out = real_run["out"]
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00001.parquet", META_DIR]
    folder = OutputFolder(out)
    assert folder.stats("00000").is_file() and folder.summary_path == out / META_DIR / "summary.json"
    assert folder.summary_path.is_file()


def test_pyarrow_dataset_reads_the_folder(real_run):
    import pyarrow.dataset as ds

    table = ds.dataset(real_run["out"]).to_table()
    assert table.num_rows == real_run["rows"]
    ok = table.filter(pa.compute.equal(table["status"], "ok"))
    assert np.asarray(ok["strokes"][0].as_py(), np.float32).shape == (N_STROKES, 10)


def test_pandas_reads_the_folder(real_run):
    import pandas as pd

    df = pd.read_parquet(real_run["out"])
    ok = df[df.status == "ok"]
    assert len(df) == real_run["rows"] and len(ok) == real_run["ok"]
    strokes = np.stack(ok.strokes.iloc[0])
    assert strokes.shape == (N_STROKES, 10) and strokes.dtype == np.float32
    assert ok.AESTHETIC_SCORE.dtype == np.float64 and set(json.loads(ok.extra.dropna().iloc[0])) >= {"NSFW"}


def test_duckdb_reads_the_folder(real_run):
    duckdb = pytest.importorskip("duckdb")
    found = duckdb.sql(f"select key, strokes, AESTHETIC_SCORE, extra->>'$.NSFW' as nsfw from "
                       f"read_parquet('{real_run['out']}/*.parquet') where status = 'ok' order by key").fetchnumpy()  # fmt: skip
    assert len(found["key"]) == real_run["ok"]
    assert np.stack(found["strokes"][0]).shape == (N_STROKES, 10)
    assert found["AESTHETIC_SCORE"][0] == 5.0 and found["nsfw"][0] == "UNLIKELY"


def test_hugging_face_datasets_reads_the_folder(real_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.load_dataset(str(real_run["out"]), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(data) == real_run["rows"]  # the Parquet builder, not JSON: the stats stay out of it
    assert isinstance(data.features["strokes"], (datasets.Sequence, getattr(datasets, "List", datasets.Sequence)))
    ok = data.filter(lambda r: r["status"] == "ok").with_format("torch")
    assert ok[0]["strokes"].shape == (N_STROKES, 10) and ok[0]["strokes"].dtype == torch.float32


def test_ray_data_reads_the_folder(real_run):
    ray = pytest.importorskip("ray")
    import ray.data

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        rows = [r for r in ray.data.read_parquet(str(real_run["out"])).take_all() if r["status"] == "ok"]
    finally:
        ray.shutdown()
    assert len(rows) == real_run["ok"]
    assert np.asarray(rows[0]["strokes"], np.float32).shape == (N_STROKES, 10)


def test_img2dataset_fields_and_crop_are_kept(real_run):
    rows = {r["key"]: r for r in pq.read_table(real_run["out"] / "00000.parquet").to_pylist()}
    first = rows["good0000"]
    assert (first["original_width"], first["original_height"], first["sha256"]) == (480, 360, f"{0:064x}")
    # Typed fields are columns of their own; the rest of the .json stays in extra.
    assert (first["AESTHETIC_SCORE"], first["pwatermark"]) == (5.0, 0.1)
    assert json.loads(first["extra"]) == {"NSFW": "UNLIKELY"}
    # A value that does not fit its column's type is null there and kept in extra, never lost.
    odd = rows["good0002"]
    assert odd["pwatermark"] is None and json.loads(odd["extra"]) == {"NSFW": "UNLIKELY", "pwatermark": "unknown"}
    schema = pq.read_schema(real_run["out"] / "00000.parquet")
    assert schema.field("AESTHETIC_SCORE").type == pa.float64()
    # The typed columns shape the folder's schema, so the folder's settings record them.
    settings = json.loads(OutputFolder(real_run["out"]).settings_path.read_text())
    assert settings["extra_columns"] == TYPED
    w, h = first["width"], first["height"]
    side = min(w, h)
    assert first["crop_box"] == pytest.approx([(w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2])
    bare = rows["good0001"]
    assert bare["caption"] is None and bare["url"] is None and bare["extra"] is None and bare["status"] == "ok"


# -- the streaming loader -------------------------------------------------------------------------------
def _write_folder(folder: Path, files=5, rows=23, group=4, strokes=lambda i: 7) -> dict[str, float]:
    """Synthetic output: every 5th row a failure; returns key -> psnr of the ok rows."""
    ok = {}
    for f in range(files):
        writer = ParquetRowWriter(folder / f"{f:05d}.parquet", 7, row_group_size=group)
        batch = []
        for i in range(rows):
            key = f"{f}-{i}"
            if i % 5 == 4:
                batch.append({"key": key, "status": "decode_error", "error_message": "bad"})
                continue
            psnr = 15.0 + (f * rows + i) % 17
            n = strokes(i)
            batch.append({"key": key, "caption": None if i % 3 == 0 else f"c{key}", "status": "ok", "psnr": psnr,
                          "strokes": np.full((n, 10), f + i / 100, np.float32), "background": [0.1, 0.2, 0.3]})  # fmt: skip
            ok[key] = psnr
        writer.add(batch)
        writer.commit()
    return ok


def _epoch(stream: StrokeStream, epoch: int, workers: int = 2) -> list[str]:
    stream.set_epoch(epoch)
    loader = DataLoader(stream, batch_size=3, num_workers=workers, collate_fn=collate_strokes)
    return [k for batch in loader for k in batch["key"]]


def test_stream_two_ranks_two_workers_every_row_once_per_epoch(tmp_path):
    ok = _write_folder(tmp_path)
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            stream = StrokeStream(tmp_path, rank=rank, world_size=2, buffer_size=8, seed=3)
            keys = _epoch(stream, epoch)
            assert len(keys) > 0.4 * len(ok)  # ranks get a fair share (within a row group)
            seen += keys
        assert sorted(seen) == sorted(ok)  # every ok row exactly once, across ranks and workers
        orders.append(seen)
    assert orders[0] != orders[1]  # a new order each epoch
    again = [k for rank in (0, 1) for k in _epoch(StrokeStream(tmp_path, rank=rank, world_size=2, buffer_size=8,
                                                                 seed=3), 0)]  # fmt: skip
    assert again == orders[0]  # and the same order for the same (seed, epoch)


def test_stream_filters_by_psnr_and_reads_only_asked_columns(tmp_path):
    ok = _write_folder(tmp_path, files=2)
    stream = StrokeStream(tmp_path, columns=["key", "strokes"], min_psnr=25, shuffle=False)
    rows = list(stream)
    assert sorted(r["key"] for r in rows) == sorted(k for k, p in ok.items() if p >= 25)
    assert len(stream) == len(rows) and set(rows[0]) == {"key", "strokes"}
    everything = list(StrokeStream(tmp_path, columns=["key", "status"], statuses=None, shuffle=False))
    assert len(everything) == 2 * 23


def test_stream_memory_stays_flat_over_many_row_groups(tmp_path):
    _write_folder(tmp_path, files=4, rows=256, group=16, strokes=lambda i: 200)  # 4 x 16 row groups, ~6.5 MB
    stream = StrokeStream(tmp_path, columns=["key", "strokes"], buffer_size=32, seed=0)
    tracemalloc.start()
    try:
        count, arrow_peak = 0, 0
        for row in stream:
            count += 1
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    row_bytes = 200 * 10 * 4
    assert count == 4 * (256 - 256 // 5)
    # The buffer (32 rows) and one row group (16 rows), with slack; the folder holds ~800 rows' worth.
    assert peak < 150 * row_bytes, peak
    assert arrow_peak < 150 * row_bytes, arrow_peak


def test_collate_pads_mixed_stroke_counts_and_keeps_missing_captions(tmp_path):
    _write_folder(tmp_path, files=1, rows=8, strokes=lambda i: 3 + i)
    rows = list(StrokeStream(tmp_path, shuffle=False))
    batch = collate_strokes(rows[:4])
    lengths = [len(r["strokes"]) for r in rows[:4]]
    assert batch["strokes"].shape == (4, max(lengths), 10) and batch["lengths"].tolist() == lengths
    assert batch["mask"].sum(1).tolist() == lengths and batch["strokes"][0, lengths[0]:].abs().sum() == 0
    assert batch["caption"][0] is None and batch["psnr"].dtype == torch.float32
    assert batch["background"].shape == (4, 3)


def test_format_1_files_still_load(tmp_path):
    """A folder encoded before the format bump: strokes as Arrow's fixed_shape_tensor."""
    strokes = np.random.default_rng(0).random((3, 5, 10), dtype=np.float32)
    kind = pa.fixed_shape_tensor(pa.float32(), [5, 10])
    column = pa.ExtensionArray.from_storage(kind, pa.FixedSizeListArray.from_arrays(pa.array(strokes.reshape(-1)), 50))
    table = pa.table({"key": ["a", "b", "c"], "caption": ["x", None, "z"], "url": [None] * 3,
                      "status": ["ok", "ok", "ok"], "strokes": column, "psnr": pa.array([20, 21, 22], pa.float32()),
                      "background": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(9, np.float32)), 3)},
                     metadata={b"painterbot.format_version": b"1"})  # fmt: skip
    pq.write_table(table, tmp_path / "old.parquet")
    rows = list(StrokeStream(tmp_path, shuffle=False))
    assert torch.equal(rows[1]["strokes"], torch.from_numpy(strokes[1]))
    assert torch.equal(StrokeDataset(tmp_path)[2]["strokes"], torch.from_numpy(strokes[2]))
    pq.write_table(table.replace_schema_metadata({b"painterbot.format_version": b"9"}), tmp_path / "new.parquet")
    with pytest.raises(ValueError, match="format 9"):
        open_file(tmp_path / "new.parquet")


# -- the tokenizer -------------------------------------------------------------------------------------
def test_tokenizer_round_trip_is_exact_on_quantised_strokes():
    tok = StrokeTokenizer(bins={"cx": 64, "rot": 100}, group_size=4)
    strokes = encoder.random_strokes(5, 9, generator=torch.Generator().manual_seed(0))
    tokens, lengths = tok.encode(strokes, torch.rand(5, 3))
    decoded = tok.decode(tokens)
    quantised = torch.stack([s for s, _ in decoded])
    step = torch.from_numpy((tok._hi - tok._lo) / tok.bins).float()
    assert ((quantised - strokes).abs()[..., ~torch.from_numpy(tok.log)] <= step[~torch.from_numpy(tok.log)] / 2 + 1e-6).all()
    again, _ = tok.encode(quantised, torch.stack([b for _, b in decoded]))
    assert np.array_equal(again, tokens)  # tokens -> strokes -> the same tokens
    assert all(torch.equal(s, q) for (s, _), q in zip(tok.decode(again), quantised))  # and the same values
    row = tokens[0]
    assert row[0] == BOS and row[lengths[0] - 1] == EOS and (row == GROUP).sum() == 3  # groups of 4, 4, 1
    assert row[4] == GROUP and tokens.max() < tok.vocab_size and tok.vocab_size == 4 + 64 + 100 + 8 * 256


def test_tokenizer_handles_mixed_lengths_and_model_garbage():
    tok = StrokeTokenizer(group_size=2)
    rows = [torch.rand(3, 10) * 0.5 + 0.1, torch.rand(0, 10), torch.rand(5, 10) * 0.5 + 0.1]
    tokens, lengths = tok.encode(rows, torch.rand(3, 3))
    assert lengths.tolist() == tok.sequence_length([3, 0, 5]).tolist()
    assert (tokens[1, lengths[1]:] == PAD).all()
    assert [s.shape[0] for s, _ in tok.decode(tokens)] == [3, 0, 5]
    noisy = np.array([[BOS, 5, 9, 17, GROUP, *range(10, 27), EOS]])  # wrong fields, a partial stroke
    strokes, background = tok.decode(noisy)[0]
    assert strokes.shape == (1, 10) and background.shape == (3,)
    encoder.validate_strokes(strokes)  # clipped into every field's range


# -- the gallery ----------------------------------------------------------------------------------------
def _pairs(page: str) -> dict[str, list[str]]:
    return {key: re.findall(r'<img src="data:image/jpeg;base64,', body)
            for key, body in re.findall(r'<div class=pair data-key="([^"]+)">(.*?)</div></td>', page)}


def test_gallery_lists_every_row_with_photo_and_painting(real_run):
    shards = [str(real_run["tmp"] / "in" / "00000.tar"), str(real_run["tmp"] / "in" / "00001.tar")]
    page, listed = build_report(real_run["out"], worst=2, best=2, thumb=32, frames=4, shards=shards)
    pairs = _pairs(page)
    keys = [k for rows in listed.values() for k in rows]
    assert len(keys) == 4 and set(keys) <= set(pairs)
    assert all(len(pairs[k]) == 2 for k in keys), pairs  # photo and painting for every listed row
    assert "photo unavailable" not in page and "Timelapse" in page and "<svg" in page
    assert "decode_error" in page  # the failed row, with its message


def test_gallery_without_shards_shows_paintings_and_reads_no_recorded_source(real_run, tmp_path):
    """The folder names its sources, and they are still there: without --shards none is opened."""
    page, _ = build_report(real_run["out"], thumb=32, frames=2)
    pairs = _pairs(page)
    assert len(pairs) == real_run["ok"] and all(len(v) == 1 for v in pairs.values())  # paintings only
    assert "give the source shards with --shards" in page
    assert html.escape(os.fspath(real_run["tmp"] / "in" / "00000.tar")) in page  # the recorded source, as text


def test_gallery_says_when_the_given_shards_lack_the_photos(real_run, tmp_path):
    page, _ = build_report(real_run["out"], thumb=32, frames=2, shards=[str(real_run["tmp"] / "in" / "00001.tar"),
                                                                       str(tmp_path / "gone.tar")])
    pairs = _pairs(page)
    assert sorted(len(v) for v in pairs.values()).count(2) == 3  # 00001's three ok rows have their photo
    assert "not in the shards given with --shards" in page and "gone.tar unreadable" in page


def test_gallery_command_writes_the_report(real_run, tmp_path, capsys):
    from pipeline.__main__ import main

    assert main(["gallery", str(real_run["out"]), "-o", str(tmp_path / "r.html"), "--thumb", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["images_listed"] == real_run["ok"]
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")


def test_training_example_runs_and_paints(real_run, tmp_path, monkeypatch):
    """examples/train_strokes.py end to end, tiny: the loader, the tokenizer, a model, a sample PNG."""
    import runpy
    import sys

    from conftest import ROOT
    from PIL import Image

    png = tmp_path / "sample.png"
    monkeypatch.setattr(sys, "argv", ["train_strokes.py", str(real_run["out"]), "--steps", "3", "--strokes", "3",
                                      "--dim", "32", "--layers", "1", "--batch", "4", "--size", "24", "-o", str(png)])  # fmt: skip
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "examples" / "train_strokes.py"), run_name="__main__")
    assert done.value.code == 0 and Image.open(png).size == (24, 24)


def test_extra_columns_setting_is_checked():
    from pipeline.config import PipelineConfig

    assert PipelineConfig(extra_columns={"AESTHETIC_SCORE": "float64"}).extra_columns
    for bad in ({"AESTHETIC_SCORE": "float"}, {"x": 3}, ["AESTHETIC_SCORE"], {"caption": "string"}):
        with pytest.raises(ValueError, match="extra_columns"):
            PipelineConfig(extra_columns=bad)


def test_typed_columns_take_any_json_value_without_failing_the_shard():
    """JSON numbers are unbounded: a value out of its column's range is null there and kept in
    extra, as a mistyped one is; nothing in a sample's .json can make the shard's table fail."""
    from pipeline.writer import make_schema, rows_to_table

    schema = make_schema(2, extra_columns={"score": "float64", "count": "int64", "flag": "bool", "tag": "string"})
    metas = [{"score": 10**400, "count": 2**63, "flag": 1, "tag": 7},
             {"score": 3, "count": 5.0, "flag": True, "tag": "a"},
             {"score": float("nan"), "count": float("inf")}]
    rows = [{"key": f"k{i}", "status": "ok", "meta": meta} for i, meta in enumerate(metas)]
    table = rows_to_table(rows, schema).to_pylist()
    assert [table[0][c] for c in ("score", "count", "flag", "tag")] == [None] * 4
    assert json.loads(table[0]["extra"]) == {"score": 10**400, "count": 2**63, "flag": 1, "tag": 7}
    assert (table[1]["score"], table[1]["count"], table[1]["flag"], table[1]["tag"], table[1]["extra"]) == \
        (3.0, 5, True, "a", None)
    assert np.isnan(table[2]["score"]) and table[2]["count"] is None and "count" in json.loads(table[2]["extra"])


def test_gallery_labels_each_picture_and_explains_its_numbers(real_run, tmp_path):
    """issue #26, 6: a label under each picture, the rates named, the terminal's mean PSNR, and a
    timelapse of a contrasted image rather than the darkest one. Also as a user sees it: the page
    opened in headless Chromium (when the machine has it), screenshot taken."""
    import subprocess

    shards = [str(real_run["tmp"] / "in" / "00000.tar"), str(real_run["tmp"] / "in" / "00001.tar")]
    page, listed = build_report(real_run["out"], thumb=48, frames=4, shards=shards)
    assert page.count("<figcaption>photo</figcaption>") == page.count("<figcaption>painting, ") == len(pairs := _pairs(page))
    assert pairs and "images/s, last run (start-up included)" in page and "mean PSNR, ok rows" in page
    summary = json.loads((real_run["out"] / "__painterbot__" / "summary.json").read_text())
    assert f"{summary['mean_psnr']:.2f} dB" in page
    lapse = re.search(r"<h2>Timelapse: ([^ ]+) ", page).group(1)
    assert lapse in {k for keys in listed.values() for k in keys}
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium on this machine: the page was checked as text only")
    report = tmp_path / "report.html"
    report.write_text(page)
    shot = tmp_path / "report.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1300,2200", report.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # the browser painted the page: photos, paintings, charts, not a blank sheet
