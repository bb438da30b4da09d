"""One optimisation step (forward + backward) of a 50-stroke group over B targets:
the fused Triton renderer against the dense PyTorch reference, same shapes, same run.

    python benchmarks/bench_render.py [--sizes 512] [--batches 1 8 32] [--out results.json]

Prints a table: ms per step, ms per image, speed-up, peak memory, the share of
(stroke, tile) pairs that culling leaves to paint, and the Triton kernels' rate
in G stroke-pixels per second (N * H * W * B / time, culled pixels included).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from encoder import reference, triton_debug, triton_render  # noqa: E402
from encoder.strokes import ALPHA, MU_R, SIGMA_R, SIGMA_T, random_strokes  # noqa: E402


def make_strokes(kind: str, b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    s = random_strokes(b, n, generator=gen)
    if kind == "large":  # early groups: broad strokes
        s[..., MU_R] = 0.1 + 0.4 * torch.rand(b, n, generator=gen)
        s[..., SIGMA_R] = 0.05 + 0.15 * torch.rand(b, n, generator=gen)
        s[..., SIGMA_T] = 0.1 + 0.5 * torch.rand(b, n, generator=gen)
    else:  # late groups: small strokes, a few pixels wide and tens long
        s[..., MU_R] = 0.05 + 0.15 * torch.rand(b, n, generator=gen)
        s[..., SIGMA_R] = 0.01 + 0.04 * torch.rand(b, n, generator=gen)
        s[..., SIGMA_T] = 0.02 + 0.1 * torch.rand(b, n, generator=gen)
    s[..., ALPHA] = 0.3 + 0.7 * torch.rand(b, n, generator=gen)
    return s


def time_ms(fn, reps: int = 20) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=max(reps, 50), return_mode="median")


def peak_mib(step) -> float:
    """Memory one step allocates beyond its inputs (measured outside do_bench, whose cache-flush buffer would count)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def bench_triton(s, base, tgt, tile, warps):
    def step():
        canvas, loss = triton_render.forward(s, base, tgt, "l2", tile=tile, num_warps=warps)
        triton_render.backward(s, base, tgt, canvas, torch.ones_like(loss), "l2", tile=tile, num_warps=warps)

    ms = time_ms(step)
    return ms, peak_mib(step)


def bench_reference(s, base, tgt):
    def step():
        p = s.detach().requires_grad_(True)
        _, loss = reference.render_loss(p, base, tgt, "l2")
        loss.sum().backward()

    try:
        ms = time_ms(step, reps=5)
        return ms, peak_mib(step)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan"), float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--strokes", type=int, default=50)
    ap.add_argument("--tiles", nargs="+", default=["16x32:1", "16x32:2"], help="tile HxW:warps variants")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {__import__('triton').__version__}")
    for size in args.sizes:
        for kind in ("large", "small"):
            for b in args.batches:
                s = make_strokes(kind, b, args.strokes, gen).to(dev)
                base = torch.rand(b, 3, size, size, generator=gen).to(dev)
                tgt = torch.rand(b, 3, size, size, generator=gen).to(dev)
                work = args.strokes * size * size * b
                ref_ms, ref_mb = (math.nan, math.nan) if args.no_reference else bench_reference(s, base, tgt)
                for variant in args.tiles:
                    shape, warps = variant.split(":")
                    tile = tuple(int(t) for t in shape.split("x"))
                    ms, mb = bench_triton(s, base, tgt, tile, int(warps))
                    painted = triton_debug.tile_hits(s, size, size, tile).float().mean().item()
                    row = dict(size=size, kind=kind, batch=b, tile=variant, triton_ms=ms, triton_mb=mb,
                               ref_ms=ref_ms, ref_mb=ref_mb, speedup=ref_ms / ms, painted=painted,
                               gpix_per_s=work / ms / 1e6)
                    rows.append(row)
                    print(f"{size:5d} {kind:5s} B={b:3d} tile={variant:8s} triton {ms:8.3f} ms ({ms / b:7.3f}/img, {mb:8.1f} MiB)"
                          f"  reference {ref_ms:9.2f} ms ({ref_mb:9.1f} MiB)  x{ref_ms / ms:7.1f}  painted {painted:6.1%}"
                          f"  {work / ms / 1e6:7.1f} G stroke-px/s", flush=True)
                del s, base, tgt
                torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
