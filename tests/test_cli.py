"""`python -m pipeline fit | render` as a user runs them: outputs, JSON lines, one-line errors."""
import json
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from conftest import DATA, ROOT

SMALL = ["--config", "cpu_small", "--strokes", "6", "--size", "24",
         "--set", "steps=4", "group_size=3", "--device", "cpu", "--quiet"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_render_seed_checkpoint_reports_psnr(tmp_path):
    out = tmp_path / "lisa.png"
    proc = run("render", DATA / "lisa_5_50_300.pt", "--size", 512, "-o", out, "--target", DATA / "lisa.jpg")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert abs(info["psnr"] - 25.4) < 0.1
    assert Image.open(out).size == (512, 512)


def test_render_bad_inputs_give_one_error_line(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    nan = tmp_path / "nan.pt"
    ckpt = torch.load(DATA / "lisa_5_50_300.pt", weights_only=True)
    ckpt["mu_r"][3] = float("nan")
    torch.save(ckpt, nan)
    wide = tmp_path / "wide.pt"
    ckpt = torch.load(DATA / "lisa_5_50_300.pt", weights_only=True)
    ckpt["sigma_r"][0] = 5.0
    torch.save(ckpt, wide)
    cases = {tmp_path / "missing.pt": "no such stroke file", junk: "not a readable seed checkpoint",
             nan: "NaN", wide: "sigma_r out of range"}
    for path, message in cases.items():
        proc = run("render", path, "-o", tmp_path / "x.png")
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr


def test_fit_writes_rows_previews_and_survives_a_bad_file(tmp_path):
    rng = np.random.default_rng(0)
    good = tmp_path / "good.png"
    Image.fromarray((rng.random((40, 30, 3)) * 255).astype(np.uint8)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    out, previews = tmp_path / "fit.parquet", tmp_path / "previews"
    proc = run("fit", good, bad, *SMALL, "-o", out, "--preview", previews, "--timelapse")
    assert proc.returncode == 1  # one image failed
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    by_image = {line["image"]: line for line in lines}
    assert by_image[str(bad)]["status"] == "decode_error" and "cannot read image" in by_image[str(bad)]["error"]
    assert by_image[str(good)]["status"] == "ok" and by_image[str(good)]["psnr"] > 5
    assert {"image", "psnr", "seconds"} <= set(by_image[str(good)])
    assert Image.open(previews / "good.png").size == (24, 24)
    assert (previews / "good.gif").is_file()
    rendered = tmp_path / "again.png"
    proc = run("render", out, "--key", good, "--size", 24, "-o", rendered)
    assert proc.returncode == 0, proc.stderr
    # The stored painting renders to the preview (same strokes, same size, same renderer).
    a = np.asarray(Image.open(rendered), dtype=np.int16)
    b = np.asarray(Image.open(previews / "good.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1
    proc = run("render", out, "--key", "nope", "-o", rendered)
    assert proc.returncode == 2 and "no row with key" in proc.stderr
