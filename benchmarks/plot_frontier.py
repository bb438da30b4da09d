"""Draw the quality/speed frontier that bench_frontier.py measured: PSNR against images/s per GPU.

    python benchmarks/plot_frontier.py frontier_data.json benchmarks/frontier.png [--table]

Three panels: the mean of the 11 benchmark photos, astronaut and lisa.
Presets are stars, the old presets squares (kind "today"), sweep variants small
points (a line joins each sweep's points, in order), single alternatives (kind
"alternative") points without a line; the seed's algorithm has given points for
astronaut and lisa only (238 s per image: 22.73 and 27.99 dB); dashed lines
are the default preset's goals of issue #20. Needs matplotlib (the development
machine, not the GPU machine). --table prints the Markdown table for RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

SEED_SECONDS = 238.0
SEED_PSNR = {"astronaut": 22.73, "lisa": 27.99}
GOALS = {"mean of the 11 benchmark photos": 32.0}  # the default preset's, issue #20 (at 56 images/s: the dotted line)
GOAL_SPEED = 56.0


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
    import matplotlib.ticker

    # Each photo's mean over its copies in the batch where measured (steadier than one fit), else its first copy.
    panels = (("mean of the 11 benchmark photos", lambda r: r.get("mean_benchmark_copies", r["mean_benchmark"]), None),
              ("astronaut", lambda r: r["benchmark"]["astronaut"], SEED_PSNR["astronaut"]),
              ("lisa", lambda r: r["benchmark"]["lisa"], SEED_PSNR["lisa"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), dpi=70)
    rows = data["rows"]
    sweeps: dict[str, list] = {}
    for r in rows:
        if r["kind"].startswith("sweep"):
            sweeps.setdefault(r["kind"], []).append(r)
    for axis, (title, value, seed) in zip(axes, panels):
        for kind, pts in sweeps.items():
            axis.plot([p["images_per_s"] for p in pts], [value(p) for p in pts], "o-", ms=3, lw=1, alpha=0.6,
                      label=kind[len("sweep: "):] if kind.startswith("sweep: ") else kind)
        for r in rows:
            if r["kind"] in ("preset", "today"):
                preset = r["kind"] == "preset"
                axis.plot(r["images_per_s"], value(r), "*" if preset else "s", ms=12 if preset else 7,
                          color="C3" if preset else "k", zorder=3)
                axis.annotate(r["name"], (r["images_per_s"], value(r)), textcoords="offset points",
                              xytext=(-8, 8) if preset else (6, -12), fontsize=8, ha="right" if preset else "left")
        others = [r for r in rows if r["kind"] == "alternative"]  # single variants, named in RESULTS.md's tables
        if others:
            axis.plot([r["images_per_s"] for r in others], [value(r) for r in others], "o", ms=4, color="C0",
                      alpha=0.7, label="alternatives")
        if seed is not None:
            axis.plot([1.0 / SEED_SECONDS], [seed], "v", ms=8, color="gray")
            axis.annotate(f"seed ({SEED_SECONDS:.0f} s/image)", (1.0 / SEED_SECONDS, seed), textcoords="offset points",
                          xytext=(6, 4), fontsize=8)
        if title in GOALS:
            axis.axhline(GOALS[title], ls="--", lw=1, color="C2")
            axis.axvline(GOAL_SPEED, ls=":", lw=1, color="C2")
            axis.annotate("goal of issue #20: 32.0 dB at 56 images/s", (0, GOALS[title]),
                          xycoords=("axes fraction", "data"), textcoords="offset points", xytext=(4, -10), fontsize=8,
                          color="C2")
        axis.set_xscale("log")
        low, high = axis.get_xlim()
        if high / low < 100:  # less than two decades: label 1, 2 and 5 of each
            axis.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel("images/s per H100 (log scale)")
        axis.set_ylabel("PSNR (dB)")
        axis.set_title(title, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
    if sweeps or any(r["kind"] == "alternative" for r in rows):
        axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"1000 strokes at 512 px: quality against speed ({data['meta']['device']}, {data['meta']['date']})",
                 fontsize=10)
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
