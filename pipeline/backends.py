"""Where the work runs: a backend runs ``ShardEncoder.encode_shard`` on its slots for the driver's queue.

``LocalBackend`` (``--no-ray``) is one encoder on a thread of this process;
``RayBackend`` is one Ray actor per slot (``num_gpus=1`` each, or CPU-only
actors) in a pool that follows the cluster (cluster.py). Both answer the same
calls, the ``Backend`` protocol below, so ``driver.Dispatcher`` hands shards out
without knowing which runs them; another executor implements those calls.
A task that raised is ``ShardFailed``; a worker process that is gone is ``WorkerDied``.
"""
from __future__ import annotations

import os
import socket
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from .cluster import WorkerPool, with_placement
from .config import PipelineConfig
from .shards import Shard
from .worker import ShardEncoder
from .writer import ShardOutputFactory

if TYPE_CHECKING:
    from .preflight import Setup

CODE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding pipeline/ and encoder/

# Fault injection for tests: a marker path; the first worker to reach it dies once.
CRASH_ONCE_ENV = "PAINTERBOT_CRASH_ONCE"


class ShardFailed(Exception):
    """The task raised inside a worker (the worker itself lives on)."""


class WorkerDied(Exception):
    """The worker process is gone; its slot needs a new one."""


class Backend(Protocol):
    """What the driver's queue asks of where the work runs; a slot is one worker's number."""

    slots: int  # workers now (the summary keeps the peak)
    dashboard_url: str | None

    def refresh(self) -> list[int]: ...  # slots whose worker came up since the last call

    def ready(self, slot: int) -> bool: ...  # the slot's worker can take a shard

    def submit(self, slot: int, shard: Shard, out: str, attempt: int): ...  # -> a handle

    def wait(self, handles: list, timeout: float) -> list: ...  # handles that finished

    def result(self, handle) -> dict: ...  # the shard's stats; raises ShardFailed or WorkerDied

    def progress(self, busy: list[int]) -> dict[int, dict]: ...  # counters of busy slots, without blocking

    def replace(self, slot: int) -> None: ...  # the slot's worker died

    def report(self) -> dict: ...  # for the summary

    def shutdown(self) -> None: ...


class LocalBackend:
    """One ShardEncoder in this process, on a thread so the driver can poll progress (--no-ray)."""

    def __init__(self, make_encoder, shards_per_worker: int = 1):
        self.make_encoder = make_encoder
        self.slots = 1
        self.encoders = [make_encoder(0)]
        # One thread per shard the worker holds (shards_per_worker): their fits take turns inside it.
        self.pool = ThreadPoolExecutor(shards_per_worker, thread_name_prefix="encode")
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

    def __init__(self, address: str | None, cfg: PipelineConfig, encoder_config, device: str, slots: int | None,
                 log: Callable[[str], None], writer_factory: ShardOutputFactory | None = None):  # fmt: skip
        import ray

        self.ray = ray
        self.log = log  # the driver's console line (redacted there)
        self.writer_factory = writer_factory
        self.started_here = address is None
        self.dashboard_url = None
        if self.started_here:
            # address="local": always a Ray of our own, whatever ray_current_cluster files or other
            # runs' clusters exist on this machine. Workers import pipeline/ and encoder/ from where
            # the driver found them (a checkout or site-packages), wherever the driver was started.
            pythonpath = os.pathsep.join(p for p in (str(CODE_ROOT), os.environ.get("PYTHONPATH")) if p)
            port = _free_port(cfg.dashboard_host, cfg.dashboard_port) if cfg.include_dashboard else cfg.dashboard_port
            if port != cfg.dashboard_port:
                log(f"dashboard port {cfg.dashboard_port} is taken (another run?): using {port}")
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
                self.log(f"{count} CPU workers asked, {cpus} CPUs in the cluster: {fit} start now, more if nodes join")
            cpus_each = cfg.cpus_per_worker
            want = count
            self.slots = min(count, fit)
        crash_once = os.environ.get(CRASH_ONCE_ENV) or None
        # A thread for each shard the actor holds (shards_per_worker; their fits take turns inside
        # it), and one more so progress() answers while they run.
        actor_class = ray.remote(with_placement(ShardEncoder)).options(
            num_gpus=1 if use_gpu else 0, num_cpus=cpus_each, max_concurrency=cfg.shards_per_worker + 1,
            max_restarts=0,
        )
        worker_device = "cuda" if use_gpu else "cpu"
        self.pool = WorkerPool(
            ray, actor_class,
            lambda worker_id: (asdict(encoder_config), asdict(cfg), worker_device, worker_id, True, crash_once,
                               self.writer_factory),
            {"GPU": 1 if use_gpu else 0, "CPU": cpus_each}, want, cfg.cluster_check_interval,
            cfg.worker_start_timeout, self.log,
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


def start(setup: Setup, log: Callable[[str], None]) -> Backend:
    """The backend the run asked for, started: Ray actors, or one encoder in this process (--no-ray)."""
    cfg, fit_config, device = setup.cfg, setup.fit_config, setup.device
    if fit_config.device == "cpu" and fit_config.strokes * fit_config.size**2 > 200 * 128**2:
        log(f"no GPU in use: {fit_config.strokes} strokes at {fit_config.size} px will be slow on CPU "
            "(--config cpu_small is the CPU preset)")  # fmt: skip
    writer_factory = setup.options.writer_factory
    if setup.options.use_ray:
        backend = RayBackend(setup.address, cfg, fit_config, device, setup.gpus if device.startswith("cuda") else None,
                             log, writer_factory)  # fmt: skip
    else:
        backend = LocalBackend(lambda slot: ShardEncoder(fit_config, cfg, device, f"local-{slot}",
                                                         writer_factory=writer_factory), cfg.shards_per_worker)
    if backend.dashboard_url:
        log(f"Ray dashboard: http://{backend.dashboard_url}")
    log(f"{backend.slots} worker(s) on {device}; {fit_config.strokes} strokes at {fit_config.size} px, "
        f"batch {cfg.batch_size}")  # fmt: skip
    return backend
