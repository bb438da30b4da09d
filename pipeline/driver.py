"""The driver: Ray start-up or attach, the shard queue, retries, progress and the summary.

Shards are handed out one at a time: a worker that finishes asks for the next,
so one slow shard never idles the others. A shard whose task raised is queued
again, and a worker process that died (``RayActorError``, also when its whole
node died) is replaced and its shard queued again, each shard at most
``1 + max_retries`` times. A shard that still fails has no stats file, so the
next run tries it again. On a Ray cluster the pool of workers follows the
cluster (cluster.py): nodes that join get workers, lost workers come back
where there is room.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import traceback
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

import encoder

from . import storage
from .cluster import NoWorkers, WorkerPool, cluster_gpus, with_placement
from .config import PipelineConfig, load_pipeline_config
from .shards import META_DIR, Shard, clean_temp, expected_samples, make_shards, plan
from .worker import ShardEncoder
from .writer import write_json_atomic

CODE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding pipeline/ and encoder/

# Fault injection for tests: a marker path; the first worker to reach it dies once.
CRASH_ONCE_ENV = "PAINTERBOT_CRASH_ONCE"
SUMMARY_NAME = f"{META_DIR}/summary.json"  # beside the stats files, out of the data readers' way


@dataclass
class RunOptions:
    """What run_encode.py parsed; None means 'from the config' (or auto)."""

    shards: list[str]
    output: str
    config: str | None = None
    encoder_overrides: dict = field(default_factory=dict)  # strokes, size, seed, ...
    pipeline_overrides: dict = field(default_factory=dict)  # batch_size, workers, ...
    device: str | None = None  # cpu | cuda | auto
    gpus: int | None = None  # None: every GPU the machine (or cluster) has
    address: str | None = None  # join this Ray cluster instead of starting one
    overwrite: bool = False
    use_ray: bool = True
    progress: bool = True


class ShardFailed(Exception):
    """The task raised inside a worker (the worker itself lives on)."""


class WorkerDied(Exception):
    """The worker process is gone; its slot needs a new one."""


def _log(message: str) -> None:
    tqdm.write(f"[painterbot] {message}", file=sys.stderr)


# -- where the work runs ------------------------------------------------------------------
class LocalBackend:
    """One ShardEncoder in this process, on a thread so the driver can poll progress (--no-ray)."""

    def __init__(self, make_encoder):
        self.make_encoder = make_encoder
        self.slots = 1
        self.encoders = [make_encoder(0)]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="encode")
        self.dashboard_url = None
        self._started = False

    def refresh(self) -> list[int]:
        """Slots that became usable since the last call: the one slot, once."""
        started, self._started = self._started, True
        return [] if started else [0]

    def ready(self, slot: int) -> bool:
        return True

    def report(self) -> dict:
        return {}

    def submit(self, slot: int, shard: Shard, out: str, attempt: int, last: bool) -> Future:
        return self.pool.submit(self.encoders[slot].encode_shard, shard.url, shard.id, out, attempt, last)

    def wait(self, handles: list, timeout: float) -> list:
        if not handles:
            time.sleep(timeout)
            return []
        done, _ = wait_futures(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        return list(done)

    def result(self, handle: Future) -> dict:
        try:
            return handle.result()
        except Exception as exc:  # noqa: BLE001
            raise ShardFailed("".join(traceback.format_exception_only(type(exc), exc)).strip()) from exc

    def progress(self, busy: list[int]) -> dict[int, dict]:
        return {slot: self.encoders[slot].progress() for slot in busy}

    def replace(self, slot: int) -> None:
        self.encoders[slot] = self.make_encoder(slot)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class RayBackend:
    """One Ray actor per slot: ``num_gpus=1`` each, or CPU-only actors, in a pool that follows the cluster."""

    def __init__(self, options: RunOptions, cfg: PipelineConfig, encoder_config, device: str, slots: int | None):
        import ray

        self.ray = ray
        self.started_here = options.address is None
        if self.started_here:
            # Workers import pipeline/ and encoder/ from where the driver found them (a checkout or
            # site-packages), wherever the driver was started.
            pythonpath = os.pathsep.join(p for p in (str(CODE_ROOT), os.environ.get("PYTHONPATH")) if p)
            context = ray.init(
                # "local": a fresh Ray even when a `ray start` cluster on this machine left its
                # address in ray_current_cluster (joining one takes --address).
                address="local",
                num_cpus=cfg.num_cpus,
                object_store_memory=cfg.object_store_memory,
                include_dashboard=cfg.include_dashboard,
                dashboard_host=cfg.dashboard_host,
                dashboard_port=cfg.dashboard_port,
                runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                logging_level="warning",
            )
        else:
            # On a cluster the package must be installed on every node (docker/ image). Already
            # connected when resolve_device asked the cluster for its GPUs.
            context = ray.init(address=options.address, logging_level="warning", ignore_reinit_error=True)
        self.dashboard_url = getattr(context, "dashboard_url", None) or None
        resources = ray.cluster_resources()
        cpus, gpus_available = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        use_gpu = device.startswith("cuda")
        if use_gpu:
            count = gpus_available if slots is None else slots
            if count < 1:
                raise RuntimeError("no GPU in the Ray cluster; use --gpus 0 for CPU workers")
            if count > gpus_available:
                raise RuntimeError(f"--gpus {count} asked, the Ray cluster has {gpus_available} GPU(s)")
            # Never ask for more CPUs than there are: a GPU actor left pending would idle its GPU.
            cpus_each = min(float(cfg.cpus_per_worker), cpus / count) if cpus else 0
            # Default: every GPU of the cluster, as it is at each check (nodes join and leave).
            want = (lambda: int(ray.cluster_resources().get("GPU", 0))) if slots is None else count
            self.slots = count  # workers at the start (the log line; the summary keeps the peak)
        else:
            count = slots or cfg.workers
            fit = max(1, cpus // max(1, cfg.cpus_per_worker))
            if count > fit:
                _log(f"{count} CPU workers asked, {cpus} CPUs in the cluster: {fit} start now, more if nodes join")
            cpus_each = cfg.cpus_per_worker
            want = count
            self.slots = min(count, fit)
        crash_once = os.environ.get(CRASH_ONCE_ENV) or None
        # max_concurrency=2: encode_shard runs on one thread while progress() answers on another.
        actor_class = ray.remote(with_placement(ShardEncoder)).options(
            num_gpus=1 if use_gpu else 0, num_cpus=cpus_each, max_concurrency=2, max_restarts=0
        )
        worker_device = "cuda" if use_gpu else "cpu"
        self.pool = WorkerPool(
            ray, actor_class,
            lambda worker_id: (asdict(encoder_config), asdict(cfg), worker_device, worker_id, True, crash_once),
            {"GPU": 1 if use_gpu else 0, "CPU": cpus_each}, want, cfg.cluster_check_interval,
            cfg.worker_start_timeout, _log,
        )  # fmt: skip
        self._progress_refs: dict[int, object] = {}
        self._task_slots: dict = {}  # task ref -> slot, to name the worker when it dies

    def refresh(self) -> list[int]:
        """Slots whose worker came up since the last call (new nodes, replacements); raises NoWorkers."""
        up = self.pool.refresh()
        self.slots = max(self.slots, self.pool.peak)
        return up

    def ready(self, slot: int) -> bool:
        return self.pool.ready(slot)

    def report(self) -> dict:
        return {"cluster": self.pool.report()}

    def submit(self, slot: int, shard: Shard, out: str, attempt: int, last: bool):
        ref = self.pool.actor(slot).encode_shard.remote(shard.url, shard.id, out, attempt, last)
        self._task_slots[ref] = slot
        return ref

    def wait(self, handles: list, timeout: float) -> list:
        if not handles:
            time.sleep(timeout)  # every worker is starting or waiting for room: refresh() decides
            return []
        ready, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        return ready

    def result(self, handle) -> dict:
        from ray.exceptions import RayActorError, RayTaskError

        slot = self._task_slots.pop(handle, None)
        try:
            return self.ray.get(handle, timeout=60)  # ready already (wait said so)
        except RayActorError as exc:
            # Ray's message: a generic first line, tab-indented actor details, then the cause
            # ("...because its node has died", "...killed by OOM"): keep the first and the cause.
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("\t")]
            why = " ".join(lines[:2])[:500] or type(exc).__name__
            who = self.pool.describe(slot) if slot is not None else "worker"
            raise WorkerDied(f"{who}: {why}") from exc
        except RayTaskError as exc:
            cause = exc.as_instanceof_cause() if hasattr(exc, "as_instanceof_cause") else exc
            raise ShardFailed(_short(cause)) from exc
        except Exception as exc:  # noqa: BLE001 - object lost, ...: the shard goes round again
            raise ShardFailed(_short(exc)) from exc

    def progress(self, busy: list[int]) -> dict[int, dict]:
        """Non-blocking: fire one progress() per busy actor, collect the answers already in."""
        for slot in busy:
            if slot not in self._progress_refs:
                self._progress_refs[slot] = self.pool.actor(slot).progress.remote()
        refs = list(self._progress_refs.values())
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
        answers: dict[int, dict] = {}
        for slot, ref in list(self._progress_refs.items()):
            if ref in ready:
                del self._progress_refs[slot]
                try:
                    answers[slot] = self.ray.get(ref, timeout=10)
                except Exception:  # noqa: BLE001 - a dying actor; its task reports the death
                    pass
        return answers

    def replace(self, slot: int) -> None:
        """The slot's worker died: a fresh one takes the slot when the cluster has room (refresh)."""
        self._progress_refs.pop(slot, None)
        self.pool.lost_worker(slot)

    def shutdown(self) -> None:
        self.pool.shutdown()
        # Attached to a cluster, this only disconnects; the cluster and its other jobs go on.
        self.ray.shutdown()


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Ray prefixes a traceback; the last line names the actual error.
    return (lines[-1] if lines else text)[:1000]


