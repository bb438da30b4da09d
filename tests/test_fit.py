"""The fitting loop on the CPU: determinism, valid ranges, robustness, batching, monotone groups."""
import pytest
import torch

from encoder import fit_batch, load_config
from encoder.config import FitConfig
from encoder.fit import null_strokes
from encoder.optim import Adam
from encoder.renderer import composite
from encoder.strokes import bounds

TINY = dict(strokes=12, group_size=4, size=16, steps=6, stages=[[0.5, 0.34], [1.0, 0.66]], device="cpu",
            backend="reference", lr=0.02, lr_scale={}, refine=[])  # the groups alone, one lr for every field


def photo(seed: int) -> torch.Tensor:
    """A small smooth random 'photo': blobs of colour."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 4, 4, generator=gen)
    return torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)[0]


def test_same_seed_same_strokes():
    config = FitConfig(**TINY)
    a = fit_batch(photo(0)[None], config, seed=5)
    b = fit_batch(photo(0)[None], config, seed=5)
    c = fit_batch(photo(0)[None], config, seed=6)
    assert torch.equal(a.strokes, b.strokes) and torch.equal(a.background, b.background)
    assert not torch.equal(a.strokes, c.strokes)


@pytest.mark.parametrize("kind", ["flat", "black", "white", "noise"])
def test_no_nan_and_valid_ranges_on_hard_images(kind):
    gen = torch.Generator().manual_seed(1)
    image = {"flat": torch.full((3, 16, 16), 0.4), "black": torch.zeros(3, 16, 16), "white": torch.ones(3, 16, 16),
             "noise": torch.rand(3, 16, 16, generator=gen)}[kind]
    result = fit_batch(image[None], FitConfig(**TINY))
    lo, hi = bounds(1.0)
    assert bool(result.ok[0])
    assert torch.isfinite(result.strokes).all() and torch.isfinite(result.psnr).all()
    assert torch.all(result.strokes >= lo) and torch.all(result.strokes <= hi)
    assert torch.all(result.background >= 0) and torch.all(result.background <= 1)


def test_parameters_stay_in_range_after_every_step(monkeypatch):
    """After every optimiser step (update + clamp) every value is valid."""
    lo, hi = bounds(1.0)
    checks = []
    original = Adam.step

    def step(self, grad, *args):
        original(self, grad, *args)
        if self.params.shape[-1] == 10:
            checks.append(bool(torch.all(self.params >= lo) and torch.all(self.params <= hi)))

    monkeypatch.setattr(Adam, "step", step)
    config = FitConfig(**{**TINY, "lr": 0.5})  # a large step pushes values past the bounds
    fit_batch(photo(2)[None], config)
    assert len(checks) == config.groups * config.steps and all(checks)


def test_fused_adam_step_matches_tensor_ops():
    """The fused Triton step (the CUDA path) computes the same update as the tensor-op path."""
    gen = torch.Generator().manual_seed(4)
    lo, hi = bounds(1.0)
    lr = torch.linspace(0.01, 0.1, 10)
    p1 = lo + torch.rand(3, 7, 10, generator=gen) * (hi - lo)
    p2 = p1.clone()
    a, b = Adam(p1, lr, lo, hi, (0.8, 0.9), fused=False), Adam(p2, lr, lo, hi, (0.8, 0.9), fused=True)
    for _ in range(3):
        g = torch.randn(3, 7, 10, generator=gen)
        g2 = g.clone()
        a.step(g)
        b.step(g2)
        assert torch.allclose(p1, p2, atol=1e-6) and torch.equal(g2, torch.zeros_like(g2))


def test_batch_of_mixed_images_equals_fitting_each_alone():
    config = FitConfig(**TINY)
    gen = torch.Generator().manual_seed(9)
    images = torch.stack([photo(3), torch.zeros(3, 16, 16), torch.rand(3, 16, 16, generator=gen)])
    together = fit_batch(images, config, seed=10)
    for i in range(3):
        alone = fit_batch(images[i:i + 1], config, seed=10 + i)  # image i draws from seed + i
        assert torch.allclose(alone.strokes[0], together.strokes[i], atol=1e-4)
        assert abs(float(alone.psnr[0]) - float(together.psnr[i])) < 1e-3


def test_psnr_never_drops_between_groups():
    config = FitConfig(**{**TINY, "lr": 0.2})
    result = fit_batch(torch.stack([photo(6), photo(7)]), config)
    diffs = result.group_psnr[:, 1:] - result.group_psnr[:, :-1]
    assert torch.all(diffs >= -1e-4)
    # and the last group's PSNR is the painting's
    assert torch.allclose(result.group_psnr[:, -1], result.psnr, atol=1e-3)


def test_null_strokes_paint_nothing():
    base = torch.rand(2, 3, 64, 48)
    assert torch.equal(composite(null_strokes(2, 5, "cpu"), base, "reference"), base)


def test_triton_backend_fits_like_reference():
    config = FitConfig(**{**TINY, "strokes": 4, "steps": 3})
    ref = fit_batch(photo(8)[None], config, seed=1)
    tri = fit_batch(photo(8)[None], FitConfig(**{**TINY, "strokes": 4, "steps": 3, "backend": "triton"}), seed=1)
    # Adam normalises each gradient, so float32-level differences in near-zero
    # gradients move a parameter by up to lr per step: compare loosely.
    assert torch.allclose(ref.strokes, tri.strokes, atol=3 * 3 * config.lr)
    assert abs(float(ref.psnr[0]) - float(tri.psnr[0])) < 0.1


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="unknown encoder config keys: bogus"):
        load_config(None, bogus=1)
    with pytest.raises(ValueError, match="loss must be"):
        load_config(None, loss="l7")
    path = tmp_path / "c.yaml"
    path.write_text("encoder:\n  strokes: 40\n  size: 64\n")
    config = load_config(path, size=32)
    assert config.strokes == 40 and config.size == 32
    schedule = config.group_schedule()
    assert len(schedule) == config.groups and schedule[-1][1] == 32 and sum(n for n, _, _ in schedule) == 40


def test_a_diverging_image_is_flagged_and_its_strokes_stay_finite(monkeypatch):
    """NaN gradients for one image: that image is reported not ok, the other is untouched, no NaN leaks."""
    from encoder import renderer

    real = renderer.loss_and_grad

    def poisoned(*args, **kwargs):
        canvas, value, grad, grad_base = real(*args, **kwargs)
        grad = grad.clone()
        grad[1] = float("nan")
        return canvas, value, grad, grad_base

    config = FitConfig(**TINY)
    clean = fit_batch(torch.stack([photo(11), photo(12)]), config)
    monkeypatch.setattr(renderer, "loss_and_grad", poisoned)
    result = fit_batch(torch.stack([photo(11), photo(12)]), config)
    assert result.ok.tolist() == [True, False]
    assert torch.isfinite(result.strokes).all() and torch.isfinite(result.background).all()
    assert torch.equal(result.strokes[0], clean.strokes[0])


def test_step_culling_reaches_every_gradient_step_and_no_commit(monkeypatch):
    """``step_cull_opacity`` is the threshold of every gradient step (groups and joint passes); the
    commits and the PSNR are rendered exactly (``composite``), so a coarse threshold never shows in a
    reported PSNR. Out-of-range values are refused."""
    from encoder import renderer

    seen = []
    real = renderer.loss_and_grad
    monkeypatch.setattr(renderer, "loss_and_grad",
                        lambda *a, **k: seen.append(a[7] if len(a) > 7 else k.get("cull_opacity")) or real(*a, **k))
    config = FitConfig(**{**TINY, "refine": [[1.0, 3]], "step_cull_opacity": 1e-3})
    result = fit_batch(photo(0)[None], config)
    assert len(seen) == 3 * 6 + 3 and set(seen) == {1e-3}
    canvas = composite(result.strokes, result.background[:, :, None, None].expand(-1, -1, 16, 16).contiguous(),
                       "reference")
    exact = 10 * torch.log10(1 / (canvas - photo(0)[None]).square().mean())
    assert abs(exact.item() - result.psnr.item()) < 1e-4
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="step_cull_opacity"):
            FitConfig(**{**TINY, "step_cull_opacity": bad})


def test_steps_list_strokes_every_bin_interval_and_keep_the_lists_between(monkeypatch):
    """``step_bin_interval`` k: the loop lists each tile's strokes at steps 0, k, 2k, ... and every step
    renders with the latest lists; at 1 every step lists afresh. Values below 1 are refused."""
    from encoder import renderer, steps
    from encoder.fit import plan_phases
    from encoder.steps import OptimiserSettings

    made, used = [], []
    monkeypatch.setattr(renderer, "stroke_lists", lambda *a, **k: made.append(object()) or made[-1])
    real = renderer.loss_and_grad

    def spy(*args, **kwargs):
        used.append(args[8])
        return real(*args[:8], **kwargs)  # the reference ignores lists: the spy's objects are not bins

    monkeypatch.setattr(renderer, "loss_and_grad", spy)
    lo, hi = bounds(1.0)
    for interval, want in ((3, [0, 0, 0, 1, 1, 1, 2]), (1, list(range(7)))):
        made.clear(), used.clear()
        settings = OptimiserSettings.of(7, 0.01, {}, (0.8, 0.9), 0.0, "l2", 2e-3, interval)
        steps._run_steps(null_strokes(1, 4, "cpu"), torch.zeros(1, 3, 8, 8), torch.rand(1, 3, 8, 8), None,
                         settings, torch.full((10,), 0.01), lo, hi, "reference", settings.steps)
        assert [made.index(b) for b in used] == want
    assert plan_phases(FitConfig(**{**TINY, "step_bin_interval": 5}), 16)[0].settings.bin_interval == 5
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="step_bin_interval"):
            FitConfig(**{**TINY, "step_bin_interval": bad})


def test_same_paintings_as_the_stored_reference():
    """The fit paints what it painted before the phase refactor (tests/data/fit_reference_cpu.pt: the
    cpu_small preset with small overrides, joint passes and per-field lr scales, seed 3)."""
    from conftest import DATA

    ref = torch.load(DATA / "fit_reference_cpu.pt")
    result = fit_batch(ref["targets"], load_config("cpu_small", **ref["overrides"]), seed=ref["seed"])
    assert torch.allclose(result.strokes, ref["strokes"], atol=1e-4, rtol=0)
    assert torch.allclose(result.background, ref["background"], atol=1e-4, rtol=0)
    assert torch.allclose(result.psnr, ref["psnr"], atol=1e-3, rtol=0)
    assert torch.allclose(result.group_psnr, ref["group_psnr"], atol=1e-3, rtol=0)
    assert torch.equal(result.refined, ref["refined"])


def test_fit_config_defaults_are_the_default_preset():
    assert FitConfig() == load_config("default")


def test_the_schedule_is_planned_once_from_the_config():
    """The default preset at 512 px: 10 groups at 128, 256 and 512 px (the last ones with their stage's
    steps), the first fitting the background, then one joint pass with the joint settings."""
    from encoder.fit import GroupPhase, JointPhase, plan_phases

    config = FitConfig()
    *groups, joint = plan_phases(config, 512)
    assert all(isinstance(g, GroupPhase) for g in groups) and isinstance(joint, JointPhase)
    assert [(g.strokes, g.resolution, g.settings.steps) for g in groups] == \
        [(100, 128, 125)] * 3 + [(100, 256, 125)] * 4 + [(100, 512, 75)] * 3
    assert [g.fit_background for g in groups] == [True] + [False] * 9
    assert {(g.settings.lr, g.settings.lr_decay) for g in groups} == {(0.01, 0.0)}
    assert [(res, s.steps, s.lr, s.lr_decay) for res, s in joint.stages] == \
        [(256, 210, 0.003, 0.9), (512, 100, 0.003, 0.9)]
    assert not any(isinstance(p, JointPhase) for p in plan_phases(FitConfig(**{**TINY, "refine": [[1.0, 0]]}), 16))


def test_commit_takes_only_a_lower_error_and_never_nan():
    from encoder.fit import Painting, commit

    def painting(value: float, errors: list) -> Painting:
        return Painting(torch.full((3, 2, 10), value), torch.full((3, 2), value > 0), torch.full((3, 3), value),
                        torch.full((3, 3, 4, 4), value), torch.tensor(errors))

    old, new = painting(0.0, [0.5, 0.5, 0.5]), painting(1.0, [0.4, 0.5, float("nan")])
    kept, better = commit(old, new)
    assert better.tolist() == [True, False, False]
    assert kept.strokes[:, 0, 0].tolist() == [1.0, 0.0, 0.0] and kept.rejected[:, 0].tolist() == [True, False, False]
    assert kept.canvas[:, 0, 0, 0].tolist() == [1.0, 0.0, 0.0] and kept.error[1:].tolist() == [0.5, 0.5]


def test_a_changed_optimiser_setting_captures_a_new_graph(monkeypatch):
    """The CUDA-graph cache is keyed by the whole OptimiserSettings: the same settings replay the
    captured loop, a change to any one of them captures a new one. There is no CUDA here, so the
    graph path is forced and the graph is a fake that records its captures."""
    import dataclasses
    from collections import OrderedDict

    from encoder import steps
    from encoder.fit import plan_phases

    captured = []

    class FakeGraph:
        def __init__(self, strokes, base, target, background, settings, *rest):
            captured.append(settings)

        def __call__(self, strokes, base, target, background):
            return None

    monkeypatch.setattr(steps, "_graphed", lambda *args: True)
    monkeypatch.setattr(steps, "_GraphedSteps", FakeGraph)
    monkeypatch.setattr(steps, "_graphs", OrderedDict())
    settings = plan_phases(FitConfig(**TINY), 16)[1].settings
    lo, hi = bounds(1.0)
    strokes, canvas = null_strokes(1, 4, "cpu"), torch.zeros(1, 3, 8, 8)

    def run(s):
        steps.optimise_group(strokes, canvas, canvas, None, s, lo, hi, "triton")

    run(settings)
    run(settings)
    assert captured == [settings]
    changes = dict(steps=7, lr=0.03, field_lr_scales=(0.5,) * 10, betas=(0.9, 0.99), lr_decay=0.5, loss="l1",
                   step_cull_opacity=1e-3, bin_interval=2)
    assert set(changes) == {f.name for f in dataclasses.fields(steps.OptimiserSettings)}  # every setting tried
    for name, value in changes.items():
        run(dataclasses.replace(settings, **{name: value}))
        assert len(captured) == 2 + list(changes).index(name) and getattr(captured[-1], name) == value
    run(settings)  # still cached: replayed, not captured again
    assert len(captured) == 1 + len(changes)
