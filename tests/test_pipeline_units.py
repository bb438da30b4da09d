"""Unit tests of the pipeline stages, without Ray: shards, reader, writer, worker loop, dataset."""
from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import encoder
from encoder.strokes import FIELDS, validate
from pipeline import shards as S
from pipeline.config import load_pipeline_config
from pipeline.dataset import StrokeDataset, read_row
from pipeline.output_folder import META_DIR, OutputFolder, temp_path
from pipeline.reader import SampleError, ShardReader, ShardReadError, decode_image
from pipeline.worker import ShardEncoder
from pipeline.writer import ShardWriter, make_schema
from pipeline_samples import TINY, bad_samples, bomb_png, good_samples, write_tar


# -- shards -------------------------------------------------------------------------------
def test_shard_specs_expand_and_name(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"{i:05d}.tar", [])
    assert S.expand_specs(str(tmp_path / "{00000..00002}.tar")) == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    assert S.expand_specs(str(tmp_path / "*.tar")) == S.expand_specs(str(tmp_path))  # glob == folder
    assert S.expand_specs([str(tmp_path / "00001.tar"), str(tmp_path / "00001.tar")]) == [str(tmp_path / "00001.tar")]
    assert S.shard_id("laion-art/00042.tar") == "00042"
    assert S.shard_id("https://host.invalid/data/cc12m-000007.tar?download=1") == "cc12m-000007"
    assert S.shard_id("pipe:curl -s -L https://host.invalid/a/00003.tar") == "00003"
    assert S.shard_id("pipe:aws s3 cp s3://bucket/x/01234.tar -") == "01234"
    assert S.shard_id("file:/data/00009.tar.gz") == "00009"
    assert [s.id for s in S.make_shards("s/{00000..00011}.tar")][-1] == "00011"
    with pytest.raises(ValueError, match="several inputs"):
        S.make_shards(["a/00000.tar", "b/00000.tar"])
    with pytest.raises(ValueError):
        S.shard_id("pipe:cat something")


def test_plan_resume_and_overwrite(tmp_path):
    shards = S.make_shards([str(tmp_path / f"in/{i:05d}.tar") for i in range(3)])
    out = tmp_path / "out"
    out.mkdir()
    folder = OutputFolder(out)
    ShardWriter(out, "00000", n_strokes=5).commit({"complete": True})
    folder.parquet("00001").write_bytes(b"x")  # parquet without stats: killed before the marker
    temp_path(folder.parquet("00002"), "abc").write_bytes(b"partial")
    todo, done = S.plan(shards, out)
    assert [s.id for s in todo] == ["00001", "00002"] and [s.id for s in done] == ["00000"]
    assert folder.clean_temp("00002") == 1 and not folder.temp_files("00002")
    todo, done = S.plan(shards, out, overwrite=True)
    assert len(todo) == 3 and not done and not folder.stats("00000").exists()


def test_pipeline_config_rejects_unknown_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pipeline:\n  batch_size: 3\n  bogus: 1\n")
    with pytest.raises(ValueError, match="bogus"):
        load_pipeline_config(path)
    path.write_text("pipeline:\n  batch_size: 3\n")
    assert load_pipeline_config(path, batch_size=None).batch_size == 3
    assert load_pipeline_config(path, batch_size=7).batch_size == 7


# -- reader -------------------------------------------------------------------------------
def test_reader_turns_every_bad_sample_into_a_record(tmp_path):
    samples = bad_samples() + good_samples(2)
    tar = write_tar(tmp_path / "00000.tar", samples)
    reader = ShardReader(str(tar), size=32, max_image_pixels=10_000_000, min_image_side=16, threads=2)
    records = list(reader.records())
    assert [r.key for r in records] == [s["key"] for s in samples]  # every sample, once, in order
    assert reader.files == sum(len(s["files"]) for s in samples)
    for sample, record in zip(samples, records):
        assert record.status == sample["status"], (record.key, record.error_message)
        assert record.caption == sample["caption"]
        if record.status == "ok":
            assert record.target.shape == (3, 32, 32) and record.target.dtype == torch.float32
            assert 0 <= float(record.target.min()) and float(record.target.max()) <= 1
            assert (record.width, record.height) == sample["size"]
            assert record.url.startswith("http://example.invalid/")
        else:
            assert record.target is None and record.error_message
    by_key = {r.key.split("_", 1)[1]: r for r in records if "_" in r.key}
    assert "pixels" in by_key["bomb"].error_message  # refused on the header, before decoding
    # RGBA composites over white: the transparent top rows come out light.
    assert float(by_key["rgba"].target[:, 0].mean()) > 0.9


