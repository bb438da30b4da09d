"""What the stroke tokenizer's quantisation costs in PSNR, at one or more bin counts.

    python benchmarks/bench_tokenizer.py --fit 12 --out .bench/tok --device cuda --json tok.json    # fit, write, measure
    python benchmarks/bench_tokenizer.py OUT_FOLDER_OR_FILE --device cuda --json tok.json           # a run's output

Each ok painting is rendered at its fit size from its strokes as stored and again after a round
trip through ``StrokeTokenizer`` (strokes -> tokens -> strokes); the table gives the mean PSNR of
the quantised painting against the unquantised one, and the mean PSNR loss against the target
photo (PSNR(painting, photo) - PSNR(quantised painting, photo)).

``--fit N`` makes its own input: N photos bundled with scikit-image, fitted with
``encoder.fit_batch`` at the preset (``default``: 1000 strokes at 512) and written with the
pipeline's writer, so one command on a GPU does it all. With a run's output, the photos are read
back from each file's source shard when it is a local tar (with the standard library's tarfile,
decoded as the pipeline decodes them); otherwise only the loss against the painting is reported.
Needs torch, numpy, pillow and pyarrow (and scikit-image for --fit); no Ray, no webdataset.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import encoder  # noqa: E402
from pipeline.columns import encoder_size, file_metadata, open_file, parquet_files, read_rows  # noqa: E402
from pipeline.tokenizer import DEFAULT_BINS, FIELDS, StrokeTokenizer  # noqa: E402
from pipeline.writer import ParquetRowWriter, encoder_metadata  # noqa: E402

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def fit_photos(n: int, config, device: str, out: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Fit n bundled photos, write them as an output file; returns the file and key -> target."""
    from photos import SKIMAGE_PHOTOS, load_photo

    names = [SKIMAGE_PHOTOS[i % len(SKIMAGE_PHOTOS)] for i in range(n)]
    keys = [f"{name}-{i}" if i >= len(SKIMAGE_PHOTOS) else name for i, name in enumerate(names)]
    targets = torch.stack([encoder.pil_to_tensor(encoder.center_crop_resize(load_photo(name), config.size))
                           for name in names])  # fmt: skip
    batch = 32 if device.startswith("cuda") else 4
    writer = ParquetRowWriter(out / "bench_tokenizer.parquet", config.strokes, encoder_metadata(config))
    for start in range(0, n, batch):
        result = encoder.fit_batch(targets[start:start + batch], config, device=device)
        print(f"fitted {min(n, start + batch)}/{n} in {result.seconds:.1f} s, mean PSNR {result.psnr.mean():.2f} dB",
              flush=True)  # fmt: skip
        writer.add([{"key": keys[start + i], "status": "ok", "strokes": result.strokes[i].numpy(),
                     "background": result.background[i].numpy(), "psnr": float(result.psnr[i])}
                    for i in range(len(result.psnr))])  # fmt: skip
    return writer.commit(), dict(zip(keys, targets))


def shard_targets(source: str | None, keys: set[str], size: int) -> dict[str, torch.Tensor]:
    """key -> fit target, read from a local source tar; empty when the source is not a readable local tar."""
    path = Path(source[len("file:"):] if source and source.startswith("file:") else (source or ""))
    if not source or not path.is_file():
        return {}
    found = {}
    with tarfile.open(path) as tar:
        for member in tar:
            stem, dot, ext = member.name.rpartition(".")
            if member.isfile() and stem in keys and f".{ext.lower()}" in IMAGE_EXTS and stem not in found:
                image = ImageOps.exif_transpose(Image.open(io.BytesIO(tar.extractfile(member).read())))
                found[stem] = encoder.pil_to_tensor(encoder.center_crop_resize(image, size))
    return found


