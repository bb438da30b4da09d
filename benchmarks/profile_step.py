"""Where one joint step's time goes: prepare, binning, forward, backward, Adam, each timed alone, on a
default fit's own 1000 strokes, at each joint resolution and each culling threshold.

    python benchmarks/profile_step.py [--batch 128] [--culls 1e-7 2e-3] [--sizes 256 512] [--tiles 16x8 16x16]

Prints ms per image for each kernel and the mean number of strokes a tile lists: what a faster
joint step has to attack (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_frontier import fill  # noqa: E402
from bench_render import time_ms  # noqa: E402
from encoder import fit_batch, load_config, triton_render  # noqa: E402
from encoder.images import center_crop_resize, downsample, pil_to_tensor  # noqa: E402
from encoder.optim import Adam  # noqa: E402
from encoder.strokes import bounds  # noqa: E402
from photos import BENCHMARK_PHOTOS, load_photo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--culls", type=float, nargs="+", default=[triton_render.CULL_OPACITY, 2e-3])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--tiles", nargs="+", help="binned tiles to time, ROWSxCOLS[xWARPS] (default: the renderer's pick)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    config = load_config("default")
    photos = torch.stack([pil_to_tensor(center_crop_resize(load_photo(n), config.size)) for n in BENCHMARK_PHOTOS])
    targets = fill(photos, args.batch).to(dev)
    fit = fit_batch(targets, config, device=dev)
    strokes = fit.strokes.to(dev).contiguous()
    lo, hi = bounds(1.0, dev)
    print(f"device: {torch.cuda.get_device_name()}  B = {args.batch}, N = {strokes.shape[1]}; ms per image")
    print(f"{'size':>5s} {'cull':>8s} {'listed':>7s} {'prepare':>8s} {'bin 1-lv':>8s} {'bin 2-lv':>8s} {'forward':>8s}"
          f" {'backward':>8s} {'adam':>8s} {'step':>8s} (step: with the faster binning)")
    for size in args.sizes:
        target = downsample(targets, size)
        base = fit.background.to(dev)[:, :, None, None].expand(-1, -1, size, size).contiguous()
        for cull in args.culls:
            prepared = triton_render.prepare(strokes, cull)
            for tile in args.tiles or [None]:
                kw = {}
                if tile:
                    r, c, *w = (int(v) for v in tile.split("x"))
                    kw = dict(tile=(r, c), num_warps=w[0] if w else 1)
                bins = triton_render.bin_strokes(prepared, size, size, coarse=False, **kw)
                two = triton_render.bin_strokes(prepared, size, size, coarse=True, **kw)
                extra = (bins.counts.sum() - two.counts.sum()).item()  # pairs only the coarse test culls (sound: tested)
                canvas, value = triton_render.forward(strokes, base, target, "l2", prepared=prepared, bins=bins)
                ones = torch.ones_like(value)
                grad = torch.zeros_like(strokes)
                opt = Adam(strokes.clone(), torch.full((10,), 1e-3, device=dev), lo, hi, (0.8, 0.9))
                times = {
                    "prepare": time_ms(lambda: triton_render.prepare(strokes, cull)),
                    "bin 1-level": time_ms(lambda: triton_render.bin_strokes(prepared, size, size, coarse=False, **kw)),
                    "bin 2-level": time_ms(lambda: triton_render.bin_strokes(prepared, size, size, coarse=True, **kw)),
                    "forward": time_ms(lambda: triton_render.forward(strokes, base, target, "l2", prepared=prepared,
                                                                     bins=bins)),
                    "backward": time_ms(lambda: triton_render.backward(strokes, base, target, canvas, ones, "l2",
                                                                       grad_strokes=grad, prepared=prepared, bins=bins)),
                    "adam": time_ms(lambda: opt.step(grad)),
                }
                listed = bins.counts.float().mean().item()
                per = {k: v / args.batch for k, v in times.items()}
                step = sum(per.values()) - max(per["bin 1-level"], per["bin 2-level"])
                print(f"{size:5d} {cull:8.0e} {listed:7.1f} " + " ".join(f"{v:8.4f}" for v in per.values())
                      + f" {step:8.4f}  tile {bins.tile} x{bins.num_warps} warps (2-level lists {extra} pairs shorter)",
                      flush=True)

if __name__ == "__main__":
    main()
