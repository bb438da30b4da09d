"""Fit a batch of images with strokes: a schedule of phases, each kept per image only where it helps.

The schedule is planned once from the config (``plan_phases``): groups of
strokes, coarse to fine, then an optional joint pass. A group is placed where
the current painting is worst, optimised against the target (downsampled for
the early, coarse groups), then frozen; a joint pass optimises every stroke
together, since frozen groups cannot correct each other. After every phase
the painting is checked at full resolution and each image keeps the phase's
result only where it lowers the error (``commit``): a group that does not is
replaced by invisible strokes for that image, so the PSNR after each group
never decreases and every prefix of groups is a finished painting.
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
from .steps import OptimiserSettings, optimise_group
from .strokes import ALPHA, COLOR, CX, CY, LOWER, MU_R, NUM_FIELDS, RED, ROT, SIGMA_R, SIGMA_T, UPPER, bounds


@dataclass
class FitResult:
    """Result of ``fit_batch`` for B images; tensors on the CPU."""

    strokes: torch.Tensor      # [B, N, 10]
    background: torch.Tensor   # [B, 3]
    psnr: torch.Tensor         # [B] at full resolution
    ok: torch.Tensor           # [B] bool: False where any group diverged (non-finite values)
    seconds: float             # wall time of the whole batch
    group_psnr: torch.Tensor   # [B, groups] PSNR after each group, before the joint pass
    refined: torch.Tensor | None = None  # [B] bool: the image kept its jointly refined painting


@dataclass(frozen=True)
class GroupPhase:
    """``strokes`` new strokes, placed where the painting is worst and optimised over it at ``resolution``."""

    strokes: int
    resolution: int
    settings: OptimiserSettings
    fit_background: bool  # the background colour is optimised along with the strokes (the first group)


@dataclass(frozen=True)
class JointPhase:
    """Every stroke (and the background, with ``fit_background``) optimised together, stage by stage,
    then kept or not as one: ``stages`` are (resolution, settings) pairs."""

    stages: tuple[tuple[int, OptimiserSettings], ...]


def plan_phases(config: FitConfig, size: int) -> list[GroupPhase | JointPhase]:
    """The fit of ``size`` x ``size`` targets, in order: the groups, coarse to fine, then the joint pass, if any."""

    def settings(steps, lr, lr_scale, betas, lr_decay):
        return OptimiserSettings.of(steps, lr, lr_scale, betas, lr_decay, config.loss, config.step_cull_opacity,
                                   config.step_bin_interval)

    groups = [GroupPhase(n, res, settings(steps, config.lr, config.lr_scale, config.betas, 0.0),
                         fit_background=config.fit_background and g == 0)
              for g, (n, res, steps) in enumerate(config.group_schedule(size))]
    stages = tuple((res, settings(steps, config.refine_lr, config.refine_lr_scale, config.refine_betas,
                                  config.refine_lr_decay))
                   for res, steps in config.joint_schedule(size))
    return groups + ([JointPhase(stages)] if stages else [])


@dataclass
class Painting:
    """What each image of a batch has committed so far; canvas and error are at full size."""

    strokes: torch.Tensor     # [B, n, 10]
    rejected: torch.Tensor    # [B, n] bool: null strokes standing in for a group the image did not keep
    background: torch.Tensor  # [B, 3]
    canvas: torch.Tensor      # [B, 3, S, S]
    error: torch.Tensor       # [B] mean squared error against the targets


def commit(old: Painting, new: Painting) -> tuple[Painting, torch.Tensor]:
    """Per image, ``new`` where its error is lower than ``old``'s (NaN never is), else ``old``; and
    which images took ``new`` ``[B]``. The one rule that keeps or drops groups and joint passes."""
    better = new.error < old.error

    def pick(fresh: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        return torch.where(better.view(-1, *[1] * (fresh.dim() - 1)), fresh, kept)

    fields = [f.name for f in dataclasses.fields(Painting)]
    return Painting(*(pick(getattr(new, name), getattr(old, name)) for name in fields)), better


@dataclass
class _Batch:
    """What every phase of one ``fit_batch`` call reads."""

    targets: torch.Tensor             # [B, 3, S, S] on the fit's device
    pyramid: dict[int, torch.Tensor]  # the targets area-averaged to each phase's resolution
    config: FitConfig
    backend: str
    generators: list[torch.Generator]  # one per image: image i draws from seed + i, in any batch
    lo: torch.Tensor                   # the strokes' valid ranges
    hi: torch.Tensor

    def error(self, canvas: torch.Tensor) -> torch.Tensor:
        return (canvas - self.targets).square().mean(dim=(1, 2, 3))

    def optimise(self, strokes, base, res: int, background, settings: OptimiserSettings) -> torch.Tensor | None:
        return optimise_group(strokes, base, self.pyramid[res], background, settings, self.lo, self.hi, self.backend,
                              self.config.cuda_graphs)


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
    strokes[..., MU_R] = min(max(config.init_mu_r, LOWER[MU_R]), UPPER[MU_R])
    strokes[..., SIGMA_R] = config.init_sigma_r
    strokes[..., SIGMA_T] = config.init_sigma_t
    strokes[..., COLOR] = torch.gather(target.reshape(bsz, 3, h * w), 2, idx[:, None, :].expand(-1, 3, -1)).transpose(1, 2)
    strokes[..., ALPHA] = config.init_alpha
    return strokes


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


def _flat(colour: torch.Tensor, res: int) -> torch.Tensor:
    """``[B, 3]`` colours as ``[B, 3, res, res]`` canvases."""
    return colour[:, :, None, None].expand(-1, -1, res, res).contiguous()


def _with_group(painting: Painting, strokes: torch.Tensor, rejected: bool, background: torch.Tensor,
                canvas: torch.Tensor, error: torch.Tensor) -> Painting:
    """``painting``'s strokes followed by ``strokes`` (flagged ``rejected``), with the given rest."""
    flags = torch.full(strokes.shape[:2], rejected, dtype=torch.bool, device=strokes.device)
    return Painting(torch.cat([painting.strokes, strokes], 1), torch.cat([painting.rejected, flags], 1),
                    background, canvas, error)