def parse_bins(spec: str) -> int | dict:
    """``"256"`` -> 256; ``"cx=1024,cy=1024,512"`` -> those fields at their counts, the rest at 512;
    ``"default"`` -> the tokenizer's own default bins."""
    if spec == "default":
        return StrokeTokenizer().bins_spec
    if spec.isdigit():
        return int(spec)
    rest, fields = DEFAULT_BINS, {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        if sep:
            fields[name] = int(value)
        else:
            rest = int(name)
    return {f: fields.get(f, rest) for f in FIELDS}


def per_field_specs(bins: int) -> list[str]:
    """One field at ``bins``, every other field so fine that it costs nothing: which field's bins matter."""
    return [f"{f}={bins},{1 << 20}" for f in FIELDS]


def measure(files: list[str], targets: dict[str, torch.Tensor], bins_list: list[str], device: str, limit: int,
            chunk: int = 16) -> list[dict]:  # fmt: skip
    tokenizers = {bins: StrokeTokenizer(bins=parse_bins(bins)) for bins in bins_list}
    sums = {bins: {"vs_painting": [], "loss_vs_photo": []} for bins in bins_list}
    seen = 0
    for path in files:
        handle = open_file(path)
        size = encoder_size(handle, 512)
        rows = [r for g in range(handle.num_row_groups) for r in read_rows(handle, g, ["key", "strokes", "background"])]
        rows = rows[: max(0, limit - seen)]
        seen += len(rows)
        known = targets or shard_targets(file_metadata(handle).get("source"), {r["key"] for r in rows}, size)
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            strokes, background = torch.stack([r["strokes"] for r in part]), torch.stack([r["background"] for r in part])
            painted = encoder.render(strokes, background, size, size, device=device)
            photo = [known.get(r["key"]) for r in part]
            for bins, tok in tokenizers.items():
                tokens, _ = tok.encode(strokes, background)
                decoded = tok.decode(tokens)
                q = encoder.render(torch.stack([s for s, _ in decoded]), torch.stack([b for _, b in decoded]), size,
                                   size, device=device)  # fmt: skip
                sums[bins]["vs_painting"] += encoder.psnr(q, painted).tolist()
                for i, target in enumerate(photo):
                    if target is not None:
                        before = encoder.psnr(painted[i:i + 1], target[None])
                        after = encoder.psnr(q[i:i + 1], target[None])
                        sums[bins]["loss_vs_photo"].append(float(before - after))
        if seen >= limit:
            break
    out = []
    for bins, tok in tokenizers.items():
        s = sums[bins]
        out.append({"bins": bins, "vocab_size": tok.vocab_size, "tokens_per_1000_strokes": int(tok.sequence_length(1000)),
                    "paintings": len(s["vs_painting"]), "with_photo": len(s["loss_vs_photo"]),
                    "psnr_vs_painting_db": float(np.mean(s["vs_painting"])) if s["vs_painting"] else None,
                    "psnr_loss_vs_photo_db": float(np.mean(s["loss_vs_photo"])) if s["loss_vs_photo"] else None,
                    "worst_loss_vs_photo_db": float(np.max(s["loss_vs_photo"])) if s["loss_vs_photo"] else None})  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", help="output folder, glob or Parquet file (omit with --fit)")
    ap.add_argument("--fit", type=int, metavar="N", help="fit N bundled photos first and measure those")
    ap.add_argument("--out", type=Path, default=Path(".bench/tokenizer"), help="where --fit writes its Parquet file")
    ap.add_argument("--config", default="default", help="preset for --fit (default: 1000 strokes at 512)")
    ap.add_argument("--bins", nargs="+", default=["default", "128", "256", "512"],
                    help="bin specs to measure: N, default (the tokenizer's), or field=N,...,N_rest")
    ap.add_argument("--per-field", type=int, metavar="N", help="also measure each field alone at N bins")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--limit", type=int, default=256, help="paintings measured at most")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if (args.source is None) == (args.fit is None):
        ap.error("give an output folder or file, or --fit N")
    device = str(encoder.resolve_device(args.device))
    started = time.time()
    targets: dict[str, torch.Tensor] = {}
    if args.fit:
        config = encoder.load_config(args.config, device=device)
        path, targets = fit_photos(args.fit, config, device, args.out)
        files = [str(path)]
    else:
        files = parquet_files(args.source)
    specs = args.bins + (per_field_specs(args.per_field) if args.per_field else [])
    results = measure(files, targets, specs, device, args.limit)
    print(f"{'bins':>22} {'vocab':>8} {'tokens/1000':>11} {'n':>4} {'PSNR vs painting':>17} {'loss vs photo':>14} "
          f"{'worst':>7}")  # fmt: skip
    for r in results:
        loss = "-" if r["psnr_loss_vs_photo_db"] is None else f"{r['psnr_loss_vs_photo_db']:.3f} dB"
        worst = "-" if r["worst_loss_vs_photo_db"] is None else f"{r['worst_loss_vs_photo_db']:.3f}"
        print(f"{r['bins']:>22} {r['vocab_size']:>8} {r['tokens_per_1000_strokes']:>11} {r['paintings']:>4} "
              f"{r['psnr_vs_painting_db']:>14.2f} dB {loss:>14} {worst:>7}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "files": files, "device": device,
                                         "seconds": round(time.time() - started, 1)}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
