"""The output format: one schema, one writer. One Parquet file per input shard, committed atomically, then its stats file.

Rows stream into a hidden temporary file row group by row group (a 10,000-image
shard of 1000 strokes is 400 MB of floats: it is never held whole), and the file
takes its final name once complete (``storage.commit``: an atomic rename locally,
a server-side copy on an object store). The stats file is
written the same way, after it: a reader that sees a shard's stats file can trust
``{id}.parquet``; a reader that sees only ``{id}.parquet`` sees a complete
file from this or an earlier run, never a partial one. The names are output_folder.py's.

The worker writes through ``ShardOutput``, a three-method seam (``add``, ``commit``,
``abort``) opened per attempt by a ``ShardOutputFactory``: ``ShardWriter`` by
default; another output format or store implements those three methods.
"""
from __future__ import annotations

import dataclasses
import json
import math
import uuid
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from encoder import STROKE_FIELDS

from . import storage
from .output_folder import OutputFolder, temp_path, write_json_atomic

FORMAT_VERSION = "2"
COLUMNS = ("key", "caption", "url", "width", "height", "original_width", "original_height", "sha256", "crop_box",
           "status", "error_message", "strokes", "background", "psnr", "fit_seconds", "extra")  # fmt: skip
META_PREFIX = "painterbot."
# Fields of img2dataset's per-sample .json that are columns already (or img2dataset's own download
# status, which would be confused with ours); every other field goes to the ``extra`` column.
_JSON_AS_COLUMNS = {"url", "key", "caption", "status", "error_message", "width", "height", "original_width",
                    "original_height", "sha256"}  # fmt: skip


def strokes_type() -> pa.DataType:
    """``[N, 10]`` float32 per row as a list of fixed-size lists.

    Nested lists are the one layout every reader keeps (pyarrow, pandas, DuckDB's
    ``FLOAT[10][]``, Ray Data, Hugging Face datasets' nested ``List``); Arrow's
    fixed-shape-tensor extension (format 1) is refused by datasets and flattened by pandas.
    The outer list also lets rows of one folder carry different stroke counts.
    """
    return pa.list_(pa.list_(pa.float32(), len(STROKE_FIELDS)))


def make_schema(n_strokes: int, metadata: dict[str, str] | None = None,
                extra_columns: dict[str, str] | None = None) -> pa.Schema:  # fmt: skip
    """The output schema; ``metadata`` values land under ``painterbot.*`` keys of the file.

    ``extra_columns`` (field -> pyarrow type name) adds typed columns after ``extra``, filled from
    the sample's .json (``pipeline.extra_columns`` in the config).
    """
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("sha256", pa.string()),
        pa.field("crop_box", pa.list_(pa.float32(), 4)),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_message", pa.string()),
        pa.field("strokes", strokes_type()),
        pa.field("background", pa.list_(pa.float32(), 3)),
        pa.field("psnr", pa.float32()),
        pa.field("fit_seconds", pa.float32()),
        pa.field("extra", pa.string()),
        *(pa.field(name, pa.type_for_alias(kind)) for name, kind in (extra_columns or {}).items()),
    ]
    meta = {
        f"{META_PREFIX}format_version": FORMAT_VERSION,
        f"{META_PREFIX}stroke_fields": json.dumps(list(STROKE_FIELDS)),
        f"{META_PREFIX}n_strokes": str(n_strokes),
    }
    meta.update({f"{META_PREFIX}{k}": v for k, v in (metadata or {}).items()})
    return pa.schema(fields, metadata=meta)


def encoder_metadata(config) -> dict[str, str]:
    """File metadata recording the encoder settings that made the rows (an ``encoder.FitConfig``)."""
    return {"encoder_config": json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)}


def file_settings(schema: pa.Schema) -> dict | None:
    """The row settings a file's footer records, in the shape of the folder's settings file; None when the file is not
    PainterBot's (no ``painterbot.n_strokes``).

    The format version, the stroke count, the fit size and the typed extra columns (name -> the alias
    ``pipeline.extra_columns`` takes) are what make rows of two files batch together; resume compares them
    with the folder's, and a folder that lost its settings file takes them from here.
    """
    meta = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in (schema.metadata or {}).items()}
    strokes = meta.get(f"{META_PREFIX}n_strokes")
    if strokes is None:
        return None
    try:
        size = json.loads(meta.get(f"{META_PREFIX}encoder_config") or "{}").get("size")
    except (ValueError, AttributeError):
        size = None
    settings = {"format_version": meta.get(f"{META_PREFIX}format_version", "1"),
                "strokes": int(strokes) if strokes.isdigit() else strokes, "size": size}  # fmt: skip
    extra = {f.name: _TYPE_ALIASES.get(str(f.type), str(f.type)) for f in schema if f.name not in COLUMNS}
    if extra:
        settings["extra_columns"] = extra
    return settings


