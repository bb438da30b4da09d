"""What img2dataset says about the URLs behind the shards: ``upstream_counts(shard urls)``.

img2dataset writes ``{id}_stats.json`` beside each ``{id}.tar``: how many URLs the shard's part of
the list held (``count``), how many became samples (``successes``), how many failed to download
or to resize, and its messages by frequency (``status_dict``). The shards hold only the
successes, so without these files a run's summary cannot account for the URLs a user started
from. Summed here for the run's summary (``upstream``), the terminal and the gallery.

The files are data, read as such: a bounded size, numbers checked, messages redacted and cut
short; a file that is missing or unreadable is counted, never an error. Only sources with a
folder are looked at (local paths, ``file:``, object-store URIs); for ``http(s)://`` and ``pipe:``
sources nothing extra is fetched.
"""
from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from . import storage
from .redact import redact
from .sources import local_path

STATS_SUFFIX = "_stats.json"
MAX_STATS_BYTES = 1 << 20  # img2dataset's are a few hundred bytes; a larger file is not one of them
COUNTS = ("count", "successes", "failed_to_download", "failed_to_resize")
TOP_ERRORS = 10
MAX_MESSAGE = 300


def stats_location(url: str) -> str | None:
    """Where img2dataset's stats file of the shard at ``url`` would be, or None (no folder to look in)."""
    path = local_path(url)
    target = path if path is not None else (url if storage.is_fs_uri(url) else None)
    for suffix in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar"):
        if target is not None and target.endswith(suffix):
            return target[: -len(suffix)] + STATS_SUFFIX
    return None


def _read(location: str) -> dict | None:
    """The parsed stats file, or None: missing, unreadable, too large, not a JSON object."""
    try:
        with storage.open_input_stream(location) as handle:
            data = handle.read(MAX_STATS_BYTES + 1)
        if len(data) > MAX_STATS_BYTES:
            return None
        stats = json.loads(data)
    except (OSError, ValueError, RecursionError):
        return None
    return stats if isinstance(stats, dict) else None


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def upstream_counts(urls: list[str]) -> dict:
    """The sums of img2dataset's stats files beside the shards at ``urls``.

    ``{"shards_with_stats", "shards_without_stats", "count", "successes", "failed_to_download",
    "failed_to_resize", "errors": [[message, count], ...]}`` (errors: the most frequent first).
    """
    totals = dict.fromkeys(COUNTS, 0)
    errors: Counter = Counter()
    found = 0
    # Object stores answer one small GET at a time: a few in flight keep 10,000 shards to seconds.
    with ThreadPoolExecutor(16) as pool:
        read = list(pool.map(lambda location: _read(location) if location else None, map(stats_location, urls)))
    for stats in read:
        counts = {name: _count(stats.get(name)) for name in COUNTS} if stats else {}
        if not stats or None in counts.values():
            continue
        found += 1
        for name, value in counts.items():
            totals[name] += value
        status_dict = stats.get("status_dict")
        for message, n in (status_dict.items() if isinstance(status_dict, dict) else ()):
            if isinstance(message, str) and message != "success" and _count(n):
                errors[redact(message)[:MAX_MESSAGE]] += n
    return {"shards_with_stats": found, "shards_without_stats": len(urls) - found, **totals,
            "errors": [[m, n] for m, n in errors.most_common(TOP_ERRORS)]}


def describe(upstream: dict) -> str:
    """One line for the terminal's summary."""
    if not upstream.get("shards_with_stats"):
        return (f"no img2dataset stats files beside the {upstream.get('shards_without_stats', 0)} shard(s): "
                "URLs that failed before the shards are not counted")
    n = {k: upstream.get(k, 0) for k in (*COUNTS, "shards_without_stats")}  # a summary read back is data
    line = (f"{n['count']} URLs in img2dataset's lists: {n['successes']} downloaded, "
            f"{n['failed_to_download']} failed to download, {n['failed_to_resize']} failed to resize")
    if n["shards_without_stats"]:
        line += f" ({n['shards_without_stats']} shard(s) without a stats file)"
    return line
