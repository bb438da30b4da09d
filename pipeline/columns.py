"""Output Parquet -> Python rows: the one place that knows how the columns are stored.

Both loaders (the map-style ``dataset.StrokeDataset`` and the streaming
``stream.StrokeStream``) and the gallery read through here, so a format change
touches one module. Format 2 stores strokes as ``list<fixed_size_list<float32,
10>>``; format 1 files (Arrow's fixed-shape-tensor extension, one N per file)
are still read, so a folder encoded before the bump keeps loading. Files of a
newer format than this code knows are refused with a message saying so.
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

import encoder

from . import storage
from .output_folder import DATA_SUFFIX, OutputFolder
from .records import Status

KNOWN_FORMATS = ("1", "2")
# The loaders' default: rows with strokes (records.Status lists every status a row may have).
OK_ONLY = (Status.OK.value,)
WIDTH = len(encoder.STROKE_FIELDS)


def parquet_files(source: str | Path | list) -> list[str]:
    """A folder (its ``*.parquet``), a glob, a file, or a list of those -> sorted file paths.

    Local paths or filesystem URIs (``s3://bucket/out``, see storage.py). Hidden
    files are skipped: the writer's in-progress files are hidden (output_folder.py).
    """
    if isinstance(source, (list, tuple)):
        return [f for s in source for f in parquet_files(s)]
    source = str(source)
    if storage.is_fs_uri(source):
        found = storage.expand(source, (DATA_SUFFIX,))  # one listing for a folder or pattern
        if not found:
            raise FileNotFoundError(f"no Parquet files at {source}")
        return found
    if os.path.isdir(source):
        found = [str(p) for p in OutputFolder(source).data_files()]
    elif any(ch in source for ch in "*?["):
        found = glob.glob(source)
    elif os.path.isfile(source):
        found = [source]
    else:
        raise FileNotFoundError(f"no Parquet files at {source}")
    return sorted(f for f in found if not os.path.basename(f).startswith("."))


REQUIRED_COLUMNS = ("key", "status", "strokes")


def open_file(path: str | Path) -> pq.ParquetFile:
    """Open an output file; ValueError naming the file for one that is damaged, is not PainterBot's
    (a Parquet file of another tool in the folder) or was written by a newer PainterBot."""
    try:
        handle = pq.ParquetFile(storage.open_input_file(path))
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc}); "
                         "move it out of the folder, or point the loader at the PainterBot files") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in handle.schema_arrow.names]
    if missing:
        raise ValueError(f"{path}: not a PainterBot output file (no {', '.join(missing)} column); move it out of "
                         "the folder, or point the loader at the PainterBot files") from None
    meta = handle.schema_arrow.metadata or {}
    version = meta.get(b"painterbot.format_version", b"1").decode()
    if version not in KNOWN_FORMATS:
        raise ValueError(f"{path}: PainterBot output format {version}; this code reads formats "
                         f"{', '.join(KNOWN_FORMATS)} (upgrade painterbot)")  # fmt: skip
    return handle


def file_metadata(handle: pq.ParquetFile) -> dict[str, str]:
    """The ``painterbot.*`` metadata of an open file, prefix stripped."""
    meta = handle.schema_arrow.metadata or {}
    return {k.decode()[len("painterbot."):]: v.decode() for k, v in meta.items() if k.startswith(b"painterbot.")}


def _one_chunk(column):
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def stroke_arrays(column) -> tuple[np.ndarray, np.ndarray]:
    """A strokes column -> (values ``[M, 10]`` float32, offsets ``[rows + 1]``).

    Row i's strokes are ``values[offsets[i]:offsets[i + 1]]``; null rows are empty (format 2) or
    zero-filled (format 1). No copy is made when the column is one chunk.
    """
    column = _one_chunk(column)
    if isinstance(column, pa.ExtensionArray):  # format 1: fixed_shape_tensor, N fixed per file
        n = int(np.prod(column.type.shape)) // WIDTH
        values = fixed_rows(column.storage, (n, WIDTH)).reshape(-1, WIDTH)
        return values, np.arange(len(column) + 1, dtype=np.int64) * n
    if pa.types.is_fixed_size_list(column.type):  # format 1 read by an Arrow without the extension
        n = column.type.list_size // WIDTH
        return fixed_rows(column, (n, WIDTH)).reshape(-1, WIDTH), np.arange(len(column) + 1, dtype=np.int64) * n
    offsets = column.offsets.to_numpy().astype(np.int64)
    inner = column.values  # offsets index into it, whatever the outer slice
    flat = inner.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(-1, WIDTH), offsets


def fixed_rows(column, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed_size_list column (background, crop_box) -> ``[rows, *shape]`` float32; null rows hold zeros."""
    column = _one_chunk(column)
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    size = int(np.prod(shape))
    return values[column.offset * size : (column.offset + len(column)) * size].reshape(-1, *shape)


def keep_mask(table: pa.Table, statuses=OK_ONLY, min_psnr: float | None = None) -> np.ndarray:
    """Rows whose status is one of ``statuses`` (None: any) and whose PSNR is at least ``min_psnr``."""
    keep = pa.array(np.ones(len(table), bool))
    if statuses is not None:
        keep = pc.is_in(table["status"], value_set=pa.array([Status(s).value for s in statuses], pa.string()))
    if min_psnr is not None:
        keep = pc.and_(keep, pc.fill_null(pc.greater_equal(table["psnr"], min_psnr), False))
    return np.asarray(_one_chunk(keep).to_numpy(zero_copy_only=False), dtype=bool)


def filter_columns(columns, statuses, min_psnr) -> list[str]:
    """The columns to read: those asked for plus those the filter needs."""
    need = list(columns)
    for name, used in (("status", statuses is not None), ("psnr", min_psnr is not None)):
        if used and name not in need:
            need.append(name)
    return need


def table_rows(table: pa.Table, columns, where: np.ndarray) -> list[dict]:
    """Rows ``where`` of a table as dicts of ``columns``: strokes ``[N, 10]``, fixed-size lists as tensors.

    Tensors are copies, so a row outlives its row group: a shuffle buffer of rows holds only those
    rows, not every row group they came from.
    """
    out = [dict() for _ in where]
    for name in columns:
        column = table[name]
        if name == "strokes":
            values, offsets = stroke_arrays(column)
            for row, i in zip(out, where):
                row[name] = torch.from_numpy(values[offsets[i] : offsets[i + 1]].copy())
        elif pa.types.is_fixed_size_list(column.type):
            values = fixed_rows(column, (column.type.list_size,))
            for row, i in zip(out, where):
                row[name] = torch.from_numpy(values[i].copy())
        else:
            picked = _one_chunk(column).take(pa.array(where, pa.int64())).to_pylist()
            for row, value in zip(out, picked):
                row[name] = value
    return out


def read_rows(handle: pq.ParquetFile, group: int, columns, statuses=OK_ONLY, min_psnr: float | None = None) -> list[dict]:
    """The rows of one row group that pass the filter, reading only ``columns`` and the filter's."""
    table = handle.read_row_group(group, columns=filter_columns(columns, statuses, min_psnr))
    return table_rows(table, columns, np.flatnonzero(keep_mask(table, statuses, min_psnr)))


def encoder_size(handle: pq.ParquetFile, default: int = 256) -> int:
    """The fit resolution S recorded in a file's metadata."""
    try:
        return int(json.loads(file_metadata(handle)["encoder_config"])["size"])
    except (KeyError, ValueError, TypeError):
        return default