# -- progress ----------------------------------------------------------------------------
class Progress:
    """Console bar over images: rate, ETA (from img2dataset's counts or finished shards), PSNR, failures."""

    def __init__(self, todo: list[Shard], enabled: bool):
        counts = [expected_samples(s) for s in todo]
        self.expected = sum(counts) if counts and all(c is not None for c in counts) else None
        self.shards_total = len(todo)
        self.shards_done = 0
        self.finished = {"images": 0, "ok": 0, "failed": 0, "psnr_sum": 0.0}
        self.live: dict[int, dict] = {}
        # A bar only on a terminal: in a log file every redraw would be a line. The
        # per-shard lines and the summary are printed either way.
        enabled = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=self.expected, unit="img", dynamic_ncols=True, disable=not enabled, mininterval=0.5,
                        smoothing=0.1, desc="encoding", file=sys.stderr)  # fmt: skip

    def shard_done(self, slot: int, stats: dict) -> None:
        self.live.pop(slot, None)
        self.shards_done += 1
        self.finished["images"] += stats.get("total", 0)
        self.finished["ok"] += stats.get("ok", 0)
        self.finished["failed"] += stats.get("failed", 0)
        self.finished["psnr_sum"] += (stats.get("mean_psnr") or 0.0) * stats.get("ok", 0)
        if self.expected is None and self.shards_done:
            per_shard = self.finished["images"] / self.shards_done
            self.bar.total = round(self.finished["images"] + per_shard * (self.shards_total - self.shards_done))
        self.refresh()

    def update(self, live: dict[int, dict]) -> None:
        self.live.update(live)
        self.refresh()

    def drop(self, slot: int) -> None:
        self.live.pop(slot, None)

    def refresh(self) -> None:
        totals = dict(self.finished)
        for p in self.live.values():
            for k in totals:
                totals[k] += p.get(k, 0)
        self.bar.n = totals["images"]
        psnr = totals["psnr_sum"] / totals["ok"] if totals["ok"] else float("nan")
        self.bar.set_postfix_str(
            f"psnr {psnr:.2f} dB, failed {totals['failed']}, shards {self.shards_done}/{self.shards_total}", refresh=False
        )
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


