"""One self-contained HTML report of a run: ``python -m pipeline gallery OUT -o report.html``.

What a person wants to see after a run, in one file that opens anywhere (images are inline base64,
the charts inline SVG, the few interactions a dozen lines of inline JavaScript, nothing fetched):

- the run's numbers (from the summary and the per-shard stats files);
- each listed image's photo beside its painting, with PSNR and caption: the worst and the best
  rows of the run (all rows when there are few), in tables sortable by any column;
- a PSNR histogram, and images finished over time (throughput) from the stats files;
- failures: every failed row's status and message, and the shards' stream errors;
- a stroke-by-stroke timelapse of one image (a slider over frames, and a play button).

The photo is not stored in the output (a JPEG per row would bloat every read of the strokes): it
is read back, by key, from the source shards the user names (``--shards``), and cut by the same
decode as the fit's target, so it shows exactly what the painting was fitted to. Nothing the
output folder says is ever opened: not the source in a file's metadata (``painterbot.source``),
not a key that looks like a path. Without ``--shards``, or for a key the given shards lack, the
report shows the painting alone, with the recorded source (redacted) as text.
"""
from __future__ import annotations

import base64
import html
import io
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

import encoder

from . import storage
from .columns import encoder_size, file_metadata, open_file, parquet_files, table_rows
from .output_folder import OutputFolder
from .reader import IMAGE_EXTS, SampleError, ShardReader, decode_image
from .records import Status
from .redact import redact
from .shards import shard_id
from .upstream import describe as describe_upstream

MAX_FAILURES = 500  # failed rows listed; a run with more counts them in the stats


