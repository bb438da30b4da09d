"""Shard specs, shard ids, done markers and resume.

A shard spec is anything webdataset's ``gopen`` opens (a local path, ``file:``,
``http(s)://``, ``pipe:CMD``) or a filesystem URI (``s3://``, ``gs://``, any
fsspec scheme: see storage.py), with img2dataset's brace ranges
(``laion-art/{00000..00999}.tar``); the output folder may be local or such a
URI. A shard's id is the stem of its tar, so
``OUT/{id}.parquet`` sits beside the input's own ``{id}.tar`` naming, and
``OUT/{id}_stats.json`` (written last) says the shard is done.
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

from . import storage

TAR_SUFFIXES = (".tar.gz", ".tar.zst", ".tar.bz2", ".tar.xz", ".tgz", ".tar")
URL_SCHEMES = ("http://", "https://", "pipe:", "file:", "s3://", "gs://", "ais://", "sftp://", "scp://", "ftps://")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._=+-]+$")


@dataclass(frozen=True)
class Shard:
    """One input tar: ``url`` is what gopen opens, ``id`` names its outputs."""

    id: str
    url: str


def _is_url(spec: str) -> bool:
    return spec.startswith(URL_SCHEMES)


def expand_specs(specs: str | list[str] | tuple[str, ...]) -> list[str]:
    """Expand brace ranges, local globs and local folders into a list of shard urls.

    Several specs may be given (a list, or one string separated by whitespace is
    NOT split: a ``pipe:`` command contains spaces). Order is kept, duplicates dropped.
    """
    # Imported here: the writer imports this module for its paths, and reading or writing output
    # files (benchmarks on a bare GPU box) should need only torch, numpy, pillow and pyarrow.
    from braceexpand import braceexpand

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


# Paths below are pathlib.Path for local folders, storage.RemotePath for object stores.
def parquet_path(out_dir: str | Path, sid: str) -> Path:
    return storage.location(out_dir) / f"{sid}.parquet"


# Everything that is not a Parquet data file lives in this folder, so that readers pointed at the
# output folder see only data: pyarrow.dataset (and pandas, Ray Data through it) skip names
# starting with "_" or ".", and Hugging Face datasets skips folders starting with "__" (a single
# "_" is not enough for it: its stats files would outnumber the Parquet files and win the builder).
META_DIR = "__painterbot__"


def meta_dir(out_dir: str | Path) -> Path:
    return storage.location(out_dir) / META_DIR


def stats_path(out_dir: str | Path, sid: str) -> Path:
    return meta_dir(out_dir) / f"{sid}_stats.json"


def temp_path(final: Path, tag: str) -> Path:
    """A hidden sibling of ``final``: same filesystem (so the commit is atomic),
    invisible to ``*.parquet`` globs, unique per attempt."""
    return final.with_name(f".{final.name}.{tag}.tmp")


def temp_files(out_dir: str | Path, sid: str) -> list[Path]:
    """Leftovers of interrupted attempts at shard ``sid`` (one listing of each folder they may be in)."""
    stats = stats_path(out_dir, sid)
    found = [p for p in storage.location(out_dir).glob(".*.tmp") if p.name.startswith(f".{sid}.parquet.")]
    found += [p for p in stats.parent.glob(".*.tmp") if p.name.startswith(f".{stats.name}.")]
    return sorted(found, key=str)


def clean_temp(out_dir: str | Path, sid: str) -> int:
    """Delete leftovers of earlier attempts at ``sid``; only call it while no attempt runs."""
    removed = 0
    for path in temp_files(out_dir, sid):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def is_done(out_dir: str | Path, sid: str) -> bool:
    """Done means the stats file exists: it is written after the Parquet file is in place."""
    return stats_path(out_dir, sid).is_file() and parquet_path(out_dir, sid).is_file()


def plan(shards: list[Shard], out_dir: str | Path, overwrite: bool = False) -> tuple[list[Shard], list[Shard]]:
    """Split shards into (to do, already done).

    With ``overwrite`` every stats marker is removed first, so an overwrite run
    that is interrupted is finished by a plain rerun instead of leaving old and
    new shards mixed under the same markers.
    """
    # One listing per folder holding markers, not a request per shard: on an object store,
    # 100,000 existence checks would take longer than some runs.
    markers = {s.id: (stats_path(out_dir, s.id), parquet_path(out_dir, s.id)) for s in shards}
    present = storage.names_in({p.parent for pair in markers.values() for p in pair})

    def exists(path) -> bool:
        return path.name in present[str(path.parent)]

    if overwrite:
        for stats, _ in markers.values():
            if exists(stats):
                stats.unlink(missing_ok=True)
        return list(shards), []
    done_ids = {sid for sid, (stats, parquet) in markers.items() if exists(stats) and exists(parquet)}
    return [s for s in shards if s.id not in done_ids], [s for s in shards if s.id in done_ids]


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
