"""The Triton renderer against the dense reference (the oracle), on random strokes and edge cases."""
import math
import zlib

import pytest
import torch

from encoder import reference, strokes, triton_debug, triton_render
from encoder.strokes import ALPHA, CX, CY, MU_R, ROT, SIGMA_R, SIGMA_T, bounds, random_strokes

LOSSES = ("l1", "l2", "prefix_l1")


def compact(s: torch.Tensor) -> torch.Tensor:
    """Bias random strokes towards visible sizes so tiny canvases see them."""
    s = s.clone()
    s[..., MU_R] = 0.05 + s[..., MU_R] * 0.2
    return s


def check(s, base, tgt, loss, fwd_tol=1e-4, grad_tol=1e-3, tile=(8, 16), binned=False):
    """Small tiles by default, so these tiny images span several tiles and culling is exercised.
    ``binned``: through per-tile stroke lists (``bin_strokes``)."""
    bins = triton_render.bin_strokes(triton_render.prepare(s), *base.shape[-2:], tile=tile) if binned else None
    tile = None if binned else tile
    canvas, value = triton_render.forward(s, base, tgt, loss, tile=tile, bins=bins)
    sd = s.double().requires_grad_(True)
    bd = base.double().requires_grad_(True)
    ref_canvas, ref_value = reference.render_loss(sd, bd, tgt.double(), loss)
    assert (canvas.double() - ref_canvas).abs().max().item() < fwd_tol
    assert torch.allclose(value.double(), ref_value.detach(), rtol=1e-4, atol=1e-6)
    ref_value.sum().backward()
    grad, grad_base = triton_render.backward(s, base, tgt, canvas, torch.ones(s.shape[0]), loss, base_grad=True, tile=tile,
                                             bins=bins)
    # Relative error per field, over all strokes of the batch.
    err = (grad.double() - sd.grad).norm(dim=(0, 1))
    scale = sd.grad.norm(dim=(0, 1))
    assert torch.all(err <= grad_tol * scale + 1e-9), (err / scale.clamp_min(1e-30)).tolist()
    assert (grad_base.double() - bd.grad).norm() <= grad_tol * bd.grad.norm() + 1e-9


@pytest.mark.parametrize("shape", [(2, 7, 16, 16), (1, 12, 20, 36), (3, 5, 33, 17)])
@pytest.mark.parametrize("loss", LOSSES)
def test_random_strokes_match_reference(shape, loss):
    b, n, h, w = shape
    # A fixed seed per case: hash() of a tuple with a str changes with PYTHONHASHSEED, and the L1 losses'
    # gradients are sign(residual), which float32 and float64 may disagree on for a pixel whose residual
    # is within rounding of zero (1 seed in 20 drew such a pixel, giving ~1% relative error in cx/cy/rot).
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, loss)).encode()))
    s = compact(random_strokes(b, n, w / h, generator=gen))
    base = torch.rand(b, 3, h, w, generator=gen)
    tgt = torch.rand(b, 3, h, w, generator=gen)  # a different target per image
    check(s, base, tgt, loss)


@pytest.mark.parametrize("shape", [(2, 7, 16, 16), (1, 12, 20, 36), (3, 5, 33, 17)])
@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_binned_strokes_match_reference(shape, loss):
    b, n, h, w = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("binned", shape, loss)).encode()))
    s = compact(random_strokes(b, n, w / h, generator=gen))
    check(s, torch.rand(b, 3, h, w, generator=gen), torch.rand(b, 3, h, w, generator=gen), loss,
          binned=True)