def _data_uri(image, fmt: str = "JPEG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=88)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _paint(strokes: torch.Tensor, background: torch.Tensor, size: int):
    return encoder.tensor_to_pil(encoder.render(strokes[None], background[None], size, size)[0])


# -- reading the run ----------------------------------------------------------------------------------
def _listing(files: list[str]) -> pa.Table:
    """key, status and psnr of every row, with its file and row index.

    Columnar on purpose: a run of millions of rows is a few columns here, not millions of dicts;
    only the rows the report shows become Python objects.
    """
    parts = []
    for f, path in enumerate(files):
        table = open_file(path).read(columns=["key", "status", "psnr"])
        parts.append(table.append_column("file", pa.array(np.full(len(table), f, np.int32)))
                     .append_column("index", pa.array(np.arange(len(table), dtype=np.int64))))  # fmt: skip
    if not parts:
        return pa.table({"key": pa.array([], pa.string()), "status": pa.array([], pa.string()),
                         "psnr": pa.array([], pa.float32()), "file": pa.array([], pa.int32()),
                         "index": pa.array([], pa.int64())})  # fmt: skip
    return pa.concat_tables(parts)


def _fetch(files: list[str], rows: list[dict], columns: list[str]) -> None:
    """Add ``columns`` to each row dict, reading only the row groups that hold them."""
    for f in sorted({r["file"] for r in rows}):
        handle = open_file(files[f])
        sizes = [handle.metadata.row_group(g).num_rows for g in range(handle.num_row_groups)]
        starts = np.cumsum([0] + sizes)
        mine = [r for r in rows if r["file"] == f]
        groups = np.searchsorted(starts, [r["index"] for r in mine], side="right") - 1
        for g in sorted(set(groups.tolist())):
            these = [r for r, group in zip(mine, groups) if group == g]
            table = handle.read_row_group(g, columns=columns)
            where = np.array([r["index"] - starts[g] for r in these], dtype=np.int64)
            for row, got in zip(these, table_rows(table, columns, where)):
                row.update(got)


def _photos(files: list[str], chosen: list[dict], size: int, shards: list[str] | None) -> dict[tuple[int, str], object]:
    """(file, key) -> the fit target as a PIL image, or why it is not shown (a string).

    Photos come only from ``shards``, the sources the user named on the command line, matched to
    rows by key: never from a source, path or URL that the output folder names. A folder made by
    someone else is data, and data must not choose what this machine runs, fetches or reads
    (docs/security.md). Without ``shards`` every photo is the reason, with the recorded source
    (redacted) as plain text.
    """
    wanted = {(r["file"], r["key"]) for r in chosen}
    by_key: dict[str, list[int]] = {}
    for f, key in wanted:
        by_key.setdefault(key, []).append(f)
    found: dict[tuple[int, str], object] = {}
    errors: list[str] = []
    for source in _likely_first(shards or [], {Path(str(files[f])).stem for f, _ in wanted}):
        if not by_key.keys() - {k for _, k in found}:
            break
        try:
            for sample in ShardReader(source, size).samples():
                key = sample["__key__"]
                if key not in by_key or "__status__" in sample or (by_key[key][0], key) in found:
                    continue  # a later sample with a key already used (duplicate_key) is not the row's image
                image = next((sample[e] for e in IMAGE_EXTS if e in sample), b"")
                try:
                    target, _, _ = decode_image(image, size, max_pixels=10**9, min_side=1)
                    photo = encoder.tensor_to_pil(target)
                except SampleError as exc:
                    photo = f"undecodable in {redact(source)}: {exc}"
                for f in by_key[key]:
                    found[(f, key)] = photo
        except Exception as exc:  # noqa: BLE001 - a source gone missing must not sink the report
            errors.append(f"{redact(source)} unreadable: {type(exc).__name__}: {redact(exc)}")
    recorded = {f: file_metadata(open_file(files[f])).get("source") for f in {f for f, _ in wanted}}
    for f, key in wanted:
        where = f"recorded source: {redact(recorded[f])}" if recorded[f] else "a single-image fit (no shard)"
        hint = "not in the shards given with --shards" if shards else "give the source shards with --shards to show it"
        hint += "".join(f"; {e}" for e in errors)
        found.setdefault((f, key), f"photo not shown: {hint} ({where})")
    return found


def _likely_first(shards: list[str], stems: set[str]) -> list[str]:
    """The given shards, those whose id names a listed row's file ({id}.parquet) first: a shard's rows
    are in its own file, so most reports read only those; the others are read only for keys still
    missing (a file renamed, or rows whose shard ids differ)."""
    def listed(url: str) -> bool:
        try:
            return shard_id(url) in stems
        except ValueError:
            return False

    return sorted(shards, key=lambda url: not listed(url))


def _stats(out) -> tuple[list[dict], dict | None]:
    folder, stats = OutputFolder(out), []
    for path in folder.stats_files():
        try:
            stats.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    summary_path = folder.summary_path
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return stats, summary


# -- charts (inline SVG) --------------------------------------------------------------------------------
def _histogram_svg(values: np.ndarray, width: int = 560, height: int = 180) -> str:
    if not len(values):
        return "<p class=note>no ok rows</p>"
    bins = int(np.clip(2 * np.sqrt(len(values)), 5, 40))  # a few rows per bar, however large the run
    counts, edges = np.histogram(values, bins=bins)
    top = max(1, counts.max())
    bar = (width - 40) / bins
    parts = [f'<svg width="{width}" height="{height + 30}" role="img" aria-label="PSNR histogram">']
    for i, c in enumerate(counts):
        h = (height - 10) * c / top
        x = 30 + i * bar
        parts.append(f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" fill="#4a7fb5">'
                     f"<title>{edges[i]:.2f}-{edges[i + 1]:.2f} dB: {c}</title></rect>")  # fmt: skip
    for x, label in ((30, f"{edges[0]:.1f}"), (width - 10, f"{edges[-1]:.1f}")):
        parts.append(f'<text x="{x}" y="{height + 18}" text-anchor="{"start" if x == 30 else "end"}">{label}</text>')
    parts.append(f'<text x="{width / 2}" y="{height + 18}" text-anchor="middle">PSNR (dB) of each image</text>'
                 f'<text x="26" y="12" text-anchor="end">{top}</text><text x="26" y="{height}" text-anchor="end">0</text>'
                 f'<text x="34" y="12">images</text>')  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _throughput_svg(stats: list[dict], width: int = 560, height: int = 180) -> str:
    """Images finished over time: a step at each shard's commit."""
    done = []
    for s in stats:
        try:
            done.append((datetime.fromisoformat(s["started_at"]), datetime.fromisoformat(s["finished_at"]), s["total"]))
        except (KeyError, TypeError, ValueError):
            continue
    if not done:
        return "<p class=note>no timed shards</p>"
    t0 = min(d[0] for d in done)
    points = sorted(((d[1] - t0).total_seconds(), d[2]) for d in done)
    span = max(points[-1][0], 1e-6)
    total = sum(p[1] for p in points)
    xy, count = [(0.0, 0)], 0
    for t, n in points:
        xy.append((t, count))
        count += n
        xy.append((t, count))
    path = " ".join(f"{40 + (width - 60) * t / span:.1f},{height - (height - 10) * c / max(total, 1):.1f}" for t, c in xy)
    rate = total / span
    return (f'<svg width="{width}" height="{height + 30}" role="img" aria-label="images over time">'
            f'<polyline points="{path}" fill="none" stroke="#c0392b" stroke-width="2"/>'
            f'<text x="36" y="12" text-anchor="end">{total}</text><text x="36" y="{height}" text-anchor="end">0</text>'
            f'<text x="40" y="{height + 18}">0 s</text><text x="42" y="12">images committed</text>'
            f'<text x="{width / 2}" y="{height + 18}" text-anchor="middle">time since the first shard started</text>'
            f'<text x="{width - 20}" y="{height + 18}" text-anchor="end">{span:.0f} s</text></svg>'
            f"<p class=note>{total} images in {span:.0f} s from the first shard's start to the last commit: {rate:.2f} images/s "
            "(the run's own rate above also counts its start-up)</p>")  # fmt: skip


# -- the report ----------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1300px}
h1{margin:0 0 4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse}table.sortable{width:100%}td,th{padding:4px 8px;border-bottom:1px solid #eee;vertical-align:middle;text-align:left}
th{cursor:pointer;background:#f4f4f4;user-select:none}th:after{content:" \\2195";color:#aaa}
img{display:block;image-rendering:auto}.pair{display:flex;gap:4px}.note{color:#666}
.missing{width:var(--t);height:var(--t);display:flex;align-items:center;justify-content:center;text-align:center;
background:#f6f6f6;color:#888;font-size:11px;padding:6px;box-sizing:border-box}
.cards{display:flex;gap:32px;flex-wrap:wrap}.card b{display:block;font-size:22px}
.charts{display:flex;gap:40px;flex-wrap:wrap}svg text{font-size:11px;fill:#555}
.strip{display:flex;gap:6px;margin-top:12px}figure{margin:0}figcaption{font-size:11px;color:#666;text-align:center}
.err{color:#a00;font-family:monospace;font-size:12px}td.num{text-align:right;font-variant-numeric:tabular-nums}
"""

JS = """
document.querySelectorAll('table.sortable th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], rows = [...body.rows], dir = th.dataset.dir === 'asc' ? -1 : 1;
  th.dataset.dir = dir === 1 ? 'asc' : 'desc';
  const val = r => { const v = r.cells[col].dataset.v ?? r.cells[col].textContent; return isNaN(v) ? v : +v; };
  rows.sort((a, b) => (val(a) > val(b) ? 1 : val(a) < val(b) ? -1 : 0) * dir).forEach(r => body.appendChild(r));
}));
const slider = document.getElementById('lapse'), frames = document.querySelectorAll('#frames img');
const label = document.getElementById('lapse-label');
function show(i) { frames.forEach((f, j) => f.style.display = j == i ? 'block' : 'none');
  if (label) label.textContent = frames[i].dataset.n + ' strokes'; }
if (slider) { slider.addEventListener('input', () => show(slider.value)); show(slider.value); }
let timer = null;
function play() { if (timer) { clearInterval(timer); timer = null; return; }
  timer = setInterval(() => { slider.value = (+slider.value + 1) % frames.length; show(slider.value); }, 250); }
"""


def _colour_spread(row: dict) -> float:
    strokes = np.asarray(row["strokes"], dtype=np.float32).reshape(-1, 10)
    return float(strokes[:, 6:9].std()) if len(strokes) else 0.0


def _image_cell(row: dict, photos: dict, size: int) -> str:
    photo = photos.get((row["file"], row["key"]))
    if isinstance(photo, str) or photo is None:
        left = f'<div class=missing style="--t:{size}px" title="{html.escape(photo or "")}">photo unavailable</div>'
    else:
        left = f'<img src="{_data_uri(photo.resize((size, size)))}" width="{size}" height="{size}" alt="photo {html.escape(row["key"])}">'
    right = f'<img src="{_data_uri(row["painting"])}" width="{size}" height="{size}" alt="painting {html.escape(row["key"])}">'
    # A label under each picture: which is the photo and which the painting, without the header.
    left = f"<figure>{left}<figcaption>photo</figcaption></figure>"
    right = f"<figure>{right}<figcaption>painting, {len(row['strokes'])} strokes</figcaption></figure>"
    return f'<div class=pair data-key="{html.escape(row["key"])}">{left}{right}</div>'


def _caption(text: str | None) -> str:
    return html.escape(text) if text else "<span class=note>(no caption)</span>"


def _rows_table(title: str, rows: list[dict], photos: dict, size: int, files: list[str]) -> str:
    body = []
    for r in rows:
        body.append(f"<tr><td>{_image_cell(r, photos, size)}</td><td>{html.escape(r['key'])}</td>"
                    f'<td class=num data-v="{r["psnr"]:.3f}">{r["psnr"]:.2f}</td>'
                    f"<td>{len(r['strokes'])}</td><td>{_caption(r['caption'])}</td>"
                    f"<td>{html.escape(Path(files[r['file']]).name)}</td></tr>")  # fmt: skip
    return (f"<h2>{title}</h2><table class=sortable><thead><tr><th title='the fit target, cut from the source shard, beside the painting rendered from its strokes'>photo &rarr; painting</th><th>key</th><th>PSNR dB</th>"
            f"<th>strokes</th><th>caption</th><th>file</th></tr></thead><tbody>{''.join(body)}</tbody></table>")


def _timelapse(row: dict, photo, size: int, frames: int) -> str:
    """A slider over ``frames`` stages of one painting beside its photo, and a strip of six stages
    that reads without interaction (in print, or a screenshot)."""
    n = len(row["strokes"])
    counts = sorted({round(n * i / frames) for i in range(frames + 1)})
    stages = {k: _paint(row["strokes"][:k], row["background"], size) for k in counts}
    imgs = "".join(f'<img src="{_data_uri(image)}" data-n="{k}" width="{size}" height="{size}" style="display:none" '
                   f'alt="{k} strokes">' for k, image in stages.items())  # fmt: skip
    strip_counts = [counts[round(i * (len(counts) - 1) / 5)] for i in range(6)]
    strip = "".join(f'<figure><img src="{_data_uri(stages[k].resize((size // 2, size // 2)))}" width="{size // 2}" '
                    f'height="{size // 2}" alt="{k} strokes"><figcaption>{k}</figcaption></figure>' for k in strip_counts)  # fmt: skip
    target = (f'<img src="{_data_uri(photo)}" width="{size}" height="{size}" alt="photo">'
              if hasattr(photo, "save") else f'<div class=missing style="--t:{size}px">photo unavailable</div>')  # fmt: skip
    return (f"<h2>Timelapse: {html.escape(row['key'])} ({row['psnr']:.2f} dB)</h2>"
            f"<p class=note>The painting stroke by stroke, in the order the fit placed them (coarse groups first); "
            f"drag the slider or press play.</p><div class=pair>{target}<div id=frames>{imgs}</div></div>"
            f'<input id=lapse type=range min=0 max={len(counts) - 1} value={len(counts) - 1} '
            f'style="width:{2 * size}px"> <button onclick="play()">play / pause</button> <span id=lapse-label></span>'
            f"<div class=strip>{strip}</div>")  # fmt: skip


def build_report(out: str | Path, worst: int = 12, best: int = 12, thumb: int = 160, timelapse_key: str | None = None,
                 frames: int = 20, shards: list[str] | None = None) -> tuple[str, dict]:  # fmt: skip
    """The report's HTML for output folder ``out``, and what it lists (keys per section).

    ``shards``: the source shards to show the photos from (expanded as ``--shards`` is); the
    folder's own records never name what is read."""
    out = storage.location(out)  # a local folder or an object-store URI (s3://bucket/out)
    files = parquet_files(str(out))
    listing = _listing(files)
    stats, summary = _stats(out)
    is_ok = pc.equal(listing["status"], Status.OK.value)
    ok = listing.filter(is_ok)
    ok = ok.take(pc.sort_indices(ok, [("psnr", "ascending")]))
    failed = listing.filter(pc.invert(is_ok))
    failures = failed.slice(0, MAX_FAILURES).to_pylist()
    if len(ok) <= worst + best:
        sections = [("All images, worst PSNR first", ok.to_pylist())]
    else:
        sections = [(f"Worst {worst} by PSNR", ok.slice(0, worst).to_pylist()),
                    (f"Best {best} by PSNR", ok.slice(len(ok) - best).to_pylist()[::-1])]  # fmt: skip
    chosen = [r for _, rows in sections for r in rows]
    picked = ok.filter(pc.equal(ok["key"], timelapse_key)).to_pylist() if timelapse_key else []
    _fetch(files, chosen + picked, ["caption", "strokes", "background"])
    # Default: of the listed images, the one whose strokes' colours spread the most (contrast): a
    # stroke-by-stroke film of a dark or flat image (the Hubble deep field) shows little.
    lapse = picked[0] if picked else max(chosen, key=_colour_spread, default=None)
    shown = chosen + picked
    _fetch(files, failures, ["error_message"])
    for r in chosen:
        r["painting"] = _paint(r["strokes"], r["background"], thumb)
    big = max(thumb, 256)  # the timelapse's size; table thumbnails are scaled down from it
    photos = _photos(files, shown, big, shards)
    missing = sum(1 for r in chosen if not hasattr(photos.get((r["file"], r["key"])), "save"))

    total, psnrs = len(listing), ok["psnr"].to_numpy(zero_copy_only=False).astype(np.float64)
    # The terminal's number when its run made every ok row here (it averages the fit's float64 PSNRs;
    # the column holds them as float32), else the column's mean.
    mean = np.mean(psnrs) if len(psnrs) else None
    if summary and summary.get("ok") == len(ok) and isinstance(summary.get("mean_psnr"), (int, float)):
        mean = summary["mean_psnr"]
    cards = [("images", total), ("ok", len(ok)), ("failed", len(failed)),
             ("mean PSNR, ok rows", f"{mean:.2f} dB" if mean is not None else "-"),
             ("files", len(files))]  # fmt: skip
    if summary:
        cards += [("seconds, last run", f"{summary.get('seconds', 0):.0f}"), ("device", summary.get("device", "?")),
                  ("images/s, last run (start-up included)", f"{summary.get('images_per_second') or 0:.2f}")]  # fmt: skip
    size = encoder_size(open_file(files[0])) if files else 0
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>PainterBot run: {html.escape(str(out))}</title>"
             f"<style>{CSS}</style></head><body><h1>PainterBot run</h1><p class=note>{html.escape(redact(out.resolve() if isinstance(out, Path) else out))}"
             f" &middot; fitted at {size} px &middot; report made {datetime.now().isoformat(timespec='seconds')}</p>",
             "<div class=cards>" + "".join(f"<div class=card><b>{html.escape(str(v))}</b>{k}</div>" for k, v in cards)
             + "</div>",
             "<div class=charts><div><h2>PSNR</h2>" + _histogram_svg(psnrs) + "</div><div><h2>Throughput</h2><p class=note>images committed over time, shard by shard (the fit alone runs faster: the stats files have each shard's fit_images_per_second)</p>"
             + _throughput_svg(stats) + "</div></div>"]  # fmt: skip
    if missing and not shards:
        parts.append("<p class=note>Paintings only: the photos are read from the source shards given with "
                     "<code>--shards</code>, never from a source the output names (hover over a grey box for the "
                     "recorded source).</p>")  # fmt: skip
    elif missing:
        parts.append(f"<p class=note>{missing} photo(s) are not in the shards given with --shards "
                     "(hover over a grey box for the reason); the paintings are complete.</p>")  # fmt: skip
    for title, rows in sections:
        parts.append(_rows_table(title, rows, photos, thumb, files))
    if lapse is not None:
        parts.append(_timelapse(lapse, photos.get((lapse["file"], lapse["key"])), big, frames))
    parts.append(_failures(failures, len(failed), stats, files))
    parts.append(_upstream((summary or {}).get("upstream")))
    parts.append(f"<script>{JS}</script></body></html>")
    listed = {title: [r["key"] for r in rows] for title, rows in sections}
    return "".join(parts), listed


def _failures(failures: list[dict], total: int, stats: list[dict], files: list[str]) -> str:
    shard_errors = [(str(s.get("shard_id", "?")), redact(e)) for s in stats for e in s.get("errors", [])]
    if not failures and not shard_errors:
        return "<h2>Failures</h2><p class=note>none: every sample of every shard was painted.</p>"
    rows = "".join(f"<tr><td>{html.escape(r['key'])}</td><td>{html.escape(r['status'])}</td>"
                   f"<td class=err>{html.escape(r['error_message'] or '')}</td>"
                   f"<td>{html.escape(Path(files[r['file']]).name)}</td></tr>" for r in failures)  # fmt: skip
    shard_rows = "".join(f"<tr><td>{html.escape(sid)}</td><td class=err>{html.escape(e)}</td></tr>"
                         for sid, e in shard_errors)  # fmt: skip
    out = f"<h2>Failures ({total} row{'' if total == 1 else 's'})</h2>"
    if total > len(failures):
        out += f"<p class=note>the first {len(failures)} are listed; the stats files count them all by status.</p>"
    if failures:
        out += ("<table class=sortable><thead><tr><th>key</th><th>status</th><th>message</th><th>file</th></tr></thead>"
                f"<tbody>{rows}</tbody></table>")  # fmt: skip
    if shard_errors:
        out += f"<h3>Shard stream errors</h3><table><tr><th>shard</th><th>error</th></tr>{shard_rows}</table>"
    return out


def _upstream(upstream) -> str:
    """img2dataset's own count of the URLs behind the shards (the summary's ``upstream``): the ones
    that failed before they were samples have no row, so only its stats files account for them."""
    if not isinstance(upstream, dict):
        return ""
    out = f"<h3>Before the shards: img2dataset</h3><p>{html.escape(describe_upstream(upstream))}</p>"
    errors = [e for e in upstream.get("errors") or [] if isinstance(e, list) and len(e) == 2]
    if errors:
        body = "".join(f"<tr><td class=num>{html.escape(str(n))}</td><td class=err>{html.escape(redact(m))}</td></tr>"
                       for m, n in errors)  # fmt: skip
        out += f"<table><tr><th>URLs</th><th>img2dataset's message</th></tr>{body}</table>"
    return out


def write_report(out: str | Path, path: str | Path, **options) -> tuple[Path, dict]:
    """Write the report of output folder ``out`` to ``path``; returns the path and the listed keys."""
    text, listed = build_report(out, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path, listed