_TYPE_ALIASES = {"double": "float64"}  # Arrow's name of a type -> the alias pipeline.extra_columns spells it with


def center_crop_box(width: int | None, height: int | None) -> list[float] | None:
    """The square the fit target was cut from, ``[left, top, right, bottom]`` in the image's pixels.

    The encoder's ``center_crop_resize`` scales the short side to S and keeps the centre square, so
    the box is the centred min(w, h) square (to within the one-pixel rounding of the resize).
    """
    if not width or not height:
        return None
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return [left, top, left + side, top + side]


def _typed(value, kind: pa.DataType):
    """A .json value as a value of ``kind``, or None when it is not one (a missing or mistyped field)."""
    if value is None or isinstance(value, bool) != pa.types.is_boolean(kind):
        return None
    if pa.types.is_floating(kind):
        # JSON integers are unbounded: one past float64's range does not fit either
        return float(value) if isinstance(value, float) or (isinstance(value, int) and abs(value) < 2**1023) else None
    if pa.types.is_integer(kind):
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        return int(value) if whole and -(2**63) <= value < 2**63 else None
    if pa.types.is_string(kind):
        return value if isinstance(value, str) else None
    return value


_INT32_MAX = 2**31 - 1


def _meta_columns(meta: dict | None, typed: dict[str, pa.DataType]) -> dict:
    """img2dataset's .json -> original_width, original_height, sha256, the ``typed`` columns and ``extra``.

    ``extra`` holds, as JSON, every field that is not a column of its own; a typed field whose value
    does not fit its type stays in ``extra`` (and its column is null), so nothing is lost.
    """
    meta = meta or {}
    kept = {name: _typed(meta.get(name), kind) for name, kind in typed.items()}

    def integer(name):
        # int32 columns: NaN, infinities, fractions, negatives and values past 2**31 - 1 are null there
        # (and kept in extra below) instead of failing the whole shard's table.
        value = meta.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            return None
        return int(value) if 0 <= value <= _INT32_MAX else None

    sizes = {name: integer(name) for name in ("original_width", "original_height")}
    unfit = {name for name, value in sizes.items() if value is None and meta.get(name) is not None}
    if meta.get("sha256") is not None and not isinstance(meta.get("sha256"), str):
        unfit.add("sha256")
    rest = {k: v for k, v in meta.items() if (k not in _JSON_AS_COLUMNS or k in unfit) and kept.get(k) is None}
    sha = meta.get("sha256")
    return {**kept, **sizes,
            "sha256": sha if isinstance(sha, str) else None,
            "extra": json.dumps(rest, sort_keys=True, default=str) if rest else None}  # fmt: skip


def _fixed_list(rows: list, width: int) -> pa.Array:
    """Rows of ``width`` floats (or None) -> fixed_size_list<float32>[width], nulls where None.

    Built from buffers so no Python float is ever touched and it works on every
    pyarrow the project supports; null rows keep zeroed slots (fixed-size layout).
    """
    values = np.zeros((len(rows), width), dtype=np.float32)
    valid = np.zeros(len(rows), dtype=bool)
    for i, row in enumerate(rows):
        if row is not None:
            values[i] = np.asarray(row, dtype=np.float32).reshape(-1)
            valid[i] = True
    child = pa.array(values.reshape(-1), type=pa.float32())
    validity = None if valid.all() else pa.array(valid, type=pa.bool_()).buffers()[1]
    return pa.Array.from_buffers(pa.list_(pa.float32(), width), len(rows), [validity], children=[child])