def test_bins_list_exactly_the_strokes_each_tile_keeps():
    """Each tile's list is, in painting order, the strokes the per-stroke culling test keeps, across
    several blocks of the binning kernel (N > its block) and images with different strokes."""
    gen = torch.Generator().manual_seed(31)
    b, n, h, w, tile = 2, 300, 24, 40, (8, 16)
    s = random_strokes(b, n, w / h, generator=gen)
    s[..., MU_R] = 0.05 + 0.1 * torch.rand(b, n, generator=gen)
    s[..., SIGMA_R] = 0.01 + 0.05 * torch.rand(b, n, generator=gen)
    s[..., SIGMA_T] = 0.02 + 0.2 * torch.rand(b, n, generator=gen)
    bins = triton_render.bin_strokes(triton_render.prepare(s), h, w, tile=tile)
    hits = triton_debug.tile_hits(s, h, w, tile)  # [B, N, tiles]
    assert bins.counts.shape == (b, hits.shape[2]) and bins.lists.dtype == torch.int16
    for i in range(b):
        for t in range(hits.shape[2]):
            want = hits[i, :, t].nonzero().flatten()
            assert bins.counts[i, t].item() == len(want)
            assert torch.equal(bins.lists[i, t, : len(want)].long(), want), (i, t)
    assert 0 < bins.counts.sum() < b * n * hits.shape[2]  # some strokes are culled, some kept


