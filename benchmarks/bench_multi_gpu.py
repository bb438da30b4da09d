"""run_encode.py on 1 GPU and on all GPUs of one machine, same shards, same run.

    python benchmarks/bench_multi_gpu.py --shards-per-gpu 12 --per-shard 64 [--out DIR]

Builds img2dataset-like shards from bundled photos, runs
``run_encode.py --gpus 1`` over shards-per-gpu shards, then ``--gpus N`` over
N x shards-per-gpu shards (the same work per GPU, so Ray start-up weighs the
same in both), samples every GPU's utilisation with nvidia-smi once a second,
checks every output for exactly-once rows and prints the scaling.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import build_shards  # noqa: E402


class GpuSampler(threading.Thread):
    """nvidia-smi utilisation samples, tagged with the phase running at the time."""

    def __init__(self):
        super().__init__(daemon=True)
        self.phase = None
        self.samples: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            if self.phase:
                for line in out.strip().splitlines():
                    idx, util = (int(x) for x in line.split(","))
                    self.samples[self.phase][idx].append(util)
            time.sleep(1.0)


def check_exactly_once(out: Path, shards: list[str], per_shard: int) -> str:
    problems = []
    for shard in shards:
        sid = Path(shard).stem
        if not (out / f"{sid}_stats.json").is_file():
            problems.append(f"{sid}: no stats file")
            continue
        keys = pq.read_table(out / f"{sid}.parquet", columns=["key"])["key"].to_pylist()
        if len(keys) != per_shard or len(set(keys)) != per_shard:
            problems.append(f"{sid}: {len(keys)} rows, {len(set(keys))} distinct, expected {per_shard}")
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    if leftovers:
        problems.append(f"temporary files left: {leftovers}")
    return "exactly once, all shards complete" if not problems else "; ".join(problems)


def run_encode(shards: list[str], gpus: int, out: Path, batch: int, sampler: GpuSampler, phase: str) -> dict:
    cmd = [sys.executable, str(ROOT / "run_encode.py"), "--shards", *shards, "--gpus", str(gpus), "--output", str(out),
           "--batch-size", str(batch), "--no-dashboard", "--no-progress"]
    sampler.phase = phase
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    sampler.phase = None
    print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"run_encode.py --gpus {gpus} exited with {proc.returncode}")
    summary = json.loads((out / "__painterbot__" / "summary.json").read_text())
    summary["wall_seconds"] = wall
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards-per-gpu", type=int, default=12)
    ap.add_argument("--per-shard", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("/tmp/painterbot_multi_gpu"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    n_gpus = torch.cuda.device_count()
    if n_gpus < 2:
        raise SystemExit(f"needs a machine with several GPUs, found {n_gpus}")
    shards = build_shards(args.work / "shards", n_gpus * args.shards_per_gpu * args.per_shard, args.per_shard)
    sampler = GpuSampler()
    sampler.start()
    one = run_encode(shards[: args.shards_per_gpu], 1, args.work / "out1", args.batch_size, sampler, "1 GPU")
    many = run_encode(shards, n_gpus, args.work / f"out{n_gpus}", args.batch_size, sampler, f"{n_gpus} GPUs")
    sampler.stop.set()
    rows = []
    for label, summary, used in (("1 GPU", one, shards[: args.shards_per_gpu]), (f"{n_gpus} GPUs", many, shards)):
        util = {gpu: sum(v) / len(v) for gpu, v in sorted(sampler.samples[label].items())}
        rows.append(dict(run=label, images=summary["images"], ok=summary["ok"], seconds=summary["seconds"],
                         images_per_s=summary["images_per_second"], wall_seconds=summary["wall_seconds"],
                         gpu_util_mean=util, check=check_exactly_once(Path(summary["output"]), used, args.per_shard)))
    scaling = rows[1]["images_per_s"] / (n_gpus * rows[0]["images_per_s"])
    print(f"\n{torch.cuda.get_device_name()} x {n_gpus}, batch {args.batch_size}, {args.per_shard} images per shard")
    for r in rows:
        util = "  ".join(f"GPU{g} {u:.0f}%" for g, u in r["gpu_util_mean"].items())
        print(f"{r['run']:8s} {r['images']:6d} images ({r['ok']} ok) in {r['seconds']:7.1f} s = {r['images_per_s']:6.2f} images/s"
              f"   mean utilisation: {util}   [{r['check']}]")
    print(f"scaling: {n_gpus}-GPU images/s = {scaling:.3f} x {n_gpus} x the 1-GPU images/s (target >= 0.9)")
    if args.json:
        args.json.write_text(json.dumps(dict(rows=rows, scaling=scaling), indent=1))


if __name__ == "__main__":
    main()
