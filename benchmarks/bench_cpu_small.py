"""The small CPU preset against the seed algorithm at the same stroke count and size, on the CPU.

    python benchmarks/bench_cpu_small.py [--images astronaut coffee] [--threads 2]

Both run the dense reference renderer through the same fit loop; the seed
algorithm is the seed preset (configs/seed.yaml) (300 steps per group at full resolution, the
mean-over-prefixes L1, softmax placement, black background).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder import fit_batch, load_config  # noqa: E402
from encoder.images import center_crop_resize, pil_to_tensor  # noqa: E402
from photos import load_photo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", nargs="+", default=["astronaut", "coffee"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-seed", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    presets = [("cpu_small", "cpu_small")]
    if not args.skip_seed:
        presets.append(("seed", "seed"))
    print(f"torch {torch.__version__}, {args.threads} threads")
    for name in args.images:
        target = pil_to_tensor(center_crop_resize(load_photo(name), 128))[None]
        for label, path in presets:
            config = load_config(path, strokes=200, size=128, device="cpu")
            start = time.perf_counter()
            result = fit_batch(target, config)
            print(f"{name:12s} {label:10s} PSNR {float(result.psnr[0]):6.2f} dB  {time.perf_counter() - start:7.1f} s", flush=True)


if __name__ == "__main__":
    main()
