"""The driver: Ray start-up or attach, the shard queue, retries, progress and the summary.

Shards are handed out one at a time: a worker that finishes asks for the next,
so one slow shard never idles the others. A shard whose task raised is queued
again, and a worker process that died (``RayActorError``, also when its whole
node died) is replaced and its shard queued again, each shard at most
``1 + max_retries`` times. A shard that still fails is reported (exit status 1)
and has no done marker, so the next run tries it again. On a Ray cluster the
pool of workers follows the cluster (cluster.py): nodes that join get workers,
lost workers come back where there is room.

``run`` is the whole command: ``preflight.prepare`` checks every setting, flag,
path and shard before anything starts (a ValueError is one ``error:`` line and exit 2),
the output folder's lock is taken, the plan and the folder's settings are
checked, Ray (or the in-process worker) starts, ``Dispatcher`` hands shards
out, and the summary is written. SIGTERM ends a run like Ctrl-C does.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from . import storage
from .cluster import NoWorkers, WorkerPool, with_placement
from .config import PipelineConfig
from .lock import OutputLock
from .preflight import Setup, prepare
from .records import Tally
from .redact import redact
from .shards import META_DIR, Shard, check_settings, clean_temp, expected_samples, plan, settings_path
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
    tqdm.write(f"[painterbot] {redact(message)}", file=sys.stderr)


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

    def submit(self, slot: int, shard: Shard, out: str, attempt: int) -> Future:
        return self.pool.submit(self.encoders[slot].encode_shard, shard.url, shard.id, out, attempt)

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
        # The shard in progress stops at its next batch (its thread cannot be killed), and
        # deletes its temporary file on the way out.
        for encoder_ in self.encoders:
            encoder_.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)


class RayBackend:
    """One Ray actor per slot: ``num_gpus=1`` each, or CPU-only actors, in a pool that follows the cluster."""

    def __init__(self, address: str | None, cfg: PipelineConfig, encoder_config, device: str, slots: int | None):
        import ray

        self.ray = ray
        self.started_here = address is None
        self.dashboard_url = None
        if self.started_here:
            # address="local": always a Ray of our own, whatever ray_current_cluster files or other
            # runs' clusters exist on this machine. Workers import pipeline/ and encoder/ from where
            # the driver found them (a checkout or site-packages), wherever the driver was started.
            pythonpath = os.pathsep.join(p for p in (str(CODE_ROOT), os.environ.get("PYTHONPATH")) if p)
            port = _free_port(cfg.dashboard_host, cfg.dashboard_port) if cfg.include_dashboard else cfg.dashboard_port
            if port != cfg.dashboard_port:
                _log(f"dashboard port {cfg.dashboard_port} is taken (another run?): using {port}")
            # Loopback only: a Ray cluster executes whatever code reaches it. Every listener of a
            # Ray node (GCS, raylet, object manager, workers, agents, metrics) binds to all
            # interfaces unless the node's IP is a loopback one, and Ray turns "127.0.0.1" into
            # the machine's network IP while it "supports clusters" (Linux). That switch is
            # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, read once when ray is imported: set it for the
            # processes ray.init starts, and for this one (ray may already be imported).
            # A run with --address (below) keeps the cluster's own `ray start` settings.
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
            context = ray.init(
                address="local",
                _node_ip_address="127.0.0.1",
                num_cpus=cfg.num_cpus,
                object_store_memory=cfg.object_store_memory,
                include_dashboard=cfg.include_dashboard,
                dashboard_host=cfg.dashboard_host,
                dashboard_port=port,
                runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                logging_level="warning",
            )
        else:
            # On a cluster the package must be installed on every node (docker/ image). Already
            # connected when preflight asked the cluster for its GPUs ('auto' device).
            context = ray.init(address=address, logging_level="warning", ignore_reinit_error=True)
        try:
            if self.started_here:
                # Fail closed should a Ray release resolve the node IP differently: a node on a
                # network IP listens on every interface (tests/test_local_ray_binds_loopback.py).
                import ipaddress

                node_ip = context.address_info.get("node_ip_address") or ""
                if not ipaddress.ip_address(node_ip.strip("[]")).is_loopback:
                    raise RuntimeError(f"the local Ray came up on {node_ip}, not loopback: refusing to run")
            self.dashboard_url = getattr(context, "dashboard_url", None) or None
            self._start_actors(cfg, encoder_config, device, slots)
        except BaseException:
            self.shutdown()
            raise

    def _start_actors(self, cfg: PipelineConfig, encoder_config, device: str, slots: int | None) -> None:
        ray = self.ray
        resources = ray.cluster_resources()
        cpus, gpus_available = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        use_gpu = device.startswith("cuda")
        if use_gpu:
            count = gpus_available if slots is None else slots
            if count < 1:
                raise ValueError("no GPU in the Ray cluster; use --gpus 0 for CPU workers")
            if count > gpus_available:
                raise ValueError(f"--gpus {count} asked, the Ray cluster has {gpus_available} GPU(s)")
            # Never ask for more CPUs than there are: a GPU actor left pending would idle its GPU.
            cpus_each = min(float(cfg.cpus_per_worker), cpus / count) if cpus else 0
            # Default: every GPU of the cluster, as it is at each check (nodes join and leave).
            want = (lambda: int(ray.cluster_resources().get("GPU", 0))) if slots is None else count
            self.slots = count  # workers at the start (the log line; the summary keeps the peak)
        else:
            count = slots or cfg.workers
            fit = max(1, cpus // max(1, cfg.cpus_per_worker))
            if cpus < cfg.cpus_per_worker and self.started_here:
                # A Ray of our own gets no more nodes: no worker could ever start. (On a cluster,
                # nodes may join; the pool gives up after worker_start_timeout.)
                raise ValueError(f"the Ray cluster has {cpus} CPU(s), a worker needs pipeline.cpus_per_worker = "
                                 f"{cfg.cpus_per_worker}")  # fmt: skip
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

    def submit(self, slot: int, shard: Shard, out: str, attempt: int):
        ref = self.pool.actor(slot).encode_shard.remote(shard.url, shard.id, out, attempt)
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
        pool = getattr(self, "pool", None)  # None when start-up failed before the pool existed
        if pool is not None:
            pool.shutdown()
        # Attached to a cluster, this only disconnects; the cluster and its other jobs go on.
        self.ray.shutdown()


def _free_port(host: str, port: int) -> int:
    """``port`` if it can be bound on ``host`` now, else a free one: two runs on one machine must not collide."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
            return port
        except OSError:
            pass
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


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
        self.finished = Tally()
        self.live: dict[int, Tally] = {}
        # A bar only on a terminal: in a log file every redraw would be a line. The
        # per-shard lines and the summary are printed either way.
        enabled = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=self.expected, unit="img", dynamic_ncols=True, disable=not enabled, mininterval=0.5,
                        smoothing=0.1, desc="encoding", file=sys.stderr)  # fmt: skip

    def shard_done(self, slot: int, stats: dict) -> None:
        self.live.pop(slot, None)
        self.shards_done += 1
        self.finished.add(Tally.from_stats(stats))
        if self.expected is None and self.shards_done:
            per_shard = self.finished.images / self.shards_done
            self.bar.total = round(self.finished.images + per_shard * (self.shards_total - self.shards_done))
        self.refresh()

    def update(self, live: dict[int, dict]) -> None:
        self.live.update({slot: Tally.from_dict(answer) for slot, answer in live.items()})
        self.refresh()

    def drop(self, slot: int) -> None:
        self.live.pop(slot, None)

    def refresh(self) -> None:
        totals = Tally()
        for tally in (self.finished, *self.live.values()):
            totals.add(tally)
        self.bar.n = totals.images
        psnr = totals.mean_psnr if totals.ok else float("nan")
        self.bar.set_postfix_str(
            f"psnr {psnr:.2f} dB, failed {totals.failed}, shards {self.shards_done}/{self.shards_total}", refresh=False
        )
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


