"""One driver per output folder: a lock file created atomically (O_CREAT | O_EXCL).

Two drivers on one folder would each encode every shard and delete each
other's temporary files (the driver cleans leftovers before each attempt,
trusting that it alone starts attempts there). The lock file names its holder
(host, pid, start time); a second driver is refused at once with that name. A
lock left by a driver that died (same host, its pid gone) is taken over; a
lock from another host cannot be checked from here and must be removed by
hand once that driver is known to be gone.

The lock lives where output_folder.py says (beside the stats files, the
settings and the summary, out of data readers' way). It is local-only: an
object-store output (``s3://``, ``gs://``, ...) has no atomic create-if-absent
here, so no lock is taken there (a log line says so): run one driver per
remote output.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

from .output_folder import OutputFolder


class LockHeld(RuntimeError):
    """Another live driver holds the folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    return True


class OutputLock:
    """``with OutputLock(out):`` holds the folder for this process; released on exit (also on errors)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = str(out_dir)
        folder = OutputFolder(out_dir)
        self.local = not folder.is_remote
        self.path = folder.lock_path if self.local else None
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started_at": datetime.now(timezone.utc).isoformat(), "token": uuid.uuid4().hex}  # fmt: skip
        self.held = False

    def acquire(self) -> None:
        if not self.local:
            print(f"[painterbot] {self.out_dir}: no output lock on an object store (local folders only): "
                  "run one driver per output", file=sys.stderr, flush=True)  # fmt: skip
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Two tries: the second after removing a stale lock (a dead driver's on this host).
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._remove_if_stale()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.holder, handle)
                handle.write("\n")
            self.held = True
            return
        raise LockHeld(f"{self.path} appeared again while a stale lock was being replaced; retry")

    def _remove_if_stale(self) -> None:
        text = self._read()
        try:
            other = json.loads(text) if text else {}
            host, pid = other.get("host"), int(other.get("pid"))
        except (ValueError, TypeError, AttributeError):
            other, host, pid = {}, None, None
        if not text:
            # Created a moment ago and not yet written (or a gone holder): say who to look for.
            raise LockHeld(f"output folder is locked by another driver ({self.path} is empty); "
                           f"if no driver runs, delete {self.path}")  # fmt: skip
        if host == self.holder["host"] and pid is not None and not _alive(pid):
            # Same host, process gone: stale. Remove it only if it is still the same lock.
            if self._read() == text:
                self.path.unlink(missing_ok=True)
            return
        who = f"host {other.get('host')}, pid {other.get('pid')}, started {other.get('started_at')}" if other else text
        raise LockHeld(f"output folder is in use by another driver ({who}); wait for it to finish, "
                       f"or if it is gone, delete {self.path}")  # fmt: skip

    def _read(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return ""

    def release(self) -> None:
        """Remove the lock if it is still ours (never another driver's that took over a stale one)."""
        if self.held:
            try:
                if json.loads(self._read() or "{}").get("token") == self.holder["token"]:
                    self.path.unlink(missing_ok=True)
            except ValueError:
                pass
            self.held = False

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            self.release()
        except OSError as error:
            if kind is None:
                raise
            # The run is already failing (an output made read-only, a disk gone): its own error is
            # the one to report; the lock that could not be removed is said beside it.
            print(f"[painterbot] could not remove the lock {self.path}: {error}; remove it by hand", file=sys.stderr)