def test_decode_image_limits():
    with pytest.raises(SampleError) as info:
        decode_image(bomb_png(20_000, 20_000), 32, max_pixels=100_000_000, min_side=16)
    assert info.value.status == "too_large"
    jpeg = good_samples(1)[0]["files"]["jpg"]
    with pytest.raises(SampleError) as info:
        decode_image(jpeg, 32, max_pixels=1000, min_side=16)  # the configured limit, not PIL's
    assert info.value.status == "too_large"
    target, w, h = decode_image(jpeg, 32, 10**8, 16)
    assert target.shape == (3, 32, 32) and min(w, h) >= 16


def _read_until_error(url: str) -> tuple[list, ShardReadError | None]:
    records = []
    try:
        for record in ShardReader(url, size=32).records():
            records.append(record)
    except ShardReadError as exc:
        return records, exc
    return records, None


def test_reader_keeps_what_a_truncated_tar_held_then_raises(tmp_path):
    samples = good_samples(6)
    whole = write_tar(tmp_path / "whole.tar", samples)
    data = whole.read_bytes()
    cut = tmp_path / "00001.tar"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    keys = [s["key"] for s in samples]
    for url in (str(cut), f"pipe:cat {cut}"):  # local or remote alike: the records first, then the error
        records, error = _read_until_error(url)
        assert 0 < len(records) < len(samples)
        assert [r.key for r in records] == keys[: len(records)] and all(r.status == "ok" for r in records)
        assert error is not None and "truncated" in str(error) and str(cut) in str(error)


def test_reader_empty_and_missing_shards(tmp_path):
    empty = write_tar(tmp_path / "empty.tar", [])
    assert list(ShardReader(str(empty), size=32).records()) == []  # a valid tar without members
    zero = tmp_path / "zero.tar"
    zero.write_bytes(b"")
    assert "empty file" in str(_read_until_error(str(zero))[1])
    assert "cannot open" in str(_read_until_error(str(tmp_path / "nope.tar"))[1])
    # pipe: sources (what webdataset's gopen opens) work the same way
    good = write_tar(tmp_path / "good.tar", good_samples(2))
    assert len(list(ShardReader(f"pipe:cat {good}", size=32).records())) == 2


# -- writer -------------------------------------------------------------------------------
def _row(key, ok=True, n=5):
    if not ok:
        return {"key": key, "status": "decode_error", "error_message": "bad bytes"}
    return {"key": key, "caption": f"c {key}", "url": "u", "width": 10, "height": 20, "status": "ok",
            "strokes": np.full((n, 10), 0.5, np.float32), "background": np.array([0.1, 0.2, 0.3], np.float32),
            "psnr": 20.0, "fit_seconds": 0.1}  # fmt: skip