# -- the run -----------------------------------------------------------------------------
def run(options: RunOptions) -> int:
    """Encode every shard of ``options``: 0 when all are done, 1 when some failed, 130/143 when stopped."""
    started = time.time()
    setup = prepare(options)
    with OutputLock(setup.out):
        todo, skipped = _plan(setup)
        if not todo:
            # Nothing to do: touch nothing, not even the summary, so a rerun is a no-op.
            _log("nothing to do")
            return 0
        outcome = Outcome()
        with StopSignals() as stop:
            _encode(setup, todo, outcome, stop)
        stopped_by = stop.received
        summary = _summary(setup, skipped, outcome, started, stopped_by)
        write_json_atomic(storage.location(setup.out) / SUMMARY_NAME, summary)
    _print_summary(summary)
    if stopped_by:
        return 128 + stopped_by[0]
    return 1 if outcome.failed else 0


def _plan(setup: Setup) -> tuple[list[Shard], list[Shard]]:
    """Refuse other row settings, check the done shards, and record the settings when there is work."""
    wanted = setup.row_settings()
    needs_writing = check_settings(setup.out, wanted, setup.options.overwrite)
    redo: dict[str, str] = {}
    todo, skipped = plan(setup.shards, setup.out, overwrite=setup.options.overwrite, redo=redo)
    for sid, why in sorted(redo.items())[:20]:
        _log(f"shard {sid}: redone: {why}")
    _log(f"{len(setup.shards)} shard(s): {len(todo)} to encode, {len(skipped)} already done (skipped) -> {setup.out}")
    if todo and needs_writing:
        write_json_atomic(settings_path(setup.out), wanted)
    return todo, skipped


