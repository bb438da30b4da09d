"""Fit a batch of images with strokes: groups, error-map placement, Adam, progressive resolution.

Strokes come in groups. Each group is placed where the current painting is
worst, optimised against the target (downsampled for the early, coarse
groups), then frozen. After every group the painting is checked at full
resolution; a group that would make an image worse is replaced by invisible
strokes for that image, so the PSNR after each group never decreases and
every prefix of groups is a finished painting.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import renderer
from .config import FitConfig
from .images import downsample, psnr
from .steps import optimise_group
from .strokes import ALPHA, COLOR, CX, CY, LOWER, MU_R, NUM_FIELDS, RED, ROT, SIGMA_R, SIGMA_T, UPPER, bounds


@dataclass
class FitResult:
    """Result of ``fit_batch`` for B images; tensors on the CPU."""

    strokes: torch.Tensor      # [B, N, 10]
    background: torch.Tensor   # [B, 3]
    psnr: torch.Tensor         # [B] at full resolution
    ok: torch.Tensor           # [B] bool: False where any group diverged (non-finite values)
    seconds: float             # wall time of the whole batch
    group_psnr: torch.Tensor   # [B, groups] PSNR after each group (and stage_refine), before the final pass
    refined: torch.Tensor | None = None  # [B] bool: the image kept its jointly refined painting


def null_strokes(batch: int, n: int, device) -> torch.Tensor:
    """Valid strokes that paint nothing: the thinnest, shortest, faintest stroke
    centred on the canvas corner, at least half a pixel (and thousands of its
    own widths) from every pixel centre."""
    lo, _ = bounds(1.0, device)
    out = lo.expand(batch, n, NUM_FIELDS).clone()
    out[..., ROT] = 0.0
    return out


def place_strokes(
    target: torch.Tensor, canvas: torch.Tensor, n: int, config: FitConfig, generators: list[torch.Generator],
    scale: float = 1.0,
) -> torch.Tensor:
    """Initial ``[B, n, 10]`` strokes at pixels sampled where the error is large.

    The colour is the target's at that pixel; the shape comes from the config, its
    size (``mu_r``: the others are relative to it) times ``scale ** -init_size_power``
    for a stage fitted at ``scale`` of the full size.
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
    strokes[..., MU_R] = min(max(config.init_mu_r * scale ** -config.init_size_power, LOWER[MU_R]), UPPER[MU_R])
    strokes[..., SIGMA_R] = config.init_sigma_r
    strokes[..., SIGMA_T] = config.init_sigma_t
    strokes[..., COLOR] = torch.gather(target.reshape(bsz, 3, h * w), 2, idx[:, None, :].expand(-1, 3, -1)).transpose(1, 2)
    strokes[..., ALPHA] = config.init_alpha
    return strokes


def _field_lrs(lr: float, scale: dict, device) -> torch.Tensor:
    from .strokes import FIELDS

    unknown = set(scale) - set(FIELDS)
    if unknown:
        raise ValueError(f"lr scales name unknown fields {sorted(unknown)}; fields are {FIELDS}")
    return torch.tensor([lr * scale.get(f, 1.0) for f in FIELDS], device=device)


def replace_rejected(
    strokes: torch.Tensor, rejected: torch.Tensor, target: torch.Tensor, canvas: torch.Tensor,
    config: FitConfig, generators: list[torch.Generator],
) -> torch.Tensor:
    """``strokes`` with every rejected (null) stroke ``rejected [B, N]`` re-placed
    where ``canvas`` is furthest from ``target``, as a new group's strokes are.

    A rejected stroke paints nothing, wherever it sits in the order, so it
    costs a slot and gives nothing; re-placed, the joint refinement can fit it.
    """
    fresh = place_strokes(target, canvas, strokes.shape[1], config, generators)
    return torch.where(rejected[..., None], fresh, strokes)


