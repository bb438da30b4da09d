"""Pipeline throughput against the encoder's own: is the GPU ever waiting on the pipeline?

Runs the same images, with the same config, four ways and prints a table:

    reader only        decoding + resize on the worker's reader threads (no fit)
    encoder only       fit_batch on pre-decoded batches: the ceiling
    worker, no Ray     ShardEncoder.encode_shard in this process (decode + fit + write overlapped),
                       pipeline.shards_per_worker shards at a time (--shards-per-worker 1 2: both)
    worker, Ray        the same worker as a Ray actor (one GPU, or one CPU worker), via the driver

The worker rows should be within a few percent of "encoder only"; a larger gap
means decoding or writing is not hidden behind the fit.

    python benchmarks/bench_pipeline.py                          # GPU if present, default preset
    python benchmarks/bench_pipeline.py --images 512 --batch-size 32 --json bench.json
    python benchmarks/bench_pipeline.py --device cpu --config cpu_small --strokes 50 --size 64 --images 16
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import tempfile
import time
from datetime import datetime
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from webdataset import TarWriter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import encoder  # noqa: E402
from pipeline.config import CPU_PRESET, DEFAULT_PRESET, load_pipeline_config  # noqa: E402
from pipeline.demo import PHOTOS, photo  # noqa: E402
from pipeline.reader import ShardReader  # noqa: E402
from pipeline.output_folder import OutputFolder  # noqa: E402
from pipeline.shards import make_shards  # noqa: E402
from pipeline.worker import ShardEncoder  # noqa: E402


def build_shards(folder: Path, images: int, per_shard: int, seed: int = 0) -> list[str]:
    """img2dataset-like shards of ~640 px JPEGs (LAION's typical size): random crops of bundled photos."""
    rng = np.random.default_rng(seed)
    sources = [np.asarray(Image.fromarray(photo(name)).convert("RGB")) for name, _ in PHOTOS]
    folder.mkdir(parents=True, exist_ok=True)
    paths, i = [], 0
    for s in range(-(-images // per_shard)):
        path = folder / f"{s:05d}.tar"
        with TarWriter(str(path)) as sink:
            for j in range(min(per_shard, images - i)):
                src = sources[i % len(sources)]
                h, w = src.shape[:2]
                ch, cw = int(h * rng.uniform(0.6, 1)), int(w * rng.uniform(0.6, 1))
                y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                crop = Image.fromarray(src[y : y + ch, x : x + cw])
                scale = 640 / max(crop.size)
                crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))))
                buffer = io.BytesIO()
                crop.save(buffer, format="JPEG", quality=90)
                key = f"{s:05d}{j:04d}"
                sink.write({"__key__": key, "jpg": buffer.getvalue(), "txt": f"crop {i}",
                            "json": json.dumps({"url": f"bench://{i}"})})  # fmt: skip
                i += 1
        paths.append(str(path))
    return paths


def bench_reader(urls, size, cfg) -> tuple[int, float, None]:
    start, count = time.perf_counter(), 0
    for url in urls:
        reader = ShardReader(url, size, cfg.max_image_pixels, cfg.min_image_side, cfg.jpeg_draft, cfg.reader_threads)
        count += sum(1 for r in reader.records() if r.status == "ok")
    return count, time.perf_counter() - start, None


def bench_encoder(urls, fit, cfg, device) -> tuple[int, float, float]:
    targets = []
    for url in urls:
        reader = ShardReader(url, fit.size, cfg.max_image_pixels, cfg.min_image_side, cfg.jpeg_draft, cfg.reader_threads)
        targets += [r.target for r in reader.records() if r.status == "ok"]
    batches = [torch.stack(targets[i : i + cfg.batch_size]) for i in range(0, len(targets), cfg.batch_size)]
    encoder.fit_batch(batches[0], fit, device=device, seed=0)  # warm-up: compilation, autotuning
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for k, batch in enumerate(batches):
        encoder.fit_batch(batch, fit, device=device, seed=k)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return len(targets), seconds, seconds


def steady(stats: list[dict]) -> tuple[int, float, float]:
    """(images, seconds, seconds inside fit_batch) of the steady shards among ``stats`` (their stats files).

    The first shard to finish carried the worker's warm-up (compilation); the others are timed from its
    end to the last one's end (the driver's hand-outs between them included). With two shards held, the
    next one's fit starts while the first one commits (its writer's last rows): that overlap is what
    holding two buys, and the span does not count it. One shard alone: its own start to end."""
    stats = sorted(stats, key=lambda s: s["finished_at"])
    rest = stats[1:] or stats
    begin = datetime.fromisoformat(stats[0]["finished_at" if len(stats) > 1 else "started_at"])
    seconds = (datetime.fromisoformat(stats[-1]["finished_at"]) - begin).total_seconds()
    return sum(s["total"] for s in rest), seconds, sum(s["fit_seconds"] for s in rest)


