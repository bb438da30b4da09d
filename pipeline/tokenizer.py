"""Strokes <-> integer tokens, for sequence models: ``StrokeTokenizer``.

Each of a stroke's 10 fields is quantised on its own into ``bins`` levels over the stroke
model's range for that field (``encoder.stroke_bounds``), linearly or, for the scale fields,
logarithmically (a thin stroke's thickness matters relative to its size, and ``sigma_r`` spans
three decades). Field f has its own token range, so a token says which field it is and a model
can be masked to the field due next (``field_range``). A painting is::

    BOS  bg_r bg_g bg_b  GROUP s0.cx s0.cy ... s0.alpha  s1.cx ...  GROUP s100.cx ...  EOS  PAD ...

GROUP opens every ``group_size`` strokes (the encoder fits strokes in groups of that size, coarse
to fine, so the marks fall on the fit's own boundaries); the background uses the r, g, b ranges.
Every prefix of the strokes is a painting, so a truncated sequence still decodes to one.

Quantisation maps a value to its bin and a bin back to its centre, so decode(encode(x)) moves each
value by at most half a bin, and on already-quantised strokes the round trip is exact. Both
directions take a whole batch (a row group) in a few numpy operations.
"""
from __future__ import annotations

import numpy as np
import torch

import encoder

