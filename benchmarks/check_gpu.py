"""Correctness of the Triton renderer on the GPU against the float64 reference, on fresh random inputs.

    python benchmarks/check_gpu.py [--tiles 16x16:1 32x32:4]

Then a small fit with CUDA graphs against the same fit run eagerly.

Every tile shape is its own compiled kernel, so each listed one is checked
(default: those pick_tile chooses from).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from encoder import FitConfig, fit_batch, reference, triton_debug, triton_render  # noqa: E402
from encoder.strokes import random_strokes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", nargs="+",
                    default=[f"{h}x{w}:{k}" for h, w, k, _ in (*triton_render.TILES, triton_render.BIN_SMALL_TILE)])
    args = ap.parse_args()
    dev = torch.device("cuda")
    worst_fwd, worst_grad = 0.0, 0.0
    for trial, (b, n, h, w) in enumerate([(2, 50, 64, 64), (3, 17, 40, 72), (1, 200, 128, 96), (4, 50, 256, 256)]):
        gen = torch.Generator().manual_seed(100 + trial)
        s = random_strokes(b, n, w / h, generator=gen)
        s[..., 3] = 0.05 + 0.3 * s[..., 3] / 2
        base, tgt = torch.rand(b, 3, h, w, generator=gen), torch.rand(b, 3, h, w, generator=gen)
        for loss in ("l1", "l2", "prefix_l1"):
            sd = s.double().requires_grad_(True)
            ref_canvas, ref_value = reference.render_loss(sd, base.double(), tgt.double(), loss)
            ref_value.sum().backward()
            # Every tile variant walking all strokes, and binned (per-tile stroke lists) where the loss allows.
            # Binned both ways: every stroke tested per tile, and two-level (coarse tiles first).
            runs = [(variant, None) for variant in args.tiles]
            runs += [(variant, coarse) for variant in args.tiles if loss != "prefix_l1" for coarse in (False, True)]
            for variant, coarse in runs:
                binned = coarse is not None
                shape, warps = variant.split(":")
                tile, warps = tuple(int(t) for t in shape.split("x")), int(warps)
                sg, bg, tg = s.to(dev), base.to(dev), tgt.to(dev)
                bins = (triton_render.bin_strokes(triton_render.prepare(sg), h, w, tile, warps, coarse=coarse)
                        if binned else None)
                launch = dict(bins=bins) if binned else dict(tile=tile, num_warps=warps)
                canvas, value = triton_render.forward(sg, bg, tg, loss, **launch)
                grad, _ = triton_render.backward(sg, bg, tg, canvas, torch.ones(b, device=dev), loss, **launch)
                variant = variant + (" binned" if binned else "") + (" 2-level" if coarse else "")
                fwd = (canvas.cpu().double() - ref_canvas).abs().max().item()
                rel = ((grad.cpu().double() - sd.grad).norm(dim=(0, 1)) / sd.grad.norm(dim=(0, 1)).clamp_min(1e-30)).max().item()
                worst_fwd, worst_grad = max(worst_fwd, fwd), max(worst_grad, rel)
                print(f"B={b} N={n} {h}x{w} {loss:9s} tile {variant:23s} canvas max|diff| {fwd:.2e}  "
                      f"loss diff {abs(value.cpu().double() - ref_value.detach()).max().item():.2e}  grad worst field rel {rel:.2e}")
    fwd, rel = check_kept_lists(dev)
    worst_fwd, worst_grad = max(worst_fwd, fwd), max(worst_grad, rel)
    print(f"WORST forward {worst_fwd:.2e} (tol 1e-4)  gradient {worst_grad:.2e} (tol 1e-3)  {'PASS' if worst_fwd < 1e-4 and worst_grad < 1e-3 else 'FAIL'}")
    check_graphed_fit(dev)


def check_kept_lists(dev: torch.device) -> tuple[float, float]:
    """Stroke lists made for earlier parameters (``step_bin_interval`` > 1), on the fit's binned tile, one
    level and two: each tile paints exactly its listed strokes as they are now (the reference masked by
    ``triton_debug.listed_pixels``), and the backward is that painting's gradient."""
    b, n, h, w, cull = 2, 300, 96, 128, 2e-3
    gen = torch.Generator().manual_seed(200)
    before = random_strokes(b, n, w / h, generator=gen)
    before[..., 3] = 0.05 + 0.3 * before[..., 3] / 2
    now = before.clone()  # a few steps later: moved by up to 2 px, grown
    now[..., :2] += (torch.rand(b, n, 2, generator=gen) - 0.5) * 4 / h
    now[..., 4] *= 1.2
    base, tgt = torch.rand(b, 3, h, w, generator=gen), torch.rand(b, 3, h, w, generator=gen)
    sg, bg, tg = now.to(dev), base.to(dev), tgt.to(dev)
    worst_fwd, worst_grad = 0.0, 0.0
    for coarse in (False, True):
        bins = triton_render.bin_strokes(triton_render.prepare(before.to(dev), cull), h, w, coarse=coarse)
        prepared = triton_render.prepare(sg, cull)
        canvas, value = triton_render.forward(sg, bg, tg, "l2", prepared=prepared, bins=bins)
        grad, _ = triton_render.backward(sg, bg, tg, canvas, torch.ones(b, device=dev), "l2", prepared=prepared,
                                         bins=bins)
        sd = now.double().requires_grad_(True)
        listed = triton_debug.listed_pixels(bins, n, h, w)
        ref_canvas, ref_value = reference.render_loss(sd, base.double(), tgt.double(), "l2", mask=listed)
        ref_value.sum().backward()
        fwd = (canvas.cpu().double() - ref_canvas).abs().max().item()
        rel = ((grad.cpu().double() - sd.grad).norm(dim=(0, 1)) / sd.grad.norm(dim=(0, 1)).clamp_min(1e-30)).max().item()
        worst_fwd, worst_grad = max(worst_fwd, fwd), max(worst_grad, rel)
        print(f"B={b} N={n} {h}x{w} l2        kept lists, tile {bins.tile}{' 2-level' if coarse else ''}: canvas "
              f"max|diff| {fwd:.2e}  loss diff {abs(value.cpu().double() - ref_value.detach()).max().item():.2e}  "
              f"grad worst field rel {rel:.2e}")
    return worst_fwd, worst_grad


