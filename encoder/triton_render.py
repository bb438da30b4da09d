"""Fused Triton renderer: forward and backward of the stroke model with a fused loss.

One program paints one tile of one image: it walks the strokes back to front,
blending in registers, and skips every stroke whose footprint provably misses
the tile (culling, `_reach`). The backward program walks the strokes in
reverse, carrying the adjoint of the canvas, recovers each earlier canvas by
un-blending (recomputing it exactly from the base when un-blending could
amplify rounding error too much), reduces each stroke's gradient over its
tile and adds it once with an atomic add. Nothing of size N x H x W is ever
materialised: memory is O(B x H x W), plus B x tiles x N stroke indices when
binned.

A small kernel first derives, once per stroke, what every tile would
otherwise recompute (pole, rotation, inverse widths, culling radius): the
"prepared" strokes, ``[B, N, PREP]`` in the layout of PREPARED_FIELDS.

With enough strokes (``should_bin``) a second small kernel bins them: for
each tile it lists, in painting order, the strokes that can reach it
(``bin_strokes``), and the forward and backward programs visit only their
tile's list instead of testing every stroke.

Shapes: strokes ``[B, N, 10]``, base/target/canvas ``[B, 3, H, W]``, float32.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .strokes import FIELDS

# The fused loss: a kernel's LOSS_KIND (each kind compiles to its own kernel). Kernels read these
# module globals, so they are tl.constexpr (see _at).
LOSS_L1 = tl.constexpr(0)
LOSS_L2 = tl.constexpr(1)
LOSS_PREFIX_L1 = tl.constexpr(2)  # the seed's: the mean over the prefix canvases C_1..C_N of their L1 error
LOSS_KINDS = {"l1": LOSS_L1.value, "l2": LOSS_L2.value, "prefix_l1": LOSS_PREFIX_L1.value}

# A tile skips a stroke only where the stroke's opacity is provably below
# CULL_OPACITY everywhere on it, so culling changes a pixel by less than
# N * CULL_OPACITY (1e-4 at N = 1000).
CULL_OPACITY = 1e-7
# Un-blending divides by (1 - a); once a bound on the product of those
# divisors since the last exact canvas exceeds this, the canvas is recomputed
# from the base instead.
UNBLEND_LIMIT = 64.0

# A prepared stroke: what _prepare_kernel writes and the other kernels read,
# one float each, in this order.
PREPARED_FIELDS = (
    "cx", "cy",
    "reach2",  # squared radius of the disc around the centre that holds the footprint (-1: never visible)
    "px", "py",  # the pole
    "cos", "sin",  # of rot
    "mu",  # mu_r
    "kr", "kt",  # 1 / (sigma_r mu_r)^2 and 1 / sigma_t^2
    "kr_exp2", "kt_exp2",  # kr and kt times -log2(e) / 2, so exp(-q) = exp2(kr' rho^2 + kt' phi^2)
    "log_ratio",  # log(alpha / cull)
    "alpha",
    "srm",  # sigma_r mu_r
    "pad",  # unused: pads a record to 64 bytes, so none straddles a cache line
)


def _at(layout: tuple[str, ...], name: str) -> tl.constexpr:
    # Kernels may read a module global only when it is a tl.constexpr (newer
    # Triton refuses others); as one it also folds into the address.
    return tl.constexpr(layout.index(name))


# Floats per raw stroke and per prepared stroke (the kernels' strides).
STROKE = tl.constexpr(len(FIELDS))
PREP = tl.constexpr(len(PREPARED_FIELDS))
# Raw stroke fields, where strokes.FIELDS puts them.
F_CX, F_CY, F_ROT = _at(FIELDS, "cx"), _at(FIELDS, "cy"), _at(FIELDS, "rot")
F_MU_R, F_SIGMA_R, F_SIGMA_T = _at(FIELDS, "mu_r"), _at(FIELDS, "sigma_r"), _at(FIELDS, "sigma_t")
F_RED, F_GREEN, F_BLUE, F_ALPHA = _at(FIELDS, "r"), _at(FIELDS, "g"), _at(FIELDS, "b"), _at(FIELDS, "alpha")
# Prepared stroke fields.
P_CX, P_CY, P_REACH2 = _at(PREPARED_FIELDS, "cx"), _at(PREPARED_FIELDS, "cy"), _at(PREPARED_FIELDS, "reach2")
P_PX, P_PY = _at(PREPARED_FIELDS, "px"), _at(PREPARED_FIELDS, "py")
P_COS, P_SIN, P_MU = _at(PREPARED_FIELDS, "cos"), _at(PREPARED_FIELDS, "sin"), _at(PREPARED_FIELDS, "mu")
P_KR, P_KT = _at(PREPARED_FIELDS, "kr"), _at(PREPARED_FIELDS, "kt")
P_KR_EXP2, P_KT_EXP2 = _at(PREPARED_FIELDS, "kr_exp2"), _at(PREPARED_FIELDS, "kt_exp2")
P_LOG_RATIO, P_ALPHA = _at(PREPARED_FIELDS, "log_ratio"), _at(PREPARED_FIELDS, "alpha")
P_SRM, P_PAD = _at(PREPARED_FIELDS, "srm"), _at(PREPARED_FIELDS, "pad")


def _fast_math() -> bool:
    """Approximate PTX reciprocal, rsqrt and exp2 on the GPU; plain operations under the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


