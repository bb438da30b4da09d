"""The stroke model's data layout: 10 numbers per stroke, their ranges, clamps,
initial values and the import of the seed's checkpoint format.

Strokes live in one float tensor ``[B, N, 10]`` (B paintings, N strokes each),
fields in the order of ``FIELDS`` (see docs/stroke_model.md).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

FIELDS = ("cx", "cy", "rot", "mu_r", "sigma_r", "sigma_t", "r", "g", "b", "alpha")
NUM_FIELDS = len(FIELDS)
CX, CY, ROT, MU_R, SIGMA_R, SIGMA_T, RED, GREEN, BLUE, ALPHA = range(NUM_FIELDS)
COLOR = slice(RED, BLUE + 1)

# Valid ranges; cx's upper bound is the aspect ratio W / H and is filled in per call.
LOWER = (0.0, 0.0, -math.pi, 0.05, 1e-4, 1e-3, 0.0, 0.0, 0.0, 0.01)
UPPER = (float("nan"), 1.0, math.pi, 2.0, 0.2, math.pi / 4, 1.0, 1.0, 1.0, 1.0)


class StrokeError(ValueError):
    """Strokes or a stroke file that do not satisfy the stroke model."""


def bounds(aspect: float = 1.0, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bound of every field, each ``[10]``, for a W/H ``aspect``."""
    lo = torch.tensor(LOWER, device=device, dtype=dtype)
    hi = torch.tensor(UPPER, device=device, dtype=dtype)
    hi[CX] = aspect
    return lo, hi


def clamp_(strokes: torch.Tensor, aspect: float = 1.0) -> torch.Tensor:
    """Clamp ``[..., 10]`` strokes into their valid ranges in place.

    Rotation wraps instead of clamping: it is an angle, and a wrap keeps the
    optimiser free to turn a stroke past +-pi.
    """
    lo, hi = bounds(aspect, strokes.device, strokes.dtype)
    rot = strokes[..., ROT]
    rot.copy_(torch.remainder(rot + math.pi, 2 * math.pi) - math.pi)
    torch.clamp(strokes, lo, hi, out=strokes)
    return strokes


def validate(strokes: torch.Tensor, aspect: float = 1.0, tol: float = 1e-4) -> None:
    """Raise StrokeError naming the first problem of a ``[B, N, 10]`` or ``[N, 10]`` tensor."""
    if not isinstance(strokes, torch.Tensor):
        raise StrokeError(f"strokes must be a tensor, got {type(strokes).__name__}")
    if strokes.dim() not in (2, 3) or strokes.shape[-1] != NUM_FIELDS:
        raise StrokeError(f"strokes must have shape [N, {NUM_FIELDS}] or [B, N, {NUM_FIELDS}], got {list(strokes.shape)}")
    if not strokes.is_floating_point():
        raise StrokeError(f"strokes must be floating point, got {strokes.dtype}")
    finite = torch.isfinite(strokes)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise StrokeError(f"strokes hold NaN or infinite values (first at index {bad}, field {FIELDS[bad[-1]]})")
    lo, hi = bounds(aspect, strokes.device, strokes.dtype)
    outside = (strokes < lo - tol) | (strokes > hi + tol)
    if bool(outside.any()):
        bad = outside.nonzero()[0].tolist()
        f = bad[-1]
        value = strokes[tuple(bad)].item()
        raise StrokeError(
            f"stroke field {FIELDS[f]} out of range at index {bad}: {value:.6g} not in [{lo[f].item():.6g}, {hi[f].item():.6g}]"
        )


def random_strokes(batch: int, n: int, aspect: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniformly random valid strokes ``[batch, n, 10]`` (for tests and benchmarks)."""
    lo, hi = bounds(aspect)
    u = torch.rand(batch, n, NUM_FIELDS, generator=generator)
    return lo + u * (hi - lo)


def _wrap(angle: torch.Tensor) -> torch.Tensor:
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def load_seed_checkpoint(path: str | Path) -> tuple[torch.Tensor, float]:
    """Read the seed project's ``.pt`` checkpoint as ``([N, 10] strokes, aspect W/H)``.

    Only tensors are unpickled (weights_only=True). The seed's raster was
    transposed, hence the swapped centre axes and the rotation mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise StrokeError(f"{path}: no such stroke file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise StrokeError(f"{path}: not a readable seed checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict):
        raise StrokeError(f"{path}: expected a dict of tensors, got {type(ckpt).__name__}")
    need = ("center_x", "center_y", "rotation", "mu_r", "sigma_r", "sigma_theta", "color", "alpha")
    missing = [k for k in need if k not in ckpt]
    if missing:
        raise StrokeError(f"{path}: seed checkpoint lacks {', '.join(missing)}")
    try:
        def col(name: str) -> torch.Tensor:
            return torch.as_tensor(ckpt[name]).float().reshape(-1)

        n = col("center_x").numel()
        color = torch.as_tensor(ckpt["color"]).float().reshape(n, 3) / 255.0
        alpha = torch.as_tensor(ckpt["alpha"]).float().reshape(n) / 255.0
        strokes = torch.stack(
            [
                col("center_y"),
                col("center_x"),
                _wrap(-col("rotation") - math.pi / 2),
                col("mu_r"),
                col("sigma_r"),
                col("sigma_theta"),
                color[:, 0],
                color[:, 1],
                color[:, 2],
                alpha,
            ],
            dim=-1,
        )
    except (RuntimeError, ValueError, TypeError) as exc:
        raise StrokeError(f"{path}: malformed seed checkpoint ({exc})") from None
    aspect = float(torch.as_tensor(ckpt.get("width_to_height_ratio", 1.0)).float().reshape(-1)[0])
    validate(strokes, aspect, tol=1e-2)  # bfloat16 storage rounds values near the bounds
    clamp_(strokes, aspect)
    return strokes, aspect