def stroke_coverage(strokes: torch.Tensor, background: torch.Tensor, res: int, backend: str,
                    canvas: torch.Tensor | None = None) -> torch.Tensor:
    """How much of the painting each stroke makes, ``[B, N]``: the sum over the pixels of a
    ``res`` x ``res`` canvas of its visible weight (opacity times the transmittance of the
    strokes above it), in pixels of that canvas. A stroke that is faint, tiny or hidden
    under others covers next to nothing: it holds a slot and paints nothing.

    Read off one gradient: against a target 0.5 below the canvas everywhere, the l2
    loss's derivative by a stroke's red is its visible weight summed, times a constant.
    ``canvas``: the painting at ``res``, if the caller has it.
    """
    base = background[:, :, None, None].expand(-1, -1, res, res).contiguous()
    if canvas is None:
        canvas = renderer.composite(strokes, base, backend)
    _, _, grad, _ = renderer.loss_and_grad(strokes, base, canvas - 0.5, "l2", backend)
    # loss = mean over 3 * res * res values of residual ** 2; its derivative by the canvas is 1 / (3 res^2)
    return grad[..., RED] * (3 * res * res)


def replace_faint(
    strokes: torch.Tensor, background: torch.Tensor, target: torch.Tensor, config: FitConfig,
    generators: list[torch.Generator], backend: str, size: int,
) -> torch.Tensor:
    """``strokes`` with every stroke that paints little moved on top, in its old order, and
    re-placed where the painting (at ``target``'s resolution) is furthest from ``target``, as a
    new group's strokes are. The others keep their order.

    A stroke paints little when its alpha is below ``config.refine_replace_alpha`` or its
    coverage (``stroke_coverage``, in pixels of the full-size image, ``size`` x ``size``) is
    below ``config.refine_replace_coverage``.
    """
    res = target.shape[-1]
    canvas = renderer.composite(strokes, background[:, :, None, None].expand(-1, -1, res, res).contiguous(), backend)
    faint = strokes[..., ALPHA] < config.refine_replace_alpha
    if config.refine_replace_coverage > 0:
        full_pixels = stroke_coverage(strokes, background, res, backend, canvas) * (size / res) ** 2
        faint |= full_pixels < config.refine_replace_coverage
    fresh = place_strokes(target, canvas, strokes.shape[1], config, generators, res / size)
    order = torch.argsort(faint.to(torch.int8), dim=1, stable=True)  # kept ones first
    moved = torch.gather(strokes, 1, order[..., None].expand(-1, -1, NUM_FIELDS))
    return torch.where(torch.gather(faint, 1, order)[..., None], fresh, moved)