# -- the run -----------------------------------------------------------------------------
def resolve_device(requested: str | None, gpus: int | None, address: str | None = None) -> tuple[str, int | None]:
    """(worker device 'cpu' | 'cuda', number of GPU workers or None for all).

    ``--gpus 0`` means CPU workers; ``--device cuda`` with ``--gpus 0`` is a contradiction.
    With ``address`` (a Ray cluster), 'auto' counts the cluster's GPUs: a head node
    without a GPU still drives GPU workers on the others.
    """
    requested = (requested or "auto").lower()
    if requested == "cpu":
        if gpus:
            raise ValueError("--device cpu contradicts --gpus > 0")
        return "cpu", 0
    if gpus == 0:
        if requested.startswith("cuda"):
            raise ValueError("--device cuda needs --gpus >= 1")
        return "cpu", 0
    if requested.startswith("cuda"):
        return "cuda", gpus
    # auto: GPUs if there are any here; a cluster's GPUs are counted once attached.
    import torch

    if gpus is None and not torch.cuda.is_available() and not (address and cluster_gpus(address)):
        return "cpu", 0
    return "cuda", gpus


def run(options: RunOptions) -> int:
    """Encode every shard of ``options``; 0 when all are done, 1 when some failed."""
    started = time.time()
    fit_config = encoder.load_config(options.config, **options.encoder_overrides)
    cfg = load_pipeline_config(options.config, **options.pipeline_overrides)
    out = storage.absolute(options.output)  # a local folder or an object store URI (s3://bucket/prefix)
    storage.location(out).mkdir(parents=True, exist_ok=True)
    shards = make_shards(options.shards)
    if not shards:
        raise ValueError(f"no shards matched {options.shards}")
    local = [s.url[len("file:"):] if s.url.startswith("file:") else s.url for s in shards]
    inputs = {storage.folder_of(u) for u in local} - {None}
    if out in inputs:
        # img2dataset keeps its own {id}.parquet (url metadata) beside each {id}.tar.
        raise ValueError(f"--output {out} holds input shards: its {{id}}.parquet files would be overwritten")
    todo, skipped = plan(shards, out, overwrite=options.overwrite)
    _log(f"{len(shards)} shard(s): {len(todo)} to encode, {len(skipped)} already done (skipped) -> {out}")
    if not todo:
        # Nothing to do: touch nothing, not even the summary, so a rerun is a no-op.
        _log("nothing to do")
        return 0

    device, gpus = resolve_device(options.device or fit_config.device, options.gpus,
                                  options.address if options.use_ray else None)  # fmt: skip
    if device == "cpu" and fit_config.strokes * fit_config.size**2 > 200 * 128**2:
        _log(f"no GPU in use: {fit_config.strokes} strokes at {fit_config.size} px will be slow on CPU "
             "(--config cpu_small is the CPU preset)")  # fmt: skip
    if not options.use_ray and device == "cuda" and (options.device or "").startswith("cuda:"):
        device = options.device  # in-process, a specific GPU may be named
    fit_config = dataclasses.replace(fit_config, device=device)

    if options.use_ray:
        backend = RayBackend(options, cfg, fit_config, device, gpus if device.startswith("cuda") else None)
    else:
        backend = LocalBackend(lambda slot: ShardEncoder(fit_config, cfg, device, f"local-{slot}"))
    if backend.dashboard_url:
        _log(f"Ray dashboard: http://{backend.dashboard_url}")
    _log(f"{backend.slots} worker(s) on {device}; {fit_config.strokes} strokes at {fit_config.size} px, "
         f"batch {cfg.batch_size}")  # fmt: skip

    queue: deque[Shard] = deque(todo)
    attempts: Counter = Counter()
    failed: dict[str, dict] = {}
    results: list[dict] = []
    inflight: dict = {}  # handle -> (slot, shard)
    idle: list[int] = []  # slots whose worker is up and free; refresh() adds the ones that come up
    retried: dict[str, list[str]] = {}  # shard id -> why each failed attempt failed
    replaced = 0
    progress = Progress(todo, options.progress)
    interrupted = False

    def retry_or_fail(shard: Shard, why: str) -> None:
        retried.setdefault(shard.id, []).append(f"attempt {attempts[shard.id]}: {why}")
        if attempts[shard.id] <= cfg.max_retries:
            _log(f"shard {shard.id}: attempt {attempts[shard.id]} failed ({why}); retrying")
            queue.append(shard)
        else:
            _log(f"shard {shard.id}: FAILED after {attempts[shard.id]} attempt(s): {why}")
            failed[shard.id] = {"url": shard.url, "attempts": attempts[shard.id], "error": why}

    try:
        while queue or inflight:
            try:
                idle += backend.refresh()  # workers that came up: first ones, joined nodes, replacements
            except NoWorkers as exc:  # inflight is empty: only live workers run shards
                _log(f"giving up: {exc}")
                for shard in queue:
                    failed[shard.id] = {"url": shard.url, "attempts": attempts[shard.id], "error": str(exc)}
                break
            while idle and queue:
                slot, shard = idle.pop(0), queue.popleft()
                attempts[shard.id] += 1
                clean_temp(out, shard.id)  # leftovers of a killed attempt; none is running now
                last = attempts[shard.id] > cfg.max_retries
                inflight[backend.submit(slot, shard, out, attempts[shard.id], last)] = (slot, shard)
            for handle in backend.wait(list(inflight), cfg.progress_interval):
                slot, shard = inflight.pop(handle)
                progress.drop(slot)
                try:
                    stats = backend.result(handle)
                except WorkerDied as exc:
                    backend.replace(slot)
                    replaced += 1
                    retry_or_fail(shard, f"worker died: {exc}")
                except ShardFailed as exc:
                    retry_or_fail(shard, str(exc))
                else:
                    results.append(stats)
                    progress.shard_done(slot, stats)
                    psnr = "n/a" if stats.get("mean_psnr") is None else f"{stats['mean_psnr']:.2f} dB"
                    note = f"; {len(stats['errors'])} stream error(s)" if stats.get("errors") else ""
                    _log(f"shard {shard.id}: {stats['total']} rows ({stats['ok']} ok, {stats['failed']} failed), "
                         f"{stats['seconds']:.1f} s, psnr {psnr}{note}")  # fmt: skip
                if backend.ready(slot):  # a dead worker's slot comes back through refresh()
                    idle.append(slot)
            current = {slot: shard.id for slot, shard in inflight.values()}
            # An answer about a shard the slot no longer holds (it just finished) would count twice.
            live = backend.progress(list(current))
            progress.update({slot: p for slot, p in live.items() if p.get("shard") == current.get(slot)})
    except KeyboardInterrupt:
        interrupted = True
        _log("interrupted: finished shards are kept; rerun the same command to resume")
    finally:
        progress.close()
        backend.shutdown()

    summary = _summary(out, shards, skipped, results, failed, attempts, replaced, started, fit_config, cfg,
                       device, backend.slots, backend.dashboard_url, interrupted)  # fmt: skip
    # What went round again and why (a worker or its node died, a task raised), and where workers ran.
    summary["retried_shards"] = {sid: {"attempts": attempts[sid], "errors": why, "done": sid not in failed}
                                 for sid, why in retried.items() if attempts[sid] > 1}  # fmt: skip
    summary.update(backend.report())
    write_json_atomic(storage.location(out) / SUMMARY_NAME, summary)
    _print_summary(summary)
    if interrupted:
        return 130
    return 1 if failed else 0


