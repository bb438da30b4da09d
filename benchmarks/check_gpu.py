"""Correctness of the Triton renderer on the GPU against the float64 reference, on fresh random inputs.

    python benchmarks/check_gpu.py [--tiles 16x16:1 32x32:4]

Every tile shape is its own compiled kernel, so each listed one is checked
(default: those pick_tile chooses from).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from encoder import reference, triton_render  # noqa: E402
from encoder.strokes import random_strokes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", nargs="+", default=[f"{h}x{w}:{k}" for h, w, k, _ in triton_render.TILES])
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
            for variant in args.tiles:
                shape, warps = variant.split(":")
                tile, warps = tuple(int(t) for t in shape.split("x")), int(warps)
                canvas, value = triton_render.forward(s.to(dev), base.to(dev), tgt.to(dev), loss, tile=tile, num_warps=warps)
                grad, _ = triton_render.backward(s.to(dev), base.to(dev), tgt.to(dev), canvas, torch.ones(b, device=dev), loss,
                                                 tile=tile, num_warps=warps)
                fwd = (canvas.cpu().double() - ref_canvas).abs().max().item()
                rel = ((grad.cpu().double() - sd.grad).norm(dim=(0, 1)) / sd.grad.norm(dim=(0, 1)).clamp_min(1e-30)).max().item()
                worst_fwd, worst_grad = max(worst_fwd, fwd), max(worst_grad, rel)
                print(f"B={b} N={n} {h}x{w} {loss:9s} tile {variant:8s} canvas max|diff| {fwd:.2e}  "
                      f"loss diff {abs(value.cpu().double() - ref_value.detach()).max().item():.2e}  grad worst field rel {rel:.2e}")
    print(f"WORST forward {worst_fwd:.2e} (tol 1e-4)  gradient {worst_grad:.2e} (tol 1e-3)  {'PASS' if worst_fwd < 1e-4 and worst_grad < 1e-3 else 'FAIL'}")


if __name__ == "__main__":
    main()