@triton.jit
def _ptx_approx(x, INSTRUCTION: tl.constexpr):
    """One single-precision PTX instruction on every element: ``INSTRUCTION dst, x;``."""
    return tl.inline_asm_elementwise(INSTRUCTION + " $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    # Triton's `/` is div.full.f32, which guards huge divisors; none of ours are.
    if FAST:
        return _ptx_approx(x, "rcp.approx.ftz.f32")
    else:
        return 1.0 / x


@triton.jit
def _rsqrt(x, FAST: tl.constexpr):
    if FAST:
        return _ptx_approx(x, "rsqrt.approx.ftz.f32")
    else:
        return 1.0 / tl.sqrt(x)


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    # tl.exp2 is ex2.approx.f32, which also handles denormal results; an
    # opacity below 1e-38 is zero to us.
    if FAST:
        return _ptx_approx(x, "ex2.approx.ftz.f32")
    else:
        return tl.exp2(x)


@triton.jit
def _atan2(y, x, FAST: tl.constexpr):
    # Cephes' single-precision arctangent after folding into [0, pi/4]
    # (a portable atan2: libdevice differs between Triton versions).
    ax = tl.abs(x)
    ay = tl.abs(y)
    hi = tl.maximum(ax, ay)
    lo = tl.minimum(ax, ay)
    t = lo * _rcp(tl.maximum(hi, 1e-30), FAST)
    big = t > 0.4142135623730950
    z = tl.where(big, (t - 1.0) * _rcp(t + 1.0, FAST), t)
    z2 = z * z
    p = (((8.05374449538e-2 * z2 - 1.38776856032e-1) * z2 + 1.99777106478e-1) * z2 - 3.33329491539e-1) * z2 * z + z
    a = tl.where(big, 0.7853981633974483 + p, p)
    a = tl.where(ay > ax, 1.5707963267948966 - a, a)
    a = tl.where(x < 0, 3.141592653589793 - a, a)
    return tl.where(y < 0, -a, a)


@triton.jit
def _prepare_kernel(S, PREPARED, total, cull_opacity, BLOCK: tl.constexpr):
    """Per stroke: the pole, cos/sin of the rotation, inverse squared widths, and the culling bounds.

    Where q <= log(alpha / cull), |rho| <= sr * mu * k and |phi| <= st * k with
    k = sqrt(2 log(alpha / cull)): an annular sector around the pole whose
    farthest point from the stroke centre is at radius mu + dr and angle
    phi_max. That bounds the footprint by a disc around the centre, the
    cheap first test of `_reach`.
    """
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < total
    s = S + i.to(tl.int64) * STROKE
    cx = tl.load(s + F_CX, mask=m, other=0.0)
    cy = tl.load(s + F_CY, mask=m, other=0.0)
    rot = tl.load(s + F_ROT, mask=m, other=0.0)
    mu = tl.load(s + F_MU_R, mask=m, other=1.0)
    sr = tl.load(s + F_SIGMA_R, mask=m, other=1.0)
    st = tl.load(s + F_SIGMA_T, mask=m, other=1.0)
    alpha = tl.load(s + F_ALPHA, mask=m, other=1.0)
    cs = tl.cos(rot)
    sn = tl.sin(rot)
    srm = sr * mu
    kr = 1.0 / (srm * srm)
    kt = 1.0 / (st * st)
    log_ratio = tl.log(alpha / cull_opacity)
    k = tl.sqrt(2.0 * tl.maximum(log_ratio, 0.0))
    outer = mu + srm * k
    phi_max = tl.minimum(st * k, 3.141592653589793)
    reach2 = outer * outer + mu * mu - 2.0 * outer * mu * tl.cos(phi_max)
    reach = tl.sqrt(tl.maximum(reach2, 0.0)) * 1.001 + 1e-6
    p = PREPARED + i.to(tl.int64) * PREP
    tl.store(p + P_CX, cx, mask=m)
    tl.store(p + P_CY, cy, mask=m)
    tl.store(p + P_REACH2, tl.where(log_ratio > 0.0, reach * reach, -1.0), mask=m)
    tl.store(p + P_PX, cx - cs * mu, mask=m)
    tl.store(p + P_PY, cy + sn * mu, mask=m)
    tl.store(p + P_COS, cs, mask=m)
    tl.store(p + P_SIN, sn, mask=m)
    tl.store(p + P_MU, mu, mask=m)
    tl.store(p + P_KR, kr, mask=m)
    tl.store(p + P_KT, kt, mask=m)
    tl.store(p + P_KR_EXP2, kr * -0.7213475204444817, mask=m)  # -log2(e) / 2
    tl.store(p + P_KT_EXP2, kt * -0.7213475204444817, mask=m)
    tl.store(p + P_LOG_RATIO, log_ratio, mask=m)
    tl.store(p + P_ALPHA, alpha, mask=m)
    tl.store(p + P_SRM, srm, mask=m)
    tl.store(p + P_PAD, 0.0 * cx, mask=m)


@triton.jit
def _reach(P, x0, x1, y0, y1):
    """Whether the prepared stroke at ``P`` can reach its culling opacity in the box [x0, x1] x [y0, y1].

    First the disc around the centre (cheap, rules out far tiles), then the
    annular sector itself (`_q_min`).
    """
    hit = _in_disc(P, x0, x1, y0, y1)
    if hit:
        hit = _q_min(P, x0, x1, y0, y1) <= tl.load(P + P_LOG_RATIO)
    return hit


@triton.jit
def _in_disc(P, x0, x1, y0, y1):
    """Whether the box meets the disc around the stroke's centre that holds its footprint."""
    cx = tl.load(P + P_CX)
    cy = tl.load(P + P_CY)
    gx = tl.maximum(tl.maximum(x0 - cx, cx - x1), 0.0)
    gy = tl.maximum(tl.maximum(y0 - cy, cy - y1), 0.0)
    return gx * gx + gy * gy <= tl.load(P + P_REACH2)


@triton.jit
def _q_min(P, x0, x1, y0, y1):
    """A lower bound of the exponent q of the prepared stroke at ``P`` over the box.

    q = (kr rho^2 + kt phi^2) / 2 is at least the sum of the two terms'
    minima over the box:
    - |rho| is at least the gap between the ring of radius mu and the range
      of the box's distances from the pole;
    - unless the box straddles the phi = 0 ray, |phi| is smallest at a corner,
      the one of largest cos(phi), and phi^2 >= 2 (1 - cos(phi)) on [0, pi]
      (tight for the small angles where culling decides; no arctangent).
    Elementwise: ``P`` may be one stroke or a block of them (`_bin_kernel`).
    """
    px = tl.load(P + P_PX)
    py = tl.load(P + P_PY)
    ax0 = x0 - px
    ax1 = x1 - px
    ay0 = y0 - py
    ay1 = y1 - py
    cs = tl.load(P + P_COS)
    sn = tl.load(P + P_SIN)
    mu = tl.load(P + P_MU)
    nx = tl.maximum(tl.maximum(ax0, -ax1), 0.0)
    ny = tl.maximum(tl.maximum(ay0, -ay1), 0.0)
    fx = tl.maximum(tl.abs(ax0), tl.abs(ax1))
    fy = tl.maximum(tl.abs(ay0), tl.abs(ay1))
    d_near = tl.sqrt(nx * nx + ny * ny)
    d_far = tl.sqrt(fx * fx + fy * fy)
    # The 1e-6 slacks absorb float32 rounding.
    rho_min = tl.maximum(tl.maximum(d_near - mu, mu - d_far) - 1e-6, 0.0)
    u00 = cs * ax0 - sn * ay0
    v00 = sn * ax0 + cs * ay0
    u01 = cs * ax0 - sn * ay1
    v01 = sn * ax0 + cs * ay1
    u10 = cs * ax1 - sn * ay0
    v10 = sn * ax1 + cs * ay0
    u11 = cs * ax1 - sn * ay1
    v11 = sn * ax1 + cs * ay1
    v_hi = tl.maximum(tl.maximum(v00, v01), tl.maximum(v10, v11))
    v_lo = tl.minimum(tl.minimum(v00, v01), tl.minimum(v10, v11))
    u_hi = tl.maximum(tl.maximum(u00, u01), tl.maximum(u10, u11))
    cos_max = tl.maximum(tl.maximum(_cos_of(u00, v00), _cos_of(u01, v01)),
                         tl.maximum(_cos_of(u10, v10), _cos_of(u11, v11)))
    straddles = (v_hi >= 0.0) & (v_lo <= 0.0) & (u_hi >= 0.0)
    one_minus_cos = tl.where(straddles, 0.0, tl.maximum(1.0 - cos_max - 1e-6, 0.0))
    return 0.5 * tl.load(P + P_KR) * rho_min * rho_min + tl.load(P + P_KT) * one_minus_cos


@triton.jit
def _bin_kernel(PREPARED, SOURCE, SOURCE_COUNT, LIST, COUNT, N, H, W, inv_h, BH: tl.constexpr, BW: tl.constexpr,
                COARSE_ROWS: tl.constexpr, COARSE_COLS: tl.constexpr, FROM_COARSE: tl.constexpr,
                BLOCK: tl.constexpr):
    """Per tile of each image, the strokes that reach it, in painting order: ``LIST[b, tile, :COUNT[b, tile]]``.

    `_reach`'s test on BLOCK strokes at once, then a prefix sum compacts the
    hits. The forward and backward programs of a binned launch then visit
    only their tile's list: a culled stroke costs them nothing instead of a
    serial test each, which is most of the work when strokes are small
    against the image.

    FROM_COARSE: the candidates are not all N strokes but the list of the
    coarse tile (COARSE_ROWS x COARSE_COLS of these tiles, binned by this
    kernel before, ``SOURCE``/``SOURCE_COUNT``) that holds this tile. A stroke
    that provably misses the coarse tile misses every tile inside it, so the
    list is the same proof of culling, at a fraction of the tests.
    """
    b, img, plane, mask, xs, ys, x0, x1, y0, y1 = _tile(H, W, inv_h, BH, BW)
    cell = b * tl.num_programs(0) + tl.program_id(0)
    out = LIST + cell * N
    PREPARED += b * N * PREP
    count = tl.program_id(0) * 0
    if FROM_COARSE:
        n_tw = tl.cdiv(W, BW)
        n_cw = tl.cdiv(W, BW * COARSE_COLS)
        n_ch = tl.cdiv(H, BH * COARSE_ROWS)
        pid = tl.program_id(0)
        coarse = b * n_cw * n_ch + ((pid // n_tw) // COARSE_ROWS) * n_cw + (pid % n_tw) // COARSE_COLS
        candidates = tl.load(SOURCE_COUNT + coarse)
        source = SOURCE + coarse * N
    else:
        candidates = N
        source = SOURCE
    for start in range(0, candidates, BLOCK):
        k = start + tl.arange(0, BLOCK)
        inside = k < candidates
        if FROM_COARSE:
            j = tl.load(source + k, mask=inside, other=0).to(tl.int32)
        else:
            j = tl.minimum(k, N - 1)  # the tail re-reads the last stroke, masked below
        P = PREPARED + j * PREP
        hit = inside & _in_disc(P, x0, x1, y0, y1)
        hit = hit & (_q_min(P, x0, x1, y0, y1) <= tl.load(P + P_LOG_RATIO))
        flags = hit.to(tl.int32)
        slot = count + tl.cumsum(flags, 0) - 1
        tl.store(out + slot, j.to(LIST.dtype.element_ty), mask=hit)
        count += tl.sum(flags, 0)
    tl.store(COUNT + cell, count)


@triton.jit
def _cos_of(u, v):
    """cos of the angle of (u, v) from the u axis."""
    return u / tl.sqrt(tl.maximum(u * u + v * v, 1e-30))


@triton.jit
def _footprint(xs, ys, P, FAST: tl.constexpr):
    """Normalised opacity exp(-q) of the prepared stroke at ``P`` over a tile, with the polar intermediates.

    ``xs`` is a row of pixel-centre x ([1, BW]) and ``ys`` a column ([BH, 1]):
    the rotation is applied to each before they broadcast to the tile.
    """
    cs = tl.load(P + P_COS)
    sn = tl.load(P + P_SIN)
    dx = xs - tl.load(P + P_PX)
    dy = ys - tl.load(P + P_PY)
    u = cs * dx - sn * dy
    v = sn * dx + cs * dy
    rr = tl.maximum(u * u + v * v, 1e-24)
    inv_r = _rsqrt(rr, FAST)
    rho = rr * inv_r - tl.load(P + P_MU)
    phi = _atan2(v, u, FAST)
    e = _exp2(rho * rho * tl.load(P + P_KR_EXP2) + phi * phi * tl.load(P + P_KT_EXP2), FAST)
    return e, u, v, inv_r, rho, phi


@triton.jit
def _tile(H, W, inv_h, BH: tl.constexpr, BW: tl.constexpr):
    """This program's image, pixel offsets into it, mask, pixel-centre row/column coordinates and the tile's box."""
    b = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    n_tw = tl.cdiv(W, BW)
    row0 = (pid // n_tw) * BH
    col0 = (pid % n_tw) * BW
    rows = row0 + tl.arange(0, BH)[:, None]
    cols = col0 + tl.arange(0, BW)[None, :]
    mask = (rows < H) & (cols < W)
    xs = (cols.to(tl.float32) + 0.5) * inv_h
    ys = (rows.to(tl.float32) + 0.5) * inv_h
    x0 = (col0 + 0.5) * inv_h
    x1 = (tl.minimum(col0 + BW, W) - 0.5) * inv_h
    y0 = (row0 + 0.5) * inv_h
    y1 = (tl.minimum(row0 + BH, H) - 0.5) * inv_h
    plane = H * W
    return b, b * 3 * plane + rows * W + cols, plane, mask, xs, ys, x0, x1, y0, y1


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
def _over(P, S, c0, c1, c2, xs, ys, FAST: tl.constexpr):
    """Blend one stroke (prepared at ``P``, raw at ``S``) over a canvas tile."""
    e, u, v, inv_r, rho, phi = _footprint(xs, ys, P, FAST)
    a = tl.load(P + P_ALPHA) * e
    c0 += a * (tl.load(S + F_RED) - c0)
    c1 += a * (tl.load(S + F_GREEN) - c1)
    c2 += a * (tl.load(S + F_BLUE) - c2)
    return c0, c1, c2


@triton.jit
def _blend(P, S, c0, c1, c2, xs, ys, x0, x1, y0, y1, FAST: tl.constexpr):
    """`_over` when the stroke can reach the tile; also says whether it did."""
    hit = _reach(P, x0, x1, y0, y1)
    if hit:
        c0, c1, c2 = _over(P, S, c0, c1, c2, xs, ys, FAST)
    return c0, c1, c2, hit


@triton.jit
def _paint(PREPARED, S, LIST, n, c0, c1, c2, xs, ys, x0, x1, y0, y1, BINNED: tl.constexpr, FAST: tl.constexpr):
    """Blend the first ``n`` strokes of one image over a canvas tile (no loss): of the tile's ``LIST``
    when BINNED, else strokes 0..n-1, each tested against the tile."""
    for t in range(n):
        if BINNED:
            j = tl.load(LIST + t).to(tl.int32)
            c0, c1, c2 = _over(PREPARED + j * PREP, S + j * STROKE, c0, c1, c2, xs, ys, FAST)
        else:
            c0, c1, c2, hit = _blend(PREPARED + t * PREP, S + t * STROKE, c0, c1, c2, xs, ys, x0, x1, y0, y1, FAST)
    return c0, c1, c2


@triton.jit
def _tile_list(LIST, COUNT, N, b, BINNED: tl.constexpr):
    """This tile's stroke list and its length when BINNED (see _bin_kernel); else (LIST, N): every stroke."""
    if BINNED:
        cell = b * tl.num_programs(0) + tl.program_id(0)
        return LIST + cell * N, tl.load(COUNT + cell)
    else:
        return LIST, N


@triton.jit
def _forward_kernel(
    S, PREPARED, LIST, COUNT, BASE, TARGET, CANVAS, LOSS, N, H, W, inv_h, loss_scale,
    LOSS_KIND: tl.constexpr, HAS_TARGET: tl.constexpr, BINNED: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
    FAST: tl.constexpr,
):
    b, img, plane, mask, xs, ys, x0, x1, y0, y1 = _tile(H, W, inv_h, BH, BW)
    c0, c1, c2 = _load_rgb(BASE, img, plane, mask)
    S += b * N * STROKE
    PREPARED += b * N * PREP
    LIST, n_listed = _tile_list(LIST, COUNT, N, b, BINNED)
    if LOSS_KIND == LOSS_PREFIX_L1 and HAS_TARGET:
        # The seed's objective: the error of every prefix canvas C_1..C_N.
        # A culled stroke leaves the tile's error unchanged, so it costs a
        # scalar add instead of a pass over the tile. (Never binned: each
        # stroke, culled or not, adds a term.)
        t0, t1, t2 = _load_rgb(TARGET, img, plane, mask)
        err = tl.sum(tl.abs(c0 - t0) + tl.abs(c1 - t1) + tl.abs(c2 - t2))
        total = err * 0.0
        for j in range(N):
            c0, c1, c2, hit = _blend(PREPARED + j * PREP, S + j * STROKE, c0, c1, c2, xs, ys, x0, x1, y0, y1, FAST)
            if hit:
                err = tl.sum(tl.where(mask, tl.abs(c0 - t0) + tl.abs(c1 - t1) + tl.abs(c2 - t2), 0.0))
            total += err
        tl.atomic_add(LOSS + b, total * loss_scale / tl.maximum(N, 1), sem="relaxed")
    else:
        c0, c1, c2 = _paint(PREPARED, S, LIST, n_listed, c0, c1, c2, xs, ys, x0, x1, y0, y1, BINNED, FAST)
        if HAS_TARGET:
            t0, t1, t2 = _load_rgb(TARGET, img, plane, mask)
            d0 = c0 - t0
            d1 = c1 - t1
            d2 = c2 - t2
            if LOSS_KIND == LOSS_L1:
                err = tl.abs(d0) + tl.abs(d1) + tl.abs(d2)
            else:
                err = d0 * d0 + d1 * d1 + d2 * d2
            tl.atomic_add(LOSS + b, tl.sum(tl.where(mask, err, 0.0)) * loss_scale, sem="relaxed")
    _store_rgb(CANVAS, img, plane, mask, c0, c1, c2)


@triton.jit
def _sign(d):
    return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))


@triton.jit
def _flush_prefix(l0, l1, l2, pending, c0, c1, c2, t0, t1, t2, mask, scale):
    """The adjoint with the ``pending`` prefix-loss terms folded in: each is sign(C - T) of the current canvas."""
    l0 += tl.where(mask, pending * _sign(c0 - t0) * scale, 0.0)
    l1 += tl.where(mask, pending * _sign(c1 - t1) * scale, 0.0)
    l2 += tl.where(mask, pending * _sign(c2 - t2) * scale, 0.0)
    return l0, l1, l2


@triton.jit
def _backward_kernel(
    S, PREPARED, LIST, COUNT, BASE, TARGET, CANVAS, GRAD_LOSS, GRAD_S, GRAD_BASE, N, H, W, inv_h, loss_scale,
    unblend_limit, LOSS_KIND: tl.constexpr, BASE_GRAD: tl.constexpr, BINNED: tl.constexpr, BH: tl.constexpr,
    BW: tl.constexpr, FAST: tl.constexpr,
):
    b, img, plane, mask, xs, ys, x0, x1, y0, y1 = _tile(H, W, inv_h, BH, BW)
    # Outside the image (a partial tile) canvas and target load as 0, so the
    # adjoint lam starts and stays 0 there and adds nothing to the sums, except
    # in the prefix loss, whose sign terms see un-blended canvas values and
    # are masked explicitly.
    c0, c1, c2 = _load_rgb(CANVAS, img, plane, mask)
    t0, t1, t2 = _load_rgb(TARGET, img, plane, mask)
    scale = tl.load(GRAD_LOSS + b) * loss_scale
    # lam: adjoint of the current canvas. For the prefix loss it is carried as
    # lam + pending * sign(C - T) * scale: a culled stroke adds one pending
    # term (its prefix canvas equals the current one) instead of a tile pass.
    pending = scale * 0.0
    if LOSS_KIND == LOSS_L1:
        l0 = _sign(c0 - t0) * scale
        l1 = _sign(c1 - t1) * scale
        l2 = _sign(c2 - t2) * scale
    elif LOSS_KIND == LOSS_L2:
        l0 = 2.0 * (c0 - t0) * scale
        l1 = 2.0 * (c1 - t1) * scale
        l2 = 2.0 * (c2 - t2) * scale
    else:  # LOSS_PREFIX_L1
        scale = scale / tl.maximum(N, 1)
        l0 = c0 * 0.0
        l1 = c0 * 0.0
        l2 = c0 * 0.0
        pending += 1.0
    # Bound on how much un-blending since the last exact canvas can have
    # amplified rounding error: the product of 1 / (1 - max a) over the tile.
    amp = scale * 0.0 + 1.0
    S += b * N * STROKE
    PREPARED += b * N * PREP
    G = GRAD_S + b * N * STROKE
    LIST, n_listed = _tile_list(LIST, COUNT, N, b, BINNED)
    for i in range(n_listed):
        # The t-th stroke of the tile's list is stroke k (unbinned: every stroke, k = t).
        t = n_listed - 1 - i
        if BINNED:
            # Listed strokes passed _reach's test in _bin_kernel, and the forward painted
            # every one of them (_paint): no test here.
            k = tl.load(LIST + t).to(tl.int32)
            P = PREPARED + k * PREP
            hit = True
        else:
            k = t
            P = PREPARED + k * PREP
            hit = _reach(P, x0, x1, y0, y1)
        if hit:
            if LOSS_KIND == LOSS_PREFIX_L1:
                # The canvas is about to change: its pending terms are due now.
                l0, l1, l2 = _flush_prefix(l0, l1, l2, pending, c0, c1, c2, t0, t1, t2, mask, scale)
                pending = pending * 0.0
            cr = tl.load(S + k * STROKE + F_RED)
            cg = tl.load(S + k * STROKE + F_GREEN)
            cb = tl.load(S + k * STROKE + F_BLUE)
            alpha = tl.load(P + P_ALPHA)
            e, u, v, inv_r, rho, phi = _footprint(xs, ys, P, FAST)
            a = alpha * e
            keep = 1.0 - a
            # Canvas before this stroke: un-blend while that is well
            # conditioned. The tile's largest opacity (one reduction, pixels
            # past the image edge included: that only lowers room) costs less
            # than _q_min's bound, which the binned path no longer computes.
            room = 1.0 - tl.max(a)
            if room * unblend_limit < amp:
                p0, p1, p2 = _load_rgb(BASE, img, plane, mask)
                p0, p1, p2 = _paint(PREPARED, S, LIST, t, p0, p1, p2, xs, ys, x0, x1, y0, y1, BINNED, FAST)
                amp = amp * 0.0 + 1.0
            else:
                inv_keep = _rcp(keep, FAST)
                p0 = (c0 - a * cr) * inv_keep
                p1 = (c1 - a * cg) * inv_keep
                p2 = (c2 - a * cb) * inv_keep
                amp = amp / room
            # Chain rule through a = alpha * exp(-q), q = (kr rho^2 + kt phi^2) / 2:
            # w = dL/dq, and the polar derivatives folded so that each of the
            # ten stroke fields needs one tile sum.
            g_a = l0 * (cr - p0) + l1 * (cg - p1) + l2 * (cb - p2)
            w = -g_a * a
            w_rho = w * rho
            w_phi = w * phi
            kr = tl.load(P + P_KR)
            kt = tl.load(P + P_KT)
            cos_phi = u * inv_r
            sin_phi = v * inv_r
            radial = w_rho * kr
            tangential = w_phi * kt * inv_r
            g_u = radial * cos_phi - tangential * sin_phi
            g_v = radial * sin_phi + tangential * cos_phi
            sum_u = tl.sum(g_u)
            sum_v = tl.sum(g_v)
            cs = tl.load(P + P_COS)
            sn = tl.load(P + P_SIN)
            mu = tl.load(P + P_MU)
            srm = tl.load(P + P_SRM)
            g_dx = cs * sum_u + sn * sum_v
            g_dy = cs * sum_v - sn * sum_u
            g_srm = -tl.sum(w_rho * rho) * kr / srm
            gk = G + k * STROKE
            tl.atomic_add(gk + F_CX, -g_dx, sem="relaxed")
            tl.atomic_add(gk + F_CY, -g_dy, sem="relaxed")
            tl.atomic_add(gk + F_ROT, kt * tl.sum(w_phi) - mu * (sn * g_dx + cs * g_dy), sem="relaxed")
            tl.atomic_add(gk + F_MU_R, g_srm * tl.load(S + k * STROKE + F_SIGMA_R) - kr * tl.sum(w_rho) + cs * g_dx
                          - sn * g_dy, sem="relaxed")
            tl.atomic_add(gk + F_SIGMA_R, g_srm * mu, sem="relaxed")
            tl.atomic_add(gk + F_SIGMA_T, -tl.sum(w_phi * phi) * kt / tl.load(S + k * STROKE + F_SIGMA_T),
                          sem="relaxed")
            tl.atomic_add(gk + F_RED, tl.sum(a * l0), sem="relaxed")
            tl.atomic_add(gk + F_GREEN, tl.sum(a * l1), sem="relaxed")
            tl.atomic_add(gk + F_BLUE, tl.sum(a * l2), sem="relaxed")
            tl.atomic_add(gk + F_ALPHA, -tl.sum(w) / alpha, sem="relaxed")
            l0 *= keep
            l1 *= keep
            l2 *= keep
            c0 = p0
            c1 = p1
            c2 = p2
        # The canvas now is C_k (0-based k strokes painted); it is a prefix
        # term of the seed's loss for k >= 1.
        if LOSS_KIND == LOSS_PREFIX_L1:
            if k >= 1:
                pending += 1.0
    if BASE_GRAD:
        if LOSS_KIND == LOSS_PREFIX_L1:
            l0, l1, l2 = _flush_prefix(l0, l1, l2, pending, c0, c1, c2, t0, t1, t2, mask, scale)
        _store_rgb(GRAD_BASE, img, plane, mask, l0, l1, l2)


def _check(strokes: torch.Tensor, base: torch.Tensor, target: torch.Tensor | None) -> None:
    if strokes.dim() != 3 or strokes.shape[-1] != STROKE.value:
        raise ValueError(f"strokes must be [B, N, {STROKE.value}], got {list(strokes.shape)}")
    if base.dim() != 4 or base.shape[1] != 3 or base.shape[0] != strokes.shape[0]:
        raise ValueError(f"base must be [B, 3, H, W] with B = {strokes.shape[0]}, got {list(base.shape)}")
    if target is not None and target.shape != base.shape:
        raise ValueError(f"target must match base {list(base.shape)}, got {list(target.shape)}")
    for name, t in (("strokes", strokes), ("base", base), ("target", target)):
        if t is not None and (t.dtype != torch.float32 or t.device != strokes.device):
            raise ValueError(f"{name} must be float32 on {strokes.device}, got {t.dtype} on {t.device}")


def prepare(strokes: torch.Tensor, cull_opacity: float = CULL_OPACITY) -> torch.Tensor:
    """The per-stroke quantities every tile needs, computed once: ``[B, N, PREP]`` (see _prepare_kernel).

    ``cull_opacity``: a tile skips a stroke whose opacity stays below it everywhere on the tile, so a
    pixel's value differs from the exact painting by at most the sum of the opacities there of the
    strokes skipped on its tile (each below ``cull_opacity``). The default keeps that under 1e-4
    at N = 1000; the fit's gradient steps may take a coarser one (``FitConfig.step_cull_opacity``).
    """
    if not 0 < cull_opacity < 1:
        raise ValueError(f"cull_opacity must be in (0, 1), got {cull_opacity}")
    strokes = strokes.contiguous()
    prepared = torch.empty(*strokes.shape[:2], PREP.value, device=strokes.device, dtype=torch.float32)
    total = strokes.shape[0] * strokes.shape[1]
    if total:
        block = 256
        _prepare_kernel[(triton.cdiv(total, block),)](strokes, prepared, total, float(cull_opacity), BLOCK=block)
    return prepared


def _grid(b: int, h: int, w: int, tile: tuple[int, int]) -> tuple[int, int]:
    return (triton.cdiv(h, tile[0]) * triton.cdiv(w, tile[1]), b)


# (rows, columns, warps, programs per SM it needs), best first. 16 x 32 on one
# warp gives each thread 16 pixels, over which the ten per-stroke tile sums
# amortise, and those sums need no step across warps (run 19 in
# benchmarks/RESULTS.md). One-warp programs hide latency only when many share
# an SM; small grids take two-warp programs, the smallest grids small tiles.
TILES = ((16, 32, 1, 8), (16, 32, 2, 2), (16, 16, 2, 0))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def pick_tile(b: int, h: int, w: int, device: torch.device, tiles: tuple = TILES) -> tuple[tuple[int, int], int]:
    """The first of ``tiles`` whose grid gives every SM the programs it needs: ``((BH, BW), warps)``."""
    for bh, bw, warps, per_sm in tiles:
        if b * triton.cdiv(h, bh) * triton.cdiv(w, bw) >= per_sm * _sm_count(device):
            return (bh, bw), warps
    raise AssertionError("the last tile of TILES needs no programs")


@dataclass(frozen=True)
class Bins:
    """Per-tile stroke lists of one batch (``bin_strokes``), for launches on the same tile."""

    tile: tuple[int, int]
    num_warps: int
    lists: torch.Tensor   # [B, tiles, N] int16 stroke indices (int32 past 32767); row [b, t] holds counts[b, t] of them
    counts: torch.Tensor  # [B, tiles] int32


# A launch bins its strokes (one small kernel) from this many strokes up: the
# tile programs then visit only the strokes that reach them. Below it the
# serial test of every stroke is cheap enough (benchmarks/RESULTS.md, "Binned
# strokes": binning is 1.16x the walked launch at 25 strokes). The seed's
# prefix loss is never binned: a culled stroke adds a term there too.
BIN_MIN_STROKES = 25
# Binned launches take 16 x 8 tiles on one warp when the strokes are many for the
# canvas (at most BIN_SMALL_TILE_PIXELS pixels per stroke) and the grid is large
# enough: a tile evaluates each listed stroke on all its pixels, so with many
# strokes a smaller tile wastes less on strokes that only touch it. One step at
# B = 128 on a fit's strokes (benchmarks/RESULTS.md, run B5): 1000 strokes at
# 256 px 0.0555 ms per image against 0.0703 on 16 x 16 and 0.127 on 16 x 32;
# 100 at 128 px 0.0053 against 0.0104 on 16 x 32; but a full-size group's 100
# strokes at 512 px (2,621 pixels per stroke, 2.4 listed per tile) 0.0157 against
# 0.0102 on 16 x 32 (run B6): with short lists a tile's own loads and stores dominate.
BIN_SMALL_TILE_PIXELS = 1024
BIN_SMALL_TILE = (16, 8, 1, 8)  # (rows, columns, warps, programs per SM it needs), as in TILES
_BIN_BLOCK = 128
# Binning tests every stroke against every tile: at 512 x 512 in 16 x 8 tiles with 1000 strokes
# that is half of a joint step once the lists are short (benchmarks/RESULTS.md, round 4). From
# BIN_COARSE_MIN_STROKES strokes up it bins first into tiles of about COARSE_TILE_PIXELS square,
# and each tile then tests only its coarse tile's strokes.
BIN_COARSE_MIN_STROKES = 200
COARSE_TILE_PIXELS = 64


def should_bin(n_strokes: int, loss: str | None) -> bool:
    return n_strokes >= BIN_MIN_STROKES and loss != "prefix_l1"


def pick_binned_tile(b: int, n: int, h: int, w: int, device: torch.device) -> tuple[tuple[int, int], int]:
    """``pick_tile`` with BIN_SMALL_TILE tried first at BIN_SMALL_TILE_PIXELS pixels per stroke or fewer."""
    small = h * w <= BIN_SMALL_TILE_PIXELS * n
    return pick_tile(b, h, w, device, (BIN_SMALL_TILE, *TILES) if small else TILES)


def bin_strokes(prepared: torch.Tensor, h: int, w: int, tile: tuple[int, int] | None = None,
                num_warps: int | None = None, coarse: bool | None = None) -> Bins:
    """The strokes that can reach each tile of an H x W canvas, in painting order (see _bin_kernel).

    ``coarse`` (default: from BIN_COARSE_MIN_STROKES strokes up, on canvases larger than a coarse
    tile): bin first into COARSE_TILE_PIXELS tiles, then each tile tests only its coarse tile's
    list. Memory: B x tiles x N indices (at B = 128, 512 x 512 in 16 x 8 tiles and
    N = 1000: 524 MB), and B x coarse tiles x N for the coarse lists.
    """
    bsz, n = prepared.shape[:2]
    if tile is None:
        tile, num_warps = pick_binned_tile(bsz, n, h, w, prepared.device)
    if coarse is None:
        coarse = n >= BIN_COARSE_MIN_STROKES and max(h, w) > COARSE_TILE_PIXELS
    grid = _grid(bsz, h, w, tile)
    dtype = torch.int16 if n <= torch.iinfo(torch.int16).max else torch.int32
    lists = torch.empty(bsz, grid[0], max(n, 1), device=prepared.device, dtype=dtype)
    counts = torch.empty(bsz, grid[0], device=prepared.device, dtype=torch.int32)
    if bsz:
        ratio = (max(1, COARSE_TILE_PIXELS // tile[0]), max(1, COARSE_TILE_PIXELS // tile[1]))
        source, source_count = lists, counts  # not read unless coarse
        if coarse:
            coarse_tile = (tile[0] * ratio[0], tile[1] * ratio[1])
            coarse_grid = _grid(bsz, h, w, coarse_tile)
            source = torch.empty(bsz, coarse_grid[0], max(n, 1), device=prepared.device, dtype=dtype)
            source_count = torch.empty(bsz, coarse_grid[0], device=prepared.device, dtype=torch.int32)
            _bin_kernel[coarse_grid](prepared, source, source_count, source, source_count, n, h, w, 1.0 / h,
                                     BH=coarse_tile[0], BW=coarse_tile[1], COARSE_ROWS=1, COARSE_COLS=1,
                                     FROM_COARSE=False, BLOCK=_BIN_BLOCK, num_warps=4)
        _bin_kernel[grid](prepared, source, source_count, lists, counts, n, h, w, 1.0 / h, BH=tile[0], BW=tile[1],
                          COARSE_ROWS=ratio[0], COARSE_COLS=ratio[1], FROM_COARSE=coarse, BLOCK=_BIN_BLOCK,
                          num_warps=4)
    return Bins(tuple(tile), num_warps or 4, lists, counts)


def _launch(
    strokes, base, tile, num_warps, prepared, bins, prefix_loss,
) -> tuple[torch.Tensor, tuple[int, int], dict, tuple]:
    """Prepared strokes, grid, tile options and stroke lists of a launch: the caller's, else ``prepare``'s
    and ``pick_tile``'s (a binned launch runs on its bins' tile). ``prefix_loss``: the launch sums the
    seed's prefix loss, which is never binned."""
    bsz = strokes.shape[0]
    h, w = base.shape[-2:]
    if prepared is None:
        prepared = prepare(strokes)
    if bins is not None:
        if prefix_loss:
            raise ValueError("the prefix_l1 loss is never binned: every stroke adds a term, culled or not")
        if tile is not None and tuple(tile) != bins.tile:
            raise ValueError(f"tile {tile} differs from the bins' tile {bins.tile}")
        tile, num_warps = bins.tile, bins.num_warps
        if tuple(bins.counts.shape) != (bsz, _grid(bsz, h, w, tile)[0]):
            raise ValueError(f"bins of shape {list(bins.counts.shape)} do not fit B={bsz} at {h} x {w}")
        lists = (bins.lists, bins.counts)
    else:
        lists = (prepared, prepared)  # not read: the kernels' unbinned path walks every stroke
    if tile is None:
        tile, num_warps = pick_tile(bsz, h, w, base.device)
    options = dict(BH=tile[0], BW=tile[1], FAST=_fast_math(), BINNED=bins is not None, num_warps=num_warps or 4)
    return prepared, _grid(bsz, h, w, tile), options, lists


def forward(
    strokes: torch.Tensor, base: torch.Tensor, target: torch.Tensor | None = None, loss: str = "l2",
    tile: tuple[int, int] | None = None, num_warps: int | None = None, prepared: torch.Tensor | None = None,
    bins: Bins | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Canvas ``[B, 3, H, W]`` and loss ``[B]`` (None without target). No autograd.

    ``tile``/``num_warps`` default to ``pick_tile``'s choice for the shape;
    ``prepared`` to ``prepare(strokes)``. With ``bins`` (``bin_strokes`` of
    the same prepared strokes) each tile visits only its listed strokes.
    """
    _check(strokes, base, target)
    strokes, base = strokes.contiguous(), base.contiguous()
    target = target.contiguous() if target is not None else None
    bsz, n = strokes.shape[:2]
    h, w = base.shape[-2:]
    canvas = torch.empty_like(base)
    value = torch.zeros(bsz, device=base.device, dtype=torch.float32)
    prefix_loss = loss == "prefix_l1" and target is not None
    prepared, grid, options, lists = _launch(strokes, base, tile, num_warps, prepared, bins, prefix_loss)
    _forward_kernel[grid](
        strokes, prepared, *lists, base, target if target is not None else base, canvas, value,
        n, h, w, 1.0 / h, 1.0 / (3 * h * w), LOSS_KIND=LOSS_KINDS[loss], HAS_TARGET=target is not None, **options,
    )
    return canvas, (value if target is not None else None)


def backward(
    strokes: torch.Tensor, base: torch.Tensor, target: torch.Tensor, canvas: torch.Tensor, grad_loss: torch.Tensor,
    loss: str = "l2", base_grad: bool = False, grad_strokes: torch.Tensor | None = None,
    tile: tuple[int, int] | None = None, num_warps: int | None = None, prepared: torch.Tensor | None = None,
    bins: Bins | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of ``sum_b grad_loss[b] * loss[b]`` w.r.t. strokes ``[B, N, 10]`` (and base).

    ``canvas`` is the forward's output. ``grad_strokes``, if given, is
    accumulated into (it must be zeroed by the caller for a fresh gradient).
    ``bins`` as for ``forward``.
    """
    bsz, n = strokes.shape[:2]
    h, w = base.shape[-2:]
    if grad_strokes is None:
        grad_strokes = torch.zeros_like(strokes)
    grad_base = torch.empty_like(base) if base_grad else None
    prepared, grid, options, lists = _launch(strokes, base, tile, num_warps, prepared, bins, loss == "prefix_l1")
    _backward_kernel[grid](
        strokes, prepared, *lists, base, target, canvas, grad_loss.contiguous(), grad_strokes,
        grad_base if base_grad else base, n, h, w, 1.0 / h, 1.0 / (3 * h * w), UNBLEND_LIMIT,
        LOSS_KIND=LOSS_KINDS[loss], BASE_GRAD=base_grad, **options,
    )
    return grad_strokes, grad_base
