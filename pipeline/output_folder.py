"""The output folder: every name in it, whether it is local or remote, and the operations on those names.

One module spells the layout, so the writer, resume, the lock, the driver, the
gallery and the loaders agree on it by construction::

    OUT/{id}.parquet                    a shard's rows: the only files data readers see
    OUT/.{id}.parquet.{tag}.tmp         an attempt in progress (hidden, one random tag per attempt)
    OUT/__painterbot__/                 everything else, out of data readers' way (META_DIR)
        {id}_stats.json                 the shard's stats, written after {id}.parquet: the done marker
        {id}.incomplete                 the shard's files hold a source that failed part-way (not done)
        settings.json                   what shapes the folder's rows (format version, strokes, size)
        summary.json                    the last run's summary
        driver.lock                     the running driver (local folders only: lock.py)
        .{name}.{tag}.tmp               a JSON file above, being written

``OUT`` is a local folder (``pathlib.Path``) or a filesystem URI (``s3://``,
``gs://``, any fsspec scheme: ``storage.RemotePath``); storage.py serves both
behind one pathlib-like API, and ``OutputFolder.is_remote`` is the one place
the pipeline asks which it is.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import storage

# Everything that is not a Parquet data file lives in this folder, so that readers pointed at the
# output folder see only data: pyarrow.dataset (and pandas, Ray Data through it) skip names
# starting with "_" or ".", and Hugging Face datasets skips folders starting with "__" (a single
# "_" is not enough for it: its stats files would outnumber the Parquet files and win the builder).
META_DIR = "__painterbot__"
DATA_SUFFIX = ".parquet"
STATS_SUFFIX = "_stats.json"
INCOMPLETE_SUFFIX = ".incomplete"
SETTINGS_NAME = "settings.json"
SUMMARY_NAME = "summary.json"
LOCK_NAME = "driver.lock"
TEMP_SUFFIX = ".tmp"


def temp_path(final: storage.AnyPath, tag: str) -> storage.AnyPath:
    """A hidden sibling of ``final``: same filesystem (so the commit is atomic),
    invisible to ``*.parquet`` globs, unique per attempt."""
    return final.with_name(f".{final.name}.{tag}{TEMP_SUFFIX}")


def write_json_atomic(path: str | Path | storage.RemotePath, data: dict) -> storage.AnyPath:
    """Write JSON under a temporary sibling name, then commit it to ``path`` (local or object store)."""
    path = storage.location(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # META_DIR, on first use
    tmp = temp_path(path, uuid.uuid4().hex[:12])
    payload = (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")
    try:
        with storage.open_output(tmp) as handle:
            handle.write(payload)
        storage.commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class Listing:
    """The names an output folder held at one moment: one listing of it and one of META_DIR.

    Resume reads thousands of done markers this way: a request per shard would
    cost minutes on an object store.
    """

    data: frozenset[str]
    meta: frozenset[str]

    def has_parquet(self, sid: str) -> bool:
        return f"{sid}{DATA_SUFFIX}" in self.data

    def has_stats(self, sid: str) -> bool:
        return f"{sid}{STATS_SUFFIX}" in self.meta

    def is_incomplete(self, sid: str) -> bool:
        return f"{sid}{INCOMPLETE_SUFFIX}" in self.meta


class OutputFolder:
    """One output folder, local or remote: the path of every file in it and the operations on them."""

    def __init__(self, out: str | Path | storage.RemotePath):
        self.root = storage.location(out)

    def __str__(self) -> str:
        return str(self.root)

    @property
    def is_remote(self) -> bool:
        """An object store or another non-local filesystem: no O_EXCL lock, resume trusts its listing."""
        return isinstance(self.root, storage.RemotePath)

    # -- names -----------------------------------------------------------------------------
    @property
    def meta(self) -> storage.AnyPath:
        return self.root / META_DIR

    def parquet(self, sid: str) -> storage.AnyPath:
        return self.root / f"{sid}{DATA_SUFFIX}"

    def stats(self, sid: str) -> storage.AnyPath:
        return self.meta / f"{sid}{STATS_SUFFIX}"

    def incomplete(self, sid: str) -> storage.AnyPath:
        """Present while shard ``sid``'s files hold the rows of a source that failed part-way (not done)."""
        return self.meta / f"{sid}{INCOMPLETE_SUFFIX}"

    @property
    def settings_path(self) -> storage.AnyPath:
        return self.meta / SETTINGS_NAME

    @property
    def summary_path(self) -> storage.AnyPath:
        return self.meta / SUMMARY_NAME

    @property
    def lock_path(self) -> storage.AnyPath:
        return self.meta / LOCK_NAME

    # -- what is there -----------------------------------------------------------------------
    def listing(self) -> Listing:
        names = storage.names_in([self.root, self.meta])
        return Listing(frozenset(names[str(self.root)]), frozenset(names[str(self.meta)]))

    def data_files(self) -> list[storage.AnyPath]:
        """The ``{id}.parquet`` files, sorted: never a hidden temporary, never META_DIR."""
        found = (p for p in self.root.glob(f"*{DATA_SUFFIX}") if not p.name.startswith("."))
        return sorted(found, key=str)

    def stats_files(self) -> list[storage.AnyPath]:
        """Every shard's stats file, sorted (done or not: a ``complete: false`` one included)."""
        return sorted(self.meta.glob(f"*{STATS_SUFFIX}"), key=str)

    def temp_files(self, sid: str) -> list[storage.AnyPath]:
        """Leftovers of interrupted attempts at shard ``sid`` (one listing of each folder they may be in)."""
        parquet, stats = self.parquet(sid), self.stats(sid)
        found = [p for p in self.root.glob(f".*{TEMP_SUFFIX}") if p.name.startswith(f".{parquet.name}.")]
        found += [p for p in self.meta.glob(f".*{TEMP_SUFFIX}") if p.name.startswith(f".{stats.name}.")]
        return sorted(found, key=str)

    def clean_temp(self, sid: str) -> int:
        """Delete leftovers of earlier attempts at ``sid``; only call it while no attempt runs."""
        removed = 0
        for path in self.temp_files(sid):
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    # -- the folder's settings -----------------------------------------------------------------
    def check_settings(self, wanted: dict, overwrite: bool) -> bool:
        """Raise ValueError when the folder's rows were made with other settings; True if the file needs writing.

        Rows of 20 and 30 strokes in one folder would make a dataset no loader can
        batch; ``--overwrite`` replaces the listed shards and takes the new settings.
        """
        path = self.settings_path
        try:
            if not path.is_file():  # also an object store's missing key, which some stores report as OSError
                return True
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is unreadable ({exc}): fix or delete it") from None
        if found == wanted:
            return False
        if overwrite:
            return True
        diff = ", ".join(f"{k} {found.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(found) | set(wanted))
                         if found.get(k) != wanted.get(k))  # fmt: skip
        raise ValueError(f"{self} holds rows made with other settings ({diff}); "
                         "use --overwrite to redo the shards with the new ones, or a new --output folder")  # fmt: skip

    def write_settings(self, settings: dict) -> None:
        write_json_atomic(self.settings_path, settings)
