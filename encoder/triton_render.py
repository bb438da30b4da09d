"""Fused Triton renderer: forward and backward of the stroke model with a fused loss.

One program paints one tile of one image: it walks the strokes back to front,
blending in registers, and skips every stroke whose conservative footprint
bound misses the tile (culling). The backward program walks the strokes in
reverse, carrying the adjoint of the canvas, recovers each earlier canvas by
un-blending (recomputing it exactly from the base when un-blending would
amplify rounding error too much), reduces each stroke's gradient over its
tile and adds it once with an atomic add. Nothing of size N x H x W is ever
materialised: memory is O(B x H x W).

Shapes: strokes ``[B, N, 10]``, base/target/canvas ``[B, 3, H, W]``, float32.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOSS_KINDS = {"l1": 0, "l2": 1, "prefix_l1": 2}

# A tile skips a stroke only where the stroke's opacity is provably below
# CULL_OPACITY everywhere on it, so culling changes a pixel by less than
# N * CULL_OPACITY (1e-4 at N = 1000).
CULL_OPACITY = 1e-7
# Un-blending divides by (1 - a); once the product of those divisors since the
# last exact canvas exceeds this, the canvas is recomputed from the base.
UNBLEND_LIMIT = 64.0


@triton.jit
def _atan2(y, x):
    # Cephes' single-precision arctangent after folding into [0, pi/4]
    # (a portable atan2: libdevice differs between Triton versions).
    ax = tl.abs(x)
    ay = tl.abs(y)
    hi = tl.maximum(ax, ay)
    lo = tl.minimum(ax, ay)
    t = lo / tl.maximum(hi, 1e-30)
    big = t > 0.4142135623730950
    z = tl.where(big, (t - 1.0) / (t + 1.0), t)
    z2 = z * z
    p = (((8.05374449538e-2 * z2 - 1.38776856032e-1) * z2 + 1.99777106478e-1) * z2 - 3.33329491539e-1) * z2 * z + z
    a = tl.where(big, 0.7853981633974483 + p, p)
    a = tl.where(ay > ax, 1.5707963267948966 - a, a)
    a = tl.where(x < 0, 3.141592653589793 - a, a)
    return tl.where(y < 0, -a, a)


@triton.jit
def _touches(cx, cy, mu, sr, st, alpha, x0, x1, y0, y1, cull_opacity):
    """Whether a stroke can reach opacity >= cull_opacity anywhere in the box [x0, x1] x [y0, y1].

    Where q <= log(alpha / cull), |rho| <= sr * mu * k and |phi| <= st * k with
    k = sqrt(2 log(alpha / cull)): an annular sector around the pole whose
    farthest point from the stroke centre is at radius mu + dr and angle
    phi_max, which bounds the footprint by a disc around the centre.
    """
    log_ratio = tl.log(alpha / cull_opacity)
    k = tl.sqrt(2.0 * tl.maximum(log_ratio, 0.0))
    outer = mu + sr * mu * k
    phi_max = tl.minimum(st * k, 3.141592653589793)
    reach2 = outer * outer + mu * mu - 2.0 * outer * mu * tl.cos(phi_max)
    reach = tl.sqrt(tl.maximum(reach2, 0.0)) * 1.001 + 1e-6
    gx = tl.maximum(tl.maximum(x0 - cx, cx - x1), 0.0)
    gy = tl.maximum(tl.maximum(y0 - cy, cy - y1), 0.0)
    return (gx * gx + gy * gy <= reach * reach) & (log_ratio > 0.0)


@triton.jit
def _footprint(x, y, cx, cy, cs, sn, mu, inv_sr2, inv_st2):
    """Normalised opacity exp(-q) of one stroke over a tile, with the polar intermediates."""
    dx = x - cx + cs * mu
    dy = y - cy - sn * mu
    u = cs * dx - sn * dy
    v = sn * dx + cs * dy
    r = tl.sqrt(tl.maximum(u * u + v * v, 1e-24))
    rho = r - mu
    phi = _atan2(v, u)
    e = tl.exp(-0.5 * (rho * rho * inv_sr2 + phi * phi * inv_st2))
    return e, u, v, r, rho, phi


@triton.jit
def _tile(H, W, inv_h, BH: tl.constexpr, BW: tl.constexpr):
    """This program's image, pixel offsets into it, mask, pixel-centre coordinates and the tile's box."""
    b = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    n_tw = tl.cdiv(W, BW)
    row0 = (pid // n_tw) * BH
    col0 = (pid % n_tw) * BW
    rows = row0 + tl.arange(0, BH)[:, None]
    cols = col0 + tl.arange(0, BW)[None, :]
    mask = (rows < H) & (cols < W)
    zero = tl.zeros([BH, BW], dtype=tl.float32)
    x = (cols.to(tl.float32) + 0.5) * inv_h + zero
    y = (rows.to(tl.float32) + 0.5) * inv_h + zero
    x0 = (col0 + 0.5) * inv_h
    x1 = (tl.minimum(col0 + BW, W) - 0.5) * inv_h
    y0 = (row0 + 0.5) * inv_h
    y1 = (tl.minimum(row0 + BH, H) - 0.5) * inv_h
    plane = H * W
    return b, b * 3 * plane + rows * W + cols, plane, mask, x, y, x0, x1, y0, y1


@triton.jit
def _load_rgb(P, img, plane, mask):
    """The three colour planes of one tile of a [B, 3, H, W] tensor."""
    return (tl.load(P + img, mask=mask, other=0.0), tl.load(P + img + plane, mask=mask, other=0.0),
            tl.load(P + img + 2 * plane, mask=mask, other=0.0))


@triton.jit
def _store_rgb(P, img, plane, mask, v0, v1, v2):
    tl.store(P + img, v0, mask=mask)
    tl.store(P + img + plane, v1, mask=mask)
    tl.store(P + img + 2 * plane, v2, mask=mask)


@triton.jit
def _load_extent(p):
    """The fields of the stroke at ``p`` that decide its reach: centre, mu_r, sigmas, alpha."""
    return tl.load(p + 0), tl.load(p + 1), tl.load(p + 3), tl.load(p + 4), tl.load(p + 5), tl.load(p + 9)


@triton.jit
def _blend(p, c0, c1, c2, x, y, x0, x1, y0, y1, cull_opacity):
    """Blend the stroke at ``p`` over a canvas tile when it can reach the tile; also says whether it did."""
    cx, cy, mu, sr, st, alpha = _load_extent(p)
    hit = _touches(cx, cy, mu, sr, st, alpha, x0, x1, y0, y1, cull_opacity)
    if hit:
        rot = tl.load(p + 2)
        srm = sr * mu
        e, u, v, r, rho, phi = _footprint(x, y, cx, cy, tl.cos(rot), tl.sin(rot), mu, 1.0 / (srm * srm), 1.0 / (st * st))
        a = alpha * e
        c0 += a * (tl.load(p + 6) - c0)
        c1 += a * (tl.load(p + 7) - c1)
        c2 += a * (tl.load(p + 8) - c2)
    return c0, c1, c2, hit


@triton.jit
def _paint(S, n_strokes, c0, c1, c2, x, y, x0, x1, y0, y1, cull_opacity):
    """Blend strokes 0..n_strokes-1 of one image over a canvas tile (no loss)."""
    for j in range(n_strokes):
        c0, c1, c2, hit = _blend(S + j * 10, c0, c1, c2, x, y, x0, x1, y0, y1, cull_opacity)
    return c0, c1, c2


@triton.jit
def _forward_kernel(
    S, BASE, TARGET, CANVAS, LOSS, N, H, W, inv_h, loss_scale, cull_opacity,
    LOSS_KIND: tl.constexpr, HAS_TARGET: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
):
    b, img, plane, mask, x, y, x0, x1, y0, y1 = _tile(H, W, inv_h, BH, BW)
    c0, c1, c2 = _load_rgb(BASE, img, plane, mask)
    S += b * N * 10
    if LOSS_KIND == 2 and HAS_TARGET:
        # The seed's objective: the error of every prefix canvas C_1..C_N.
        # A culled stroke leaves the tile's error unchanged, so it costs a
        # scalar add instead of a pass over the tile.
        t0, t1, t2 = _load_rgb(TARGET, img, plane, mask)
        err = tl.sum(tl.abs(c0 - t0) + tl.abs(c1 - t1) + tl.abs(c2 - t2))
        total = err * 0.0
        for j in range(N):
            c0, c1, c2, hit = _blend(S + j * 10, c0, c1, c2, x, y, x0, x1, y0, y1, cull_opacity)
            if hit:
                err = tl.sum(tl.where(mask, tl.abs(c0 - t0) + tl.abs(c1 - t1) + tl.abs(c2 - t2), 0.0))
            total += err
        tl.atomic_add(LOSS + b, total * loss_scale / tl.maximum(N, 1))
    else:
        c0, c1, c2 = _paint(S, N, c0, c1, c2, x, y, x0, x1, y0, y1, cull_opacity)
        if HAS_TARGET:
            t0, t1, t2 = _load_rgb(TARGET, img, plane, mask)
            d0 = c0 - t0
            d1 = c1 - t1
            d2 = c2 - t2
            if LOSS_KIND == 0:
                err = tl.abs(d0) + tl.abs(d1) + tl.abs(d2)
            else:
                err = d0 * d0 + d1 * d1 + d2 * d2
            tl.atomic_add(LOSS + b, tl.sum(tl.where(mask, err, 0.0)) * loss_scale)
    _store_rgb(CANVAS, img, plane, mask, c0, c1, c2)


@triton.jit
def _sign(d):
    return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))


@triton.jit
def _backward_kernel(
    S, BASE, TARGET, CANVAS, GRAD_LOSS, GRAD_S, GRAD_BASE, N, H, W, inv_h, loss_scale, cull_opacity, unblend_limit,
    LOSS_KIND: tl.constexpr, BASE_GRAD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
):
    b, img, plane, mask, x, y, x0, x1, y0, y1 = _tile(H, W, inv_h, BH, BW)
    c0, c1, c2 = _load_rgb(CANVAS, img, plane, mask)
    t0, t1, t2 = _load_rgb(TARGET, img, plane, mask)
    scale = tl.load(GRAD_LOSS + b) * loss_scale
    inside = tl.where(mask, 1.0, 0.0)
    # lam: adjoint of the current canvas. For the prefix loss it is carried as
    # lam + pending * sign(C - T) * scale: a culled stroke adds one pending
    # term (its prefix canvas equals the current one) instead of a tile pass.
    pending = scale * 0.0
    if LOSS_KIND == 0:
        l0 = _sign(c0 - t0) * scale * inside
        l1 = _sign(c1 - t1) * scale * inside
        l2 = _sign(c2 - t2) * scale * inside
    elif LOSS_KIND == 1:
        l0 = 2.0 * (c0 - t0) * scale * inside
        l1 = 2.0 * (c1 - t1) * scale * inside
        l2 = 2.0 * (c2 - t2) * scale * inside
    else:
        scale = scale / tl.maximum(N, 1)
        l0 = inside * 0.0
        l1 = inside * 0.0
        l2 = inside * 0.0
        pending += 1.0
    amp = inside * 0.0 + 1.0
    S += b * N * 10
    G = GRAD_S + b * N * 10
    for i in range(N):
        k = N - 1 - i
        p = S + k * 10
        cx, cy, mu, sr, st, alpha = _load_extent(p)
        if _touches(cx, cy, mu, sr, st, alpha, x0, x1, y0, y1, cull_opacity):
            if LOSS_KIND == 2:
                l0 += pending * _sign(c0 - t0) * scale * inside
                l1 += pending * _sign(c1 - t1) * scale * inside
                l2 += pending * _sign(c2 - t2) * scale * inside
                pending = pending * 0.0
            rot = tl.load(p + 2)
            cr = tl.load(p + 6)
            cg = tl.load(p + 7)
            cb = tl.load(p + 8)
            cs = tl.cos(rot)
            sn = tl.sin(rot)
            srm = sr * mu
            inv_sr2 = 1.0 / (srm * srm)
            inv_st2 = 1.0 / (st * st)
            e, u, v, r, rho, phi = _footprint(x, y, cx, cy, cs, sn, mu, inv_sr2, inv_st2)
            a = alpha * e
            keep = 1.0 - a
            # Canvas before this stroke: un-blend while it is well conditioned.
            inv_keep = 1.0 / tl.maximum(keep, 1e-30)
            grown = amp * inv_keep
            if tl.max(tl.where(mask, grown, 0.0)) > unblend_limit:
                p0, p1, p2 = _load_rgb(BASE, img, plane, mask)
                p0, p1, p2 = _paint(S, k, p0, p1, p2, x, y, x0, x1, y0, y1, cull_opacity)
                amp = inside * 0.0 + 1.0
            else:
                p0 = (c0 - a * cr) * inv_keep
                p1 = (c1 - a * cg) * inv_keep
                p2 = (c2 - a * cb) * inv_keep
                amp = grown
            g_a = tl.where(mask, l0 * (cr - p0) + l1 * (cg - p1) + l2 * (cb - p2), 0.0)
            g_q = -g_a * a
            g_rho = g_q * rho * inv_sr2
            g_phi = g_q * phi * inv_st2
            inv_r = 1.0 / r
            g_u = (g_rho * u - g_phi * v * inv_r) * inv_r
            g_v = (g_rho * v + g_phi * u * inv_r) * inv_r
            g_dx = tl.sum(g_u * cs + g_v * sn)
            g_dy = tl.sum(g_v * cs - g_u * sn)
            g_srm = -tl.sum(g_q * rho * rho) * inv_sr2 / srm
            tl.atomic_add(G + k * 10 + 0, -g_dx)
            tl.atomic_add(G + k * 10 + 1, -g_dy)
            tl.atomic_add(G + k * 10 + 2, tl.sum(g_v * u - g_u * v) - mu * (sn * g_dx + cs * g_dy))
            tl.atomic_add(G + k * 10 + 3, g_srm * sr - tl.sum(g_rho) + cs * g_dx - sn * g_dy)
            tl.atomic_add(G + k * 10 + 4, g_srm * mu)
            tl.atomic_add(G + k * 10 + 5, -tl.sum(g_q * phi * phi) * inv_st2 / st)
            tl.atomic_add(G + k * 10 + 6, tl.sum(a * l0))
            tl.atomic_add(G + k * 10 + 7, tl.sum(a * l1))
            tl.atomic_add(G + k * 10 + 8, tl.sum(a * l2))
            tl.atomic_add(G + k * 10 + 9, tl.sum(g_a * e))
            l0 *= keep
            l1 *= keep
            l2 *= keep
            c0 = p0
            c1 = p1
            c2 = p2
        # The canvas now is C_k (0-based k strokes painted); it is a prefix
        # term of the seed's loss for k >= 1.
        if LOSS_KIND == 2:
            if k >= 1:
                pending += 1.0
    if BASE_GRAD:
        if LOSS_KIND == 2:
            l0 += pending * _sign(c0 - t0) * scale * inside
            l1 += pending * _sign(c1 - t1) * scale * inside
            l2 += pending * _sign(c2 - t2) * scale * inside
        _store_rgb(GRAD_BASE, img, plane, mask, l0, l1, l2)


def _check(strokes: torch.Tensor, base: torch.Tensor, target: torch.Tensor | None) -> None:
    if strokes.dim() != 3 or strokes.shape[-1] != 10:
        raise ValueError(f"strokes must be [B, N, 10], got {list(strokes.shape)}")
    if base.dim() != 4 or base.shape[1] != 3 or base.shape[0] != strokes.shape[0]:
        raise ValueError(f"base must be [B, 3, H, W] with B = {strokes.shape[0]}, got {list(base.shape)}")
    if target is not None and target.shape != base.shape:
        raise ValueError(f"target must match base {list(base.shape)}, got {list(target.shape)}")
    for name, t in (("strokes", strokes), ("base", base), ("target", target)):
        if t is not None and (t.dtype != torch.float32 or t.device != strokes.device):
            raise ValueError(f"{name} must be float32 on {strokes.device}, got {t.dtype} on {t.device}")


def _grid(b: int, h: int, w: int, tile: tuple[int, int]) -> tuple[int, int]:
    return (triton.cdiv(h, tile[0]) * triton.cdiv(w, tile[1]), b)


# (rows, columns, warps), best first: 32 x 32 on 2 warps gives each thread 16
# pixels, over which the per-stroke tile reductions amortise (run 11 in
# benchmarks/RESULTS.md); smaller tiles only when the big ones leave SMs idle.
TILES = ((32, 32, 2), (16, 32, 4), (16, 16, 4))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def pick_tile(b: int, h: int, w: int, device: torch.device) -> tuple[tuple[int, int], int]:
    """The largest tile that still gives every SM two programs, else the smallest: ``((BH, BW), warps)``."""
    for bh, bw, warps in TILES:
        if b * triton.cdiv(h, bh) * triton.cdiv(w, bw) >= 2 * _sm_count(device):
            return (bh, bw), warps
    bh, bw, warps = TILES[-1]
    return (bh, bw), warps


def forward(
    strokes: torch.Tensor, base: torch.Tensor, target: torch.Tensor | None = None, loss: str = "l2",
    tile: tuple[int, int] | None = None, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Canvas ``[B, 3, H, W]`` and loss ``[B]`` (None without target). No autograd.

    ``tile``/``num_warps`` default to ``pick_tile``'s choice for the shape.
    """
    _check(strokes, base, target)
    strokes, base = strokes.contiguous(), base.contiguous()
    target = target.contiguous() if target is not None else None
    bsz, n = strokes.shape[:2]
    h, w = base.shape[-2:]
    canvas = torch.empty_like(base)
    value = torch.zeros(bsz, device=base.device, dtype=torch.float32)
    if tile is None:
        tile, num_warps = pick_tile(bsz, h, w, base.device)
    num_warps = num_warps or 4
    _forward_kernel[_grid(bsz, h, w, tile)](
        strokes, base, target if target is not None else base, canvas, value,
        n, h, w, 1.0 / h, 1.0 / (3 * h * w), CULL_OPACITY,
        LOSS_KIND=LOSS_KINDS[loss], HAS_TARGET=target is not None, BH=tile[0], BW=tile[1], num_warps=num_warps,
    )
    return canvas, (value if target is not None else None)


