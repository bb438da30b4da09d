"""Fit a batch of images with strokes: groups, error-map placement, Adam, progressive resolution.

Strokes come in groups. Each group is placed where the current painting is
worst, optimised against the target (downsampled for the early, coarse
groups), then frozen. After every group the painting is checked at full
resolution; a group that would make an image worse is replaced by invisible
strokes for that image, so the PSNR after each group never decreases and
every prefix of groups is a finished painting.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import renderer
from .config import FitConfig
from .images import downsample, psnr
from .steps import optimise_group
from .strokes import ALPHA, COLOR, CX, CY, MU_R, NUM_FIELDS, ROT, SIGMA_R, SIGMA_T, bounds


@dataclass
class FitResult:
    """Result of ``fit_batch`` for B images; tensors on the CPU."""

    strokes: torch.Tensor      # [B, N, 10]
    background: torch.Tensor   # [B, 3]
    psnr: torch.Tensor         # [B] at full resolution
    ok: torch.Tensor           # [B] bool: False where any group diverged (non-finite values)
    seconds: float             # wall time of the whole batch
    group_psnr: torch.Tensor   # [B, groups] PSNR after each group


def null_strokes(batch: int, n: int, device) -> torch.Tensor:
    """Valid strokes that paint nothing: the thinnest, shortest, faintest stroke
    centred on the canvas corner, at least half a pixel (and thousands of its
    own widths) from every pixel centre."""
    lo, _ = bounds(1.0, device)
    out = lo.expand(batch, n, NUM_FIELDS).clone()
    out[..., ROT] = 0.0
    return out


def place_strokes(
    target: torch.Tensor, canvas: torch.Tensor, n: int, config: FitConfig, generators: list[torch.Generator]
) -> torch.Tensor:
    """Initial ``[B, n, 10]`` strokes at pixels sampled where the error is large.

    The colour is the target's at that pixel; the shape comes from the config.
    """
    bsz, _, h, w = target.shape
    error = (target - canvas).abs().mean(dim=1).reshape(bsz, h * w)
    if config.placement == "softmax":
        weights = torch.softmax(error, dim=1)
    else:
        weights = error.pow(config.placement_power) + 1e-12
    # One generator per image, so an image gets the same draws in any batch.
    idx = torch.stack([torch.multinomial(weights[i], n, replacement=n > h * w, generator=generators[i]) for i in range(bsz)])
    rows, cols = idx // w, idx % w
    strokes = torch.empty(bsz, n, NUM_FIELDS, device=target.device)
    strokes[..., CX] = (cols.float() + 0.5) / h
    strokes[..., CY] = (rows.float() + 0.5) / h
    spin = torch.stack([torch.rand(n, device=target.device, generator=g) for g in generators])
    strokes[..., ROT] = (spin * 2 - 1) * math.pi
    strokes[..., MU_R] = config.init_mu_r
    strokes[..., SIGMA_R] = config.init_sigma_r
    strokes[..., SIGMA_T] = config.init_sigma_t
    strokes[..., COLOR] = torch.gather(target.reshape(bsz, 3, h * w), 2, idx[:, None, :].expand(-1, 3, -1)).transpose(1, 2)
    strokes[..., ALPHA] = config.init_alpha
    return strokes


def _field_lrs(config: FitConfig, device) -> torch.Tensor:
    from .strokes import FIELDS

    unknown = set(config.lr_scale) - set(FIELDS)
    if unknown:
        raise ValueError(f"lr_scale names unknown fields {sorted(unknown)}; fields are {FIELDS}")
    return torch.tensor([config.lr * config.lr_scale.get(f, 1.0) for f in FIELDS], device=device)


def fit_batch(
    targets: torch.Tensor,
    config: FitConfig,
    device: str | torch.device | None = None,
    seed: int | None = None,
    on_group: Callable[[int, int, torch.Tensor], None] | None = None,
) -> FitResult:
    """Fit ``config.strokes`` strokes to each of B targets ``[B, 3, S, S]`` in [0, 1].

    ``device``/``seed`` default to the config's; image i draws its random
    numbers from ``seed + i``, so it gets the same painting in any batch that
    starts it at the same seed. ``on_group(done, total,
    psnr [B])`` is called after each group (for progress bars); it is the
    only place the loop waits for the GPU.
    """
    start = time.perf_counter()
    dev = renderer.resolve_device(device if device is not None else config.device)
    backend = renderer.resolve_backend(config.backend, dev)
    if targets.dim() != 4 or targets.shape[1] != 3:
        raise ValueError(f"targets must be [B, 3, S, S], got {list(targets.shape)}")
    targets = targets.to(dev, torch.float32).contiguous()
    bsz, _, size, width = targets.shape
    if size != width:
        raise ValueError(f"targets must be square, got {size} x {width}")
    first_seed = config.seed if seed is None else seed
    generators = [torch.Generator(device=dev).manual_seed(first_seed + i) for i in range(bsz)]
    lo, hi = bounds(1.0, dev)
    lrs = _field_lrs(config, dev)

    resolutions = [min(r, size) for r in config.group_resolutions()]
    pyramid = {r: downsample(targets, r) for r in set(resolutions)}
    background = targets.mean(dim=(2, 3)) if config.background == "mean" else targets.new_zeros(bsz, 3)
    frozen: list[torch.Tensor] = []
    full_canvas = background[:, :, None, None].expand(-1, -1, size, size).contiguous()
    full_error = (full_canvas - targets).square().mean(dim=(1, 2, 3))
    history = []
    canvas, canvas_res = None, None
    diverged = torch.zeros(bsz, dtype=torch.bool, device=dev)

    for g, (n, res) in enumerate(zip(config.group_sizes(), resolutions)):
        target = pyramid[res]
        fit_bg = config.fit_background and g == 0
        if canvas_res != res:
            # Point-sampled strokes at the new resolution, not a resampled canvas.
            base = background[:, :, None, None].expand(-1, -1, res, res).contiguous()
            canvas = renderer.composite(torch.cat(frozen, 1), base, backend) if frozen else base
            canvas_res = res
        base = canvas
        strokes = place_strokes(target, base, n, config, generators)
        fitted_bg = optimise_group(strokes, base, target, background if fit_bg else None, config, lrs, lo, hi, backend)
        old_background = background
        if fit_bg:
            background = fitted_bg
        # Commit at full resolution; an image the group made worse keeps its old painting.
        full_base = background[:, :, None, None].expand(-1, -1, size, size).contiguous() if fit_bg else full_canvas
        new_full = renderer.composite(strokes, full_base, backend)
        new_error = (new_full - targets).square().mean(dim=(1, 2, 3))
        worse = ~(new_error <= full_error)  # NaN counts as worse
        diverged |= ~torch.isfinite(new_error)  # the painting stays valid, but the caller must know
        strokes = torch.where(worse[:, None, None], null_strokes(bsz, n, dev), strokes)
        full_canvas = torch.where(worse[:, None, None, None], full_canvas, new_full)
        full_error = torch.where(worse, full_error, new_error)
        if fit_bg:
            background = torch.where(worse[:, None], old_background, background)
            canvas_res = None  # the base changed under the group: repaint at the next group
        frozen.append(strokes)
        if canvas_res is not None:
            canvas = renderer.composite(strokes, base, backend)  # null strokes leave a worse image's base as it was
        history.append(10.0 * torch.log10(1.0 / full_error.clamp_min(1e-12)))
        if on_group is not None:
            on_group(g + 1, len(resolutions), history[-1].cpu())

    strokes = torch.cat(frozen, 1)
    final_psnr = psnr(full_canvas, targets)
    ok = ~diverged & torch.isfinite(strokes).all(dim=(1, 2)) & torch.isfinite(final_psnr)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return FitResult(
        strokes=torch.nan_to_num(strokes).cpu(),
        background=torch.nan_to_num(background).cpu(),
        psnr=final_psnr.cpu(),
        ok=ok.cpu(),
        seconds=time.perf_counter() - start,
        group_psnr=torch.stack(history, 1).cpu(),
    )
