"""The vocabulary the stages share: row statuses, the decoded record, the output row, per-shard tallies.

One place for each, so the reader, the worker, the driver and the docs
(output_schema.md, section 4) cannot drift apart on what a status means or
how images, ok rows and PSNR are counted.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch


class Status(str, Enum):
    """A row's ``status`` column. Only OK rows carry strokes."""

    OK = "ok"
    MISSING_IMAGE = "missing_image"  # no member with an image extension
    DECODE_ERROR = "decode_error"  # empty, undecodable or unusable image bytes
    TOO_LARGE = "too_large"  # pixel count over max_image_pixels, or a member over max_member_bytes
    TOO_SMALL = "too_small"  # short side under min_image_side
    DUPLICATE_KEY = "duplicate_key"  # the key already named an earlier sample of the shard (that one is kept)
    LINK_MEMBER = "link_member"  # a member is a symbolic or hard link: never followed
    FIT_ERROR = "fit_error"  # fit_batch raised on this image alone
    FIT_FAILED = "fit_failed"  # the fit diverged or returned non-finite values


@dataclass
class Record:
    """One input sample. ``status == OK`` means ``target`` is ready to fit;
    any other status is a failure row with ``error_message`` saying why."""

    key: str
    caption: str | None = None
    url: str | None = None
    width: int | None = None  # original size, after EXIF rotation; None if undecodable
    height: int | None = None
    status: Status = Status.OK
    error_message: str | None = None
    target: torch.Tensor | None = None  # [3, S, S] float32 in [0, 1]
    meta: dict | None = None  # the sample's parsed .json (img2dataset's fields and the user's extra columns)


@dataclass
class FitResult:
    """What the fit says about one image (the worker's half of a row)."""

    status: Status
    error_message: str | None = None
    strokes: np.ndarray | None = None  # [N, 10] float32
    background: np.ndarray | None = None  # [3] float32
    psnr: float | None = None
    fit_seconds: float | None = None


@dataclass
class Row:
    """One output row: a record's fields, plus the fit's when the image reached the fit."""

    key: str
    caption: str | None
    url: str | None
    width: int | None
    height: int | None
    status: Status
    error_message: str | None = None
    strokes: np.ndarray | None = None
    background: np.ndarray | None = None
    psnr: float | None = None
    fit_seconds: float | None = None
    # The sample's parsed .json: the writer takes original_width, original_height, sha256 and the
    # ``extra`` column from it, and derives crop_box from width and height (output format 2).
    meta: dict | None = None

    @classmethod
    def make(cls, record: Record, fit: FitResult | None = None) -> "Row":
        row = cls(record.key, record.caption, record.url, record.width, record.height, record.status,
                  record.error_message, meta=record.meta)  # fmt: skip
        if fit is not None:
            row.status, row.error_message = fit.status, fit.error_message
            row.strokes, row.background, row.psnr, row.fit_seconds = fit.strokes, fit.background, fit.psnr, fit.fit_seconds
        return row

    def as_dict(self) -> dict:
        """The writer's row dict (``writer.rows_to_table`` takes plain values: the status as its string)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["status"] = Status(self.status).value
        return out


@dataclass
class Tally:
    """Images, ok rows, PSNR sum and rows per status: of a shard in progress, a finished shard, or a run."""

    images: int = 0
    ok: int = 0
    psnr_sum: float = 0.0
    status_counts: Counter = field(default_factory=Counter)

    @property
    def failed(self) -> int:
        return self.images - self.ok

    @property
    def mean_psnr(self) -> float | None:
        return self.psnr_sum / self.ok if self.ok else None

    def add_rows(self, rows: list[Row]) -> None:
        for row in rows:
            self.images += 1
            self.status_counts[Status(row.status).value] += 1
            if row.status == Status.OK:
                self.ok += 1
                self.psnr_sum += row.psnr

    def add(self, other: "Tally") -> None:
        self.images += other.images
        self.ok += other.ok
        self.psnr_sum += other.psnr_sum
        self.status_counts.update(other.status_counts)

    def as_dict(self) -> dict:
        """JSON-friendly (stats files, progress answers across Ray)."""
        return {"images": self.images, "ok": self.ok, "failed": self.failed, "psnr_sum": self.psnr_sum,
                "status_counts": dict(sorted(self.status_counts.items()))}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> "Tally":
        return cls(int(data.get("images", 0)), int(data.get("ok", 0)), float(data.get("psnr_sum", 0.0)),
                   Counter(data.get("status_counts") or {}))  # fmt: skip

    @classmethod
    def from_stats(cls, stats: dict) -> "Tally":
        """The tally of a shard's stats file (``total``, ``ok``, ``mean_psnr``, ``status_counts``)."""
        ok = int(stats.get("ok", 0))
        return cls(int(stats.get("total", 0)), ok, (stats.get("mean_psnr") or 0.0) * ok,
                   Counter(stats.get("status_counts") or {}))  # fmt: skip


def is_out_of_memory(exc: BaseException) -> bool:
    """Host or device memory ran out: the machine's problem, never the sample's."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom))