def _stroke_lists(rows: list) -> pa.Array:
    """Rows of ``[N_i, 10]`` strokes (or None) -> list<fixed_size_list<float32, 10>>, nulls where None."""
    width = len(STROKE_FIELDS)
    arrays = [np.asarray(r, dtype=np.float32).reshape(-1, width) for r in rows if r is not None]
    lengths = np.array([0 if r is None else len(np.asarray(r).reshape(-1, width)) for r in rows], dtype=np.int32)
    values = np.concatenate(arrays) if arrays else np.zeros((0, width), np.float32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=pa.float32()), width)
    mask = pa.array([r is None for r in rows], type=pa.bool_())
    return pa.ListArray.from_arrays(offsets, inner, type=strokes_type(), mask=mask)


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Row dicts -> a Table of ``schema``.

    A row has keys of COLUMNS (strokes an ``[N, 10]`` array or None) and optionally ``meta``, the
    sample's parsed .json, from which original_width, original_height, sha256 and extra are taken;
    crop_box is derived from width and height.
    """
    typed = {name: schema.field(name).type for name in schema.names[len(COLUMNS):]}
    rows = [{**row, **_meta_columns(row.get("meta"), typed),
             "crop_box": center_crop_box(row.get("width"), row.get("height"))} for row in rows]  # fmt: skip
    columns = {}
    for name in (*COLUMNS, *typed):
        values = [row.get(name) for row in rows]
        if name == "strokes":
            columns[name] = _stroke_lists(values)
        elif name in ("background", "crop_box"):
            columns[name] = _fixed_list(values, schema.field(name).type.list_size)
        else:
            columns[name] = pa.array(values, type=schema.field(name).type)
    return pa.Table.from_pydict(columns, schema=schema)


class ParquetRowWriter:
    """Streams rows into a hidden temporary sibling of ``path``; ``commit`` renames it to ``path``.

    The one way PainterBot writes an output file: shards (``ShardWriter``) and
    single-image fits (``python -m pipeline fit -o``) alike, so every file has
    the same schema and is read by the same loader. Not thread-safe: one
    writer thread owns it.
    """

    def __init__(self, path: str | Path, n_strokes: int, metadata: dict[str, str] | None = None,
                 row_group_size: int = 256, extra_columns: dict[str, str] | None = None):  # fmt: skip
        self.final = storage.location(path)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.schema = make_schema(n_strokes, metadata, extra_columns)
        self.tmp = temp_path(self.final, uuid.uuid4().hex[:12])
        self.row_group_size = row_group_size
        self.rows = 0
        self._pending: list[dict] = []
        # Opened now, so an empty shard still yields a valid (empty) Parquet file.
        where, filesystem = storage.arrow_target(self.tmp)
        self._writer = pq.ParquetWriter(where, self.schema, filesystem=filesystem)

    def add(self, rows: list[dict]) -> None:
        self._pending.extend(rows)
        while len(self._pending) >= self.row_group_size:
            self._write(self._pending[: self.row_group_size])
            self._pending = self._pending[self.row_group_size :]

    def _write(self, rows: list[dict]) -> None:
        if rows:
            self._writer.write_table(rows_to_table(rows, self.schema), row_group_size=len(rows))
            self.rows += len(rows)

    def commit(self) -> Path:
        """Finish the file and move it into place; returns its final path."""
        self._write(self._pending)
        self._pending = []
        self._writer.close()
        storage.commit(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        """Drop the temporary file of a failed attempt."""
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - already broken; the file goes anyway
            pass
        self.tmp.unlink(missing_ok=True)


class ShardOutput(Protocol):
    """Where one attempt at one shard puts its rows: the worker's writer seam.

    The worker opens one per attempt through a ``ShardOutputFactory``, hands it
    the rows in input order from one thread, then either commits it (the shard's
    stats in, the stats as recorded out: at least ``rows``, the rows written) or
    aborts it (any error: nothing may be left under a final name). A commit of
    stats with ``complete: false`` keeps the rows of a source that failed
    part-way, and must not read as done. ``ShardWriter`` is the Parquet one.
    """

    def add(self, rows: list[dict]) -> None: ...

    def commit(self, stats: dict) -> dict: ...

    def abort(self) -> None: ...


class ShardOutputFactory(Protocol):
    """Opens a ``ShardOutput`` for shard ``shard_id`` of output folder ``out_dir`` (``ShardWriter`` is one).

    A factory travels to Ray workers, so it must pickle: a class or a module-level function.
    """

    def __call__(self, out_dir: str, shard_id: str, n_strokes: int, metadata: dict[str, str] | None = None,
                 row_group_size: int = 256, extra_columns: dict[str, str] | None = None) -> ShardOutput: ...


class ShardWriter(ParquetRowWriter):
    """``{id}.parquet`` of one shard, then its stats file (the done marker), in that order: a ``ShardOutput``."""

    def __init__(self, out_dir: str | Path, shard_id: str, n_strokes: int,
                 metadata: dict[str, str] | None = None, row_group_size: int = 256,
                 extra_columns: dict[str, str] | None = None):  # fmt: skip
        self.folder = OutputFolder(out_dir)
        self.shard_id = shard_id
        super().__init__(self.folder.parquet(shard_id), n_strokes, {"shard_id": shard_id, **(metadata or {})},
                         row_group_size, extra_columns)

    def commit(self, stats: dict) -> dict:  # type: ignore[override]
        """Finish the Parquet file, move it into place, then write the stats (the done marker).

        Stats with ``complete: false`` (the source failed part-way) get an incomplete
        marker first, which a listing shows: resume on an object store, which reads no stats
        file, still redoes the shard. A complete commit removes the marker, after its stats.
        """
        marker = self.folder.incomplete(self.shard_id)
        if stats.get("complete") is False:
            write_json_atomic(marker, {"shard_id": self.shard_id, "errors": stats.get("errors", [])})
        super().commit()
        stats = {**stats, "rows": self.rows, "parquet": self.final.name, "parquet_bytes": self.final.stat().st_size}
        write_json_atomic(self.folder.stats(self.shard_id), stats)
        if stats.get("complete") is not False:
            marker.unlink(missing_ok=True)
        return stats