def _summary(out, shards, skipped, results, failed, attempts, replaced, started, fit_config, cfg, device, workers,
             dashboard_url, interrupted) -> dict:  # fmt: skip
    seconds = time.time() - started
    counts: Counter = Counter()
    for stats in results:
        counts.update(stats.get("status_counts", {}))
    ok = counts.get("ok", 0)
    psnr_sum = sum((s.get("mean_psnr") or 0.0) * s.get("ok", 0) for s in results)
    total = sum(counts.values())
    return {
        "output": out,
        "shards_total": len(shards),
        "shards_encoded": len(results),
        "shards_skipped": len(skipped),
        "shards_failed": len(failed),
        "failed_shards": failed,
        "shards_with_stream_errors": sorted(s["shard_id"] for s in results if s.get("errors")),
        "images": total,
        "ok": ok,
        "failed": total - ok,
        "status_counts": dict(sorted(counts.items())),
        "mean_psnr": round(psnr_sum / ok, 4) if ok else None,
        "seconds": round(seconds, 3),
        "images_per_second": round(total / seconds, 3) if seconds > 0 else None,
        "retries": sum(max(0, n - 1) for n in attempts.values()),
        "workers_replaced": replaced,
        "workers": workers,
        "device": device,
        "interrupted": interrupted,
        "dashboard_url": dashboard_url,
        "encoder_config": asdict(fit_config),
        "pipeline_config": asdict(cfg),
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }


