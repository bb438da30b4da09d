"""Draw the quality/speed frontier that bench_frontier.py measured: PSNR against images/s per GPU.

    python benchmarks/plot_frontier.py frontier_data.json benchmarks/frontier.png [--table]

Presets are labelled points, sweep variants small ones (a line joins each
sweep's points, in order), the seed's algorithm its given points (238 s per
image: astronaut 22.73 dB, lisa 27.99 dB). Needs matplotlib (the development
machine, not the GPU machine). --table prints the Markdown table for RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

SEED_SECONDS = 238.0
SEED_PSNR = {"astronaut": 22.73, "lisa": 27.99}


def table(data: dict) -> str:
    lines = ["| config | kind | B | images/s | mean PSNR, 11 benchmark photos | lisa | astronaut | tuning (6) | held-out (6) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['name']} | {r['kind']} | {r['batch']} | {r['images_per_s']:.2f} | {r['mean_benchmark']:.2f} |"
                     f" {r['benchmark']['lisa']:.2f} | {r['benchmark']['astronaut']:.2f} | {r['mean_tuning']:.2f} |"
                     f" {r['mean_held_out']:.2f} |")
    return "\n".join(lines)


def plot(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.6), dpi=80)
    rows = data["rows"]
    sweeps: dict[str, list] = {}
    for r in rows:
        if r["kind"].startswith("sweep"):
            sweeps.setdefault(r["kind"], []).append(r)
    for kind, pts in sweeps.items():
        for axis, key in ((ax, "mean_benchmark"), (ax2, "lisa")):
            ys = [p[key] if key != "lisa" else p["benchmark"]["lisa"] for p in pts]
            axis.plot([p["images_per_s"] for p in pts], ys, "o-", ms=3, lw=1, alpha=0.6, label=kind)
    for r in rows:
        if r["kind"] in ("preset", "today"):
            for axis, y in ((ax, r["mean_benchmark"]), (ax2, r["benchmark"]["lisa"])):
                axis.plot(r["images_per_s"], y, "*" if r["kind"] == "preset" else "s", ms=11 if r["kind"] == "preset" else 7,
                          color="C3" if r["kind"] == "preset" else "k")
                axis.annotate(r["name"], (r["images_per_s"], y), textcoords="offset points", xytext=(6, -10), fontsize=8)
    seed_rate = 1.0 / SEED_SECONDS
    ax.plot([seed_rate], [sum(SEED_PSNR.values()) / 2], "v", color="gray")
    ax.annotate("seed (mean of astronaut, lisa)", (seed_rate, sum(SEED_PSNR.values()) / 2), textcoords="offset points",
                xytext=(6, 4), fontsize=8)
    ax2.plot([seed_rate], [SEED_PSNR["lisa"]], "v", color="gray")
    ax2.annotate("seed", (seed_rate, SEED_PSNR["lisa"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for axis, title in ((ax, "mean of the 11 benchmark photos"), (ax2, "lisa")):
        axis.set_xscale("log")
        axis.set_xlabel("images/s per H100 (log)")
        axis.set_ylabel("PSNR (dB)")
        axis.set_title(title, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"1000 strokes at 512 px: quality vs speed ({data['meta']['device']}, {data['meta']['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("png", type=Path, nargs="?")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    data = json.loads(args.data.read_text())
    if args.table:
        print(table(data))
    if args.png:
        plot(data, args.png)


if __name__ == "__main__":
    main()
