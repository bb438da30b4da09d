"""Rows/s of the streaming loader against pyarrow reading the same files directly, on the CPU.

    python benchmarks/bench_loader.py [--files 8 --rows 512 --strokes 1000] [--json out.json]

Generates output files with the pipeline's writer (random strokes, every row ok), then times:
- pyarrow, sequential: ``ParquetFile.iter_batches`` over the strokes column of every file, each
  batch turned into numpy (the floor: decode and nothing else);
- StrokeStream, sequential (shuffle=False) and shuffled (row-group order and a 1024-row buffer),
  key + strokes + background per row, as a training loop gets them;
- StrokeDataset (map-style) in a shuffled index order, for comparison with the old loader.
Each timing is the best of ``--repeat`` passes (the files are in the page cache after the first).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.dataset import StrokeDataset  # noqa: E402
from pipeline.stream import StrokeStream  # noqa: E402
from pipeline.writer import ParquetRowWriter  # noqa: E402


def generate(folder: Path, files: int, rows: int, strokes: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for f in range(files):
        writer = ParquetRowWriter(folder / f"{f:05d}.parquet", strokes, row_group_size=256)
        for start in range(0, rows, 256):
            writer.add([{"key": f"{f}-{i}", "caption": f"caption {i}", "status": "ok", "psnr": 25.0,
                         "strokes": rng.random((strokes, 10), dtype=np.float32), "background": [0.5, 0.5, 0.5]}
                        for i in range(start, min(rows, start + 256))])  # fmt: skip
        paths.append(writer.commit())
    return paths


def best_rate(fn, repeat: int) -> float:
    rates = []
    for _ in range(repeat):
        start = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - start))
    return max(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--strokes", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--map-rows", type=int, default=512, help="rows timed for the map-style StrokeDataset (slow)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = generate(folder, args.files, args.rows, args.strokes)
        total = args.files * args.rows

        def pyarrow_sequential():
            n = 0
            for path in paths:
                for batch in pq.ParquetFile(path).iter_batches(columns=["strokes"]):
                    flat = batch.column(0).values.flatten().to_numpy()
                    n += len(flat.reshape(len(batch), -1, 10))
            return n

        def stream(shuffle):
            def go():
                data = StrokeStream(folder, columns=["key", "strokes", "background"], shuffle=shuffle)
                return sum(1 for _ in data)
            return go

        def map_style_shuffled():
            data = StrokeDataset(folder)
            order = np.random.default_rng(0).permutation(len(data))[: args.map_rows]
            for i in order:
                data[int(i)]
            return len(order)

        results = {
            "pyarrow_sequential": best_rate(pyarrow_sequential, args.repeat),
            "stream_sequential": best_rate(stream(False), args.repeat),
            "stream_shuffled": best_rate(stream(True), args.repeat),
            "map_style_shuffled": best_rate(map_style_shuffled, 1),
        }
    ratio = results["pyarrow_sequential"] / results["stream_shuffled"]
    print(f"{args.files} files x {args.rows} rows x {args.strokes} strokes ({total} rows), best of {args.repeat}")
    print(f"{'reader':<22}{'rows/s':>10}")
    for name, rate in results.items():
        print(f"{name:<22}{rate:>10.0f}")
    print(f"pyarrow sequential / stream shuffled = {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({
            "rows_per_second": results, "pyarrow_over_shuffled": ratio, "files": args.files, "rows": args.rows,
            "strokes": args.strokes, "machine": platform.platform(), "cpus": os.cpu_count(),
            "python": platform.python_version()}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
