"""One worker: encodes whole shards, overlapping decoding, fitting and writing.

Three stages run at once inside a worker, joined by bounded queues::

    decode thread   ShardReader -> chunks of records holding <= batch_size fit-ready images,
                    their targets stacked into one (pinned, on CUDA) batch tensor
    main thread     encoder.fit_batch on each chunk's batch (the GPU's work)
    writer thread   rows -> the shard's output (writer.ShardOutput; by default ShardWriter's Parquet row groups)

so the GPU never waits on JPEG decoding or Parquet encoding while the queues
hold work. The driver wraps ``ShardEncoder`` in a Ray actor (one per GPU, or
``--workers`` CPU actors); ``--no-ray`` and the benchmark call it directly.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import queue
import socket
import threading
import time
import zlib
from datetime import datetime, timezone

import torch

import encoder  # the public API only (encoder.fit_batch is looked up per call)

from .config import PipelineConfig
from .reader import ShardReader
from .records import FitResult, Record, Row, Status, Tally, is_out_of_memory
from .redact import redact
from .sources import ShardReadError
from .writer import FORMAT_VERSION, ShardOutputFactory, ShardWriter, encoder_metadata

_END = object()  # end of a stream between stages


class _Chunk:
    """Records in input order, and the targets of the fit-ready ones stacked into ``[B, 3, S, S]`` (or None).

    Stacking (and pinning) here, on the decode thread, keeps ~100 MB of copying
    per batch off the main thread, which would otherwise hold up the next fit.
    """

    def __init__(self, records: list[Record], pin: bool):
        self.records = records
        ready = [r.target for r in records if r.status == Status.OK]
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


class ShardIncomplete(ShardReadError):
    """The source failed part-way: the rows read before it are committed with stats marked incomplete,
    and the shard is not done (the driver retries it; a later run redoes it)."""


class BatchFailed(RuntimeError):
    """Every image of a batch raised in fit_batch: the encoder or the device is failing, not the data."""


class Cancelled(RuntimeError):
    """The run is stopping (Ctrl-C, SIGTERM): the shard in progress is abandoned, its temporary file deleted."""


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

    def record(self, rows: list[Row]) -> None:
        for row in rows:
            if row.status == Status.OK:
                self.encoded.inc(1)
                self.psnr.observe(row.psnr)
                self.fit_seconds.observe(row.fit_seconds)
            else:
                self.failed.inc(1, tags={"status": Status(row.status).value})


class _Attempt:
    """One attempt at one shard: the decode and write stages on their threads, the fit on the caller's.

    Holds what the attempt counts (the shard's ``Tally``, fit seconds, sample
    error messages) and the source's error, if the source failed part-way.
    """

    def __init__(self, owner: "ShardEncoder", url: str, shard_id: str, out_dir: str, attempt: int, ticket: int = 0):
        cfg, fit = owner.config, owner.fit_config
        self.owner, self.url, self.shard_id, self.attempt, self.ticket = owner, url, shard_id, attempt, ticket
        self.started = time.time()
        self.reader = ShardReader(url, fit.size, cfg.max_image_pixels, cfg.min_image_side, cfg.jpeg_draft,
                                  cfg.reader_threads, max_member_bytes=cfg.max_member_bytes,
                                  timeouts=cfg.timeouts())  # fmt: skip
        self.writer = owner.writer_factory(out_dir, shard_id, fit.strokes, owner._file_metadata(url),
                                           cfg.row_group_size, cfg.extra_columns)
        self.tally = Tally()
        self.fit_seconds = 0.0
        self.sample_errors: list[str] = []
        self.source_error: ShardReadError | None = None
        self.chunks: queue.Queue = queue.Queue(maxsize=cfg.prefetch_batches)
        self.rows: queue.Queue = queue.Queue(maxsize=cfg.prefetch_batches + 1)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def run(self) -> None:
        """Decode, fit and write every record; on any error stop all stages, drop the temporary file, raise.

        The fit stage waits for the worker's device (``ShardEncoder._device_turn``): the attempt before
        this one may still be fitting, and this one's decode stage meanwhile fills its queue, so the
        device goes from one shard's last batch to the next shard's first without waiting for decoding.
        """
        threads = [self._thread(self._decode_stage, "decode"), self._thread(self._write_stage, "write")]
        try:
            with self.owner._device_turn(self):
                self._fit_stage()
            _put(self.rows, _END, self.stop)
            for thread in threads:
                thread.join()
            if self.errors:
                raise self.errors[0]
        except BaseException:
            self.stop.set()
            for thread in threads:
                thread.join(timeout=30)
            self.writer.abort()
            if self.errors and not isinstance(self.errors[0], _Stopped):
                raise self.errors[0] from None
            raise

    def _thread(self, stage, name: str) -> threading.Thread:
        def guarded():
            try:
                stage()
            except _Stopped:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to the fit thread, which raises it
                self.errors.append(exc)
                self.stop.set()

        thread = threading.Thread(target=guarded, name=f"{name}-{self.shard_id}", daemon=True)
        thread.start()
        return thread

    def _decode_stage(self) -> None:
        cfg, pin = self.owner.config, str(self.owner.device).startswith("cuda")
        chunk, fit_ready = [], 0
        try:
            for record in self.reader.records():
                chunk.append(record)
                fit_ready += record.status == Status.OK
                # A chunk closes at a full batch; runs of failures close it too so rows keep flowing.
                if fit_ready >= cfg.batch_size or len(chunk) >= 4 * cfg.batch_size:
                    _put(self.chunks, _Chunk(chunk, pin), self.stop)
                    chunk, fit_ready = [], 0
        except ShardReadError as exc:
            self.source_error = exc  # the records read before it are still fitted and kept
        if chunk:
            _put(self.chunks, _Chunk(chunk, pin), self.stop)
        _put(self.chunks, _END, self.stop)

    def _fit_stage(self) -> None:
        cfg = self.owner.config
        seed_base = self.owner.fit_config.seed + zlib.crc32(self.shard_id.encode()) * 1009
        index = 0
        while (chunk := _get(self.chunks, self.stop)) is not _END:
            self.owner._check_cancelled()
            # fit_batch gives image i of a batch seed + i: stride by the batch so no two
            # images of a shard share a random stream.
            seed = (seed_base + index * cfg.batch_size) % 2**31
            rows, seconds = self.owner._fit_chunk(chunk, seed, fitted_before=self.tally.ok > 0)
            index += 1
            self.fit_seconds += seconds
            with self.owner._lock:  # progress() reads the tally from another thread
                self.tally.add_rows(rows)
            room = cfg.max_error_messages - len(self.sample_errors)
            self.sample_errors += [f"{r.key}: {Status(r.status).value}: {r.error_message}"
                                   for r in rows if r.status != Status.OK][: max(0, room)]  # fmt: skip
            _put(self.rows, [row.as_dict() for row in rows], self.stop)
            self.owner._metrics_record(rows)
            self.owner._maybe_crash()

    def _write_stage(self) -> None:
        while (rows := _get(self.rows, self.stop)) is not _END:
            self.writer.add(rows)

    def finish(self) -> dict:
        """Commit the shard and return its stats; or, after a source error, keep what was read and raise."""
        stats = self._stats()
        if self.source_error is None:
            return self.writer.commit(stats)
        if self.tally.images:
            committed = self.writer.commit(stats)
            where = committed.get("parquet") or "the shard's output"
            kept = f"; the {committed['rows']} rows read before it are kept in {where}, marked incomplete"
        else:
            self.writer.abort()
            kept = ""
        raise ShardIncomplete(f"{self.source_error}{kept}")

    def _stats(self) -> dict:
        seconds = time.time() - self.started
        fit, cfg, tally = self.owner.fit_config, self.owner.config, self.tally
        complete = self.source_error is None
        return {
            "shard_id": self.shard_id,
            "source": redact(self.url),
            "format_version": FORMAT_VERSION,
            # False: the source failed part-way; the rows are those read before the error, the
            # shard is not done, and the next attempt or run replaces both files.
            "complete": complete,
            "total": tally.images,
            "ok": tally.ok,
            "failed": tally.failed,
            "status_counts": tally.as_dict()["status_counts"],
            "seconds": round(seconds, 3),
            "fit_seconds": round(self.fit_seconds, 3),
            "images_per_second": round(tally.images / seconds, 3) if seconds > 0 else None,
            "fit_images_per_second": round(tally.ok / self.fit_seconds, 3) if self.fit_seconds > 0 else None,
            "mean_psnr": round(tally.mean_psnr, 4) if tally.ok else None,
            "errors": [] if complete else [redact(self.source_error)],
            "truncated": not complete,
            "sample_errors": self.sample_errors,
            "tar_members": self.reader.files,
            "compression": self.reader.compression,
            "attempt": self.attempt,
            "worker": self.owner.worker_id,
            "host": socket.gethostname(),
            "device": self.owner.device,
            "strokes": fit.strokes,
            "size": fit.size,
            "batch_size": cfg.batch_size,
            "started_at": datetime.fromtimestamp(self.started, timezone.utc).isoformat(),
            "finished_at": datetime.now(timezone.utc).isoformat(),
        }


class ShardEncoder:
    """Encodes shards one at a time; stateless between shards except for counters.

    encoder_config: an ``encoder.FitConfig`` or its ``asdict``; device: where
    fit_batch runs; crash_once: a marker path for fault-injection tests (see
    ``_maybe_crash``); writer_factory: opens each attempt's output (a
    ``writer.ShardOutputFactory``; None: ``ShardWriter``, the Parquet file and its stats).
    """

    def __init__(self, encoder_config, pipeline_config: PipelineConfig | dict, device: str = "cpu",
                 worker_id: str = "worker-0", metrics: bool = False, crash_once: str | None = None,
                 writer_factory: ShardOutputFactory | None = None):  # fmt: skip
        if isinstance(encoder_config, dict):
            encoder_config = encoder.FitConfig(**encoder_config)
        if isinstance(pipeline_config, dict):
            pipeline_config = PipelineConfig(**pipeline_config)
        self.fit_config = encoder_config
        self.config = pipeline_config
        self.device = device
        self.worker_id = worker_id
        self.crash_once = crash_once
        self.writer_factory = writer_factory or ShardWriter
        self._metrics = _Metrics(worker_id) if metrics else None
        self._lock = threading.Lock()
        self._current: _Attempt | None = None  # the attempt fitting now (progress() reports it)
        self._cancelled = threading.Event()
        # The fit stages of this worker's attempts take turns on its device, in the order the shards
        # arrived: with shards_per_worker above 1 the next shard decodes while this one fits, and
        # fits when this one is done.
        self._turn = threading.Condition()
        self._tickets = itertools.count()
        self._waiting: list[int] = []  # tickets of the attempts waiting for the device
        self._fitting = False

    # -- small actor API ---------------------------------------------------------------
    def progress(self) -> dict:
        """Counters of the shard in progress (polled by the driver from another thread)."""
        with self._lock:
            current = self._current
            if current is None:
                return {"shard": None, **Tally().as_dict()}
            return {"shard": current.shard_id, **current.tally.as_dict()}

    def cancel(self) -> None:
        """Stop the shard in progress at its next batch (the run is being interrupted)."""
        self._cancelled.set()

    # -- one shard ---------------------------------------------------------------------
    def encode_shard(self, url: str, shard_id: str, out_dir: str, attempt: int = 1) -> dict:
        """Encode every sample of one shard into its output (``{shard_id}.parquet`` + stats); return the stats.

        Raises when the shard cannot be finished: ``ShardIncomplete`` when its
        source failed part-way (the rows read are committed, marked incomplete),
        anything else (writer error, out of memory, a fatal device error) with
        nothing left under the final names. The driver retries it either way.
        """
        with self._turn:
            ticket = next(self._tickets)  # its place in the queue for the device
        current = _Attempt(self, url, shard_id, out_dir, attempt, ticket)
        current.run()
        return current.finish()

    @contextlib.contextmanager
    def _device_turn(self, attempt: _Attempt):
        """Wait for this worker's device, then hold it for ``attempt``'s fit stage; the attempts holding
        earlier tickets go first. The wait ends early when the run is cancelled or another stage of the
        attempt failed (so it has a bound: the attempt fitting now stops at its next batch either way)."""
        with self._turn:
            self._waiting.append(attempt.ticket)
            try:
                while self._fitting or min(self._waiting) != attempt.ticket:
                    self._turn.wait(timeout=0.1)
                    self._check_cancelled()
                    if attempt.stop.is_set():
                        raise _Stopped
            finally:
                self._waiting.remove(attempt.ticket)
                self._turn.notify_all()  # the next ticket may go, if this one leaves without fitting
            self._fitting = True
        try:
            with self._lock:
                self._current = attempt
            yield
        finally:
            with self._turn:
                self._fitting = False
                self._turn.notify_all()

    # -- the fit -----------------------------------------------------------------------
    def _fit_chunk(self, chunk: _Chunk, seed: int, fitted_before: bool = False) -> tuple[list[Row], float]:
        """Rows for one chunk, in input order, and the seconds spent fitting.

        Raises BatchFailed when every image of the batch raised (see the rule below).
        """
        ready = [r for r in chunk.records if r.status == Status.OK]
        fits: dict[int, FitResult] = {}
        seconds = 0.0
        if ready:
            results, seconds = self._fit_images(chunk.targets, seed)
            chunk.targets = None  # ~100 MB (pinned): free it before the next batch is taken
            fits = {id(r): res for r, res in zip(ready, results)}
            # Every image raising is the encoder or the device failing, not the data; a lone
            # image raising after others of this shard fitted is that image's problem.
            if all(res.status == Status.FIT_ERROR for res in results) and (len(ready) > 1 or not fitted_before):
                raise BatchFailed(f"every image of a batch of {len(ready)} raised in fit_batch: {results[0].error_message}")
        return [Row.make(record, fits.get(id(record))) for record in chunk.records], seconds

    def _fit_images(self, targets: torch.Tensor, seed: int) -> tuple[list[FitResult], float]:
        """fit_batch on ``[B, 3, S, S]`` -> one FitResult per image.

        An exception splits the batch in halves until the failing image is alone
        and gets a FIT_ERROR row. Out of memory splits the same way (a smaller
        batch may fit), but a single image out of memory is the device's
        problem, not the image's: it raises, and the shard is retried.
        """
        try:
            result = encoder.fit_batch(targets, self.fit_config, device=self.device, seed=seed)
        except Exception as exc:  # noqa: BLE001
            if _fatal(exc) or (is_out_of_memory(exc) and targets.shape[0] == 1):
                raise
            if targets.shape[0] == 1:
                return [FitResult(Status.FIT_ERROR, f"{type(exc).__name__}: {exc}"[:2000])], 0.0
            if is_out_of_memory(exc) and torch.cuda.is_available():
                torch.cuda.empty_cache()  # hand the failed batch's memory back before the halves try
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
                out.append(FitResult(Status.OK, None, strokes[i].numpy(), background[i].numpy(), float(psnr[i]), per_image))
            else:
                why = "fit diverged (encoder reported ok=False)" if not bool(ok[i]) else "fit returned non-finite values"
                out.append(FitResult(Status.FIT_FAILED, why, fit_seconds=per_image))
        return out, float(result.seconds)

    # -- bookkeeping -------------------------------------------------------------------
    def _metrics_record(self, rows: list[Row]) -> None:
        if self._metrics is not None:
            self._metrics.record(rows)

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise Cancelled("the run was interrupted")

    def _maybe_crash(self) -> None:
        """Fault injection for tests: die hard, once per marker file, mid-shard.

        os._exit skips every cleanup, like a segfault or an OOM kill would, so
        the temporary Parquet file of the shard is left behind on purpose.
        """
        if not self.crash_once:
            return
        try:  # "x": created by exactly one process, so two workers at once cannot both die
            with open(self.crash_once, "x") as handle:
                handle.write(f"{self.worker_id} {os.getpid()}\n")
        except FileExistsError:
            return
        os._exit(17)

    def _file_metadata(self, url: str) -> dict[str, str]:
        return {
            **encoder_metadata(self.fit_config),
            "source": redact(url),  # never a credential: the file is made to be shared
            "device": self.device,
            "created_by": "painterbot pipeline",
        }
