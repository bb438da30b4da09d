"""Dense pure-PyTorch renderer: the stroke model (docs/stroke_model.md) in code.

It is differentiable by autograd, runs anywhere, and is the oracle every
fast path is tested against. It evaluates every stroke at every pixel, so it
is slow and (under autograd) memory hungry: use it for tests, the CPU
fallback and small images.
"""
from __future__ import annotations

import torch

from .strokes import ALPHA, COLOR, CX, CY, MU_R, ROT, SIGMA_R, SIGMA_T

LOSSES = ("l1", "l2", "prefix_l1")


def pixel_grid(height: int, width: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres ``x [1, W]`` and ``y [H, 1]`` in units of image height."""
    x = (torch.arange(width, device=device, dtype=dtype) + 0.5) / height
    y = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
    return x[None, :], y[:, None]


def opacity(strokes: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Opacity of each stroke at each pixel.

    strokes: ``[..., 10]``; x ``[1, W]``, y ``[H, 1]``. Returns ``[..., H, W]``.
    """
    s = strokes[..., None, None, :]
    cx, cy, rot, mu = s[..., CX], s[..., CY], s[..., ROT], s[..., MU_R]
    cos, sin = torch.cos(rot), torch.sin(rot)
    dx = x - (cx - cos * mu)
    dy = y - (cy + sin * mu)
    u = cos * dx - sin * dy
    v = sin * dx + cos * dy
    rho = torch.sqrt(u * u + v * v) - mu
    phi = torch.atan2(v, u)
    sigma_r = s[..., SIGMA_R] * mu
    sigma_t = s[..., SIGMA_T]
    q = rho * rho / (2 * sigma_r * sigma_r) + phi * phi / (2 * sigma_t * sigma_t)
    return s[..., ALPHA] * torch.exp(-q)


def render_loss(
    strokes: torch.Tensor, base: torch.Tensor, target: torch.Tensor | None = None, loss: str = "l2",
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blend strokes back to front over a base canvas, optionally with a loss.

    strokes ``[B, N, 10]``, base ``[B, 3, H, W]`` (the background, or a canvas
    already painted by frozen strokes), target ``[B, 3, H, W]`` or None.
    Returns the final canvas ``[B, 3, H, W]`` and the loss per image ``[B]``
    (None without a target):

    - ``l1``/``l2``: mean absolute / squared error of the final canvas;
    - ``prefix_l1``: the seed's objective, the mean over k = 1..N of the mean
      absolute error of the canvas after k strokes.

    ``mask`` ``[B, N, H, W]``, if given, multiplies each stroke's opacity: the
    painting of a renderer that skips strokes on some pixels
    (``triton_debug.listed_pixels``), for tests of its stroke lists.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    height, width = base.shape[-2:]
    x, y = pixel_grid(height, width, base.device, base.dtype)
    canvas = base
    prefix = base.new_zeros(base.shape[0])
    n = strokes.shape[1]
    for k in range(n):
        a = opacity(strokes[:, k], x, y)[:, None]  # [B, 1, H, W]
        if mask is not None:
            a = a * mask[:, k, None]
        color = strokes[:, k, COLOR][:, :, None, None]
        canvas = canvas + a * (color - canvas)
        if target is not None and loss == "prefix_l1":
            prefix = prefix + (canvas - target).abs().mean(dim=(1, 2, 3))
    if target is None:
        return canvas, None
    if loss == "prefix_l1":
        value = prefix / max(n, 1)
    elif loss == "l1":
        value = (canvas - target).abs().mean(dim=(1, 2, 3))
    else:
        value = (canvas - target).square().mean(dim=(1, 2, 3))
    return canvas, value


def render(strokes: torch.Tensor, background: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Paint ``[B, N, 10]`` strokes over ``[B, 3]`` background colours: ``[B, 3, H, W]``."""
    base = background[:, :, None, None].expand(-1, -1, height, width)
    return render_loss(strokes, base)[0]