def backward(
    strokes: torch.Tensor, base: torch.Tensor, target: torch.Tensor, canvas: torch.Tensor, grad_loss: torch.Tensor,
    loss: str = "l2", base_grad: bool = False, grad_strokes: torch.Tensor | None = None,
    tile: tuple[int, int] | None = None, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of ``sum_b grad_loss[b] * loss[b]`` w.r.t. strokes ``[B, N, 10]`` (and base).

    ``canvas`` is the forward's output. ``grad_strokes``, if given, is
    accumulated into (it must be zeroed by the caller for a fresh gradient).
    """
    bsz, n = strokes.shape[:2]
    h, w = base.shape[-2:]
    if grad_strokes is None:
        grad_strokes = torch.zeros_like(strokes)
    grad_base = torch.empty_like(base) if base_grad else None
    if tile is None:
        tile, num_warps = pick_tile(bsz, h, w, base.device)
    num_warps = num_warps or 4
    _backward_kernel[_grid(bsz, h, w, tile)](
        strokes, base, target, canvas, grad_loss.contiguous(), grad_strokes, grad_base if base_grad else base,
        n, h, w, 1.0 / h, 1.0 / (3 * h * w), CULL_OPACITY, UNBLEND_LIMIT,
        LOSS_KIND=LOSS_KINDS[loss], BASE_GRAD=base_grad, BH=tile[0], BW=tile[1], num_warps=num_warps,
    )
    return grad_strokes, grad_base


class RenderLoss(torch.autograd.Function):
    """Autograd wrapper: ``(strokes, base, target) -> (canvas, loss[B])``.

    The loss is differentiable w.r.t. strokes and base; the canvas is returned
    for inspection only (marked non-differentiable: gradients flow through the
    fused loss, never through a materialised canvas).
    """

    @staticmethod
    def forward(ctx, strokes, base, target, loss):
        strokes, base, target = strokes.contiguous(), base.contiguous(), target.contiguous()
        canvas, value = forward(strokes, base, target, loss)
        ctx.save_for_backward(strokes, base, target, canvas)
        ctx.loss = loss
        ctx.mark_non_differentiable(canvas)
        return canvas, value

    @staticmethod
    def backward(ctx, grad_canvas, grad_loss):
        strokes, base, target, canvas = ctx.saved_tensors
        base_grad = ctx.needs_input_grad[1]
        grad_strokes, grad_base = backward(strokes, base, target, canvas, grad_loss, ctx.loss, base_grad)
        return grad_strokes, grad_base, None, None


def render_loss(strokes: torch.Tensor, base: torch.Tensor, target: torch.Tensor, loss: str = "l2"):
    """Differentiable fused render + loss. Returns ``(canvas, loss [B])``.

    ``base`` may be anything that broadcasts to the target, e.g. ``[B, 3, 1, 1]`` colours.
    """
    base = base.expand(target.shape)
    _check(strokes, base, target)
    return RenderLoss.apply(strokes, base, target, loss)
