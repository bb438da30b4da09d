"""The inner loop of a group or a joint stage: ``steps`` Adam steps on its strokes (and on the background).

A step is a handful of kernel launches (prepare, forward, backward, the fused
Adam step) and a group runs hundreds of them, each launched from Python. On
CUDA with the Triton backend the whole loop is captured once as a CUDA graph
per shape and settings and replayed for every later group and batch of that
shape; elsewhere it runs eagerly. Both run the same code (``_run_steps``).

Why: launching from Python costs the interpreter, which a pipeline worker's
decoding threads also need, and it dominates at small batches. What the
graphs buy is measured in benchmarks/RESULTS.md ("CUDA graphs").
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import torch

from . import renderer
from .optim import Adam
from .strokes import FIELDS

# Captured loops kept per process: one per (settings, batch, group size,
# resolution, background or not). Each preset uses five or six per batch size
# (groups per resolution, the joint passes), and a shard's last, partial
# batch brings a second size: twelve keep both without recapturing.
_MAX_GRAPHS = 12
_graphs: OrderedDict[tuple, _GraphedSteps] = OrderedDict()


@dataclass(frozen=True)
class OptimiserSettings:
    """Everything a loop of Adam steps does besides its shapes: a group's loop or a joint pass's stage.

    Its value, with the shapes, is the key of the loop's CUDA graph, so a setting added here is in the
    key by construction: a graph captured for other settings is never replayed.
    """

    steps: int
    lr: float
    field_lr_scales: tuple[float, ...]  # lr multiplier of each stroke field, in strokes.FIELDS order
    betas: tuple[float, float]
    lr_decay: float                     # the lr falls linearly to (1 - lr_decay) * lr over the steps
    loss: str
    step_cull_opacity: float            # the renderer's culling threshold in these steps
    bin_interval: int                   # steps between two listings of each tile's strokes

    @classmethod
    def of(cls, steps: int, lr: float, lr_scale: dict, betas, lr_decay: float, loss: str,
           step_cull_opacity: float, bin_interval: int) -> OptimiserSettings:
        """Settings with per-field lr multipliers given by field name (``{"alpha": 2.0}``; others 1)."""
        scales = tuple(float(lr_scale.get(f, 1.0)) for f in FIELDS)
        return cls(int(steps), lr, scales, tuple(betas), lr_decay, loss, step_cull_opacity, int(bin_interval))


def optimise_group(
    strokes: torch.Tensor, base: torch.Tensor | None, target: torch.Tensor, background: torch.Tensor | None,
    settings: OptimiserSettings, lo: torch.Tensor, hi: torch.Tensor, backend: str, cuda_graphs: bool = True,
) -> torch.Tensor | None:
    """Optimise ``strokes [B, n, 10]`` in place over ``target [B, 3, R, R]``.

    With ``background [B, 3]`` the base is that colour, fitted along with the
    strokes, and the fitted colour is returned; otherwise the strokes paint
    over ``base [B, 3, R, R]`` and None is returned.
    """
    lrs = _field_lrs(settings.lr, settings.field_lr_scales, strokes.device)
    if not _graphed(strokes, backend, cuda_graphs):
        return _run_steps(strokes, base, target, background, settings, lrs, lo, hi, backend, settings.steps)
    key = (settings, strokes.device, tuple(strokes.shape), tuple(target.shape), background is not None)
    graphed = _graphs.pop(key, None)
    if graphed is None:
        graphed = _GraphedSteps(strokes, base, target, background, settings, lrs, lo, hi)
        while len(_graphs) >= _MAX_GRAPHS:
            _graphs.popitem(last=False)
    _graphs[key] = graphed  # most recently used last
    return graphed(strokes, base, target, background)


def _graphed(strokes: torch.Tensor, backend: str, cuda_graphs: bool) -> bool:
    """Whether the loop runs as a CUDA graph: only the Triton kernels on CUDA are captured."""
    return cuda_graphs and backend == "triton" and strokes.is_cuda


@functools.lru_cache(maxsize=32)
def _field_lrs(lr: float, scales: tuple[float, ...], device: torch.device) -> torch.Tensor:
    # Made once per setting and device: a copy from the host waits for the GPU, which the group loop must not.
    return torch.tensor([lr * s for s in scales], device=device)


def _run_steps(strokes, base, target, background, settings, lrs, lo, hi, backend, steps):
    res = target.shape[-1]
    opt = Adam(strokes, lrs, lo, hi, settings.betas)
    grad = torch.zeros_like(strokes)
    fit_bg = background is not None
    if fit_bg:
        bg = background.clone()
        dev = bg.device
        bg_opt = Adam(bg, torch.full((3,), settings.lr, device=dev), torch.zeros(3, device=dev),
                      torch.ones(3, device=dev), settings.betas)
    bins = None
    for t in range(steps):
        # Linear decay from lr to (1 - lr_decay) * lr over the loop's steps.
        factor = 1.0 - settings.lr_decay * t / max(1, steps - 1)
        if fit_bg:
            base = bg[:, :, None, None].expand(-1, -1, res, res).contiguous()
        if t % settings.bin_interval == 0:
            # The lists of this step are kept for the next bin_interval - 1 (FitConfig.step_bin_interval).
            bins = None  # the old lists go first: two sets at once would double their memory (0.5 GB at B = 128)
            bins = renderer.stroke_lists(strokes, base, settings.loss, backend, settings.step_cull_opacity)
        _, _, grad, grad_base = renderer.loss_and_grad(strokes, base, target, settings.loss, backend, fit_bg, grad,
                                                     settings.step_cull_opacity, bins)
        opt.step(grad, factor)
        if fit_bg:
            bg_opt.step(grad_base.sum(dim=(2, 3)), factor)
    return bg if fit_bg else None


class _GraphedSteps:
    """The loop captured as a CUDA graph over private copies of its inputs.

    Everything the graph reads lives in this object (inputs, learning rates,
    bounds) or in the graph's own memory pool (Adam moments, gradients,
    canvases), so a replay never touches memory the caller may have freed.
    Each replay re-zeroes the moments and restarts Adam's step count, as a
    fresh group does.
    """

    def __init__(self, strokes, base, target, background, settings, lrs, lo, hi):
        self.strokes = strokes.clone()
        self.target = target.clone()
        self.base = base.clone() if background is None else None
        self.background = background.clone() if background is not None else None
        self.lrs, self.lo, self.hi = lrs.clone(), lo.clone(), hi.clone()
        args = (self.target, self.background, settings, self.lrs, self.lo, self.hi, "triton")
        # Compile and load every kernel outside the capture, on scratch copies.
        side = torch.cuda.Stream(strokes.device)
        side.wait_stream(torch.cuda.current_stream(strokes.device))
        with torch.cuda.stream(side):
            scratch = self.base.clone() if self.base is not None else None
            _run_steps(self.strokes.clone(), scratch, *args, steps=1)
        torch.cuda.current_stream(strokes.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a worker's other threads may use CUDA while this one captures.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.fitted_background = _run_steps(self.strokes, self.base, *args, steps=settings.steps)

    def __call__(self, strokes, base, target, background):
        self.strokes.copy_(strokes)
        self.target.copy_(target)
        if background is None:
            self.base.copy_(base)
        else:
            self.background.copy_(background)
        self.graph.replay()
        strokes.copy_(self.strokes)
        return self.fitted_background.clone() if background is not None else None