def _print_summary(s: dict) -> None:
    psnr = "n/a" if s["mean_psnr"] is None else f"{s['mean_psnr']:.2f} dB"
    lines = [
        "",
        "PainterBot summary",
        f"  output          {s['output']}",
        f"  shards          {s['shards_encoded']} encoded, {s['shards_skipped']} skipped, {s['shards_failed']} failed"
        f" (of {s['shards_total']})",
        f"  images          {s['images']} ({s['ok']} ok, {s['failed']} failed: "
        + (", ".join(f"{k} {v}" for k, v in s["status_counts"].items() if k != "ok") or "none")
        + ")",
        f"  mean PSNR       {psnr}",
        f"  time            {s['seconds']:.1f} s, {s['images_per_second'] or 0:.2f} images/s on {s['workers']} "
        f"{s['device']} worker(s)",
        f"  retries         {s['retries']} (workers replaced: {s['workers_replaced']})",
    ]
    for sid, info in s["failed_shards"].items():
        lines.append(f"  FAILED {sid}: {info['error']}")
    for sid, info in list(s.get("retried_shards", {}).items())[:10]:
        if info["done"]:
            lines.append(f"  retried {sid}: {info['errors'][-1]}")
    lines.append(f"  summary file    {storage.location(s['output']) / SUMMARY_NAME}")
    print("\n".join(lines), flush=True)
