"""One entry point to the two renderers: Triton on CUDA, the dense reference elsewhere.

Callers (the fit loop, the CLI, the pipeline through ``encoder.render``) pick
a backend once and then call ``loss_and_grad``/``composite``/``render``
without caring which one runs.
"""
from __future__ import annotations

import torch

from . import reference

BACKENDS = ("auto", "triton", "reference")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> the current CUDA device when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available on this machine")
    return device


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> triton on CUDA, the reference elsewhere.

    ``triton`` on the CPU runs the kernels through Triton's interpreter
    (TRITON_INTERPRET=1): only for tests, far too slow for real work.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" else "reference"


def loss_and_grad(
    strokes: torch.Tensor, base: torch.Tensor, target: torch.Tensor, loss: str, backend: str, base_grad: bool = False,
    grad_out: torch.Tensor | None = None, cull_opacity: float | None = None, bins=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Canvas, per-image loss ``[B]`` and the gradient of ``loss.sum()``.

    ``grad_out``, if given, must be zero; the Triton backend accumulates into it.
    ``cull_opacity``: the Triton backend's culling threshold (``triton_render.prepare``; None: its
    default); the reference culls nothing.
    ``bins``: per-tile stroke lists to render with (``stroke_lists``, possibly of earlier parameters of
    the same strokes: each tile then paints exactly its listed strokes as they are now); None: listed
    afresh where binning pays. The reference ignores them.

    Returns ``(canvas, loss, grad_strokes [B, N, 10], grad_base [B, 3, H, W] or None)``.
    Images are independent, so the summed loss gives each image its own gradient.
    """
    if backend == "triton":
        from . import triton_render

        prepared = triton_render.prepare(strokes, cull_opacity or triton_render.CULL_OPACITY)
        if bins is None:
            bins = _bins(prepared, base, loss)
        canvas, value = triton_render.forward(strokes, base, target, loss, prepared=prepared, bins=bins)
        ones = torch.ones_like(value)
        grad, grad_base = triton_render.backward(strokes, base, target, canvas, ones, loss, base_grad, grad_out,
                                                 prepared=prepared, bins=bins)
        return canvas, value, grad, grad_base
    with torch.enable_grad():
        s = strokes.detach().requires_grad_(True)
        b = base.detach().requires_grad_(base_grad)
        canvas, value = reference.render_loss(s, b, target, loss)
        grads = torch.autograd.grad(value.sum(), [s, b] if base_grad else [s])
    return canvas.detach(), value.detach(), grads[0], (grads[1] if base_grad else None)


def stroke_lists(strokes: torch.Tensor, base: torch.Tensor, loss: str, backend: str,
                 cull_opacity: float | None = None):
    """The per-tile stroke lists ``loss_and_grad`` would make for these strokes now, to be kept for
    later steps; None where it would not bin (the reference, too few strokes, the prefix loss)."""
    if backend != "triton":
        return None
    from . import triton_render

    return _bins(triton_render.prepare(strokes, cull_opacity or triton_render.CULL_OPACITY), base, loss)


def _bins(prepared: torch.Tensor, base: torch.Tensor, loss: str | None):
    """Per-tile stroke lists when they pay for themselves (``triton_render.should_bin``), else None."""
    from . import triton_render

    if not triton_render.should_bin(prepared.shape[1], loss):
        return None
    return triton_render.bin_strokes(prepared, *base.shape[-2:])


def composite(strokes: torch.Tensor, base: torch.Tensor, backend: str) -> torch.Tensor:
    """Paint ``[B, N, 10]`` strokes over a ``[B, 3, H, W]`` canvas (no gradient)."""
    with torch.no_grad():
        if strokes.shape[1] == 0:
            return base.clone()
        if backend == "triton":
            from . import triton_render

            strokes = strokes.contiguous()
            prepared = triton_render.prepare(strokes)
            bins = _bins(prepared, base, None)
            return triton_render.forward(strokes, base.contiguous(), prepared=prepared, bins=bins)[0]
        return reference.render_loss(strokes, base)[0]


def render(
    strokes: torch.Tensor, background: torch.Tensor, height: int, width: int,
    device: str | torch.device = "auto", backend: str = "auto",
) -> torch.Tensor:
    """Paint ``[B, N, 10]`` strokes over ``[B, 3]`` background colours at H x W: ``[B, 3, H, W]``.

    Returns a float32 tensor on the CPU.
    """
    if strokes.dim() == 2:
        strokes, background = strokes[None], background.reshape(1, 3)
    dev = resolve_device(device)
    backend = resolve_backend(backend, dev)
    strokes = strokes.to(dev, torch.float32)
    base = background.to(dev, torch.float32)[:, :, None, None].expand(-1, -1, height, width).contiguous()
    return composite(strokes, base, backend).cpu()
