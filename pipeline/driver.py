"""The driver: the shard queue, retries, progress and the summary (the workers are backends.py's).

Shards are handed out as workers free up, ``shards_per_worker`` at a time per
worker (the next one decodes while the current one fits), so one slow shard
never idles the others. A shard whose task raised is queued
again, and a worker process that died (``RayActorError``, also when its whole
node died) is replaced and its shard queued again, each shard at most
``1 + max_retries`` times. A shard that still fails is reported (exit status 1)
and has no done marker, so the next run tries it again. On a Ray cluster the
pool of workers follows the cluster (cluster.py): nodes that join get workers,
lost workers come back where there is room.

``run`` is the whole command: ``preflight.prepare`` checks every setting, flag,
path and shard before anything starts (a ValueError is one ``error:`` line and exit 2),
the output folder's lock is taken, the plan and the folder's settings are
checked, a backend starts (backends.py: Ray, or the in-process worker),
``Dispatcher`` hands shards out, and the summary is written. SIGTERM and SIGHUP end a run like
Ctrl-C does (stopping.py).
"""
from __future__ import annotations

import signal
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from tqdm import tqdm

from . import backends
from .backends import ShardFailed, WorkerDied
from .cluster import NoWorkers
from .lock import OutputLock
from .output_folder import OutputFolder, write_json_atomic
from .preflight import Setup, prepare
from .records import Tally
from .redact import redact
from .shards import Shard, expected_samples, plan
from .stopping import StopSignals
from .upstream import describe as describe_upstream
from .upstream import upstream_counts
from .writer import ShardOutputFactory


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
    writer_factory: ShardOutputFactory | None = None  # opens each shard's output; None: writer.ShardWriter


def _log(message: str) -> None:
    tqdm.write(f"[painterbot] {redact(message)}", file=sys.stderr)


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
def run(options: RunOptions, stop: StopSignals | None = None) -> int:
    """Encode every shard of ``options``: 0 when all are done, 1 when some failed, 128 + the signal
    (130, 143, 129) when stopped. ``stop``: the command's own handler, installed before its imports;
    else one is installed here for the run."""
    own = stop is None
    stop = (stop or StopSignals()).install()
    try:
        return _run(options, stop)
    except BaseException as exc:
        if not stop.interrupted(exc):
            raise
        # Stopped before the output folder was locked: nothing of this run was written.
        _log(f"stopped by {stop.name} before the run started: nothing was written")
        return stop.exit_status
    finally:
        if own:
            stop.uninstall()


def _run(options: RunOptions, stop: StopSignals) -> int:
    started = time.time()
    # The checks and the plan finish (each wait in them has a bound); a signal meanwhile is recorded
    # and stops the run before its first shard, with a summary like any other stop.
    stop.defer()
    setup = prepare(options)
    with OutputLock(setup.out):
        outcome, todo, skipped = Outcome(), None, []
        try:
            todo, skipped, settings = _plan(setup)
            if todo:
                stop.resume()  # raises here if a signal came during the checks
                if settings is not None:
                    OutputFolder(setup.out).write_settings(settings)
                _encode(setup, todo, outcome, stop)
        except BaseException as exc:
            if not stop.interrupted(exc):
                raise
            _log(f"stopped by {stop.name}: finished shards are kept; rerun the same command to resume")
        stop.defer()  # from here a signal is recorded: the summary is written and the lock released
        if not todo and not stop.stopped:
            # Nothing to do: touch nothing, not even the summary, so a rerun is a no-op.
            _log("nothing to do")
            return 0
        summary = _write_summary(setup, skipped, outcome, started, stop)
    _print_summary(summary)
    # The exit status agrees with the summary: a signal after it was written changes neither.
    if summary["stopped_by"]:
        return 128 + signal.Signals[summary["stopped_by"]]
    return 1 if outcome.failed else 0


def _write_summary(setup: Setup, skipped: list[Shard], outcome: Outcome, started: float, stop: StopSignals) -> dict:
    """Write the summary; again if a signal came while it was written, so it names the signal."""
    while True:
        seen = list(stop.received)
        summary = _summary(setup, skipped, outcome, started, seen)
        try:
            write_json_atomic(OutputFolder(setup.out).summary_path, summary)
        except OSError as exc:  # the folder went read-only, the disk filled, the store went away
            done = len(outcome.results)
            raise OSError(f"the summary could not be written ({type(exc).__name__}: {exc}); the {done} shard(s) "
                          f"finished by this run are kept: make {setup.out} writable and rerun the same command "
                          "to resume") from exc  # fmt: skip
        if stop.received == seen:
            return summary


def _plan(setup: Setup) -> tuple[list[Shard], list[Shard], dict | None]:
    """Refuse other row settings and check the done shards: the shards to encode, those skipped, and the
    row settings to record before the first shard is encoded (None: the folder records them already)."""
    wanted, folder = setup.row_settings(), OutputFolder(setup.out)
    needs_writing = folder.check_settings(wanted, setup.options.overwrite)
    redo: dict[str, str] = {}
    todo, skipped = plan(setup.shards, setup.out, overwrite=setup.options.overwrite, redo=redo)
    for sid, why in sorted(redo.items())[:20]:
        _log(f"shard {sid}: redone: {why}")
    _log(f"{len(setup.shards)} shard(s): {len(todo)} to encode, {len(skipped)} already done (skipped) -> {setup.out}")
    return todo, skipped, wanted if needs_writing else None


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
        backend = backends.start(setup, _log)
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
        for _, shard, _ in (dispatcher.inflight.values() if dispatcher else ()):
            _clean_temp(OutputFolder(setup.out), shard)  # interrupted attempts (their workers are gone, or going)