def test_writer_is_atomic_and_keeps_the_schema(tmp_path):
    writer = ShardWriter(tmp_path, "00007", n_strokes=5, metadata={"encoder_config": "{}"}, row_group_size=2)
    writer.add([_row("a"), _row("b", ok=False), _row("c")])
    final = tmp_path / "00007.parquet"
    assert not final.exists() and writer.tmp.exists() and writer.tmp.name.startswith(".")
    assert not list(tmp_path.glob("*.parquet"))  # the partial file is invisible to *.parquet
    stats = writer.commit({"total": 3})
    assert final.exists() and not writer.tmp.exists() and stats["rows"] == 3
    assert json.loads(OutputFolder(tmp_path).stats("00007").read_text())["rows"] == 3
    assert [p.name for p in tmp_path.iterdir()] and all(p.suffix == ".parquet" or p.name == META_DIR for p in tmp_path.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    table = pq.read_table(final)
    assert table.column_names == ["key", "caption", "url", "width", "height", "original_width", "original_height",
                                  "sha256", "crop_box", "status", "error_message", "strokes", "background", "psnr",
                                  "fit_seconds", "extra"]  # fmt: skip
    assert table.schema.field("strokes").type == pa.list_(pa.list_(pa.float32(), 10))
    meta = table.schema.metadata
    assert json.loads(meta[b"painterbot.stroke_fields"]) == list(FIELDS)
    assert meta[b"painterbot.format_version"] == b"2" and b"painterbot.encoder_config" in meta
    rows = table.to_pylist()
    assert rows[1]["strokes"] is None and rows[1]["background"] is None and rows[1]["error_message"] == "bad bytes"
    assert read_row(final, "c")["strokes"].shape == (5, 10)

    aborted = ShardWriter(tmp_path, "00008", n_strokes=5)
    aborted.add([_row("x")])
    aborted.abort()
    assert not list(tmp_path.glob("*00008*"))

    empty = ShardWriter(tmp_path, "00009", n_strokes=5)
    empty.commit({"total": 0})
    assert pq.read_table(tmp_path / "00009.parquet").num_rows == 0
    assert pq.read_schema(tmp_path / "00009.parquet").equals(make_schema(5, {"shard_id": "00009"}), check_metadata=False)


# -- dataset ------------------------------------------------------------------------------
def test_stroke_dataset_serves_ok_rows_only(tmp_path):
    for sid, psnrs in (("00000", [18.0, None, 25.0]), ("00001", [30.0] * 5)):
        writer = ShardWriter(tmp_path, sid, n_strokes=5, row_group_size=2)
        rows = []
        for i, p in enumerate(psnrs):
            row = _row(f"{sid}-{i}", ok=p is not None)
            if p is not None:
                row["psnr"] = p
                row["strokes"] = np.full((5, 10), i / 10, np.float32)
            rows.append(row)
        writer.add(rows)
        writer.commit({})
    (tmp_path / ".00002.parquet.zzz.tmp").write_bytes(b"partial")  # never read
    data = StrokeDataset(tmp_path)
    assert len(data) == 7
    item = data[1]
    assert item["key"] == "00000-2" and item["caption"] == "c 00000-2"
    assert torch.allclose(item["strokes"], torch.full((5, 10), 0.2)) and item["background"].shape == (3,)
    assert {data[i]["key"] for i in range(len(data))} == {"00000-0", "00000-2"} | {f"00001-{i}" for i in range(5)}
    assert len(StrokeDataset(str(tmp_path / "*.parquet"), min_psnr=20)) == 6
    assert len(StrokeDataset(tmp_path, in_memory=True)) == 7
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=3)))
    assert batch["strokes"].shape == (3, 5, 10)


# -- the worker loop, in process, with the real encoder -------------------------------------
def _encoder(batch_size=4, **pipeline):
    fit = encoder.load_config("cpu_small", **TINY)
    cfg = load_pipeline_config(None, batch_size=batch_size, row_group_size=4, **pipeline)
    return ShardEncoder(fit, cfg, device="cpu", worker_id="test")


def test_worker_encodes_a_shard_with_bad_samples(tmp_path):
    samples = good_samples(3) + bad_samples()
    tar = write_tar(tmp_path / "00003.tar", samples)
    worker = _encoder()
    seen = []
    poll = threading.Thread(target=lambda: seen.append(worker.progress()))
    poll.start()
    stats = worker.encode_shard(str(tar), "00003", str(tmp_path / "out"))
    poll.join()
    table = pq.read_table(tmp_path / "out" / "00003.parquet")
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == [s["key"] for s in samples]
    assert stats["total"] == len(samples) and stats["ok"] == sum(s["status"] == "ok" for s in samples)
    assert stats["status_counts"]["decode_error"] == 3 and stats["mean_psnr"] > 10
    for sample, row in zip(samples, rows):
        assert row["status"] == sample["status"] and row["caption"] == sample["caption"]
        if row["status"] == "ok":
            strokes = torch.tensor(row["strokes"]).reshape(TINY["strokes"], 10)
            validate(strokes)
            assert np.isfinite(row["psnr"]) and row["fit_seconds"] > 0
        else:
            assert row["strokes"] is None and row["error_message"]
    assert worker.progress()["images"] == len(samples)