def refine_strokes(
    strokes: torch.Tensor, background: torch.Tensor, targets: torch.Tensor, pyramid: dict, stages: list,
    config: FitConfig, lo: torch.Tensor, hi: torch.Tensor, backend: str, generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise all ``strokes [B, N, 10]`` (and the background, with
    ``fit_background``) jointly, through ``stages``: (resolution, steps) pairs;
    returns new tensors, the inputs are left as they were."""
    strokes, background = strokes.clone(), background.clone()
    lrs = _field_lrs(config.refine_lr, config.refine_lr_scale, strokes.device)
    for res, steps in stages:
        if steps == 0:
            continue
        if res not in pyramid:
            pyramid[res] = downsample(targets, res)
        if config.refine_replace_alpha > 0 or config.refine_replace_coverage > 0:
            strokes = replace_faint(strokes, background, pyramid[res], config, generators, backend, targets.shape[-1])
        stage = dataclasses.replace(config, steps=int(steps), lr=config.refine_lr, lr_scale=config.refine_lr_scale,
                                    betas=config.refine_betas, lr_decay=config.refine_lr_decay)
        if config.fit_background:
            background = optimise_group(strokes, None, pyramid[res], background, stage, lrs, lo, hi, backend)
        else:
            base = background[:, :, None, None].expand(-1, -1, res, res).contiguous()
            optimise_group(strokes, base, pyramid[res], None, stage, lrs, lo, hi, backend)
    return strokes, background


def _joint_pass(strokes, rejected, background, targets, pyramid, full_canvas, full_error, stages, config, generators,
                lo, hi, backend):
    """Re-place rejected strokes, refine all strokes jointly, and commit per image
    as a group is: only a lower full-size error (NaN never is) replaces an image's
    painting. Returns (strokes, rejected, background, full_canvas, full_error, improved [B])."""
    size = targets.shape[-1]
    start = strokes
    if config.refine_replace and bool(rejected.any()):
        start = replace_rejected(strokes, rejected, targets, full_canvas, config, generators)
    new_strokes, new_background = refine_strokes(start, background, targets, pyramid, stages, config, lo, hi, backend,
                                                 generators)
    new_full = renderer.composite(new_strokes, new_background[:, :, None, None].expand(-1, -1, size, size)
                                  .contiguous(), backend)
    new_error = (new_full - targets).square().mean(dim=(1, 2, 3))
    improved = new_error < full_error
    strokes = torch.where(improved[:, None, None], new_strokes, strokes)
    rejected = rejected & ~improved[:, None] if config.refine_replace else rejected
    background = torch.where(improved[:, None], new_background, background)
    full_canvas = torch.where(improved[:, None, None, None], new_full, full_canvas)
    full_error = torch.where(improved, new_error, full_error)
    return strokes, rejected, background, full_canvas, full_error, improved


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
    psnr [B])`` is called after each group (for progress bars). The loop
    waits for the GPU only there and, once per joint pass, to learn whether any
    image has rejected strokes to re-place or kept a stage-end refinement.
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
    lrs = _field_lrs(config.lr, config.lr_scale, dev)

    resolutions = [min(r, size) for r in config.group_resolutions()]
    pyramid = {r: downsample(targets, r) for r in set(resolutions)}
    background = targets.mean(dim=(2, 3)) if config.background == "mean" else targets.new_zeros(bsz, 3)
    frozen: list[torch.Tensor] = []
    rejected: list[torch.Tensor] = []  # [B, n] per group: True where the image got null strokes
    full_canvas = background[:, :, None, None].expand(-1, -1, size, size).contiguous()
    full_error = (full_canvas - targets).square().mean(dim=(1, 2, 3))
    history = []
    canvas, canvas_res = None, None
    diverged = torch.zeros(bsz, dtype=torch.bool, device=dev)

    group_steps = config.group_steps()
    for g, (n, res) in enumerate(zip(config.group_sizes(), resolutions)):
        target = pyramid[res]
        group_config = config if group_steps[g] == config.steps else dataclasses.replace(config, steps=group_steps[g])
        fit_bg = config.fit_background and g == 0
        if canvas_res != res:
            # Point-sampled strokes at the new resolution, not a resampled canvas.
            base = background[:, :, None, None].expand(-1, -1, res, res).contiguous()
            canvas = renderer.composite(torch.cat(frozen, 1), base, backend) if frozen else base
            canvas_res = res
        base = canvas
        strokes = place_strokes(target, base, n, config, generators, res / size)
        fitted_bg = optimise_group(strokes, base, target, background if fit_bg else None, group_config, lrs, lo, hi,
                                   backend)
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
        rejected.append(worse[:, None].expand(-1, n))
        if canvas_res is not None:
            canvas = renderer.composite(strokes, base, backend)  # null strokes leave a worse image's base as it was
        if config.stage_refine and g + 1 < len(resolutions) and resolutions[g + 1] != res:
            # The end of a coarse stage: refine its strokes together at its resolution, cheaply (few
            # strokes, few pixels), so the next stage's groups are placed on a better painting.
            joint, joint_rejected, background, full_canvas, full_error, improved = _joint_pass(
                torch.cat(frozen, 1), torch.cat(rejected, 1), background, targets, pyramid, full_canvas, full_error,
                [(res, config.stage_refine)], config, generators, lo, hi, backend)
            if bool(improved.any()):  # else the incremental canvas stands, bit for bit
                frozen, rejected = [joint], [joint_rejected]
                canvas_res = None
        history.append(10.0 * torch.log10(1.0 / full_error.clamp_min(1e-12)))
        if on_group is not None:
            on_group(g + 1, len(resolutions), history[-1].cpu())

    strokes = torch.cat(frozen, 1)
    refined = torch.zeros(bsz, dtype=torch.bool, device=dev)
    stages = [(min(size, max(8, round(scale * size))), steps) for scale, steps in config.refine]
    if any(steps > 0 for _, steps in stages):
        strokes, _, background, full_canvas, full_error, refined = _joint_pass(
            strokes, torch.cat(rejected, 1), background, targets, pyramid, full_canvas, full_error, stages, config,
            generators, lo, hi, backend)
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
        refined=refined.cpu(),
    )
