"""Joint refinement after the groups, re-placed rejected strokes and per-stage steps (CPU, tiny sizes)."""
import pytest
import torch

from encoder import fit_batch, renderer
from encoder.config import FitConfig
from encoder.fit import null_strokes, replace_rejected
from encoder.strokes import bounds

TINY = dict(strokes=12, group_size=4, size=16, steps=6, stages=[[0.5, 0.34], [1.0, 0.66]], device="cpu",
            backend="reference", lr=0.02, lr_scale={}, refine=[])  # the groups alone, one lr for every field
REFINE = dict(TINY, refine=[[0.5, 3], [1.0, 3]], refine_lr=0.01, refine_lr_scale={}, refine_lr_decay=0.0)


def photo(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 4, 4, generator=gen)
    return torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)[0]


def images() -> torch.Tensor:
    return torch.stack([photo(1), photo(2)])


def _negate_gradients_when(condition, monkeypatch):
    """Make the optimiser climb the loss in the calls where ``condition(strokes)`` holds."""
    real = renderer.loss_and_grad

    def flipped(strokes, *args, **kwargs):
        canvas, value, grad, grad_base = real(strokes, *args, **kwargs)
        if condition(strokes):
            grad = -grad
            grad_base = -grad_base if grad_base is not None else None
        return canvas, value, grad, grad_base

    monkeypatch.setattr(renderer, "loss_and_grad", flipped)


def test_no_refinement_is_the_plain_fit():
    plain = fit_batch(images(), FitConfig(**TINY))
    zero = fit_batch(images(), FitConfig(**{**TINY, "refine": [[1.0, 0]]}))
    assert torch.equal(plain.strokes, zero.strokes) and torch.equal(plain.psnr, zero.psnr)
    assert not zero.refined.any()


def test_refinement_improves_and_never_lowers_psnr():
    plain = fit_batch(images(), FitConfig(**TINY))
    refined = fit_batch(images(), FitConfig(**REFINE))
    # The groups are the same fit; refinement starts from their painting.
    assert torch.equal(plain.group_psnr, refined.group_psnr)
    assert torch.all(refined.psnr >= plain.psnr - 1e-5)
    assert refined.refined.any() and torch.all(refined.psnr[refined.refined] > plain.psnr[refined.refined])


def test_harmful_refinement_is_rejected_per_image(monkeypatch):
    """Refinement that climbs the loss must leave each image's painting exactly as the groups left it."""
    plain = fit_batch(images(), FitConfig(**TINY))
    _negate_gradients_when(lambda s: s.shape[1] == TINY["strokes"], monkeypatch)  # only the joint pass
    result = fit_batch(images(), FitConfig(**{**REFINE, "refine_lr": 0.2}))
    assert not result.refined.any()
    assert torch.equal(result.strokes, plain.strokes) and torch.equal(result.background, plain.background)
    assert torch.allclose(result.psnr, plain.psnr)


def test_rejected_groups_are_replaced_with_valid_strokes(monkeypatch):
    """Groups that paint wrong are rejected (null strokes); refinement re-places and fits them."""
    from encoder import fit

    real = fit.optimise_group

    def spoiled(strokes, *args):
        out = real(strokes, *args)
        if strokes.shape[1] == TINY["group_size"]:  # a group, not the joint pass: opaque, wide, wrong colour
            strokes[..., 3:6] = torch.tensor([0.5, 0.2, 0.7])
            strokes[..., 6:9] = (args[1].mean(dim=(2, 3))[:, None, :] < 0.5).float()  # the far end of each channel
            strokes[..., 9] = 1.0
        return out

    monkeypatch.setattr(fit, "optimise_group", spoiled)
    result = fit_batch(images(), FitConfig(**REFINE))
    assert torch.all(result.group_psnr == result.group_psnr[:, :1])  # nothing was accepted
    lo, hi = bounds(1.0)
    assert torch.isfinite(result.strokes).all() and torch.all(result.strokes >= lo) and torch.all(result.strokes <= hi)
    assert result.refined.all() and torch.all(result.psnr > result.group_psnr[:, -1])
    null = null_strokes(1, 1, "cpu")[0, 0]
    assert not (result.strokes == null).all(dim=-1).any()  # every slot was re-placed


def test_replace_rejected_touches_only_rejected_slots():
    config = FitConfig(**TINY)
    target = images()
    canvas = torch.full_like(target, 0.5)
    strokes = null_strokes(2, 6, "cpu")
    strokes[:, :3, 0] = 0.3  # three "accepted" strokes per image
    rejected = torch.tensor([[False] * 3 + [True] * 3, [False] * 6])
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = replace_rejected(strokes, rejected, target, canvas, config, gens)
    assert torch.equal(out[~rejected], strokes[~rejected])
    lo, hi = bounds(1.0)
    placed = out[rejected]
    assert torch.all(placed >= lo) and torch.all(placed <= hi)
    assert torch.allclose(placed[:, 9], torch.full((3,), config.init_alpha))


