"""One optimisation step (prepare, forward, backward; l2) on a fit's own strokes: every tile walking
all strokes against binned launches (per-tile stroke lists, the binning kernel's time included).

    python benchmarks/bench_binning.py [--batch 128] [--strokes 100 200 500 1000] [--sizes 128 256 512]

The strokes are the first N (or, with ``--offset K``, strokes K..K+N) of the default
preset's fit of the 11 benchmark photos (repeated to fill the batch), so their sizes
are those a joint pass or a group meets. Prints ms per image for both, the speed-up, the stroke-tile pairs each
tile visits, the peak memory of a step and how far the two launches' canvas and
gradients lie apart. The result decides ``triton_render.BIN_MIN_STROKES``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_frontier import fill  # noqa: E402
from bench_render import peak_mib, time_ms  # noqa: E402
from encoder import fit_batch, load_config, triton_render  # noqa: E402
from encoder.images import center_crop_resize, downsample, pil_to_tensor  # noqa: E402
from photos import BENCHMARK_PHOTOS, load_photo  # noqa: E402


def step(strokes, base, target, binned, tile=None):
    """``tile``: (BH, BW, warps) of a binned launch; default pick_binned_tile's."""
    prepared = triton_render.prepare(strokes)
    bins = None
    if binned:
        tile, warps = (tile[:2], tile[2]) if tile else (None, None)
        bins = triton_render.bin_strokes(prepared, *base.shape[-2:], tile, warps)
    canvas, value = triton_render.forward(strokes, base, target, "l2", prepared=prepared, bins=bins)
    grad, _ = triton_render.backward(strokes, base, target, canvas, torch.ones_like(value), "l2", prepared=prepared,
                                     bins=bins)
    return canvas, grad, bins


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--strokes", type=int, nargs="+", default=[100, 200, 300, 500, 1000])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--tiles", nargs="*", default=[], help="more tiles for the binned launch, HxW:warps")
    ap.add_argument("--offset", type=int, default=0,
                    help="take strokes offset..offset+N (900 with N = 100: the last group's, as a full-size group meets)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {__import__('triton').__version__}")
    photos = torch.stack([pil_to_tensor(center_crop_resize(load_photo(n), 512)) for n in BENCHMARK_PHOTOS])
    targets = fill(photos, args.batch).to(dev)
    fitted = fit_batch(targets, load_config("default"), device=dev)
    print(f"strokes from the default preset's fit: {fitted.psnr.mean():.2f} dB, {fitted.seconds:.1f} s for B={args.batch}")
    strokes_all = fitted.strokes.to(dev)
    background = fitted.background.to(dev)
    print("  size     N   walked ms/img   binned ms/img   speed-up   listed/tile   peak MiB walked/binned"
          "   max|canvas diff|   grad rel diff")
    for size in args.sizes:
        target = downsample(targets, size)
        base = background[:, :, None, None].expand(-1, -1, size, size).contiguous()
        for n in args.strokes:
            s = strokes_all[:, args.offset : args.offset + n].contiguous()
            walked = time_ms(lambda: step(s, base, target, False))
            binned = time_ms(lambda: step(s, base, target, True))
            mem_w = peak_mib(lambda: step(s, base, target, False))
            mem_b = peak_mib(lambda: step(s, base, target, True))
            cw, gw, _ = step(s, base, target, False)
            cb, gb, bins = step(s, base, target, True)
            listed = bins.counts.float().mean().item()
            rel = ((gb - gw).norm() / gw.norm()).item()
            print(f"{size:6d} {n:5d} {walked / args.batch:15.4f} {binned / args.batch:15.4f} {walked / binned:10.2f}"
                  f" {listed:13.1f} {mem_w:13.0f} / {mem_b:<8.0f} {(cb - cw).abs().max().item():18.2e}"
                  f" {rel:15.2e}", flush=True)
            for variant in args.tiles:
                shape, warps = variant.split(":")
                tile = (*(int(t) for t in shape.split("x")), int(warps))
                ms = time_ms(lambda: step(s, base, target, True, tile))
                print(f"{size:6d} {n:5d}   binned on tile {variant:8s} {ms / args.batch:9.4f} ms/img"
                      f"  {walked / ms:10.2f}x the walked launch", flush=True)


if __name__ == "__main__":
    main()
