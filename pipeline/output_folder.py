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
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs

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


# How a store says the credentials in use may not do what was asked (pyarrow's S3 and GCS errors, botocore's
# codes, HTTP 403) rather than that the object is missing or damaged.
_DENIED = re.compile(r"ACCESS_DENIED|AccessDenied|INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|SIGNATURE_DOES_NOT_MATCH|"
                     r"SignatureDoesNotMatch|EXPIRED_TOKEN|ExpiredToken|InvalidToken|UNAUTHORIZED|Unauthorized|"
                     r"Forbidden|PERMISSION_DENIED|Permission denied|\b403\b|\b401\b")  # fmt: skip
CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (with AWS_SESSION_TOKEN for temporary ones), or AWS_PROFILE "
          "(and AWS_ENDPOINT_URL for a store other than AWS)",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS",
    "gcs": "GOOGLE_APPLICATION_CREDENTIALS",
}


def is_access_denied(exc: BaseException) -> bool:
    """The error says the user or the credentials in use may not read or write there (not: missing, damaged)."""
    return isinstance(exc, PermissionError) or bool(_DENIED.search(str(exc)))


def access_denied(where, exc: BaseException) -> str:
    """What to do when ``where`` (the output folder or a file in it) cannot be reached with the access at hand."""
    where = str(where)
    if "://" not in where:
        reason = getattr(exc, "strerror", None) or exc
        return (f"{where}: this user may not read or write it ({reason}): give it access to the output folder "
                "(its owner and permissions), or pick another --output")  # fmt: skip
    scheme = where.split("://", 1)[0].lower()
    what = CREDENTIALS.get(scheme, f"the credentials of {scheme}:// in the environment")
    return (f"the credentials in use may not read {where} ({exc}): set {what} to credentials that may read and "
            "write the output, or pick another --output")  # fmt: skip


def _settings_diff(found: dict, wanted: dict) -> str:
    """``"strokes 12 -> 30, size 32 -> 64"``: the settings that differ, from ``found`` to ``wanted``."""
    return ", ".join(f"{k} {found.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(found) | set(wanted))
                     if found.get(k) != wanted.get(k))  # fmt: skip


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

    def foreign_names(self) -> list[str]:
        """Names in the folder that are not an output folder's, sorted: anything but ``{id}.parquet`` files, the
        writer's hidden temporaries and META_DIR (one listing; a folder that does not exist holds none)."""

        def ours(name: str, is_file: bool) -> bool:
            if name == META_DIR:
                return not is_file
            if name.startswith("."):
                return is_file and name.endswith(TEMP_SUFFIX)
            return is_file and name.endswith(DATA_SUFFIX)

        if isinstance(self.root, Path):
            entries = [(p.name, p.is_file()) for p in self.root.iterdir()] if self.root.is_dir() else []
        else:
            entries = [(i.base_name, i.type == pafs.FileType.File) for i in self.root.listing()]
        return sorted(name for name, is_file in entries if name and not ours(name, is_file))

    # -- the folder's settings -----------------------------------------------------------------
    def read_settings(self) -> dict | None:
        """The folder's settings file as written (None when there is none); ValueError saying what to do when it
        cannot be read, is not JSON or is not an object, or the access at hand may not read it."""
        path = self.settings_path
        try:
            if not path.is_file():  # also an object store's missing key, which some stores report as OSError
                return None
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            if is_access_denied(exc):
                raise ValueError(access_denied(path, exc)) from None
            raise ValueError(f"{path} is unreadable ({exc}): fix or delete it (a run then takes the folder's "
                             "settings from its Parquet files)") from None  # fmt: skip
        try:
            found = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}): fix or delete it (a run then takes the folder's "
                             "settings from its Parquet files)") from None  # fmt: skip
        if not isinstance(found, dict):
            raise ValueError(f"{path} holds a JSON {type(found).__name__}, not the object of the folder's settings "
                             "(format_version, strokes, size): delete it (a run then takes the folder's settings from "
                             "its Parquet files), or use a new --output folder")  # fmt: skip
        return found

    def recorded_settings(self, parse: Callable, limit: int | None = None) -> dict[str, list[str]]:
        """What the footers of the folder's Parquet files say shaped their rows: settings (JSON) -> file names.

        ``parse`` turns a file's Arrow schema (its key-value metadata with it) into its settings, or None for a
        file that is not PainterBot's (``writer.file_settings``). Files that cannot be read are left out (resume
        redoes their shards), and so are files of other tools; ``limit`` reads only the first ones (by name).
        """
        import pyarrow.parquet as pq

        found: dict[str, list[str]] = {}
        for path in self.data_files()[:limit]:
            try:
                source = storage.open_input_file(path)
                try:
                    settings = parse(pq.read_schema(source))
                finally:
                    if not isinstance(source, str):
                        source.close()
            except Exception:  # noqa: BLE001 - missing, cut short, not Parquet: not a record of the settings
                continue
            if settings is not None:
                found.setdefault(json.dumps(settings, sort_keys=True), []).append(path.name)
        return found

    def check_settings(self, wanted: dict, overwrite: bool, file_settings: Callable | None = None,
                       limit: int | None = None) -> bool:  # fmt: skip
        """Raise ValueError when the folder's rows were made with other settings; True if the file needs writing.

        Rows of 20 and 30 strokes in one folder would make a dataset no loader can
        batch; ``--overwrite`` replaces the listed shards and takes the new settings.
        A folder without a settings file (lost, or older than the file) takes its
        settings from its files' footers when ``file_settings`` parses them
        (``writer.file_settings``; ``limit``: read the first files only, as on an object store).
        """
        found, said = self.read_settings(), ""
        if found is None:
            if overwrite or file_settings is None:
                return True
            recorded = self.recorded_settings(file_settings, limit)
            if len(recorded) > 1:
                kinds = "; ".join(f"{settings} in {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                                  for settings, names in sorted(recorded.items()))  # fmt: skip
                raise ValueError(f"{self} has no {self.settings_path.name} and its Parquet files were made with "
                                 f"different settings ({kinds}); use --overwrite to redo the shards with this run's "
                                 "settings (list them all), or a new --output folder")  # fmt: skip
            if not recorded:
                return True  # a new folder (or one without PainterBot files)
            found = json.loads(next(iter(recorded)))
            said = f", as the footers of its Parquet files say ({self.settings_path} is missing)"
            if found == wanted:
                return True  # the settings file is written back
        if found == wanted:
            return False
        if overwrite:
            return True
        raise ValueError(f"{self} holds rows made with other settings ({_settings_diff(found, wanted)}){said}; "
                         "use --overwrite to redo the shards with the new ones, or a new --output folder")  # fmt: skip

    def write_settings(self, settings: dict) -> None:
        write_json_atomic(self.settings_path, settings)
