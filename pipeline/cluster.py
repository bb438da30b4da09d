"""A Ray worker pool sized to the cluster as it is now, not as it was at start-up.

Machines come and go during a long run: a node dies (spot preemption, a
crash) and its workers with it; a node joins (``ray start --address HEAD``,
an autoscaler) and should get work. ``WorkerPool`` keeps one actor per slot
and, every ``check_interval`` seconds, compares the workers it has with the
workers it wants (every GPU of the cluster, or the ``--gpus`` / ``--workers``
asked for) and starts actors for the missing ones, as far as the cluster's
free resources allow. An actor gets work only once it answered a first call
(``placement``: its node, host and code), so no shard ever waits on an actor
that Ray cannot place; an actor that does not answer within
``start_timeout`` is given up and its slot tried again later. When no worker
at all has been up for ``start_timeout`` seconds, or every start fails, the
pool raises ``NoWorkers``, so a run on a cluster that lost every node (or
cannot import the code) ends instead of waiting forever.

Slots are the driver's handles on workers; a slot whose actor died is refilled
with a fresh actor (a new worker id) when there is room.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Callable


class NoWorkers(RuntimeError):
    """No worker has been up for ``start_timeout`` seconds."""


def with_placement(cls: type) -> type:
    """``cls`` plus ``placement()``, the first call of every actor: where it runs and which code it runs."""

    class Placed(cls):
        def placement(self) -> dict:
            import ray

            module = sys.modules[cls.__module__]
            return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                    "pid": os.getpid(), "code": os.path.dirname(os.path.abspath(module.__file__))}  # fmt: skip

    # The dashboard lists actors by class name: keep the worker's own.
    Placed.__name__ = Placed.__qualname__ = cls.__name__
    return Placed


def cluster_gpus(address: str) -> int:
    """GPUs in the Ray cluster at ``address``; stays connected (the driver's backend reuses the connection)."""
    import ray

    ray.init(address=address, logging_level="warning", ignore_reinit_error=True)
    return int(ray.cluster_resources().get("GPU", 0))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}"[:500] if text else type(exc).__name__


@dataclass
class _Slot:
    actor: object | None = None  # None: the slot waits for room in the cluster
    worker_id: str = ""
    probe: object | None = None  # the placement() answer while the actor starts
    started: float = 0.0  # monotonic time the actor was created
    ready: bool = False
    node: str = ""
    host: str = ""