def test_two_shards_held_by_one_worker_take_turns_and_the_next_decodes_meanwhile(tmp_path, monkeypatch):
    """shards_per_worker 2: two encode_shard calls at once on one worker. Their fits never overlap (one
    device), each shard's rows are its own, and the second shard's first batch is decoded while the
    first shard is still fitting, so the device does not wait for it at the shard boundary."""
    import time

    from pipeline import worker as W

    real, events, lock = encoder.fit_batch, [], threading.Lock()

    def slow(targets, config, device="cpu", seed=0):
        start = time.monotonic()
        time.sleep(0.3)  # a batch on the device
        result = real(targets, config, device=device, seed=seed)
        with lock:
            events.append(("fit", threading.current_thread().name, start, time.monotonic()))
        return result

    made = W._Chunk.__init__

    def chunk(self, records, pin):
        made(self, records, pin)
        with lock:
            events.append(("decoded", records[0].key, time.monotonic(), None))

    monkeypatch.setattr(encoder, "fit_batch", slow)
    monkeypatch.setattr(W._Chunk, "__init__", chunk)
    worker = _encoder(batch_size=1, shards_per_worker=2)
    tars = [write_tar(tmp_path / f"0000{i}.tar", good_samples(3, prefix=f"s{i}")) for i in range(2)]
    results = {}

    def encode(i):
        results[i] = worker.encode_shard(str(tars[i]), f"0000{i}", str(tmp_path / "out"))

    threads = [threading.Thread(target=encode, args=(i,), name=f"shard{i}") for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # shard 0 takes the device first
    for t in threads:
        t.join(timeout=60)
    assert all(results[i]["ok"] == 3 for i in range(2))
    for i in range(2):
        keys = pq.read_table(tmp_path / "out" / f"0000{i}.parquet", columns=["key"])["key"].to_pylist()
        assert keys and all(k.startswith(f"s{i}") for k in keys)
    fits = sorted((start, end, name) for kind, name, start, end in events if kind == "fit")
    assert len(fits) == 6
    assert all(a[1] <= b[0] for a, b in zip(fits, fits[1:])), fits  # one at a time
    assert [name for _, _, name in fits] == ["shard0"] * 3 + ["shard1"] * 3  # a shard keeps the device to its end
    first_decoded = min(t for kind, key, t, _ in events if kind == "decoded" and key.startswith("s1"))
    assert first_decoded < fits[2][1]  # shard 1's first batch was ready before shard 0's last fit ended


def test_worker_never_writes_diverged_strokes(tmp_path, monkeypatch):
    real = encoder.fit_batch

    def flaky(targets, config, device="cpu", seed=0):
        result = real(targets, config, device=device, seed=seed)
        result.ok[0] = False  # the encoder's own verdict
        result.strokes[1, 0, 0] = float("nan")  # a bug it failed to flag
        return result

    monkeypatch.setattr(encoder, "fit_batch", flaky)
    tar = write_tar(tmp_path / "00004.tar", good_samples(4))
    _encoder().encode_shard(str(tar), "00004", str(tmp_path))
    rows = pq.read_table(tmp_path / "00004.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["fit_failed", "fit_failed", "ok", "ok"]
    assert rows[0]["strokes"] is None and rows[1]["strokes"] is None and "diverged" in rows[0]["error_message"]


def test_worker_isolates_an_image_that_raises(tmp_path, monkeypatch):
    real = encoder.fit_batch
    samples = good_samples(4)
    poison = samples[2]["files"]["jpg"]

    def picky(targets, config, device="cpu", seed=0):
        if any(float(t.mean()) == pytest.approx(float(marker.mean())) for t in targets):
            raise RuntimeError("encoder bug on this image")
        return real(targets, config, device=device, seed=seed)

    from pipeline.reader import decode_image as dec

    marker = dec(poison, TINY["size"], 10**8, 16)[0]
    monkeypatch.setattr(encoder, "fit_batch", picky)
    tar = write_tar(tmp_path / "00005.tar", samples)
    _encoder().encode_shard(str(tar), "00005", str(tmp_path))
    rows = pq.read_table(tmp_path / "00005.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "fit_error", "ok"]
    assert "encoder bug" in rows[2]["error_message"]

    # An encoder that fails on everything is not a data problem: the shard fails, nothing is left.
    def broken(*args, **kwargs):
        raise RuntimeError("broken encoder")

    monkeypatch.setattr(encoder, "fit_batch", broken)
    with pytest.raises(RuntimeError, match="broken encoder"):
        _encoder().encode_shard(str(tar), "00006", str(tmp_path))
    assert not list(tmp_path.glob("*00006*")) and not list(tmp_path.glob(".*00006*"))
