"""Load Parquet stroke datasets for training: ``StrokeDataset`` and ``read_row``.

Only ``status == 'ok'`` rows are served. The small columns (key, caption,
psnr) are read up front to build the index; strokes are read a row group at a
time when first asked for and a few row groups stay cached, so a dataset far
larger than memory can be iterated in file order (shuffle by file or row group
for training, or pass ``in_memory=True`` for small sets and full shuffles).
"""
from __future__ import annotations

import glob
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

import encoder

from . import storage

INDEX_COLUMNS = ["key", "caption", "url", "status", "psnr"]


def parquet_files(source: str | Path | list) -> list[str]:
    """A folder (its ``*.parquet``), a glob, a file, or a list of those -> sorted file paths.

    Local paths or filesystem URIs (``s3://bucket/out``, see storage.py). Hidden
    files are skipped: the writer's in-progress files are ``.{id}.parquet.*.tmp``.
    """
    if isinstance(source, (list, tuple)):
        return [f for s in source for f in parquet_files(s)]
    source = str(source)
    if storage.is_fs_uri(source):
        found = storage.expand(source, (".parquet",))  # one listing for a folder or pattern
        if not found:
            raise FileNotFoundError(f"no Parquet files at {source}")
        return found
    if os.path.isdir(source):
        found = glob.glob(os.path.join(source, "*.parquet"))
    elif any(ch in source for ch in "*?["):
        found = glob.glob(source)
    elif os.path.isfile(source):
        found = [source]
    else:
        raise FileNotFoundError(f"no Parquet files at {source}")
    return sorted(f for f in found if not os.path.basename(f).startswith("."))


def fixed_rows(column: pa.ChunkedArray | pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """A strokes (fixed_shape_tensor) or background (fixed_size_list) column -> ``[rows, *shape]`` float32.

    Null rows come out as NaN: callers select ok rows, which are never null.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    storage = column.storage if isinstance(column, pa.ExtensionArray) else column
    values = storage.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    values = values.reshape(-1, *shape)
    return values[storage.offset : storage.offset + len(storage)]


def _stroke_shape(schema: pa.Schema) -> tuple[int, int]:
    kind = schema.field("strokes").type
    if isinstance(kind, pa.FixedShapeTensorType):
        return tuple(kind.shape)
    width = len(encoder.STROKE_FIELDS)
    return (kind.list_size // width, width)  # read by an Arrow without the extension


class StrokeDataset(Dataset):
    """Rows of output Parquet files as dicts: ``key``, ``caption``, ``url``, ``strokes`` ``[N, 10]``
    float32 tensor, ``background`` ``[3]`` tensor, ``psnr`` float.

    source: folder, glob, file or list of them; min_psnr: drop rows below it.
    """

    def __init__(self, source, min_psnr: float | None = None, in_memory: bool = False, cache_row_groups: int = 4):
        self.files = parquet_files(source)
        self.min_psnr = min_psnr
        self.cache_row_groups = cache_row_groups
        keys, captions, urls, psnrs, file_idx, rows = [], [], [], [], [], []
        self._group_starts: list[np.ndarray] = []
        self._shapes: list[tuple[int, int]] = []
        for f, path in enumerate(self.files):
            meta = pq.ParquetFile(storage.open_input_file(path))
            self._shapes.append(_stroke_shape(meta.schema_arrow))
            sizes = [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self._group_starts.append(np.cumsum([0] + sizes))
            table = meta.read(columns=INDEX_COLUMNS)
            keep = pc.equal(table["status"], "ok")
            if min_psnr is not None:
                keep = pc.and_(keep, pc.greater_equal(table["psnr"], min_psnr))
            keep = keep.to_numpy(zero_copy_only=False).astype(bool) if len(table) else np.zeros(0, bool)
            where = np.flatnonzero(keep)
            keys += table["key"].take(where).to_pylist()
            captions += table["caption"].take(where).to_pylist()
            urls += table["url"].take(where).to_pylist()
            psnrs.append(table["psnr"].take(where).to_numpy(zero_copy_only=False))
            file_idx.append(np.full(len(where), f, dtype=np.int32))
            rows.append(where.astype(np.int64))
        self.keys, self.captions, self.urls = keys, captions, urls
        self.psnr = np.concatenate(psnrs).astype(np.float32) if psnrs else np.zeros(0, np.float32)
        self._file = np.concatenate(file_idx) if file_idx else np.zeros(0, np.int32)
        self._row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self._cache: OrderedDict = OrderedDict()
        self._memory = None
        if in_memory:
            self._memory = [self._load(i) for i in range(len(self))]

    def __len__(self) -> int:
        return len(self.keys)

    def _group(self, f: int, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Strokes ``[rows, N, 10]`` and backgrounds ``[rows, 3]`` of row group g of file f, cached."""
        hit = self._cache.get((f, g))
        if hit is not None:
            self._cache.move_to_end((f, g))
            return hit
        source = storage.open_input_file(self.files[f])
        table = pq.ParquetFile(source).read_row_group(g, columns=["strokes", "background"])
        value = (fixed_rows(table["strokes"], self._shapes[f]), fixed_rows(table["background"], (3,)))
        self._cache[(f, g)] = value
        while len(self._cache) > max(1, self.cache_row_groups):
            self._cache.popitem(last=False)
        return value

    def _load(self, i: int) -> dict:
        f, row = int(self._file[i]), int(self._row[i])
        starts = self._group_starts[f]
        g = int(np.searchsorted(starts, row, side="right") - 1)
        strokes, background = self._group(f, g)
        return {
            "key": self.keys[i],
            "caption": self.captions[i],
            "url": self.urls[i],
            "strokes": torch.from_numpy(strokes[row - starts[g]].copy()),
            "background": torch.from_numpy(background[row - starts[g]].copy()),
            "psnr": float(self.psnr[i]),
        }

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
    row = {name: table[name][0].as_py() for name in ("key", "caption", "url", "width", "height", "status",
                                                        "error_message", "psnr", "fit_seconds")}  # fmt: skip
    ok = row["status"] == "ok"
    shape = _stroke_shape(table.schema)
    row["strokes"] = torch.from_numpy(fixed_rows(table["strokes"], shape)[0].copy()) if ok else None
    row["background"] = torch.from_numpy(fixed_rows(table["background"], (3,))[0].copy()) if ok else None
    return row
