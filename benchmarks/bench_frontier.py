"""Quality against speed of several fit configs, measured in one run: the data behind the frontier plot.

    python benchmarks/bench_frontier.py --variants benchmarks/frontier.json --reps 3 --out frontier_data.json

Each variant is {name, config (a preset path, or null for the default), overrides,
batch (images per fit_batch call, default --batch), reps (default --reps), kind
(free text: "today", "preset", "sweep: ...")}. For each one:

- throughput: the 11 benchmark photos repeated to fill ``batch``, fitted ``--reps``
  times after one untimed fit that compiles the kernels and captures the CUDA
  graphs (as a pipeline worker's first batch does); images/s counts every stage
  of ``fit_batch`` (placement, groups, commits, refinement) up to the copy of the
  results to the CPU.
- PSNR of each benchmark photo (from the first timed batch), and of the tuning
  and held-out photos (``photos.py``), fitted together in one more batch of the
  same size (untimed: their timing is not the benchmark's). Each photo's first
  copy in the batch gives ``benchmark``/``tuning``/``held_out``; the mean over
  all its copies (``*_copies``, each copy its own random stream) is steadier, and
  the per-photo worst difference from the first variant ("worst d") uses it.

Prints one line per variant and writes everything to ``--out`` as JSON
(``plot_frontier.py`` draws it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder import fit_batch, load_config, render  # noqa: E402
from encoder.images import psnr  # noqa: E402
from encoder.images import center_crop_resize, pil_to_tensor  # noqa: E402
from photos import BENCHMARK_PHOTOS, HELD_OUT_PHOTOS, TUNING_PHOTOS, load_photo  # noqa: E402


def fill(targets: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat the images to exactly ``batch`` (or keep all of them if there are more)."""
    reps = -(-batch // targets.shape[0])
    return targets.repeat(reps, 1, 1, 1)[: max(batch, targets.shape[0])]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(variant: dict, photos: dict[str, torch.Tensor], default_batch: int, reps: int, base: dict,
            device: str) -> dict:
    config = load_config(variant.get("config"), **{**base, **variant.get("overrides", {})})
    batch = int(variant.get("batch", default_batch))
    reps = int(variant.get("reps", reps))
    bench = fill(photos["benchmark"], batch)
    fit_batch(bench, config, device=device)  # compiles and captures, untimed
    sync(device)
    start = time.perf_counter()
    first = None
    for _ in range(reps):
        result = fit_batch(bench, config, device=device)
        first = result if first is None else first
    seconds = time.perf_counter() - start
    row = dict(name=variant["name"], kind=variant.get("kind", ""), config=variant.get("config"),
               overrides=variant.get("overrides", {}), batch=batch, reps=reps,
               images_per_s=reps * bench.shape[0] / seconds, seconds_per_image=seconds / (reps * bench.shape[0]))
    n_bench = photos["benchmark"].shape[0]
    row["benchmark"] = {n: float(p) for n, p in zip(BENCHMARK_PHOTOS, first.psnr[:n_bench])}
    # Each photo fills about batch / 11 slots, each fitted from its own random stream: their mean
    # is the photo's expected PSNR, with about a third of one fit's spread (0.1 dB).
    row["benchmark_copies"] = copies_mean(first.psnr, BENCHMARK_PHOTOS)
    row["refined_share"] = float(first.refined[:n_bench].float().mean()) if first.refined is not None else 0.0
    row["before_refine"] = {n: float(p) for n, p in zip(BENCHMARK_PHOTOS, first.group_psnr[:n_bench, -1])}
    row["prefix_psnr"] = prefix_psnr(first, photos["benchmark"], device)
    extra_names = TUNING_PHOTOS + HELD_OUT_PHOTOS
    extra = fit_batch(fill(photos["extra"], batch), config, device=device)
    extra_psnr = {n: float(p) for n, p in zip(extra_names, extra.psnr[: len(extra_names)])}
    row["tuning"] = {n: extra_psnr[n] for n in TUNING_PHOTOS}
    row["held_out"] = {n: extra_psnr[n] for n in HELD_OUT_PHOTOS}
    extra_copies = copies_mean(extra.psnr, extra_names)
    row["tuning_copies"] = {n: extra_copies[n] for n in TUNING_PHOTOS}
    row["held_out_copies"] = {n: extra_copies[n] for n in HELD_OUT_PHOTOS}
    for key in ("benchmark", "tuning", "held_out", "benchmark_copies", "tuning_copies", "held_out_copies"):
        row[f"mean_{key}"] = sum(row[key].values()) / len(row[key])
    return row


def copies_mean(psnr: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Per photo, the mean PSNR over its copies in a batch made by ``fill`` (photo i sits at i, i + len(names), ...)."""
    psnr = psnr.detach().float().cpu()
    return {n: float(psnr[i :: len(names)].mean()) for i, n in enumerate(names)}


PREFIXES = (100, 250, 500)


def prefix_psnr(result, targets: torch.Tensor, device: str) -> dict:
    """Mean PSNR over ``targets`` of the first 100, 250, 500 strokes of each stored painting, and of all of
    them, rendered at the targets' size with the exact renderer: text-to-strokes models generate in
    stored order, so a fit that stops putting the coarse strokes first shows here."""
    n_img, _, size, _ = targets.shape
    strokes, background = result.strokes[:n_img], result.background[:n_img]
    out = {}
    for k in (*PREFIXES, strokes.shape[1]):
        canvas = render(strokes[:, :k], background, size, size, device=device)
        out[str(k)] = float(psnr(canvas, targets.cpu()).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=1, help="timed batches per variant")
    ap.add_argument("--only", nargs="*", help="run only the variants with these names")
    ap.add_argument("--set", nargs="*", default=[], help="overrides for every variant, key=value (YAML values)")
    ap.add_argument("--device", default="cuda", help="cpu: a quick dry run of the script itself, with tiny --set sizes")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    base = {k: yaml.safe_load(v) for k, v in (item.partition("=")[::2] for item in args.set)}

    variants = json.loads(args.variants.read_text())
    if args.only:
        variants = [v for v in variants if v["name"] in args.only]
    size = load_config(None, **base).size
    load = lambda names: torch.stack([pil_to_tensor(center_crop_resize(load_photo(n), size))  # noqa: E731
                                      for n in names]).to(args.device)
    photos = {"benchmark": load(BENCHMARK_PHOTOS), "extra": load(TUNING_PHOTOS + HELD_OUT_PHOTOS)}
    meta = dict(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device, torch=torch.__version__, command=" ".join(sys.argv),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                benchmark_photos=BENCHMARK_PHOTOS, tuning_photos=TUNING_PHOTOS, held_out_photos=HELD_OUT_PHOTOS)
    print(f"device: {meta['device']}  torch {meta['torch']}", flush=True)
    print(f"{'variant':>28s} {'B':>4s} {'img/s':>7s} {'bench':>6s} {'copies':>6s} {'lisa':>6s} {'astro':>6s} {'tune':>6s}"
          f" {'held':>6s} {'worst d':>7s}  {'first 100/250/500/all strokes':>29s}", flush=True)
    rows = []
    for variant in variants:
        row = measure(variant, photos, args.batch, args.reps, base, args.device)
        rows.append(row)
        # vs the first variant, per photo (mean of its copies), over the benchmark, tuning and held-out photos
        worst = min(row[key][n] - rows[0][key][n]
                    for key in ("benchmark_copies", "tuning_copies", "held_out_copies") for n in row[key])
        print(f"{row['name']:>28s} {row['batch']:4d} {row['images_per_s']:7.2f} {row['mean_benchmark']:6.2f}"
              f" {row['mean_benchmark_copies']:6.2f}"
              f" {row['benchmark']['lisa']:6.2f} {row['benchmark']['astronaut']:6.2f} {row['mean_tuning']:6.2f}"
              f" {row['mean_held_out']:6.2f} {worst:+7.2f}  " + "/".join(f"{v:.2f}" for v in row["prefix_psnr"].values()),
              flush=True)
        if args.out:  # after every variant: a run cut off by its time limit keeps what it measured
            args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