def test_per_field_lr_scales_reach_their_fields():
    """lr_scale multiplies each named field's step: a field at scale 0 does not move, the others do;
    an unknown field name is an error, not a silently ignored key."""
    from encoder.steps import OptimiserSettings, optimise_group
    from encoder.strokes import FIELDS

    settings = OptimiserSettings.of(6, 0.01, {"cx": 0.0, "cy": 0.0, "alpha": 3.0}, (0.8, 0.9), 0.0, "l2", 1e-7, 1)
    assert [0.01 * s for s in settings.field_lr_scales] == pytest.approx([0.0, 0.0] + [0.01] * 7 + [0.03])
    for name in ("lr_scale", "refine_lr_scale"):
        with pytest.raises(ValueError, match=f"{name} names unknown fields"):
            FitConfig(**{**TINY, name: {"x": 1.0}})
    gen = torch.Generator().manual_seed(8)
    lo, hi = bounds(1.0)
    strokes = lo + (hi - lo) * (0.25 + 0.5 * torch.rand(2, 4, 10, generator=gen))
    before = strokes.clone()
    base = torch.full((2, 3, 16, 16), 0.5)
    optimise_group(strokes, base, images(), None, settings, lo, hi, "reference")
    moved = (strokes - before).abs().amax(dim=(0, 1))
    assert moved[FIELDS.index("cx")] == 0 and moved[FIELDS.index("cy")] == 0
    assert torch.all(moved[2:] > 0)


def test_stage_steps():
    config = FitConfig(**{**TINY, "stages": [[0.5, 0.34, 2], [1.0, 0.66]]})
    assert [steps for _, _, steps in config.group_schedule()] == [2] + [6, 6]
    same = FitConfig(**{**TINY, "stages": [[0.5, 0.34, 6], [1.0, 0.66, 6]]})
    assert torch.equal(fit_batch(photo(3)[None], same).strokes, fit_batch(photo(3)[None], FitConfig(**TINY)).strokes)


@pytest.mark.parametrize("bad", [dict(refine=[[0.0, 5]]), dict(refine=[[1.0, -1]]), dict(refine=[[1.0]]),
                                 dict(refine_lr=0.0), dict(stages=[[1.0, 1.0, 0]]),
                                 dict(refine_lr_decay=1.5), dict(refine_betas=(0.9, 1.0))])
def test_config_rejects_bad_refinement(bad):
    with pytest.raises(ValueError):
        FitConfig(**{**TINY, **bad})


def test_adam_lr_factor_fused_matches_tensor_ops_and_one_is_identity():
    from encoder.optim import Adam

    gen = torch.Generator().manual_seed(4)
    lo, hi = bounds(1.0)
    lr = torch.linspace(0.01, 0.1, 10)
    p0 = lo + torch.rand(2, 5, 10, generator=gen) * (hi - lo)
    p1, p2, p3 = p0.clone(), p0.clone(), p0.clone()
    a = Adam(p1, lr, lo, hi, (0.8, 0.9), fused=False)
    b = Adam(p2, lr, lo, hi, (0.8, 0.9), fused=True)
    c = Adam(p3, lr, lo, hi, (0.8, 0.9), fused=False)
    for factor in (1.0, 0.5, 0.1):
        g = torch.randn(2, 5, 10, generator=gen)
        a.step(g.clone(), factor)
        b.step(g.clone(), factor)
        c.step(g.clone())  # no factor: the plain step
        if factor == 1.0:
            assert torch.equal(p1, p3)
        assert torch.allclose(p1, p2, atol=1e-6)
    assert not torch.equal(p1, p3)


def test_joint_lr_decay_changes_the_joint_pass_only():
    constant = fit_batch(photo(4)[None], FitConfig(**REFINE))
    decayed = fit_batch(photo(4)[None], FitConfig(**{**REFINE, "refine_lr_decay": 0.9}))
    assert torch.equal(constant.group_psnr, decayed.group_psnr)  # the groups' lr never decays
    assert not torch.equal(constant.strokes, decayed.strokes)


def _visible_weight(strokes: torch.Tensor, res: int) -> torch.Tensor:
    """Sum over pixels of each stroke's opacity times the transmittance of the strokes above it, ``[B, N]``."""
    from encoder.reference import opacity, pixel_grid

    x, y = pixel_grid(res, res)
    a = opacity(strokes, x, y)                                   # [B, N, H, W]
    above = torch.flip(torch.cumprod(torch.flip(1 - a, [1]), 1), [1])  # product over j >= i
    transmit = above / (1 - a)                                    # product over j > i
    return (a * transmit).sum(dim=(2, 3))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_stroke_coverage_is_the_visible_weight(backend):
    """stroke_coverage equals the brute-force visible weight on random strokes, including strokes
    hidden under an opaque one (coverage near zero) and strokes off the canvas."""
    from encoder.fit import stroke_coverage

    if backend == "triton":
        pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(11)
    lo, hi = bounds(1.0)
    strokes = lo + (hi - lo) * torch.rand(2, 7, 10, generator=gen)
    strokes[:, :, 9] = strokes[:, :, 9].clamp(max=0.9)
    strokes[0, 6] = torch.tensor([0.5, 0.5, 0.0, 2.0, 0.2, 0.785, 0.1, 0.2, 0.3, 0.9])  # a big stroke on top
    background = torch.rand(2, 3, generator=gen)
    got = stroke_coverage(strokes, background, 12, backend)
    want = _visible_weight(strokes, 12)
    assert torch.allclose(got, want, atol=1e-3, rtol=1e-3)