def _culling_strokes(b, n, h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    s = random_strokes(b, n, w / h, generator=gen)
    s[..., MU_R] = 0.05 + 0.1 * torch.rand(b, n, generator=gen)
    s[..., SIGMA_R] = 0.01 + 0.05 * torch.rand(b, n, generator=gen)
    s[..., SIGMA_T] = 0.02 + 0.2 * torch.rand(b, n, generator=gen)
    return s


@pytest.mark.parametrize("cull", [triton_render.CULL_OPACITY, 2e-3])
def test_coarse_bins_keep_every_stroke_that_reaches_its_tile(monkeypatch, cull):
    """Two-level binning (coarse tiles first, then each tile tests its coarse tile's list): each list is,
    in painting order, a subset of the one-level list, and a stroke missing from it stays below the
    culling opacity on every pixel of that tile (float64 reference): the same proof of culling."""
    b, n, h, w, tile = 2, 300, 40, 56, (8, 8)
    s = _culling_strokes(b, n, h, w, 33)
    monkeypatch.setattr(triton_render, "COARSE_TILE_PIXELS", 16)  # 2 x 2 tiles a coarse tile; 3 x 4 of them
    prepared = triton_render.prepare(s, cull)
    flat = triton_render.bin_strokes(prepared, h, w, tile=tile, coarse=False)
    two = triton_render.bin_strokes(prepared, h, w, tile=tile, coarse=True)
    x, y = reference.pixel_grid(h, w, dtype=torch.float64)
    alpha = reference.opacity(s.double(), x, y)  # [B, N, H, W]
    tiles_w = -(-w // tile[1])
    dropped = 0
    for i in range(b):
        for t in range(flat.counts.shape[1]):
            want = flat.lists[i, t, : flat.counts[i, t]].long().tolist()
            got = two.lists[i, t, : two.counts[i, t]].long().tolist()
            assert got == [j for j in want if j in set(got)], (i, t)  # a subset, in order
            r0, c0 = (t // tiles_w) * tile[0], (t % tiles_w) * tile[1]
            for j in set(want) - set(got):
                assert alpha[i, j, r0:r0 + tile[0], c0:c0 + tile[1]].max().item() < cull
                dropped += 1
    assert 0 < two.counts.sum() <= flat.counts.sum()


@pytest.mark.parametrize("cull", [triton_render.CULL_OPACITY, 1e-3, 5e-2])
def test_culled_pixels_stay_within_their_bound(cull):
    """A pixel of a culled rendering differs from the exact painting (float64 reference, nothing culled)
    by at most the sum of the opacities there of the strokes below ``cull`` at that pixel: a skipped
    stroke would have moved the pixel by its opacity times a colour difference of at most 1, and later
    strokes only shrink that. Binned and walked launches, one-level and two-level bins."""
    b, n, h, w = 2, 60, 24, 40
    s = _culling_strokes(b, n, h, w, 7)
    base = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(8))
    x, y = reference.pixel_grid(h, w, dtype=torch.float64)
    alpha = reference.opacity(s.double(), x, y)
    bound = torch.where(alpha < cull, alpha, 0.0).sum(dim=1)[:, None]  # [B, 1, H, W]
    exact, _ = reference.render_loss(s.double(), base.double())
    prepared = triton_render.prepare(s, cull)
    launches = [dict(tile=(8, 8)),
                dict(bins=triton_render.bin_strokes(prepared, h, w, tile=(8, 8), coarse=False)),
                dict(bins=triton_render.bin_strokes(prepared, h, w, tile=(8, 8), coarse=True))]
    for launch in launches:
        canvas, _ = triton_render.forward(s, base, prepared=prepared, **launch)
        err = (canvas.double() - exact).abs()
        assert torch.all(err <= bound + 1e-5), (err - bound).max().item()  # 1e-5: float32 rounding
    if cull >= 1e-3:  # the bound is not vacuous: culling changed pixels, by less than it allows
        assert err.max().item() > 1e-4


def test_kept_lists_paint_exactly_their_strokes_as_they_are_now():
    """Lists made for earlier parameters of the strokes (``FitConfig.step_bin_interval``): each tile paints
    exactly the strokes its list holds, with their current parameters, and the backward is the exact
    gradient of that painting (float64 reference with each stroke masked to its listed tiles)."""
    b, n, h, w, tile, cull = 2, 40, 24, 40, (8, 8), 2e-3
    before = _culling_strokes(b, n, h, w, 51)
    gen = torch.Generator().manual_seed(52)
    now = before.clone()  # a few steps later: moved by up to 1.5 px, grown, more opaque
    now[..., CX] += (torch.rand(b, n, generator=gen) - 0.5) * 3 / h
    now[..., CY] += (torch.rand(b, n, generator=gen) - 0.5) * 3 / h
    now[..., SIGMA_R] *= 1.3
    now[..., ALPHA] = (now[..., ALPHA] * 1.5).clamp(max=1.0)
    bins = triton_render.bin_strokes(triton_render.prepare(before, cull), h, w, tile=tile, coarse=False)
    fresh = triton_render.bin_strokes(triton_render.prepare(now, cull), h, w, tile=tile, coarse=False)
    assert not torch.equal(bins.counts, fresh.counts)  # the kept lists are stale: the test is not vacuous
    listed = triton_debug.listed_pixels(bins, n, h, w)
    assert listed[0, 0].sum() > 0 and listed.amin() == 0  # each stroke is listed on some tiles only
    base = torch.rand(b, 3, h, w, generator=gen)
    tgt = torch.rand(b, 3, h, w, generator=gen)
    prepared = triton_render.prepare(now, cull)
    canvas, value = triton_render.forward(now, base, tgt, "l2", prepared=prepared, bins=bins)
    grad, grad_base = triton_render.backward(now, base, tgt, canvas, torch.ones(b), "l2", base_grad=True,
                                             prepared=prepared, bins=bins)
    sd = now.double().requires_grad_(True)
    bd = base.double().requires_grad_(True)
    want, loss = reference.render_loss(sd, bd, tgt.double(), "l2", mask=listed)
    loss.sum().backward()
    assert (canvas.double() - want).abs().max().item() < 1e-4
    assert torch.allclose(value.double(), loss.detach(), rtol=1e-4, atol=1e-6)
    err = (grad.double() - sd.grad).norm(dim=(0, 1))
    assert torch.all(err <= 1e-3 * sd.grad.norm(dim=(0, 1)) + 1e-9), (err / sd.grad.norm(dim=(0, 1))).tolist()
    assert (grad_base.double() - bd.grad).norm() <= 1e-3 * bd.grad.norm()


def test_cull_opacity_is_checked():
    s = random_strokes(1, 2, generator=torch.Generator().manual_seed(1))
    for bad in (0.0, 1.0, -1e-3):
        with pytest.raises(ValueError, match="cull_opacity"):
            triton_render.prepare(s, bad)


def test_loss_and_grad_bins_from_the_threshold_on_and_agrees(monkeypatch):
    """The fit's entry point: binned at or above BIN_MIN_STROKES, the same canvas, loss and gradients
    as the walk over every stroke, to float rounding."""
    from encoder import renderer

    gen = torch.Generator().manual_seed(41)
    b, n, h, w = 2, 150, 20, 36
    s = compact(random_strokes(b, n, w / h, generator=gen))
    s[..., SIGMA_R] = 0.02 + 0.05 * torch.rand(b, n, generator=gen)
    base, tgt = torch.rand(b, 3, h, w, generator=gen), torch.rand(b, 3, h, w, generator=gen)
    calls = []
    real_bin = triton_render.bin_strokes
    monkeypatch.setattr(triton_render, "bin_strokes", lambda *a, **k: calls.append(1) or real_bin(*a, **k))
    # The walk and the bins on the same tile (another tile culls other pixels: float rounding apart)
    monkeypatch.setattr(triton_render, "BIN_SMALL_TILE_PIXELS", 0)
    out = {}
    for threshold in (n + 1, n):
        monkeypatch.setattr(triton_render, "BIN_MIN_STROKES", threshold)
        out[threshold] = renderer.loss_and_grad(s, base, tgt, "l2", "triton", base_grad=True)
        assert len(calls) == (threshold == n)
    walked, binned = out[n + 1], out[n]
    for got, want in zip(binned, walked):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not triton_render.should_bin(10_000, "prefix_l1")


def test_prefix_loss_refuses_bins():
    s = compact(random_strokes(1, 4, generator=torch.Generator().manual_seed(2)))
    base = torch.rand(1, 3, 8, 8)
    bins = triton_render.bin_strokes(triton_render.prepare(s), 8, 8)
    with pytest.raises(ValueError, match="prefix_l1 loss is never binned"):
        triton_render.forward(s, base, base, "prefix_l1", bins=bins)


def test_default_tile_matches_reference():
    gen = torch.Generator().manual_seed(21)
    s = compact(random_strokes(2, 6, 40 / 36, generator=gen))
    check(s, torch.rand(2, 3, 36, 40, generator=gen), torch.rand(2, 3, 36, 40, generator=gen), "l2", tile=(32, 32))


@pytest.mark.parametrize("loss,binned", [(loss, False) for loss in LOSSES] + [("l1", True), ("l2", True)])
def test_edge_cases(loss, binned):
    """alpha 1, sigmas at their lower clamps, mu_r at both clamps, strokes off-canvas; walked and binned."""
    gen = torch.Generator().manual_seed(7)
    h, w = 18, 24
    lo, hi = bounds(w / h)
    s = compact(random_strokes(2, 10, w / h, generator=gen))
    s[0, 0, ALPHA] = 1.0                                  # opaque
    s[0, 1, ALPHA] = 1.0
    s[0, 1, CX], s[0, 1, CY] = 4.5 / h, 8.5 / h           # opaque, centred exactly on a pixel
    s[0, 2, SIGMA_R], s[0, 2, SIGMA_T] = lo[SIGMA_R], lo[SIGMA_T]  # thinnest, shortest
    s[0, 3, MU_R] = lo[MU_R]
    s[0, 4, MU_R] = hi[MU_R]                              # almost straight
    s[1, 0, CX], s[1, 0, CY] = 0.0, 0.0                   # centre in a corner: partly off-canvas
    s[1, 1, CX], s[1, 1, CY] = hi[CX], 1.0
    s[1, 2, MU_R], s[1, 2, ALPHA] = lo[MU_R], 1.0
    s[1, 3, SIGMA_R] = lo[SIGMA_R]
    s[1, 4:6, ALPHA] = 1.0                                # a run of opaque strokes over each other
    s[1, 4:6, CX], s[1, 4:6, CY] = 0.7, 0.5
    # Fully off-canvas: far outside, small, cannot reach any pixel.
    s[1, 6, MU_R], s[1, 6, SIGMA_R], s[1, 6, SIGMA_T] = 0.05, 0.01, 0.01
    s[1, 6, CX], s[1, 6, CY] = hi[CX], 0.0
    base = torch.rand(2, 3, h, w, generator=gen)
    tgt = torch.rand(2, 3, h, w, generator=gen)
    check(s, base, tgt, loss, binned=binned)


@pytest.mark.parametrize("binned", [False, True])
def test_backward_recomputes_the_canvas_under_opaque_strokes(binned):
    """Strokes of opacity 1 stacked over one spot: un-blending one divides by 1 - a = 0 at its peak, so the
    backward must recompute the canvas below it from the base, each time the tile's largest opacity says
    un-blending would amplify rounding past UNBLEND_LIMIT (here: at every such stroke)."""
    gen = torch.Generator().manual_seed(11)
    h, w = 16, 16
    s = compact(random_strokes(1, 12, w / h, generator=gen))
    s[0, ::2, ALPHA] = 1.0
    s[0, :, CX] = (7.5 + torch.randint(-1, 2, (12,), generator=gen)) / h  # peaks on pixel centres
    s[0, :, CY] = (8.5 + torch.randint(-1, 2, (12,), generator=gen)) / h
    s[0, :, MU_R] = 1.0
    s[0, :, SIGMA_R] = 0.2  # 3 px across
    s[0, :, SIGMA_T] = 0.78  # and long
    check(s, torch.rand(1, 3, h, w, generator=gen), torch.rand(1, 3, h, w, generator=gen), "l2", binned=binned)


def test_culling_skips_far_strokes_exactly():
    """A stroke that cannot reach the canvas changes nothing, and gets zero gradient."""
    s = torch.tensor([[[0.0, 0.0, 0.0, 0.05, 1e-4, 1e-3, 1.0, 0.0, 0.0, 1.0]]])
    base = torch.rand(1, 3, 8, 8)
    tgt = torch.rand(1, 3, 8, 8)
    canvas, _ = triton_render.forward(s, base, tgt, "l2")
    assert torch.equal(canvas, base)
    grad, _ = triton_render.backward(s, base, tgt, canvas, torch.ones(1), "l2")
    assert torch.equal(grad, torch.zeros_like(grad))


def _tile_max_opacity(s, h, w, tile):
    """Per stroke, the largest opacity over each tile (float64 reference): ``[B, N, tiles]``."""
    x, y = reference.pixel_grid(h, w, dtype=torch.float64)
    a = reference.opacity(s.double(), x, y)
    a = torch.nn.functional.pad(a, (0, -w % tile[1], 0, -h % tile[0]))  # partial tiles
    b, n, hp, wp = a.shape
    a = a.reshape(b, n, hp // tile[0], tile[0], wp // tile[1], tile[1])
    return a.amax(dim=(3, 5)).reshape(b, n, -1)


@pytest.mark.parametrize("kind", ["broad", "thin", "curled"])
def test_culling_is_conservative(kind):
    """A tile skips a stroke only where the stroke's opacity stays below CULL_OPACITY on every pixel of it."""
    gen = torch.Generator().manual_seed(len(kind))
    h, w, tile = 40, 56, (8, 8)
    s = random_strokes(3, 40, w / h, generator=gen)
    if kind == "broad":
        s[..., SIGMA_R] = 0.05 + 0.15 * torch.rand(3, 40, generator=gen)
        s[..., SIGMA_T] = 0.1 + 0.6 * torch.rand(3, 40, generator=gen)
    elif kind == "thin":
        s[..., SIGMA_R] = 1e-4 + 0.02 * torch.rand(3, 40, generator=gen)
        s[..., SIGMA_T] = 1e-3 + 0.05 * torch.rand(3, 40, generator=gen)
    else:  # tight curves: small radius, long arcs
        s[..., MU_R] = 0.05 + 0.1 * torch.rand(3, 40, generator=gen)
        s[..., SIGMA_T] = 0.5 + 0.28 * torch.rand(3, 40, generator=gen)
    hits = triton_debug.tile_hits(s, h, w, tile)
    peak = _tile_max_opacity(s, h, w, tile)
    assert hits.shape == peak.shape
    assert torch.all(hits | (peak < triton_render.CULL_OPACITY))
    assert hits.float().mean() < 0.9  # and it does cull


def test_culling_skips_the_inside_of_a_ring():
    """A closed, thin ring: the tile around its pole sits in the hole and is skipped, though it lies
    well within the disc around the stroke's centre that bounds the whole footprint."""
    s = torch.tensor([[[0.5 + 0.45, 0.5, 0.0, 0.45, 0.02, math.pi / 4, 1.0, 1.0, 1.0, 1.0]]])  # pole at (0.5, 0.5)
    h = w = 32
    tile = (8, 8)
    hits = triton_debug.tile_hits(s, h, w, tile)[0, 0].reshape(4, 4)
    assert not hits[1:3, 1:3].any()  # the four central tiles, within 0.34 of the pole
    assert hits[0].any() and hits[3].any()  # the ring itself
    assert torch.all(hits.flatten() | (_tile_max_opacity(s, h, w, tile)[0, 0] < triton_render.CULL_OPACITY))
    base = torch.rand(1, 3, h, w)
    check(s, base, torch.rand(1, 3, h, w), "l2", tile=tile)


def test_backward_weights_each_image_by_grad_loss():
    gen = torch.Generator().manual_seed(3)
    s = compact(random_strokes(2, 6, generator=gen))
    base = torch.rand(2, 3, 12, 12, generator=gen)
    tgt = torch.rand(2, 3, 12, 12, generator=gen)
    weights = torch.tensor([1.0, 2.0])
    canvas, _ = triton_render.forward(s, base, tgt, "l2")
    grad, grad_base = triton_render.backward(s, base, tgt, canvas, weights, "l2", base_grad=True)
    s2 = s.double().requires_grad_(True)
    base2 = base.double().requires_grad_(True)
    _, ref = reference.render_loss(s2, base2, tgt.double(), "l2")
    (ref * weights.double()).sum().backward()
    assert torch.allclose(grad.double(), s2.grad, rtol=1e-3, atol=1e-7)
    assert torch.allclose(grad_base.double(), base2.grad, rtol=1e-3, atol=1e-7)


def test_kernel_names_the_fields_of_strokes_py():
    """Each raw-stroke offset the kernels use is the field's place in strokes.FIELDS."""
    assert triton_render.STROKE.value == strokes.NUM_FIELDS
    for name in ("CX", "CY", "ROT", "MU_R", "SIGMA_R", "SIGMA_T", "RED", "GREEN", "BLUE", "ALPHA"):
        assert getattr(triton_render, "F_" + name).value == getattr(strokes, name), name


def test_prepared_layout_names_each_slot_once():
    offsets = [v for k, v in vars(triton_render).items() if k.startswith("P_")]
    assert len(offsets) == len(triton_render.PREPARED_FIELDS) == triton_render.PREP.value
    assert sorted(o.value for o in offsets) == list(range(triton_render.PREP.value))


def test_prepare_writes_each_field_where_it_is_read():
    """The prepare kernel's output, read by name, against the formulas in PyTorch: a swapped offset fails."""
    gen = torch.Generator().manual_seed(5)
    s = random_strokes(2, 9, 1.5, generator=gen)
    got = triton_render.prepare(s)
    s = s.double()
    cx, cy, rot, mu, alpha = s[..., CX], s[..., CY], s[..., ROT], s[..., MU_R], s[..., ALPHA]
    srm, st = s[..., SIGMA_R] * mu, s[..., SIGMA_T]
    kr, kt = 1 / srm**2, 1 / st**2
    log_ratio = torch.log(alpha / triton_render.CULL_OPACITY)
    k = torch.sqrt(2 * log_ratio)
    outer = mu + srm * k
    reach2 = outer**2 + mu**2 - 2 * outer * mu * torch.cos(torch.clamp(st * k, max=math.pi))
    half_log2e = 0.5 / math.log(2)
    want = dict(
        cx=cx, cy=cy, reach2=(reach2.sqrt() * 1.001 + 1e-6) ** 2, px=cx - torch.cos(rot) * mu,
        py=cy + torch.sin(rot) * mu, cos=torch.cos(rot), sin=torch.sin(rot), mu=mu, kr=kr, kt=kt,
        kr_exp2=-half_log2e * kr, kt_exp2=-half_log2e * kt, log_ratio=log_ratio, alpha=alpha, srm=srm,
        pad=torch.zeros_like(cx),
    )
    assert set(want) == set(triton_render.PREPARED_FIELDS)
    for name, value in want.items():
        slot = getattr(triton_render, "P_" + name.upper())
        assert torch.allclose(got[..., slot.value].double(), value, rtol=1e-5, atol=1e-6), name


def test_reference_gradcheck_float64():
    gen = torch.Generator().manual_seed(11)
    s = compact(random_strokes(1, 3, generator=gen)).double()
    s[..., SIGMA_R] = 0.1
    s[..., SIGMA_T] = 0.5
    s.requires_grad_(True)
    base = torch.rand(1, 3, 6, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    tgt = torch.rand(1, 3, 6, 6, generator=gen, dtype=torch.float64)
    for loss in ("l2", "prefix_l1"):
        assert torch.autograd.gradcheck(lambda a, b: reference.render_loss(a, b, tgt, loss)[1], (s, base))
    assert torch.autograd.gradcheck(lambda a: reference.render_loss(a, base.detach(), None)[0], (s,))


def test_centre_opacity_is_alpha():
    """At the stroke centre u = mu_r, v = 0, so the opacity is exactly alpha (STROKE_MODEL.md)."""
    s = torch.tensor([[0.5, 0.5, 0.3, 0.4, 0.05, 0.2, 1, 1, 1, 0.37]], dtype=torch.float64)
    x = torch.tensor([[0.5]], dtype=torch.float64)
    y = torch.tensor([[0.5]], dtype=torch.float64)
    assert math.isclose(reference.opacity(s, x, y).item(), 0.37, rel_tol=1e-12)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"strokes must be \[B, N, 10\]"):
        triton_render.forward(torch.rand(2, 5, 9), torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="base must be"):
        triton_render.forward(torch.rand(2, 5, 10), torch.rand(3, 3, 4, 4))
    with pytest.raises(ValueError, match="float32"):
        triton_render.forward(torch.rand(1, 5, 10).double(), torch.rand(1, 3, 4, 4).double())


def test_binned_tile_is_small_where_strokes_are_many_for_the_canvas():
    """16 x 8 tiles at BIN_SMALL_TILE_PIXELS pixels per stroke or fewer, given the programs it needs;
    the walked launch's tile otherwise."""
    dev = torch.device("cpu")  # one "SM" on the CPU: every grid has enough programs for the first tile
    small = tuple(triton_render.BIN_SMALL_TILE[:2]), triton_render.BIN_SMALL_TILE[2]
    walked = tuple(triton_render.TILES[0][:2]), triton_render.TILES[0][2]
    assert triton_render.pick_binned_tile(128, 1000, 512, 512, dev) == small
    assert triton_render.pick_binned_tile(128, 100, 128, 128, dev) == small
    assert triton_render.pick_binned_tile(128, 100, 512, 512, dev) == walked
    assert triton_render.pick_binned_tile(128, 256, 512, 512, dev) == small   # 1024 pixels per stroke
    assert triton_render.pick_binned_tile(128, 255, 512, 512, dev) == walked
