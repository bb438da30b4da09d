"""How a run stops on a signal: ``StopSignals``, installed from the command's first line to its last write.

SIGINT (Ctrl-C), SIGTERM (a scheduler, ``kill``) and SIGHUP (a closed terminal or SSH session)
all stop a run the same way: the first one raises ``KeyboardInterrupt`` where the driver is, the
workers are shut down (Ray too), finished shards are kept, and the summary names the signal; the
exit status is 128 + its number (130, 143, 129). Once the driver is writing the summary the
handler only records a signal, so a second one, or one that comes just after the last shard,
cannot cut the summary or leave the lock behind.

This module imports nothing heavy, so ``run_encode.py`` installs it before torch and Ray load, deferred:
an interrupt raised inside a native import can abort the interpreter. A signal during the imports and
the checks before the run (each with a time bound) is recorded; the driver then locks the output
folder, plans, and stops before the first shard, writing the summary as for any stop.
"""
from __future__ import annotations

import signal
import threading

STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


class StopSignals:
    """Records the stop signals a run receives; see the module."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.deferred = False
        self._previous: dict[int, object] = {}

    @property
    def stopped(self) -> bool:
        return bool(self.received)

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received[0]).name if self.received else None

    def record(self, signum: int) -> None:
        if not self.received:
            self.received.append(signum)

    def _handler(self, signum, frame) -> None:
        first = not self.received
        self.record(signum)
        if first and not self.deferred:
            raise KeyboardInterrupt

    def install(self) -> "StopSignals":
        """Take over the stop signals (main thread only: Python delivers signals there)."""
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous.setdefault(signum, signal.getsignal(signum))
                signal.signal(signum, self._handler)
        return self

    # ``ray.init`` installs its own SIGTERM handler (``sys.exit``): the driver installs again after it.
    arm = install

    def defer(self) -> None:
        """From now on a signal is recorded, not raised: the work in hand (the summary) finishes."""
        self.deferred = True

    def resume(self) -> None:
        """Signals raise again; one recorded while deferred raises now (as ``KeyboardInterrupt``)."""
        self.deferred = False
        if self.received:
            raise KeyboardInterrupt

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def interrupted(self, exc: BaseException) -> bool:
        """Whether ``exc`` is this stop: a KeyboardInterrupt (Ctrl-C, or raised by the handler), or
        the ``SystemExit(SIGTERM)`` of Ray's own handler while Ray was starting. Records it."""
        if isinstance(exc, KeyboardInterrupt):
            self.record(signal.SIGINT)
            return True
        if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
            self.record(signal.SIGTERM)
            return True
        return False

    @property
    def exit_status(self) -> int:
        return 128 + self.received[0]
