"""Where a fit's strokes go: how many paint next to nothing, and what the last strokes still buy.

    python benchmarks/probe_strokes.py --config default --photos lisa grass gravel cell clock motorcycle_left page

For each photo, after one ``fit_batch`` of all of them together:

- PSNR, and the gain of the last group of strokes (before the joint pass);
- the strokes' coverage at full size (``encoder.fit.stroke_coverage``: visible
  weight summed over the pixels) as counts under 1, 4 and 16 pixels, and how many
  have alpha under 0.05;
- the PSNR lost when the strokes under 4 pixels are removed: what the nearly idle
  strokes are worth. If it is small and they are many, the slots they hold are
  free capacity that re-placing them could use.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder import fit_batch, load_config, renderer  # noqa: E402
from encoder.config import parse_overrides  # noqa: E402
from encoder.fit import null_strokes, stroke_coverage  # noqa: E402
from encoder.images import center_crop_resize, pil_to_tensor, psnr  # noqa: E402
from encoder.strokes import ALPHA  # noqa: E402
from photos import TUNING_PHOTOS, load_photo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="preset name or YAML path (default: the default preset)")
    ap.add_argument("--photos", nargs="+", default=["lisa", *TUNING_PHOTOS])
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, key=value (YAML values)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    config = load_config(args.config, **parse_overrides(args.set))
    size = config.size
    targets = torch.stack([pil_to_tensor(center_crop_resize(load_photo(n), size)) for n in args.photos]).to(args.device)
    start = time.perf_counter()
    result = fit_batch(targets, config, device=args.device)
    print(f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}; "
          f"config {args.config or 'default'} {args.set}; {len(args.photos)} photos in {time.perf_counter() - start:.1f} s")
    backend = renderer.resolve_backend(config.backend, torch.device(args.device))
    strokes, background = result.strokes.to(args.device), result.background.to(args.device)
    coverage = stroke_coverage(strokes, background, size, backend)
    idle = coverage < 4.0
    pruned = torch.where(idle[..., None], null_strokes(*strokes.shape[:2], strokes.device), strokes)
    base = background[:, :, None, None].expand(-1, -1, size, size).contiguous()
    pruned_psnr = psnr(renderer.composite(pruned, base, backend), targets).cpu()
    history = result.group_psnr
    print(f"{'photo':>16s} {'PSNR':>6s} {'groups':>6s} {'last g':>6s} {'<1px':>5s} {'<4px':>5s} {'<16px':>5s}"
          f" {'a<.05':>5s} {'median':>7s} {'-<4px dB':>8s}")
    for i, name in enumerate(args.photos):
        cov = coverage[i].cpu()
        print(f"{name:>16s} {float(result.psnr[i]):6.2f} {float(history[i, -1]):6.2f}"
              f" {float(history[i, -1] - history[i, -2]):+6.2f} {int((cov < 1).sum()):5d} {int((cov < 4).sum()):5d}"
              f" {int((cov < 16).sum()):5d} {int((strokes[i, :, ALPHA] < 0.05).sum()):5d} {float(cov.median()):7.1f}"
              f" {float(pruned_psnr[i] - result.psnr[i]):+8.3f}")


if __name__ == "__main__":
    main()