def bench_worker(urls, fit, cfg, device, out: Path) -> tuple[int, float, float]:
    """``steady`` of every shard given to one worker in this process, ``cfg.shards_per_worker`` at a time
    as the driver hands them out (their fits take turns on the device)."""
    worker = ShardEncoder(fit, cfg, device=device, worker_id="bench")
    with ThreadPoolExecutor(cfg.shards_per_worker) as pool:
        stats = list(pool.map(lambda s: worker.encode_shard(s.url, s.id, str(out / "no_ray")), make_shards(urls)))
    return steady(stats)


def bench_ray(urls, args, device, out: Path, spw: int) -> tuple[int, float, float, float]:
    """``steady`` of the shards of a Ray run (one actor), and the wall seconds including Ray's start-up."""
    from pipeline.driver import RunOptions, run

    options = RunOptions(
        shards=urls, output=str(out / "ray"), config=args.config,
        encoder_overrides={"strokes": args.strokes, "size": args.size},
        pipeline_overrides={"batch_size": args.batch_size, "reader_threads": args.reader_threads,
                            "include_dashboard": False, "workers": 1, "shards_per_worker": spw},
        device=device, gpus=1 if device.startswith("cuda") else 0, progress=False, overwrite=True,
    )  # fmt: skip
    start = time.perf_counter()
    code = run(options)
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError("the Ray run failed")
    stats = [json.loads(p.read_text()) for p in sorted(OutputFolder(out / "ray").stats_files())]
    return (*steady(stats), wall)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config")
    p.add_argument("--strokes", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--reader-threads", type=int)
    p.add_argument("--device", help="cuda | cpu (default: cuda when present)")
    p.add_argument("--images", type=int, default=128, help="images per measurement")
    p.add_argument("--per-shard", type=int, default=32)
    p.add_argument("--shards", nargs="+", help="use these shards instead of generated ones")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray row")
    p.add_argument("--shards-per-worker", type=int, nargs="+",
                   help="worker rows for each of these pipeline.shards_per_worker values (default: the config's)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.config = args.config or (DEFAULT_PRESET if device.startswith("cuda") else CPU_PRESET)
    fit = encoder.load_config(args.config, strokes=args.strokes, size=args.size, device=device)
    cfg = load_pipeline_config(args.config, batch_size=args.batch_size, reader_threads=args.reader_threads)
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    print(f"{gpu}: {fit.strokes} strokes at {fit.size} px, batch {cfg.batch_size}, {cfg.reader_threads} reader threads")

    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        tmp = Path(tmp)
        urls = args.shards or build_shards(tmp / "shards", args.images + args.per_shard, args.per_shard)
        # The first shard is the warm-up of each row that needs one; the rest is measured.
        measured = urls[1:] if len(urls) > 1 else urls
        rows = []
        rows.append(("reader only (decode + resize)", *bench_reader(measured, fit.size, cfg), None))
        rows.append(("encoder only (fit_batch)", *bench_encoder(measured, fit, cfg, device), None))
        ceiling = rows[-1][1] / rows[-1][2]
        for spw in args.shards_per_worker or [cfg.shards_per_worker]:
            held = dataclasses.replace(cfg, shards_per_worker=spw)
            rows.append((f"worker, no Ray, {spw} shard(s) held", *bench_worker(urls, fit, held, device, tmp / f"out{spw}"),
                         None))
            if not args.no_ray:
                rows.append((f"worker, Ray actor, {spw} shard(s) held", *bench_ray(urls, args, device, tmp / f"out{spw}", spw)))

    # "in fit_batch": the share of the time the worker spent inside fit_batch; the
    # rest is the GPU waiting (between batches, at shard starts and ends).
    print(f"\n{'mode':42s} {'images':>7s} {'seconds':>9s} {'images/s':>9s} {'vs encoder':>10s} {'in fit_batch':>12s}")
    results = []
    for name, n, s, fitting, wall in rows:
        rate = n / s if s > 0 else float("nan")
        share = f"{fitting / s:11.1%}" if fitting is not None and s > 0 else f"{'':11s}"
        print(f"{name:42s} {n:7d} {s:9.2f} {rate:9.2f} {rate / ceiling:9.2f}x {share}")
        results.append({"mode": name, "images": n, "seconds": s, "images_per_second": rate, "vs_encoder": rate / ceiling,
                        "fit_seconds": fitting, "wall_with_ray_startup": wall})  # fmt: skip
    if rows[-1][4] is not None:
        print(f"(the Ray run took {rows[-1][4]:.1f} s wall in all, with Ray start-up and the actor's warm-up shard)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": gpu, "strokes": fit.strokes, "size": fit.size,
                                               "batch_size": cfg.batch_size, "results": results}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
