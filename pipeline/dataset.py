"""Map-style loading of Parquet stroke datasets for small sets: ``StrokeDataset`` and ``read_row``.

For training on a large folder, or on several GPUs, use ``pipeline.stream.StrokeStream``: it
streams row groups in a shuffled order and splits them across ranks and workers. This class is
for random access (``data[i]``) to a set that is small enough for its index: it keeps three small
integer arrays per served row (file, row group, position) and reads the strokes a row group at a
time, with a few row groups cached, so iterating in order costs one read per row group.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from torch.utils.data import Dataset

from . import storage
from .records import Status
from .columns import OK_ONLY, filter_columns, keep_mask, open_file, parquet_files, read_rows, table_rows

DEFAULT_COLUMNS = ("key", "caption", "url", "strokes", "background", "psnr")


class StrokeDataset(Dataset):
    """Rows of output Parquet files as dicts: ``key``, ``caption``, ``url``, ``strokes`` ``[N, 10]``
    float32 tensor, ``background`` ``[3]`` tensor, ``psnr`` float (or the ``columns`` asked for).

    source: folder, glob, file or list of them; min_psnr: drop rows below it; statuses: the
    statuses served (``("ok",)``; rows of other statuses have no strokes).
    """

    def __init__(self, source, min_psnr: float | None = None, in_memory: bool = False, cache_row_groups: int = 4,
                 columns=DEFAULT_COLUMNS, statuses=OK_ONLY):  # fmt: skip
        self.files = parquet_files(source)
        self.columns, self.min_psnr, self.statuses = list(columns), min_psnr, statuses
        self.cache_row_groups = cache_row_groups
        self._handles = [open_file(path) for path in self.files]
        index = []  # (file, row group, position among the group's kept rows) per served row
        for f, handle in enumerate(self._handles):
            filtered = handle.read(columns=filter_columns([], statuses, min_psnr))
            keep = keep_mask(filtered, statuses, min_psnr)
            start = 0
            for g in range(handle.num_row_groups):
                size = handle.metadata.row_group(g).num_rows
                kept = int(keep[start : start + size].sum())
                index.append(np.stack([np.full(kept, f), np.full(kept, g), np.arange(kept)], axis=1))
                start += size
        self._index = np.concatenate(index).astype(np.int64) if index else np.zeros((0, 3), np.int64)
        self._cache: OrderedDict = OrderedDict()
        self._memory = [self._load(i) for i in range(len(self))] if in_memory else None

    def __len__(self) -> int:
        return len(self._index)

    def _group(self, f: int, g: int) -> list[dict]:
        hit = self._cache.get((f, g))
        if hit is None:
            hit = read_rows(self._handles[f], g, self.columns, self.statuses, self.min_psnr)
            self._cache[(f, g)] = hit
            while len(self._cache) > max(1, self.cache_row_groups):
                self._cache.popitem(last=False)
        self._cache.move_to_end((f, g))
        return hit

    def _load(self, i: int) -> dict:
        f, g, k = (int(v) for v in self._index[i])
        return self._group(f, g)[k]

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._memory[i] if self._memory is not None else self._load(i)


def read_row(path: str | Path, key: str) -> dict:
    """One row of an output file by key, whatever its status (strokes/background None for failures)."""
    where, filesystem = storage.arrow_target(path)
    table = pq.read_table(where, filesystem=filesystem, filters=[("key", "=", key)])
    if len(table) == 0:
        raise KeyError(f"{key!r} not in {path}")
    row = table_rows(table, table.column_names, np.arange(1))[0]
    if row["status"] != Status.OK:
        row["strokes"] = row["background"] = None
    return row
