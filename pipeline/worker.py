"""One worker: encodes whole shards, overlapping decoding, fitting and writing.

Three stages run at once inside a worker, joined by bounded queues::

    decode thread   ShardReader -> chunks of records holding <= batch_size fit-ready images,
                    their targets stacked into one (pinned, on CUDA) batch tensor
    main thread     encoder.fit_batch on each chunk's batch (the GPU's work)
    writer thread   rows -> ShardWriter (Parquet row groups)

so the GPU never waits on JPEG decoding or Parquet encoding while the queues
hold work. The driver wraps ``ShardEncoder`` in a Ray actor (one per GPU, or
``--workers`` CPU actors); ``--no-ray`` and the benchmark call it directly.
"""
from __future__ import annotations

import json
import math
import os
import queue
import socket
import threading
import time
import zlib
from collections import Counter
from datetime import datetime, timezone

import torch

import encoder  # the public API only (encoder.fit_batch is looked up per call)

from .config import PipelineConfig
from .reader import Record, ShardReader, is_remote
from .writer import FORMAT_VERSION, ShardWriter, encoder_metadata

_END = object()  # end of a stream between stages


class _Chunk:
    """Records in input order, and the targets of the fit-ready ones stacked into ``[B, 3, S, S]`` (or None).

    Stacking (and pinning) here, on the decode thread, keeps ~100 MB of copying
    per batch off the main thread, which would otherwise hold up the next fit.
    """

    def __init__(self, records: list[Record], pin: bool):
        self.records = records
        ready = [r.target for r in records if r.status == "ok"]
        self.targets = torch.stack(ready) if ready else None
        if self.targets is not None and pin:
            self.targets = self.targets.pin_memory()
        for record in records:
            record.target = None  # the batch holds the pixels now


class _Stopped(Exception):
    """Another stage failed; this one unwinds quietly."""


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue


def _fatal(exc: BaseException) -> bool:
    """Errors after which this process's device is unusable: the shard must move elsewhere."""
    text = f"{type(exc).__name__}: {exc}"
    return "CUDA error" in text or "device-side assert" in text or "AcceleratorError" in text


class _Metrics:
    """Ray custom metrics (Prometheus, through the dashboard's metrics agent), tagged per worker."""

    def __init__(self, worker_id: str):
        from ray.util.metrics import Counter as RayCounter
        from ray.util.metrics import Histogram

        tags = {"worker": worker_id}
        self.encoded = RayCounter("painterbot_images_encoded", "Images fitted successfully", tag_keys=("worker",))
        self.failed = RayCounter("painterbot_images_failed", "Samples written as failure rows", tag_keys=("worker", "status"))
        self.fit_seconds = Histogram("painterbot_fit_seconds", "Fit wall time per image (batch time / batch size)",
                                     boundaries=[0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300], tag_keys=("worker",))  # fmt: skip
        self.psnr = Histogram("painterbot_psnr_db", "Reconstruction PSNR per image",
                              boundaries=[10, 15, 18, 20, 22, 24, 26, 28, 30, 35, 40], tag_keys=("worker",))  # fmt: skip
        for metric in (self.encoded, self.failed, self.fit_seconds, self.psnr):
            metric.set_default_tags(tags)

    def record(self, rows: list[dict]) -> None:
        for row in rows:
            if row["status"] == "ok":
                self.encoded.inc(1)
                self.psnr.observe(row["psnr"])
                self.fit_seconds.observe(row["fit_seconds"])
            else:
                self.failed.inc(1, tags={"status": row["status"]})