def check_graphed_fit(dev: torch.device) -> None:
    """The fit with each group's steps replayed as a CUDA graph against the same fit run eagerly.

    Float atomics add in any order, so runs differ in the last bits and those
    differences grow over hundreds of steps: the check is on PSNR per group.
    The second graphed fit replays the graphs the first one captured.
    """
    gen = torch.Generator().manual_seed(5)
    # Smooth random images: a 8 x 8 grid of colours, bilinearly enlarged.
    targets = torch.nn.functional.interpolate(torch.rand(3, 3, 8, 8, generator=gen), size=96, mode="bilinear")
    config = FitConfig(strokes=60, size=96, group_size=20, steps=50, refine=[])
    eager = fit_batch(targets, replace(config, cuda_graphs=False), device=dev, seed=1)
    graphed = [fit_batch(targets, config, device=dev, seed=1) for _ in range(2)]
    worst = max((g.group_psnr - eager.group_psnr).abs().max().item() for g in graphed)
    print(f"fit, groups as CUDA graphs vs eager: PSNR per group {eager.group_psnr.mean():.2f} dB, "
          f"worst difference {worst:.3f} dB (tol 0.05)  {'PASS' if worst < 0.05 else 'FAIL'}")
    # The joint pass is captured too: same check on the final PSNR. A joint
    # step moves every stroke at once, so the last-bit differences of the atomics spread further than
    # in a group: the yardstick is how far two eager runs land apart, and graphed runs may differ
    # from eager by twice that, or by 0.1 dB, whichever is larger.
    # Lists kept 4 steps in the joint pass (60 strokes: binned), as in the presets.
    config = replace(config, refine=[[0.5, 20], [1.0, 30]], refine_lr=0.003, step_bin_interval=4)
    eager = [fit_batch(targets, replace(config, cuda_graphs=False), device=dev, seed=1) for _ in range(2)]
    graphed = [fit_batch(targets, config, device=dev, seed=1) for _ in range(2)]
    noise = (eager[1].psnr - eager[0].psnr).abs().max().item()
    worst = max((g.psnr - eager[0].psnr).abs().max().item() for g in graphed)
    tol = max(0.1, 2 * noise)
    gain = (eager[0].psnr - eager[0].group_psnr[:, -1]).mean().item()
    print(f"fit with joint refinement, graphed vs eager: final PSNR {eager[0].psnr.mean():.2f} dB ({gain:+.2f} from "
          f"the final pass), worst difference {worst:.3f} dB, eager vs eager {noise:.3f} dB (tol {tol:.3f})  "
          f"{'PASS' if worst <= tol else 'FAIL'}")

if __name__ == "__main__":
    main()