class Dispatcher:
    """Up to ``shards_per_worker`` shards per live worker; results collected as they come; failed
    attempts queued again."""

    def __init__(self, backend: backends.Backend, setup: Setup, progress: Progress, outcome: Outcome):
        self.backend, self.cfg, self.out = backend, setup.cfg, setup.out
        self.folder = OutputFolder(setup.out)
        self.progress, self.outcome = progress, outcome
        self.queue: deque[Shard] = deque()
        self.inflight: dict = {}  # handle -> (slot, shard, the slot's worker generation when submitted)
        # One entry per shard a live worker can take now: shards_per_worker for each worker that comes
        # up (refresh), one back for each shard it finishes.
        self.idle: list[int] = []
        # Bumped when a slot's worker dies: its other shards in flight die with it, and must not
        # replace the worker again (nor give back room on a worker that is gone).
        self.generation: Counter = Counter()

    def run(self, todo: list[Shard]) -> None:
        self.queue.extend(todo)
        while self.queue or self.inflight:
            try:
                # Workers that came up (first ones, joined nodes, replacements): round robin, so each
                # takes one shard before any takes a second.
                self.idle += self.backend.refresh() * self.cfg.shards_per_worker
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
            # Leftovers of a killed attempt; none is running now (the lock). A store that cannot even
            # be listed fails this attempt, like any failure of the shard, never the whole run.
            trouble = _clean_temp(self.folder, shard)
            if trouble:
                self.idle.insert(0, slot)
                self._retry_or_fail(shard, trouble)
                continue
            handle = self.backend.submit(slot, shard, self.out, self.outcome.attempts[shard.id])
            self.inflight[handle] = (slot, shard, self.generation[slot])

    def _collect(self, handle) -> None:
        slot, shard, generation = self.inflight.pop(handle)
        self.progress.drop(slot)
        try:
            stats = self.backend.result(handle)
        except WorkerDied as exc:
            if generation == self.generation[slot]:  # the first of its shards to report the death
                self.generation[slot] += 1
                self.idle = [s for s in self.idle if s != slot]  # the room it had died with it
                self.backend.replace(slot)
                self.outcome.replaced += 1
            self._retry_or_fail(shard, f"worker died: {exc}")
            return
        except ShardFailed as exc:
            self._retry_or_fail(shard, str(exc))
        else:
            self.outcome.results.append(stats)
            self.progress.shard_done(slot, stats)
            psnr = "n/a" if stats.get("mean_psnr") is None else f"{stats['mean_psnr']:.2f} dB"
            _log(f"shard {shard.id}: {stats['total']} rows ({stats['ok']} ok, {stats['failed']} failed), "
                 f"{stats['seconds']:.1f} s, psnr {psnr}")  # fmt: skip
        if generation == self.generation[slot] and self.backend.ready(slot):  # a dead one's comes back by refresh()
            self.idle.append(slot)

    def _retry_or_fail(self, shard: Shard, why: str) -> None:
        attempts, why = self.outcome.attempts[shard.id], redact(why)
        self.outcome.retried.setdefault(shard.id, []).append(f"attempt {attempts}: {why}")
        # The failed attempt's hidden temporary file goes now, not at the next attempt (there may be none).
        _clean_temp(self.folder, shard)
        if attempts <= self.cfg.max_retries:
            _log(f"shard {shard.id}: attempt {attempts} failed ({why}); retrying")
            self.queue.append(shard)
        else:
            _log(f"shard {shard.id}: FAILED after {attempts} attempt(s): {why}")
            self.outcome.failed[shard.id] = {"url": redact(shard.url), "attempts": attempts, "error": why}

    def _poll_progress(self) -> None:
        held: dict[int, set[str]] = {}
        for slot, shard, generation in self.inflight.values():
            if generation == self.generation[slot]:  # not a shard of a worker that died (its death is collected)
                held.setdefault(slot, set()).add(shard.id)
        # A worker reports the shard it is fitting. An answer about a shard the slot no longer holds
        # (it just finished) would count twice.
        live = self.backend.progress(list(held))
        self.progress.update({slot: p for slot, p in live.items() if p.get("shard") in held.get(slot, ())})


def _clean_temp(folder: OutputFolder, shard: Shard) -> str | None:
    """Remove a shard's temporary files; the store's error as a reason, or None."""
    try:
        folder.clean_temp(shard.id)
    except OSError as exc:  # an object store out of reach, a folder gone read-only
        return f"the output could not be listed or cleaned: {type(exc).__name__}: {exc}"
    return None


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
    # What img2dataset says of the URLs behind the shards: the ones that never became samples.
    summary["upstream"] = upstream_counts([shard.url for shard in setup.shards])
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
        f"  upstream        {describe_upstream(s['upstream'])}",
    ]
    for message, count in s["upstream"]["errors"][:3]:
        lines.append(f"    {count} x {message}")
    for sid, info in s["failed_shards"].items():
        lines.append(f"  FAILED {sid}: {info['error']}")
    for sid, info in list(s.get("retried_shards", {}).items())[:10]:
        if info["done"]:
            lines.append(f"  retried {sid}: {info['errors'][-1]}")
    lines.append(f"  summary file    {OutputFolder(s['output']).summary_path}")
    print(redact("\n".join(lines)), flush=True)