class ShardEncoder:
    """Encodes shards one at a time; stateless between shards except for counters.

    encoder_config: an ``encoder.FitConfig`` or its ``asdict``; device: where
    fit_batch runs; crash_once: a marker path for fault-injection tests (see
    ``_maybe_crash``).
    """

    def __init__(self, encoder_config, pipeline_config: PipelineConfig | dict, device: str = "cpu",
                 worker_id: str = "worker-0", metrics: bool = False, crash_once: str | None = None):  # fmt: skip
        if isinstance(encoder_config, dict):
            encoder_config = encoder.FitConfig(**encoder_config)
        if isinstance(pipeline_config, dict):
            pipeline_config = PipelineConfig(**pipeline_config)
        self.fit_config = encoder_config
        self.config = pipeline_config
        self.device = device
        self.worker_id = worker_id
        self.crash_once = crash_once
        self._metrics = _Metrics(worker_id) if metrics else None
        self._lock = threading.Lock()
        self._progress = {"shard": None, "images": 0, "ok": 0, "failed": 0, "psnr_sum": 0.0}

    # -- small actor API ---------------------------------------------------------------
    def progress(self) -> dict:
        """Counters of the shard in progress (polled by the driver from another thread)."""
        with self._lock:
            return dict(self._progress)

    # -- one shard ---------------------------------------------------------------------
    def encode_shard(self, url: str, shard_id: str, out_dir: str, attempt: int = 1, last_attempt: bool = True) -> dict:
        """Encode every sample of one shard into ``out_dir/{shard_id}.parquet`` + stats; return the stats.

        Raises when the shard cannot be finished (source unreadable, writer error,
        a fatal device error); the driver then retries it elsewhere. Nothing under
        the final names is touched until the shard is complete.
        """
        started = time.time()
        with self._lock:
            self._progress = {"shard": shard_id, "images": 0, "ok": 0, "failed": 0, "psnr_sum": 0.0}
        cfg = self.config
        reader = ShardReader(url, self.fit_config.size, cfg.max_image_pixels, cfg.min_image_side, cfg.jpeg_draft,
                             cfg.reader_threads, strict=is_remote(url) and not last_attempt)  # fmt: skip
        writer = ShardWriter(out_dir, shard_id, self.fit_config.strokes, self._file_metadata(url),
                             cfg.row_group_size)  # fmt: skip
        chunks: queue.Queue = queue.Queue(maxsize=cfg.prefetch_batches)
        rows_q: queue.Queue = queue.Queue(maxsize=cfg.prefetch_batches + 1)
        stop = threading.Event()
        errors: list[BaseException] = []

        def guarded(fn):
            def run():
                try:
                    fn()
                except _Stopped:
                    pass
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    errors.append(exc)
                    stop.set()

            return run

        pin = str(self.device).startswith("cuda")

        def decode_stage():
            chunk, fit_ready = [], 0
            for record in reader.records():
                chunk.append(record)
                fit_ready += record.status == "ok"
                # A chunk closes at a full batch; runs of failures close it too so rows keep flowing.
                if fit_ready >= cfg.batch_size or len(chunk) >= 4 * cfg.batch_size:
                    _put(chunks, _Chunk(chunk, pin), stop)
                    chunk, fit_ready = [], 0
            if chunk:
                _put(chunks, _Chunk(chunk, pin), stop)
            _put(chunks, _END, stop)

        def write_stage():
            while (rows := _get(rows_q, stop)) is not _END:
                writer.add(rows)

        threads = [threading.Thread(target=guarded(decode_stage), name=f"decode-{shard_id}", daemon=True),
                   threading.Thread(target=guarded(write_stage), name=f"write-{shard_id}", daemon=True)]  # fmt: skip
        counts: Counter = Counter()
        fit_seconds, fitted, psnr_sum, sample_errors = 0.0, 0, 0.0, []
        seed_base = self.fit_config.seed + zlib.crc32(shard_id.encode()) * 1009
        try:
            for thread in threads:
                thread.start()
            index = 0
            while (chunk := _get(chunks, stop)) is not _END:
                # fit_batch gives image i of a batch seed + i: stride by the batch so no two
                # images of a shard share a random stream.
                seed = (seed_base + index * cfg.batch_size) % 2**31
                rows, seconds = self._fit_chunk(chunk, seed, fitted_before=fitted > 0)
                index += 1
                if seconds is None:
                    raise RuntimeError(f"every image of batch {index} raised in fit_batch: {rows[0]['error_message']}")
                fit_seconds += seconds
                for row in rows:
                    counts[row["status"]] += 1
                    if row["status"] == "ok":
                        fitted += 1
                        psnr_sum += row["psnr"]
                    elif len(sample_errors) < cfg.max_error_messages:
                        sample_errors.append(f"{row['key']}: {row['status']}: {row['error_message']}")
                _put(rows_q, rows, stop)
                self._report(shard_id, rows)
                self._maybe_crash()
            _put(rows_q, _END, stop)
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
        except BaseException:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
            writer.abort()
            if errors and not isinstance(errors[0], _Stopped):
                raise errors[0] from None
            raise

        seconds = time.time() - started
        total = sum(counts.values())
        stats = {
            "shard_id": shard_id,
            "source": url,
            "format_version": FORMAT_VERSION,
            "total": total,
            "ok": counts.get("ok", 0),
            "failed": total - counts.get("ok", 0),
            "status_counts": dict(sorted(counts.items())),
            "seconds": round(seconds, 3),
            "fit_seconds": round(fit_seconds, 3),
            "images_per_second": round(total / seconds, 3) if seconds > 0 else None,
            "fit_images_per_second": round(fitted / fit_seconds, 3) if fit_seconds > 0 else None,
            "mean_psnr": round(psnr_sum / fitted, 4) if fitted else None,
            # Shard-level problems (truncated or corrupt tar, ...): the rows before them are kept.
            "errors": reader.errors,
            "truncated": bool(reader.errors),
            "sample_errors": sample_errors,
            "tar_members": reader.files,
            "attempt": attempt,
            "worker": self.worker_id,
            "host": socket.gethostname(),
            "device": self.device,
            "strokes": self.fit_config.strokes,
            "size": self.fit_config.size,
            "batch_size": cfg.batch_size,
            "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
            "finished_at": datetime.now(timezone.utc).isoformat(),
        }
        return writer.commit(stats)

    # -- the fit -----------------------------------------------------------------------
    def _fit_chunk(self, chunk: _Chunk, seed: int, fitted_before: bool = False) -> tuple[list[dict], float | None]:
        """Rows for one chunk, in input order, and the seconds spent fitting.

        Seconds is None when the shard must fail: see the rule below.
        """
        ready = [r for r in chunk.records if r.status == "ok"]
        fits: dict[int, dict] = {}
        seconds = 0.0
        if ready:
            results, seconds = self._fit_images(chunk.targets, seed)
            chunk.targets = None  # ~100 MB (pinned): free it before the next batch is taken
            fits = {id(r): res for r, res in zip(ready, results)}
            # Every image raising is the encoder or the device failing, not the data; a lone
            # image raising after others of this shard fitted is that image's problem.
            if all(res["status"] == "fit_error" for res in results) and (len(ready) > 1 or not fitted_before):
                first = results[0]
                return [{"key": ready[0].key, "error_message": first["error_message"]}], None
        rows = []
        for record in chunk.records:
            row = {
                "key": record.key,
                "caption": record.caption,
                "url": record.url,
                "width": record.width,
                "height": record.height,
                "status": record.status,
                "error_message": record.error_message,
                "meta": record.meta,  # the writer keeps img2dataset's fields beside the strokes
            }
            row.update(fits.get(id(record), {}))
            rows.append(row)
        return rows, seconds

    def _fit_images(self, targets: torch.Tensor, seed: int) -> tuple[list[dict], float]:
        """fit_batch on ``[B, 3, S, S]`` -> one result dict per image.

        An exception splits the batch in halves until the failing image is alone
        and gets a 'fit_error' row; out-of-memory errors split the same way, which
        also lets a batch too large for the device finish.
        """
        try:
            result = encoder.fit_batch(targets, self.fit_config, device=self.device, seed=seed)
        except Exception as exc:  # noqa: BLE001
            if _fatal(exc):
                raise
            if targets.shape[0] == 1:
                return [{"status": "fit_error", "error_message": f"{type(exc).__name__}: {exc}"[:2000]}], 0.0
            half = targets.shape[0] // 2
            first, s1 = self._fit_images(targets[:half], seed)
            second, s2 = self._fit_images(targets[half:], seed)
            return first + second, s1 + s2
        batch, n = targets.shape[0], self.fit_config.strokes
        if tuple(result.strokes.shape) != (batch, n, len(encoder.STROKE_FIELDS)):
            raise RuntimeError(f"fit_batch returned strokes {list(result.strokes.shape)}, expected [{batch}, {n}, 10]")
        strokes = result.strokes.detach().float().cpu()
        background = result.background.detach().float().cpu()
        psnr = result.psnr.detach().float().cpu()
        ok = result.ok.detach().cpu().bool()
        per_image = float(result.seconds) / batch
        out = []
        for i in range(batch):
            finite = bool(torch.isfinite(strokes[i]).all() and torch.isfinite(background[i]).all())
            finite = finite and math.isfinite(float(psnr[i]))
            if bool(ok[i]) and finite:
                out.append({"status": "ok", "strokes": strokes[i].numpy(), "background": background[i].numpy(),
                            "psnr": float(psnr[i]), "fit_seconds": per_image})  # fmt: skip
            else:
                why = "fit diverged (encoder reported ok=False)" if not bool(ok[i]) else "fit returned non-finite values"
                out.append({"status": "fit_failed", "error_message": why, "fit_seconds": per_image})
        return out, float(result.seconds)

    # -- bookkeeping -------------------------------------------------------------------
    def _report(self, shard_id: str, rows: list[dict]) -> None:
        ok = [r for r in rows if r["status"] == "ok"]
        with self._lock:
            p = self._progress
            p["images"] += len(rows)
            p["ok"] += len(ok)
            p["failed"] += len(rows) - len(ok)
            p["psnr_sum"] += sum(r["psnr"] for r in ok)
        if self._metrics is not None:
            self._metrics.record(rows)

    def _maybe_crash(self) -> None:
        """Fault injection for tests: die hard, once per marker file, mid-shard.

        os._exit skips every cleanup, like a segfault or an OOM kill would, so
        the temporary Parquet file of the shard is left behind on purpose.
        """
        if self.crash_once and not os.path.exists(self.crash_once):
            with open(self.crash_once, "w") as handle:
                handle.write(f"{self.worker_id} {os.getpid()}\n")
            os._exit(17)

    def _file_metadata(self, url: str) -> dict[str, str]:
        return {
            **encoder_metadata(self.fit_config),
            "source": url,
            "device": self.device,
            "created_by": "painterbot pipeline",
        }