class StopSignals:
    """SIGTERM (a scheduler, ``kill``) stops the run as Ctrl-C does; ``received`` lists the signals.

    ``ray.init`` installs its own SIGTERM handler (``sys.exit``, no summary), so
    ``arm`` is called again once Ray has started.
    """

    def __init__(self):
        self.received: list[int] = []
        self.previous = None

    def _stop(self, signum, frame):
        if not self.received:  # once: a second signal must not break the summary being written
            self.received.append(signum)
            raise KeyboardInterrupt

    def arm(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._stop)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGTERM)
        self.arm()
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            self.received[:] = self.received or [signal.SIGINT]
            _log("interrupted: finished shards are kept; rerun the same command to resume")
            return True
        return False


def _start_backend(setup: Setup):
    cfg, fit_config, device = setup.cfg, setup.fit_config, setup.device
    if fit_config.device == "cpu" and fit_config.strokes * fit_config.size**2 > 200 * 128**2:
        _log(f"no GPU in use: {fit_config.strokes} strokes at {fit_config.size} px will be slow on CPU "
             "(--config cpu_small is the CPU preset)")  # fmt: skip
    if setup.options.use_ray:
        backend = RayBackend(setup.address, cfg, fit_config, device, setup.gpus if device.startswith("cuda") else None)
    else:
        backend = LocalBackend(lambda slot: ShardEncoder(fit_config, cfg, device, f"local-{slot}"))
    if backend.dashboard_url:
        _log(f"Ray dashboard: http://{backend.dashboard_url}")
    _log(f"{backend.slots} worker(s) on {device}; {fit_config.strokes} strokes at {fit_config.size} px, "
         f"batch {cfg.batch_size}")  # fmt: skip
    return backend


@dataclass
class Outcome:
    results: list[dict] = field(default_factory=list)  # stats of the shards committed
    failed: dict[str, dict] = field(default_factory=dict)  # id -> url, attempts, error
    attempts: Counter = field(default_factory=Counter)
    retried: dict[str, list[str]] = field(default_factory=dict)  # id -> why each failed attempt failed
    replaced: int = 0
    workers: int = 0
    dashboard_url: str | None = None
    report: dict = field(default_factory=dict)  # the backend's (a cluster: where workers ran)


def _encode(setup: Setup, todo: list[Shard], outcome: Outcome, stop: StopSignals) -> None:
    """Start the workers and hand the shards out until every one is done or has failed every attempt."""
    progress = Progress(todo, setup.options.progress)
    backend = dispatcher = None
    try:
        backend = _start_backend(setup)
        stop.arm()
        outcome.workers, outcome.dashboard_url = backend.slots, backend.dashboard_url
        dispatcher = Dispatcher(backend, setup, progress, outcome)
        dispatcher.run(todo)
    finally:
        progress.close()
        if backend is not None:
            outcome.workers = max(outcome.workers, backend.slots)  # the peak: nodes may have joined
            try:
                outcome.report = backend.report()
            except Exception:  # noqa: BLE001 - a report is a nicety; shutting down is not
                pass
            backend.shutdown()
        for _, shard in (dispatcher.inflight.values() if dispatcher else ()):
            clean_temp(setup.out, shard.id)  # interrupted attempts (their workers are gone, or going)


