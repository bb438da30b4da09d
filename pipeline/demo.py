"""A small demo set, built offline from photos bundled with scikit-image, then encoded.

``run_encode.py --demo`` runs forward through here: ``prepare_demo`` builds the
shards and completes the run's options for this machine, the run goes like
any other, and ``show_demo`` renders a few paintings and says where things are.

The shards copy img2dataset's layout exactly ({key}.jpg + {key}.txt +
{key}.json per sample, 9-digit keys whose leading digits are the shard number,
and img2dataset's ``{id}_stats.json`` beside each tar), so the demo runs the
same path as a real LAION or CC12M download.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset import TarWriter

import encoder

from .config import CPU_PRESET, DEFAULT_PRESET
from .driver import RunOptions
from .columns import encoder_size, open_file
from .output_folder import OutputFolder

DEMO_ROOT = Path("demo_out")  # in .gitignore

# skimage.data name -> caption. Only images shipped inside the scikit-image wheel:
# the demo must not need the network.
PHOTOS = [
    ("astronaut", "portrait of astronaut Eileen Collins in front of the American flag"),
    ("coffee", "a cup of coffee on a saucer, seen from above"),
    ("chelsea", "Chelsea the tabby cat looking sideways"),
    ("rocket", "a rocket on its launch pad under a blue sky"),
    ("hubble_deep_field", "galaxies of the Hubble deep field"),
    ("immunohistochemistry", "a stained tissue sample under the microscope"),
    ("camera", "black and white photo of a cameraman with a tripod"),
    ("coins", "old coins on a dark background"),
]


def photo(name: str) -> np.ndarray:
    import skimage.data

    return np.asarray(getattr(skimage.data, name)())


def build_demo_shards(folder: str | Path, shards: int = 2, per_shard: int = 4) -> list[Path]:
    """Write ``shards`` tars of ``per_shard`` JPEG samples into ``folder``; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        with TarWriter(str(path)) as sink:
            for i in range(per_shard):
                name, caption = PHOTOS[(s * per_shard + i) % len(PHOTOS)]
                buffer = io.BytesIO()
                image = Image.fromarray(photo(name))
                image.convert("RGB" if image.mode != "L" else "L").save(buffer, format="JPEG", quality=92)
                key = f"{s:05d}{i:04d}"
                meta = {"url": f"skimage://data/{name}", "key": key, "caption": caption, "status": "success",
                        "width": image.width, "height": image.height, "original_width": image.width,
                        "original_height": image.height}  # fmt: skip
                sink.write({"__key__": key, "jpg": buffer.getvalue(), "txt": caption, "json": json.dumps(meta)})
        # img2dataset writes this beside each tar; the progress bar reads it for its total.
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
        paths.append(path)
    return paths


def render_previews(parquet: Path, folder: Path, size: int, limit: int = 8) -> list[Path]:
    """Paint the first ``limit`` ok rows of one output file to PNGs (what the strokes look like)."""
    import torch

    from .dataset import StrokeDataset

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    data = StrokeDataset(str(parquet))
    for i in range(min(limit, len(data))):
        row = data[i]
        canvas = encoder.render(row["strokes"][None], torch.as_tensor(row["background"])[None], size, size)
        path = folder / f"{row['key']}.png"
        encoder.tensor_to_pil(canvas[0]).save(path)
        written.append(path)
    return written


def prepare_demo(options: RunOptions) -> RunOptions:
    """Build the demo shards, then fill what the user left open: shards, output, preset and workers for this machine."""
    import torch

    shard_dir = DEMO_ROOT.resolve() / "shards"
    paths = build_demo_shards(shard_dir)
    print(f"[demo] built {len(paths)} shards of img2dataset layout in {shard_dir}")
    cuda = torch.cuda.is_available() and (options.device or "auto") != "cpu" and options.gpus != 0
    gpus, pipeline_overrides = options.gpus, dict(options.pipeline_overrides)
    if not cuda and gpus is None:
        gpus = 0
        # One single-threaded worker per core: the CPU fit does not scale across threads as well.
        pipeline_overrides["workers"] = pipeline_overrides.get("workers") or min(len(paths), os.cpu_count() or 1)
    config = options.config or (DEFAULT_PRESET if cuda else CPU_PRESET)
    print(f"[demo] encoding on {'cuda' if cuda else 'cpu'} with the {config} preset")
    return dataclasses.replace(
        options, shards=[str(shard_dir / ("{00000..%05d}.tar" % (len(paths) - 1)))],
        output=options.output or str(DEMO_ROOT.resolve() / "strokes"), config=config, gpus=gpus,
        pipeline_overrides=pipeline_overrides)  # fmt: skip


def show_demo(options: RunOptions) -> None:
    """Paint a few rows of each output file and say where the strokes, stats and paintings are."""
    out = Path(options.output)
    folder, previews = OutputFolder(out), []
    for parquet in folder.data_files():
        # Beside the output folder, not inside it: image files there would make Hugging Face
        # datasets pick its image-folder builder for the folder instead of Parquet.
        previews += render_previews(parquet, out.parent / "previews", encoder_size(open_file(parquet)), limit=4)
    print(f"[demo] strokes: {folder.parquet('*')}  stats: {folder.stats('*')}  summary: {folder.summary_path}")
    if previews:
        print(f"[demo] {len(previews)} paintings rendered from the strokes: {out.parent / 'previews'}")
    print(f"[demo] render one yourself: python -m pipeline render {folder.parquet('00000')} --key 000000000 --size 512 "
          "-o painting.png")
    if folder.data_files():
        from .gallery import write_report
        from .shards import expand_specs

        # The shards this demo built and encoded: the gallery reads photos only from shards it is given.
        report, _ = write_report(out, out.parent / "gallery.html", shards=expand_specs(options.shards))
        print(f"[demo] gallery (photos beside paintings, PSNR, throughput, a timelapse): {report.resolve()}")
