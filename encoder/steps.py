"""The inner loop of one group: ``steps`` Adam steps on its strokes (and on the background, for the first group).

A step is a handful of kernel launches (prepare, forward, backward, the fused
Adam step) and a group runs hundreds of them, each launched from Python. On
CUDA with the Triton backend the whole loop is captured once as a CUDA graph
per shape and replayed for every later group and batch of that shape;
elsewhere it runs eagerly. Both run the same code (``_run_steps``).

Why: launching from Python costs the interpreter, which a pipeline worker's
decoding threads also need, and it dominates at small batches. What the
graphs buy is measured in benchmarks/RESULTS.md ("CUDA graphs").
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from . import renderer
from .config import FitConfig
from .optim import Adam

# Captured loops kept per process: one per (batch, group size, resolution,
# background or not, steps, lr, ...). Each preset uses five or six per batch
# size (groups per resolution, the joint passes), and a shard's last, partial
# batch brings a second size: twelve keep both without recapturing.
_MAX_GRAPHS = 12
_graphs: OrderedDict[tuple, _GraphedSteps] = OrderedDict()


def optimise_group(
    strokes: torch.Tensor, base: torch.Tensor, target: torch.Tensor, background: torch.Tensor | None,
    config: FitConfig, lrs: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, backend: str,
) -> torch.Tensor | None:
    """Optimise ``strokes [B, n, 10]`` in place over ``target [B, 3, R, R]``.

    With ``background [B, 3]`` the base is that colour, fitted along with the
    strokes, and the fitted colour is returned; otherwise the strokes paint
    over ``base [B, 3, R, R]`` and None is returned.
    """
    if not (config.cuda_graphs and backend == "triton" and strokes.is_cuda):
        return _run_steps(strokes, base, target, background, config, lrs, lo, hi, backend, config.steps)
    # lrs follow from lr and lr_scale; keying on them, not on the tensor, needs no device sync.
    key = (strokes.device, tuple(strokes.shape), tuple(target.shape), background is not None, config.steps,
           config.loss, config.betas, config.lr, config.lr_decay, tuple(sorted(config.lr_scale.items())),
           config.step_cull_opacity)
    graphed = _graphs.pop(key, None)
    if graphed is None:
        graphed = _GraphedSteps(strokes, base, target, background, config, lrs, lo, hi)
        while len(_graphs) >= _MAX_GRAPHS:
            _graphs.popitem(last=False)
    _graphs[key] = graphed  # most recently used last
    return graphed(strokes, base, target, background)


def _run_steps(strokes, base, target, background, config, lrs, lo, hi, backend, steps):
    res = target.shape[-1]
    opt = Adam(strokes, lrs, lo, hi, config.betas)
    grad = torch.zeros_like(strokes)
    fit_bg = background is not None
    if fit_bg:
        bg = background.clone()
        dev = bg.device
        bg_opt = Adam(bg, torch.full((3,), config.lr, device=dev), torch.zeros(3, device=dev),
                      torch.ones(3, device=dev), config.betas)
    for t in range(steps):
        # Linear decay from lr to (1 - lr_decay) * lr over the loop's steps.
        factor = 1.0 - config.lr_decay * t / max(1, steps - 1)
        if fit_bg:
            base = bg[:, :, None, None].expand(-1, -1, res, res).contiguous()
        _, _, grad, grad_base = renderer.loss_and_grad(strokes, base, target, config.loss, backend, fit_bg, grad,
                                                     config.step_cull_opacity)
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

    def __init__(self, strokes, base, target, background, config, lrs, lo, hi):
        self.strokes = strokes.clone()
        self.target = target.clone()
        self.base = base.clone() if background is None else None
        self.background = background.clone() if background is not None else None
        self.lrs, self.lo, self.hi = lrs.clone(), lo.clone(), hi.clone()
        args = (self.target, self.background, config, self.lrs, self.lo, self.hi, "triton")
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
            self.fitted_background = _run_steps(self.strokes, self.base, *args, steps=config.steps)

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