class Dispatcher:
    """One shard per idle worker; results collected as they come; failed attempts queued again."""

    def __init__(self, backend, setup: Setup, progress: Progress, outcome: Outcome):
        self.backend, self.cfg, self.out = backend, setup.cfg, setup.out
        self.progress, self.outcome = progress, outcome
        self.queue: deque[Shard] = deque()
        self.inflight: dict = {}  # handle -> (slot, shard)
        self.idle: list[int] = []  # slots whose worker is up and free; refresh() adds the ones that come up

    def run(self, todo: list[Shard]) -> None:
        self.queue.extend(todo)
        while self.queue or self.inflight:
            try:
                self.idle += self.backend.refresh()  # workers that came up: first ones, joined nodes, replacements
            except NoWorkers as exc:  # inflight is empty: only live workers run shards
                _log(f"giving up: {exc}")
                for shard in self.queue:
                    self.outcome.failed[shard.id] = {"url": redact(shard.url),
                                                     "attempts": self.outcome.attempts[shard.id],
                                                     "error": redact(exc)}  # fmt: skip
                self.queue.clear()
                break
            self._hand_out()
            for handle in self.backend.wait(list(self.inflight), self.cfg.progress_interval):
                self._collect(handle)
            self._poll_progress()

    def _hand_out(self) -> None:
        while self.idle and self.queue:
            slot, shard = self.idle.pop(0), self.queue.popleft()
            self.outcome.attempts[shard.id] += 1
            clean_temp(self.out, shard.id)  # leftovers of a killed attempt; none is running now (the lock)
            self.inflight[self.backend.submit(slot, shard, self.out, self.outcome.attempts[shard.id])] = (slot, shard)

    def _collect(self, handle) -> None:
        slot, shard = self.inflight.pop(handle)
        self.progress.drop(slot)
        try:
            stats = self.backend.result(handle)
        except WorkerDied as exc:
            self.backend.replace(slot)
            self.outcome.replaced += 1
            self._retry_or_fail(shard, f"worker died: {exc}")
        except ShardFailed as exc:
            self._retry_or_fail(shard, str(exc))
        else:
            self.outcome.results.append(stats)
            self.progress.shard_done(slot, stats)
            psnr = "n/a" if stats.get("mean_psnr") is None else f"{stats['mean_psnr']:.2f} dB"
            _log(f"shard {shard.id}: {stats['total']} rows ({stats['ok']} ok, {stats['failed']} failed), "
                 f"{stats['seconds']:.1f} s, psnr {psnr}")  # fmt: skip
        if self.backend.ready(slot):  # a dead worker's slot comes back through refresh()
            self.idle.append(slot)

    def _retry_or_fail(self, shard: Shard, why: str) -> None:
        attempts, why = self.outcome.attempts[shard.id], redact(why)
        self.outcome.retried.setdefault(shard.id, []).append(f"attempt {attempts}: {why}")
        if attempts <= self.cfg.max_retries:
            _log(f"shard {shard.id}: attempt {attempts} failed ({why}); retrying")
            self.queue.append(shard)
        else:
            _log(f"shard {shard.id}: FAILED after {attempts} attempt(s): {why}")
            self.outcome.failed[shard.id] = {"url": redact(shard.url), "attempts": attempts, "error": why}

    def _poll_progress(self) -> None:
        current = {slot: shard.id for slot, shard in self.inflight.values()}
        # An answer about a shard the slot no longer holds (it just finished) would count twice.
        live = self.backend.progress(list(current))
        self.progress.update({slot: p for slot, p in live.items() if p.get("shard") == current.get(slot)})


def _summary(setup: Setup, skipped: list[Shard], outcome: Outcome, started: float, stopped_by: list[int]) -> dict:
    seconds = time.time() - started
    tally = Tally()
    for stats in outcome.results:
        tally.add(Tally.from_stats(stats))
    summary = {
        "output": redact(setup.out),
        "shards_total": len(setup.shards),
        "shards_encoded": len(outcome.results),
        "shards_skipped": len(skipped),
        "shards_failed": len(outcome.failed),
        "failed_shards": outcome.failed,
        "images": tally.images,
        "ok": tally.ok,
        "failed": tally.failed,
        "status_counts": tally.as_dict()["status_counts"],
        "mean_psnr": round(tally.mean_psnr, 4) if tally.ok else None,
        "seconds": round(seconds, 3),
        "images_per_second": round(tally.images / seconds, 3) if seconds > 0 else None,
        "retries": sum(max(0, n - 1) for n in outcome.attempts.values()),
        "workers_replaced": outcome.replaced,
        "workers": outcome.workers,
        "device": setup.device,
        "interrupted": bool(stopped_by),
        "stopped_by": signal.Signals(stopped_by[0]).name if stopped_by else None,
        "dashboard_url": outcome.dashboard_url,
        "encoder_config": asdict(setup.fit_config),
        "pipeline_config": asdict(setup.cfg),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        # What went round again and why (a worker or its node died, a task raised).
        "retried_shards": {sid: {"attempts": outcome.attempts[sid], "errors": why, "done": sid not in outcome.failed}
                           for sid, why in outcome.retried.items() if outcome.attempts[sid] > 1},  # fmt: skip
    }
    summary.update(outcome.report)  # a cluster: where the workers ran
    return summary


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
    print(redact("\n".join(lines)), flush=True)
