"""Shard specs, shard ids and resume: which shards are done.

A shard spec is anything ``sources.open_source`` opens (a local path, ``file:``,
``http(s)://``, ``pipe:CMD``, or a filesystem URI: ``s3://``, ``gs://``, any
fsspec scheme, see storage.py), with img2dataset's brace ranges
(``laion-art/{00000..00999}.tar``); the output folder may be local or such a
URI. A shard's id is the stem of its tar, so its ``{id}.parquet`` sits beside
the input's own ``{id}.tar`` naming, and its stats file (written last, names in
output_folder.py) says the shard is done, once checked: the stats say the
source was read whole, and the Parquet footer is readable, holds as many
rows as the stats, names that shard's source and records the folder's settings
(local outputs; an object store's resume trusts its listing).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from braceexpand import braceexpand

from . import storage
from .output_folder import OutputFolder
from .redact import redact
from .sources import local_path, scheme

TAR_SUFFIXES = (".tar.gz", ".tar.zst", ".tar.bz2", ".tar.xz", ".tgz", ".tar")
URL_SCHEMES = ("http://", "https://", "pipe:", "file:", "s3://", "gs://", "ais://", "sftp://", "scp://", "ftps://")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._=+-]+$")


@dataclass(frozen=True)
class Shard:
    """One input tar: ``url`` is what sources.open_source opens, ``id`` names its outputs."""

    id: str
    url: str


def _is_url(spec: str) -> bool:
    return spec.startswith(URL_SCHEMES) or scheme(spec) != "file"


def expand_specs(specs: str | list[str] | tuple[str, ...]) -> list[str]:
    """Expand brace ranges, local globs and local folders into a list of shard urls.

    Several specs may be given (a list, or one string separated by whitespace is
    NOT split: a ``pipe:`` command contains spaces). Order is kept, duplicates dropped.
    """
    if isinstance(specs, str):
        specs = [specs]
    urls: list[str] = []
    for spec in specs:
        for url in braceexpand(spec):
            if storage.is_fs_uri(url):
                urls.extend(storage.expand(url, TAR_SUFFIXES))  # a folder or pattern: one listing
            elif not _is_url(url) and os.path.isdir(url):
                # A folder of img2dataset output: its tars, in name order.
                found = sorted(str(p) for p in Path(url).iterdir() if p.name.endswith(TAR_SUFFIXES))
                urls.extend(found)
            elif not _is_url(url) and any(ch in url for ch in "*?["):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    seen: set[str] = set()
    return [u for u in urls if not (u in seen or seen.add(u))]


def shard_id(url: str) -> str:
    """The tar's stem: ``'s3/laion-art/00042.tar'`` -> ``'00042'``.

    For ``pipe:`` commands the last argument that names a tar is used
    (``pipe:curl -s https://host/00042.tar`` -> ``'00042'``).
    """
    target = url
    if url.startswith("pipe:"):
        words = shlex.split(url[len("pipe:"):])
        tars = [w for w in words if urlsplit(w).path.endswith(TAR_SUFFIXES)]
        if not tars:
            raise ValueError(f"cannot tell a shard id from {url!r}: no argument ends in .tar")
        target = tars[-1]
    path = urlsplit(target).path if _is_url(target) else target
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in TAR_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if not name or not _SAFE_ID.match(name) or name.startswith("."):
        raise ValueError(f"cannot tell a shard id from {url!r} (got {name!r})")
    return name


def make_shards(specs: str | list[str] | tuple[str, ...]) -> list[Shard]:
    """Expand specs into shards; two inputs with one id would overwrite each other, so refuse."""
    shards = [Shard(shard_id(url), url) for url in expand_specs(specs)]
    by_id: dict[str, list[str]] = {}
    for shard in shards:
        by_id.setdefault(shard.id, []).append(shard.url)
    clashes = {k: v for k, v in by_id.items() if len(v) > 1}
    if clashes:
        first = next(iter(clashes.items()))
        raise ValueError(f"{len(clashes)} shard ids are used by several inputs, e.g. {first[0]!r}: {first[1]}")
    return shards


INCOMPLETE = "incomplete: its source failed part-way last time"


def same_source(recorded: str | None, url: str) -> bool:
    """Whether a file's recorded source (its footer's ``painterbot.source``) names shard source ``url``.

    Both are compared redacted, so a rerun whose URL carries a new token still matches; local paths are
    compared made absolute (``file:`` or not, ``./`` or not).
    """
    if recorded is None:
        return False
    mine, theirs = redact(url), redact(recorded)
    if mine == theirs:
        return True
    mine_path, their_path = local_path(mine), local_path(theirs)
    if mine_path is None or their_path is None:
        return False
    return os.path.abspath(mine_path) == os.path.abspath(their_path)


def check_done(out_dir: str | Path, sid: str, source: str | None = None, settings: dict | None = None) -> str | None:
    """None when shard ``sid`` is done; otherwise why not (no stats file, incomplete, damaged Parquet file,
    another shard's or another source's rows, rows of other settings).

    The stats file is written after the Parquet file is in place, but a file
    can still be damaged or replaced later (a copy cut short, a full disk, another
    shard's file copied over it): the footer is read (a few KB per shard), its
    row count checked against the stats and its shard id against ``sid``; with
    ``source`` (the shard's url) its recorded source (``same_source``), and with
    ``settings`` (the folder's) the settings it records (``writer.file_settings``).
    """
    folder = OutputFolder(out_dir)
    stats_file, parquet = folder.stats(sid), folder.parquet(sid)
    if not stats_file.is_file():
        return "no stats file"
    try:
        stats = json.loads(stats_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{stats_file.name} is unreadable ({exc})"
    if not isinstance(stats, dict):
        return f"{stats_file.name} is not a JSON object"
    if stats.get("complete") is False:
        return INCOMPLETE
    import pyarrow.parquet as pq

    from .writer import META_PREFIX, file_settings

    try:
        footer = pq.read_metadata(storage.open_input_file(parquet))
        schema = footer.schema.to_arrow_schema()
    except Exception as exc:  # noqa: BLE001 - missing, cut short, not Parquet: all mean redo
        return f"{parquet.name} is missing or unreadable ({type(exc).__name__}: {exc})"
    if footer.num_rows != stats.get("rows"):
        return f"{parquet.name} holds {footer.num_rows} rows, its stats file says {stats.get('rows')}"
    meta = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in (schema.metadata or {}).items()}
    recorded, recorded_id = meta.get(f"{META_PREFIX}source"), meta.get(f"{META_PREFIX}shard_id")
    if source is not None and recorded is not None and not same_source(recorded, source):
        return f"{parquet.name} was made from {redact(recorded)}, not from this run's {redact(source)}"
    if recorded_id is not None and recorded_id != sid:
        return f"{parquet.name} holds the rows of shard {recorded_id}"
    if source is not None and recorded is None and recorded_id is None:
        # Every file the pipeline writes records its source; one written without (a writer given no
        # metadata) must at least name the shard.
        return f"{parquet.name} names neither a source nor a shard"
    if settings is not None:
        found = file_settings(schema)
        if found is None:
            return f"{parquet.name} is not a PainterBot file"
        if found != settings:
            differ = ", ".join(f"{k} {found.get(k)!r} where the folder's is {settings.get(k)!r}"
                               for k in sorted(set(found) | set(settings)) if found.get(k) != settings.get(k))
            return f"{parquet.name} holds rows made with other settings than the folder's ({differ})"
    return None


def is_done(out_dir: str | Path, sid: str) -> bool:
    return check_done(out_dir, sid) is None


def plan(shards: list[Shard], out_dir: str | Path, overwrite: bool = False,
         redo: dict[str, str] | None = None) -> tuple[list[Shard], list[Shard]]:  # fmt: skip
    """Split shards into (to do, already done); ``redo`` receives why each shard with a stats file is redone.

    With ``overwrite`` every stats marker is removed first, so an overwrite run
    that is interrupted is finished by a plain rerun instead of leaving old and
    new shards mixed under the same markers.

    On a local output a listed shard is done only once ``check_done`` passed: its
    footer names the shard's source and records the folder's settings (its settings
    file, checked against the run's before; a folder without one had its footers
    checked against the run's instead: ``OutputFolder.check_settings``).
    """
    # One listing per folder holding markers, not a request per shard: on an object store,
    # 100,000 existence checks would take longer than some runs.
    folder = OutputFolder(out_dir)
    listed = folder.listing()
    if overwrite:
        for shard in shards:
            if listed.has_stats(shard.id):
                folder.stats(shard.id).unlink(missing_ok=True)
        return list(shards), []
    todo, done = [], []
    settings: list[dict | None] = []  # the folder's, read once, when the first shard needs verifying
    for shard in shards:
        # The listing rules out most shards at no cost; those with both files are verified.
        if not listed.has_stats(shard.id):
            why = "no stats file"
        elif not listed.has_parquet(shard.id):
            why = f"{folder.parquet(shard.id).name} is missing"
        elif listed.is_incomplete(shard.id):
            why = INCOMPLETE
        elif not folder.is_remote:
            if not settings:
                settings.append(folder.read_settings())
            # a few KB read per shard: local outputs only
            why = check_done(folder.root, shard.id, source=shard.url, settings=settings[0])
        else:
            # An object store: a request per shard would cost minutes for 100,000 shards, so resume
            # trusts the listing there (the incomplete marker is in it; the footer check is local-only).
            why = None
        (todo if why else done).append(shard)
        if why and redo is not None and why != "no stats file":
            redo[shard.id] = why
    return todo, done


def missing_local(shards: list[Shard]) -> list[str]:
    """Local shard paths that do not exist (a typo in a brace range should fail at once, not shard by shard)."""
    paths = ((s.url, local_path(s.url)) for s in shards)
    return [url for url, path in paths if path is not None and not os.path.isfile(path)]


def expected_samples(shard: Shard) -> int | None:
    """Sample count from img2dataset's own ``{id}_stats.json`` beside a local tar, if any.

    Only used to give the progress bar a total (and so an ETA).
    """
    if _is_url(shard.url) and not shard.url.startswith("file:"):
        return None
    path = Path(shard.url[len("file:"):] if shard.url.startswith("file:") else shard.url)
    stats = path.with_name(f"{shard.id}_stats.json")
    try:
        with open(stats, encoding="utf-8") as handle:
            value = json.load(handle).get("successes")
        return int(value) if value is not None else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None