def _fit_group(phase: GroupPhase, painting: Painting, canvas: torch.Tensor | None,
               batch: _Batch) -> tuple[Painting, torch.Tensor | None, torch.Tensor]:
    """Place, optimise and commit one group over ``canvas``, the painting at the group's resolution.

    Returns the painting, its canvas at that resolution for the next group (None when it must be
    repainted) and the group's full-size error ``[B]``, taken or not.
    """
    res, n, backend = phase.resolution, phase.strokes, batch.backend
    if canvas is None or canvas.shape[-1] != res:
        # Point-sampled strokes at the new resolution, not a resampled canvas.
        canvas = renderer.composite(painting.strokes, _flat(painting.background, res), backend)
    strokes = place_strokes(batch.pyramid[res], canvas, n, batch.config, batch.generators)
    fitted = batch.optimise(strokes, canvas, res, painting.background if phase.fit_background else None,
                            phase.settings)
    background = fitted if phase.fit_background else painting.background
    full_base = _flat(background, batch.targets.shape[-1]) if phase.fit_background else painting.canvas
    full = renderer.composite(strokes, full_base, backend)
    proposal = _with_group(painting, strokes, False, background, full, batch.error(full))
    null = null_strokes(strokes.shape[0], n, strokes.device)
    unchanged = _with_group(painting, null, True, painting.background, painting.canvas, painting.error)
    painting, _ = commit(unchanged, proposal)
    if phase.fit_background:
        return painting, None, proposal.error  # the base changed under the group: repaint at the next one
    # Null strokes leave the canvas of an image that did not keep the group as it was.
    return painting, renderer.composite(painting.strokes[:, -n:], canvas, backend), proposal.error


def _fit_jointly(phase: JointPhase, painting: Painting, batch: _Batch) -> tuple[Painting, torch.Tensor]:
    """Re-place rejected strokes, optimise every stroke together through the phase's stages and commit.

    Returns the painting and which images took the refined one ``[B]``.
    """
    config, strokes = batch.config, painting.strokes
    if config.refine_replace and bool(painting.rejected.any()):
        strokes = replace_rejected(strokes, painting.rejected, batch.targets, painting.canvas, config,
                                   batch.generators)
    strokes, background = strokes.clone(), painting.background.clone()
    for res, settings in phase.stages:
        if config.fit_background:
            background = batch.optimise(strokes, None, res, background, settings)
        else:
            batch.optimise(strokes, _flat(background, res), res, None, settings)
    full = renderer.composite(strokes, _flat(background, batch.targets.shape[-1]), batch.backend)
    rejected = torch.zeros_like(painting.rejected) if config.refine_replace else painting.rejected
    return commit(painting, Painting(strokes, rejected, background, full, batch.error(full)))


def _checked(targets: torch.Tensor) -> torch.Tensor:
    if targets.dim() != 4 or targets.shape[1] != 3:
        raise ValueError(f"targets must be [B, 3, S, S], got {list(targets.shape)}")
    if targets.shape[2] != targets.shape[3]:
        raise ValueError(f"targets must be square, got {targets.shape[2]} x {targets.shape[3]}")
    return targets


