"""Command line for single images and for looking at a run: ``python -m pipeline fit | render | bench | gallery``.

    python -m pipeline fit IMAGE... --strokes N --size S --device cpu|cuda -o OUT.parquet --preview DIR
    python -m pipeline render STROKES.pt|OUT.parquet [--key KEY] --size S -o OUT.png [--target IMAGE]
    python -m pipeline bench [--batch B] [--size S]
    python -m pipeline gallery OUT -o report.html [--shards SPEC ...] [--worst N] [--best N] [--timelapse-key KEY]

It lives in the pipeline (not the encoder) because ``fit -o`` writes the same
Parquet format as ``run_encode.py``, through the same writer, and ``render``
reads rows through the same loader. Errors the user can fix (a missing file, a
malformed stroke file, a bad option) print one ``error: ...`` line and exit
with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import encoder
from encoder import FitConfig, ImageError, StrokeError, load_image, psnr, render, resolve_device, tensor_to_pil

from .dataset import read_row
from .redact import redact
from .writer import ParquetRowWriter, encoder_metadata


class UsageError(Exception):
    """A problem the user can fix; printed as one line."""


def _config(args) -> FitConfig:
    try:
        return encoder.load_config(args.config, strokes=args.strokes, size=args.size, device=args.device, seed=args.seed,
                           **encoder.parse_overrides(args.set))
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


# --- fit -------------------------------------------------------------------------------------------

def _write_parquet(path: Path, rows: list[dict], config: FitConfig) -> None:
    writer = ParquetRowWriter(path, config.strokes, encoder_metadata(config))
    try:
        writer.add(rows)
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def _use_cpu_threads(threads: int | None) -> None:
    # The CPU fit is many small tensor ops: intra-op threads mostly contend with each other (and with
    # the decode and progress threads), so one thread is the fast default unless the user asks.
    if threads is not None:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def _timelapse(path: Path, strokes: torch.Tensor, background: torch.Tensor, size: int, step: int, device) -> None:
    """A GIF of the painting growing ``step`` strokes at a time."""
    frames = []
    for k in list(range(0, strokes.shape[0], step)) + [strokes.shape[0]]:
        canvas = render(strokes[None, :k], background[None], size, size, device=device)
        frames.append(tensor_to_pil(canvas[0]))
    frames[0].save(path, save_all=True, append_images=frames[1:] + [frames[-1]] * 5, duration=120, loop=0)


def cmd_fit(args) -> int:
    from tqdm import tqdm

    config = _config(args)
    device = resolve_device(config.device)
    if device.type == "cpu":
        _use_cpu_threads(args.threads)
    if args.preview:
        args.preview.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    good: list[tuple[str, torch.Tensor]] = []
    for image in args.images:
        try:
            good.append((image, load_image(image, config.size)))
        except ImageError as exc:
            print(json.dumps({"image": image, "status": "decode_error", "error": str(exc)}), flush=True)
            rows.append({"key": image, "status": "decode_error", "error_message": str(exc)})
    failed = len(rows)
    batch = args.batch_size or (32 if device.type == "cuda" else 1)
    for start in range(0, len(good), batch):
        chunk = good[start:start + batch]
        targets = torch.stack([t for _, t in chunk])
        bar = tqdm(total=config.groups, desc=f"images {start + 1}-{start + len(chunk)} of {len(good)}", unit="group",
                   file=sys.stderr, disable=args.quiet, leave=False)

        def on_group(done: int, total: int, group_psnr: torch.Tensor) -> None:
            bar.update(1)
            bar.set_postfix(psnr=f"{group_psnr.mean().item():.2f}")

        result = encoder.fit_batch(targets, config, device=device, on_group=on_group)
        bar.close()
        for i, (image, target) in enumerate(chunk):
            ok = bool(result.ok[i])
            row = {"image": image, "status": "ok" if ok else "fit_failed", "psnr": round(float(result.psnr[i]), 3),
                   "seconds": round(result.seconds / len(chunk), 3), "batch_seconds": round(result.seconds, 3),
                   "strokes": config.strokes, "size": config.size}
            if not ok:
                row["error"] = "fit produced non-finite values"
                failed += 1
            print(json.dumps(row), flush=True)
            if ok and args.preview:
                stem = Path(image).stem
                painting = render(result.strokes[i][None], result.background[i][None], config.size, config.size,
                                           device=device)
                tensor_to_pil(painting[0]).save(args.preview / f"{stem}.png")
                if args.timelapse:
                    _timelapse(args.preview / f"{stem}.gif", result.strokes[i], result.background[i], config.size,
                               config.group_size, device)
            rows.append({"key": image, "status": row["status"], "error_message": row.get("error"),
                         "strokes": result.strokes[i].numpy() if ok else None,
                         "background": result.background[i].numpy() if ok else None,
                         "psnr": row["psnr"], "fit_seconds": row["seconds"]})
    if args.output:
        _write_parquet(args.output, rows, config)
    return 1 if failed else 0


# --- render ----------------------------------------------------------------------------------------

def _read_parquet_row(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        row = read_row(path, key)
    except KeyError:
        raise StrokeError(f"{path}: no row with key {key!r}") from None
    except (OSError, ValueError) as exc:  # pyarrow's errors for a corrupt or foreign file derive from these
        raise StrokeError(f"{path}: not a PainterBot output file ({exc})") from None
    if row["strokes"] is None:
        raise StrokeError(f"{path}: row {key!r} has no strokes (status {row['status']})")
    encoder.validate_strokes(row["strokes"])
    return row["strokes"], row["background"]


def cmd_render(args) -> int:
    path = args.strokes
    if path.suffix == ".parquet":
        if args.key is None:
            raise UsageError("rendering a Parquet file needs --key KEY")
        strokes, background = _read_parquet_row(path, args.key)
        aspect = 1.0
    else:
        strokes, aspect = encoder.load_seed_checkpoint(path)
        background = torch.zeros(3)
    height = args.size
    width = max(1, round(args.size * aspect))
    canvas = render(strokes[None], background[None], height, width, device=args.device)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tensor_to_pil(canvas[0]).save(args.output)
    info = {"output": str(args.output), "strokes": strokes.shape[0], "height": height, "width": width}
    if args.target:
        try:
            target = load_image(args.target, height)
        except ImageError as exc:
            raise UsageError(str(exc)) from None
        if target.shape[-1] != width:
            raise UsageError("--target needs a square painting (aspect 1)")
        info["psnr"] = round(float(psnr(canvas, target[None])[0]), 3)
    print(json.dumps(info))
    return 0


# --- bench -----------------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    """Time one optimisation step of a 50-stroke group on this machine."""
    device = resolve_device(args.device)
    backend = encoder.resolve_backend("auto", device)
    gen = torch.Generator().manual_seed(0)
    strokes = encoder.random_strokes(args.batch, 50, generator=gen).to(device)
    base = torch.rand(args.batch, 3, args.size, args.size, generator=gen).to(device)
    target = torch.rand(args.batch, 3, args.size, args.size, generator=gen).to(device)
    for _ in range(2):
        encoder.loss_and_grad(strokes, base, target, "l2", backend)
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps = 20 if device.type == "cuda" else 2
    start = time.perf_counter()
    for _ in range(reps):
        encoder.loss_and_grad(strokes, base, target, "l2", backend)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / reps * 1000
    print(json.dumps({"device": str(device), "backend": backend, "batch": args.batch, "size": args.size,
                      "ms_per_step": round(ms, 3), "ms_per_image": round(ms / args.batch, 4)}))
    return 0


# --- gallery ---------------------------------------------------------------------------------------

def cmd_gallery(args) -> int:
    from .gallery import write_report

    from . import storage

    try:
        is_folder = storage.location(args.out).is_dir()
    except (OSError, ValueError) as exc:
        raise UsageError(f"{redact(args.out)} cannot be read ({redact(exc)})") from None
    if not is_folder:
        raise UsageError(f"{redact(args.out)} is not an output folder")
    shards = None
    if args.shards:
        from .shards import expand_specs

        shards = expand_specs(args.shards)
    path, listed = write_report(args.out, args.output, worst=args.worst, best=args.best, thumb=args.thumb,
                                timelapse_key=args.timelapse_key, shards=shards)  # fmt: skip
    print(json.dumps({"report": str(path), "images_listed": sum(len(v) for v in listed.values())}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline", description="PainterBot encoder: images <-> strokes")
    sub = ap.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit strokes to images")
    fit.add_argument("images", nargs="+", help="image files")
    fit.add_argument("--config", help=f"preset name ({', '.join(encoder.preset_names())}) or YAML path (default: default)")
    fit.add_argument("--strokes", type=int)
    fit.add_argument("--size", type=int)
    fit.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    fit.add_argument("--seed", type=int)
    fit.add_argument("--batch-size", type=int, help="images fitted together (default 32 on CUDA, 1 on CPU)")
    fit.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="any other config value")
    fit.add_argument("-o", "--output", type=Path, help="Parquet file for the strokes")
    fit.add_argument("--preview", type=Path, help="folder for a PNG of each painting")
    fit.add_argument("--timelapse", action="store_true", help="also write a GIF of each painting growing (needs --preview)")
    fit.add_argument("--threads", type=int, help="CPU threads for the fit (default 1: the CPU fit is fastest on one)")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(func=cmd_fit)

    render = sub.add_parser("render", help="render strokes to a PNG")
    render.add_argument("strokes", type=Path, help="a seed checkpoint (.pt) or an output Parquet file")
    render.add_argument("--key", help="row key, for a Parquet file")
    render.add_argument("--size", type=int, default=512, help="height in pixels")
    render.add_argument("-o", "--output", type=Path, required=True)
    render.add_argument("--target", type=Path, help="image to report the painting's PSNR against")
    render.add_argument("--device", default="auto")
    render.set_defaults(func=cmd_render)

    bench = sub.add_parser("bench", help="time one optimisation step on this machine")
    bench.add_argument("--batch", type=int, default=8)
    bench.add_argument("--size", type=int, default=512)
    bench.add_argument("--device", default="auto")
    bench.set_defaults(func=cmd_bench)

    gallery = sub.add_parser("gallery", help="one self-contained HTML report of an output folder")
    gallery.add_argument("out", help="the output folder of run_encode.py: a path or an object-store URI (s3://...)")
    gallery.add_argument("-o", "--output", type=Path, default=Path("report.html"))
    gallery.add_argument("--worst", type=int, default=12, help="rows listed with the lowest PSNR")
    gallery.add_argument("--best", type=int, default=12, help="rows listed with the highest PSNR")
    gallery.add_argument("--thumb", type=int, default=160, help="thumbnail size in pixels")
    gallery.add_argument("--timelapse-key", help="the image shown stroke by stroke (default: the median PSNR)")
    gallery.add_argument("--shards", nargs="+", metavar="SPEC",
                         help="the source shards to show the photos from, as run_encode.py --shards takes them "
                              "(matched to rows by key); without it the report shows the paintings alone")
    gallery.set_defaults(func=cmd_gallery)

    args = ap.parse_args(argv)
    if getattr(args, "timelapse", False) and not args.preview:
        ap.error("--timelapse needs --preview DIR")
    try:
        return args.func(args)
    except (UsageError, StrokeError, RuntimeError) as exc:
        print(f"error: {redact(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