class WorkerPool:
    """Actors of ``actor_class`` (a ``ray.remote`` class with options set), one per slot.

    make_args(worker_id) -> the constructor's arguments; demand: the resources one
    actor takes ({"CPU": 1} or {"GPU": 1, "CPU": 0.5}); want: how many workers to
    have, a number or a function of the cluster read at every check.
    """

    def __init__(self, ray, actor_class, make_args: Callable[[str], tuple], demand: dict[str, float],
                 want: int | Callable[[], int], check_interval: float, start_timeout: float,
                 log: Callable[[str], None]):  # fmt: skip
        self.ray = ray
        self.actor_class = actor_class
        self.make_args = make_args
        self.demand = {k: v for k, v in demand.items() if v > 0}
        self.want = want
        self.check_interval = check_interval
        self.start_timeout = start_timeout
        self.log = log
        self.slots: list[_Slot] = []
        self.created = 0
        self.lost = 0
        self.peak = 0
        self.nodes: dict[str, dict] = {}  # node id -> {"host": ..., "workers": [ids that ran there]}
        self._next_check = 0.0
        self._none_since = time.monotonic()
        self._failed_starts: list[str] = []  # why actors failed to start since one last came up
        self._fill()

    # -- what the driver asks ------------------------------------------------------------
    def target(self) -> int:
        return max(0, int(self.want() if callable(self.want) else self.want))

    def actor(self, slot: int):
        return self.slots[slot].actor

    def ready(self, slot: int) -> bool:
        return self.slots[slot].ready

    def describe(self, slot: int) -> str:
        s = self.slots[slot]
        return f"{s.worker_id} on node {s.node[:12]} ({s.host})" if s.node else s.worker_id

    def refresh(self) -> list[int]:
        """Slots whose actor came up since the last call; starts actors where there is room.

        Raises NoWorkers when no actor has been up for ``start_timeout`` seconds, or when
        every actor started since the last one came up failed (at least 3, and at least
        as many as wanted): a worker that cannot import its code will not heal by waiting.
        """
        now = time.monotonic()
        up = self._collect_probes()
        failures = len(self._failed_starts)
        if failures >= 3 and failures >= self.target() and not any(s.ready for s in self.slots):
            # Every start fails (an import error, a broken node image): no use waiting it out.
            raise NoWorkers(f"{len(self._failed_starts)} workers in a row failed to start, the last: "
                            f"{self._failed_starts[-1]}")  # fmt: skip
        for i, slot in enumerate(self.slots):
            if slot.probe is not None and now - slot.started > self.start_timeout:
                self.log(f"{slot.worker_id} did not start within {self.start_timeout:.0f} s: its slot waits for room")
                self._drop(i)
        # With no actor at all (the cluster's resources not reported yet, every node gone), look
        # at every refresh rather than a whole interval later: the run has nothing else to do.
        if now >= self._next_check or all(s.actor is None for s in self.slots):
            self._next_check = now + self.check_interval
            self._fill()
        ready = sum(s.ready for s in self.slots)
        self.peak = max(self.peak, ready)
        if ready:
            self._none_since = now
        elif now - self._none_since > self.start_timeout:
            raise NoWorkers(f"no worker has been up for {self.start_timeout:.0f} s: the cluster has no room for "
                            f"one ({self.demand} each; free: {self._free()})")  # fmt: skip
        return up

    def lost_worker(self, slot: int) -> None:
        """The slot's actor died (its node, or the process): refill it when there is room, soon."""
        self.lost += 1
        self._drop(slot)
        self._next_check = 0.0  # look for room at the next refresh, not a whole interval later

    def shutdown(self) -> None:
        for i in range(len(self.slots)):
            self._drop(i)

    def report(self) -> dict:
        """For the run summary: where the workers ran and how many came and went."""
        return {"workers_started": self.created, "workers_lost": self.lost, "workers_peak": self.peak,
                "nodes": self.nodes}  # fmt: skip

    # -- inside --------------------------------------------------------------------------
    def _collect_probes(self) -> list[int]:
        probes = {slot.probe: i for i, slot in enumerate(self.slots) if slot.probe is not None}
        if not probes:
            return []
        answered, _ = self.ray.wait(list(probes), num_returns=len(probes), timeout=0)
        up = []
        for ref in answered:
            i = probes[ref]
            slot = self.slots[i]
            slot.probe = None
            try:
                where = self.ray.get(ref, timeout=30)  # already answered: returns at once
            except Exception as exc:  # noqa: BLE001 - the actor failed to start (import error, node died, ...)
                self.log(f"{slot.worker_id} failed to start: {_first_line(exc)}")
                self._failed_starts.append(_first_line(exc))
                self.lost += 1
                self._drop(i)
                continue
            slot.ready, slot.node, slot.host = True, where["node"], where["host"]
            self._failed_starts.clear()
            entry = self.nodes.setdefault(where["node"], {"host": where["host"], "workers": [], "code": where["code"]})
            entry["workers"].append(slot.worker_id)
            self.log(f"{self.describe(i)} is up")
            up.append(i)
        return up

    def _free(self) -> dict[str, float]:
        """The cluster's free resources less what actors still starting will take."""
        free = dict(self.ray.available_resources())
        for slot in self.slots:
            if slot.probe is not None:
                for key, amount in self.demand.items():
                    free[key] = free.get(key, 0.0) - amount
        return {k: v for k, v in free.items() if k in self.demand}

    def _fill(self) -> None:
        """Start actors for empty slots (adding slots up to the target) while the cluster has room."""
        target = self.target()
        while len(self.slots) < target:
            self.slots.append(_Slot())
        live = sum(s.actor is not None for s in self.slots)
        if live >= target:
            return
        free = self._free()
        for i, slot in enumerate(self.slots):
            if live >= target:
                break
            if slot.actor is not None:
                continue
            if any(free.get(key, 0.0) + 1e-9 < amount for key, amount in self.demand.items()):
                break
            self._start(i)
            live += 1
            for key, amount in self.demand.items():
                free[key] = free.get(key, 0.0) - amount

    def _start(self, i: int) -> None:
        worker_id = f"worker-{self.created}"
        self.created += 1
        actor = self.actor_class.remote(*self.make_args(worker_id))
        probe = actor.placement.remote()
        self.slots[i] = _Slot(actor=actor, worker_id=worker_id, probe=probe, started=time.monotonic())

    def _drop(self, i: int) -> None:
        actor = self.slots[i].actor
        self.slots[i] = _Slot()
        if actor is not None:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass


__all__ = ["NoWorkers", "WorkerPool", "cluster_gpus", "with_placement"]