def _start(targets: torch.Tensor, config: FitConfig, phases: list, device, seed: int | None) -> tuple[_Batch, Painting]:
    """The batch every phase reads, and the painting before the first group: the background alone."""
    dev = renderer.resolve_device(device if device is not None else config.device)
    targets = targets.to(dev, torch.float32).contiguous()
    bsz, size = targets.shape[0], targets.shape[-1]
    first_seed = config.seed if seed is None else seed
    resolutions = {p.resolution for p in phases if isinstance(p, GroupPhase)}
    resolutions |= {res for p in phases if isinstance(p, JointPhase) for res, _ in p.stages}
    batch = _Batch(targets, {r: downsample(targets, r) for r in resolutions}, config,
                   renderer.resolve_backend(config.backend, dev),
                   [torch.Generator(device=dev).manual_seed(first_seed + i) for i in range(bsz)], *bounds(1.0, dev))
    background = targets.mean(dim=(2, 3)) if config.background == "mean" else targets.new_zeros(bsz, 3)
    canvas = _flat(background, size)
    blank = Painting(targets.new_zeros(bsz, 0, NUM_FIELDS), torch.zeros(bsz, 0, dtype=torch.bool, device=dev),
                     background, canvas, batch.error(canvas))
    return batch, blank


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
    waits for the GPU only there and, before the joint pass, to learn whether
    any image has rejected strokes to re-place.
    """
    start = time.perf_counter()
    phases = plan_phases(config, _checked(targets).shape[-1])
    batch, painting = _start(targets, config, phases, device, seed)
    groups = sum(isinstance(phase, GroupPhase) for phase in phases)
    canvas, history = None, []
    diverged = torch.zeros(batch.targets.shape[0], dtype=torch.bool, device=batch.targets.device)
    refined = torch.zeros_like(diverged)
    for phase in phases:
        if isinstance(phase, GroupPhase):
            painting, canvas, error = _fit_group(phase, painting, canvas, batch)
            diverged |= ~torch.isfinite(error)  # the painting stays valid, but the caller must know
            history.append(10.0 * torch.log10(1.0 / painting.error.clamp_min(1e-12)))
            if on_group is not None:
                on_group(len(history), groups, history[-1].cpu())
        else:
            painting, better = _fit_jointly(phase, painting, batch)
            refined |= better
    return _result(painting, batch, history, diverged, refined, start)


def _result(painting: Painting, batch: _Batch, history: list, diverged: torch.Tensor, refined: torch.Tensor,
            start: float) -> FitResult:
    final_psnr = psnr(painting.canvas, batch.targets)
    ok = ~diverged & torch.isfinite(painting.strokes).all(dim=(1, 2)) & torch.isfinite(final_psnr)
    if batch.targets.is_cuda:
        torch.cuda.synchronize(batch.targets.device)
    return FitResult(
        strokes=torch.nan_to_num(painting.strokes).cpu(),
        background=torch.nan_to_num(painting.background).cpu(),
        psnr=final_psnr.cpu(),
        ok=ok.cpu(),
        seconds=time.perf_counter() - start,
        group_psnr=torch.stack(history, 1).cpu(),
        refined=refined.cpu(),
    )


def stroke_coverage(strokes: torch.Tensor, background: torch.Tensor, res: int, backend: str,
                    canvas: torch.Tensor | None = None) -> torch.Tensor:
    """How much of the painting each stroke makes, ``[B, N]``: the sum over the pixels of a
    ``res`` x ``res`` canvas of its visible weight (opacity times the transmittance of the
    strokes above it), in pixels of that canvas. A stroke that is faint, tiny or hidden
    under others covers next to nothing: it holds a slot and paints nothing.

    Not part of the fit: a measurement, kept for benchmarks/probe_strokes.py ("Where the strokes
    go" in benchmarks/RESULTS.md). Read off one gradient: against a target 0.5 below the canvas
    everywhere, the l2 loss's derivative by a stroke's red is its visible weight summed, times a
    constant. ``canvas``: the painting at ``res``, if the caller has it.
    """
    base = _flat(background, res)
    if canvas is None:
        canvas = renderer.composite(strokes, base, backend)
    _, _, grad, _ = renderer.loss_and_grad(strokes, base, canvas - 0.5, "l2", backend)
    # loss = mean over 3 * res * res values of residual ** 2; its derivative by the canvas is 1 / (3 res^2)
    return grad[..., RED] * (3 * res * res)