PAD, BOS, EOS, GROUP = 0, 1, 2, 3
SPECIALS = ("PAD", "BOS", "EOS", "GROUP")
FIELDS = encoder.STROKE_FIELDS
WIDTH = len(FIELDS)
COLOR_FIELDS = (FIELDS.index("r"), FIELDS.index("g"), FIELDS.index("b"))
DEFAULT_BINS = 256
# Position and angle get finer bins: a stroke of a 1000-stroke, 512 px painting is a few pixels
# thick, so a position off by half of one of 256 bins (1 px) already shows (benchmarks/RESULTS.md,
# "Stroke tokenizer", measured each field alone). The other fields are fine at 256.
DEFAULT_FIELD_BINS = {"cx": 2048, "cy": 2048, "rot": 1024}
DEFAULT_LOG_FIELDS = ("mu_r", "sigma_r", "sigma_t")


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class StrokeTokenizer:
    """bins: one int for every field, or a dict field -> bins (others DEFAULT_BINS); by default
    DEFAULT_FIELD_BINS.
    log_fields: fields quantised on a log scale. group_size: strokes between GROUP tokens.
    aspect: W / H of the paintings (the upper bound of cx)."""

    def __init__(self, bins: int | dict | None = None, log_fields=DEFAULT_LOG_FIELDS, group_size: int = 100,
                 aspect: float = 1.0):  # fmt: skip
        bins = DEFAULT_FIELD_BINS if bins is None else bins
        per_field = bins if isinstance(bins, dict) else {}
        unknown = set(per_field) - set(FIELDS) | set(log_fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown stroke fields {sorted(unknown)}; fields are {list(FIELDS)}")
        default = DEFAULT_BINS if isinstance(bins, dict) else int(bins)
        self.bins = np.array([int(per_field.get(f, default)) for f in FIELDS], dtype=np.int64)
        if (self.bins < 2).any():
            raise ValueError(f"every field needs at least 2 bins, got {self.bins.tolist()}")
        self.group_size = int(group_size)
        self.log = np.array([f in log_fields for f in FIELDS])
        lo, hi = (b.double().numpy() for b in encoder.stroke_bounds(aspect))
        self._lo = np.where(self.log, np.log(np.maximum(lo, 1e-12)), lo)
        self._hi = np.where(self.log, np.log(hi), hi)
        self.bins_spec = dict(zip(FIELDS, self.bins.tolist()))
        self.offsets = len(SPECIALS) + np.concatenate([[0], np.cumsum(self.bins)[:-1]])
        self.vocab_size = int(len(SPECIALS) + self.bins.sum())

    # -- per-field quantisation ---------------------------------------------------------------------
    def quantize(self, strokes) -> np.ndarray:
        """``[..., 10]`` values -> ``[..., 10]`` bin indices (int64), clipped to the ranges."""
        x = _as_numpy(strokes).astype(np.float64)  # a copy, transformed in place below
        logs = np.flatnonzero(self.log)
        x[..., logs] = np.log(np.maximum(x[..., logs], 1e-12))
        x -= self._lo
        x *= self.bins / (self._hi - self._lo)
        return np.clip(np.floor(x, out=x), 0, self.bins - 1, out=x).astype(np.int64)

    def dequantize(self, bins) -> np.ndarray:
        """``[..., 10]`` bin indices -> ``[..., 10]`` float32 bin centres."""
        x = np.asarray(bins, dtype=np.float64) + 0.5
        x *= (self._hi - self._lo) / self.bins
        x += self._lo
        logs = np.flatnonzero(self.log)
        x[..., logs] = np.exp(x[..., logs])
        return x.astype(np.float32)

    def field_range(self, field: int | str) -> tuple[int, int]:
        """Token ids [start, stop) of one field, e.g. to mask a model's logits to the field due next."""
        f = FIELDS.index(field) if isinstance(field, str) else field
        return int(self.offsets[f]), int(self.offsets[f] + self.bins[f])

    # -- sequences -------------------------------------------------------------------------------------
    def sequence_length(self, n_strokes) -> np.ndarray:
        """Tokens (BOS to EOS) of a painting of ``n_strokes`` strokes."""
        n = np.asarray(n_strokes, dtype=np.int64)
        return 1 + 3 + n * WIDTH + -(-n // self.group_size) + 1

    def encode(self, strokes, background, lengths=None) -> tuple[np.ndarray, np.ndarray]:
        """Paintings -> (tokens ``[B, L]`` int32, PAD after each row's EOS; lengths ``[B]``).

        strokes ``[B, N, 10]`` (rows padded to N, with ``lengths`` their real counts; default N),
        or a list of ``[N_i, 10]``; background ``[B, 3]``.
        """
        if isinstance(strokes, (list, tuple)):
            lengths = np.array([len(s) for s in strokes], dtype=np.int64)
            padded = np.zeros((len(strokes), int(lengths.max(initial=0)), WIDTH), np.float32)
            for i, s in enumerate(strokes):
                padded[i, : len(s)] = _as_numpy(s)
            strokes = padded
        strokes = _as_numpy(strokes)
        batch, n = strokes.shape[:2]
        lengths = np.full(batch, n, np.int64) if lengths is None else _as_numpy(lengths).astype(np.int64)
        out = np.full((batch, int(self.sequence_length(n))), PAD, dtype=np.int32)
        out[:, 0] = BOS
        colors = np.zeros((batch, WIDTH))
        colors[:, COLOR_FIELDS] = _as_numpy(background)
        out[:, 1:4] = (self.quantize(colors) + self.offsets)[:, COLOR_FIELDS]
        k = np.arange(n)
        first = 4 + k * WIDTH + k // self.group_size + 1  # stroke k's first token, after k // gs + 1 GROUPs
        out[:, first[:, None] + np.arange(WIDTH)] = self.quantize(strokes) + self.offsets
        out[:, 4 + np.arange(-(-n // self.group_size)) * (self.group_size * WIDTH + 1)] = GROUP
        end = self.sequence_length(lengths) - 1
        out[np.arange(out.shape[1])[None, :] > end[:, None]] = PAD
        out[np.arange(batch), end] = EOS
        return out, end + 1

    def decode(self, tokens) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Token rows -> one (strokes ``[N, 10]``, background ``[3]``) per row.

        Lenient, for a model's samples: reading stops at EOS or PAD, GROUP and BOS are skipped,
        the k-th value token is read as field k % 10 whatever its range (clipped into it), a
        missing background colour is black, and a trailing partial stroke is dropped.
        """
        out = []
        for row in np.atleast_2d(_as_numpy(tokens)).astype(np.int64):
            stop = np.flatnonzero((row == EOS) | (row == PAD))
            values = row[: stop[0] if len(stop) else len(row)]
            values = values[values >= len(SPECIALS)]
            colors, body = values[:3], values[3:]
            body = body[: len(body) // WIDTH * WIDTH].reshape(-1, WIDTH)
            strokes = self.dequantize(np.clip(body - self.offsets, 0, self.bins - 1))
            background = np.zeros(3, np.float32)
            if len(colors):
                fields = list(COLOR_FIELDS[: len(colors)])
                full = np.zeros(WIDTH, np.int64)
                full[fields] = np.clip(colors - self.offsets[fields], 0, self.bins[fields] - 1)
                background[: len(colors)] = self.dequantize(full)[fields]
            out.append((torch.from_numpy(strokes), torch.from_numpy(background)))
        return out

    def describe(self) -> dict:
        """The settings, for logs and checkpoints (``StrokeTokenizer(**describe())`` rebuilds it)."""
        return {"bins": dict(zip(FIELDS, self.bins.tolist())), "group_size": self.group_size,
                "log_fields": [f for f, is_log in zip(FIELDS, self.log) if is_log]}  # fmt: skip


__all__ = ["BOS", "EOS", "GROUP", "PAD", "SPECIALS", "StrokeTokenizer"]
