"""Test material for the pipeline tests: photos, every kind of bad sample, tars, a tiny config.

Everything is made here from images bundled with scikit-image: no network.
"""
from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

import encoder

REPO = Path(__file__).resolve().parent.parent
# A fit that takes a fraction of a second per image on one CPU core, so a run of
# a few dozen images through Ray stays within seconds. The dense reference
# renderer: the tests run under TRITON_INTERPRET=1, where 'auto' would pick the
# (correct but far slower) interpreted Triton kernels.
TINY = {"strokes": 12, "size": 32, "steps": 30, "backend": "reference"}


def photo(name: str = "astronaut", size: int | None = 96) -> Image.Image:
    """A bundled skimage photo, shrunk so tests decode fast (None keeps its size)."""
    import skimage.data

    array = np.asarray(getattr(skimage.data, name)())
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    image = Image.fromarray(array)
    if size:
        image.thumbnail((size, size))
    return image


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb in a few bytes)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8  # after the signature: length(4) 'IHDR'(4) data(13) crc(4)
    body = bytearray(data[ihdr + 4 : ihdr + 8 + 13])
    body[4:12] = struct.pack(">II", width, height)
    data[ihdr + 4 : ihdr + 8 + 13] = body
    data[ihdr + 8 + 13 : ihdr + 8 + 13 + 4] = struct.pack(">I", zlib.crc32(bytes(body)) & 0xFFFFFFFF)
    return bytes(data)


def bad_samples(prefix: str = "bad") -> list[dict]:
    """Samples covering every way an input image can be odd.

    Each: ``key``, ``files`` {ext: bytes} as they go in the tar, ``status`` the
    row must get, ``caption`` (None when there is no .txt) and ``size`` (w, h) for ok rows.
    """
    rgb = photo("coffee", 80)
    jpeg = encode(rgb, "JPEG", quality=90)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    gray16 = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    cases = [
        ("zero", {"jpg": b""}, "decode_error", None),
        ("truncated", {"jpg": jpeg[: len(jpeg) // 2]}, "decode_error", None),
        ("random", {"jpg": np.random.default_rng(0).bytes(3000)}, "decode_error", None),
        ("tiny", {"png": encode(Image.new("RGB", (3, 3), (200, 10, 10)), "PNG")}, "too_small", None),
        ("bomb", {"png": bomb_png()}, "too_large", None),
        ("gray", {"jpg": encode(rgb.convert("L"), "JPEG")}, "ok", rgb.size),
        ("rgba", {"png": encode(rgba, "PNG")}, "ok", rgb.size),
        ("cmyk", {"jpg": encode(rgb.convert("CMYK"), "JPEG")}, "ok", rgb.size),
        ("sixteen", {"png": encode(gray16, "PNG")}, "ok", rgb.size),
        ("palette", {"png": encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")}, "ok", rgb.size),
        ("webp", {"webp": encode(rgb, "WEBP")}, "ok", rgb.size),
        ("nocaption", {"jpg": jpeg}, "ok", rgb.size),
        ("noimage", {}, "missing_image", None),
    ]
    samples = []
    for i, (name, files, status, size) in enumerate(cases):
        key = f"{prefix}{i:03d}_{name}"
        files = dict(files)
        caption = None if name == "nocaption" else f"a {name} picture"
        if caption is not None:
            files["txt"] = caption.encode()
        files["json"] = json.dumps({"url": f"http://example.invalid/{key}", "key": key}).encode()
        samples.append({"key": key, "files": files, "status": status, "caption": caption, "size": size})
    return samples


def good_samples(n: int, prefix: str = "good", size: int = 64) -> list[dict]:
    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"]
    out = []
    for i in range(n):
        image = photo(names[i % len(names)], size)
        key = f"{prefix}{i:04d}"
        caption = f"{names[i % len(names)]} number {i}"
        files = {"jpg": encode(image, "JPEG", quality=90), "txt": caption.encode(),
                 "json": json.dumps({"url": f"http://example.invalid/{key}.jpg"}).encode()}  # fmt: skip
        out.append({"key": key, "files": files, "status": "ok", "caption": caption, "size": image.size})
    return out


def write_tar(path: str | Path, samples: list[dict], mode: str = "w") -> Path:
    """Write (or with mode='a', append) samples as img2dataset lays them out: {key}.{ext} members."""
    path = Path(path)
    with tarfile.open(path, mode) as tar:
        for sample in samples:
            for ext, data in sample["files"].items():
                info = tarfile.TarInfo(f"{sample['key']}.{ext}")
                info.size = len(data)
                info.mtime = 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    return path


def tar_samples(path: str | Path) -> dict[str, dict]:
    """key -> {ext: bytes} of a readable tar, in order."""
    out: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def tiny_config(path: str | Path, **pipeline) -> Path:
    """The cpu_small preset with the tiny fit and test-friendly pipeline knobs."""
    data = encoder.read_preset("cpu_small")
    data.setdefault("encoder", {})
    data["encoder"] = {**(data["encoder"] or {}), **TINY}
    data["pipeline"] = {**(data.get("pipeline") or {}), "include_dashboard": False, "num_cpus": 2,
                        "batch_size": 4, "row_group_size": 8, "progress_interval": 0.2, **pipeline}  # fmt: skip
    Path(path).write_text(yaml.safe_dump(data))
    return Path(path)


def run_encode(args: list[str], env: dict | None = None, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """run_encode.py in a subprocess (as users run it), output captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "run_encode.py"), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout, **popen)  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_pids(pids: list[int]) -> None:
    """SIGKILL processes this test started (Ray helpers orphaned by a killed driver), one by one."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def sigkill_driver_when(args: list, env: dict, log_path: Path, ready, poll: float = 0.05, timeout: float = 240) -> None:
    """Start run_encode.py (``args``), SIGKILL it once ``ready()`` holds (bounded), end its orphans.

    Ray's processes die with the driver, but its agents may linger as orphans: they are ended
    by pid (seen as the driver's descendants), never by name.
    """
    helpers: set[int] = set()
    with open(log_path, "w") as log:
        driver = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + timeout
            while time.time() < deadline and driver.poll() is None:
                helpers.update(descendants(driver.pid))
                if ready():
                    break
                time.sleep(poll)
            assert driver.poll() is None, Path(log_path).read_text()[-3000:]
            helpers.update(descendants(driver.pid))
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=30)
        finally:
            if driver.poll() is None:
                driver.kill()
            time.sleep(1)
            kill_pids(sorted(helpers))


class LocalServer:
    """http.server on 127.0.0.1 in a thread, serving ``folder``: counts every request (``requests``);
    ``broken`` makes it answer 404 (a source that recovers later); a query string (a token, a
    signature) is not part of the file name, and any credential is taken."""

    def __init__(self, folder: Path, broken: bool = False):
        owner = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kw):
                super().__init__(*args, directory=str(folder), **kw)

            def do_GET(self):
                owner.requests.append(self.path)
                if owner.broken:
                    self.send_error(404)
                    return
                self.path = self.path.split("?", 1)[0]
                super().do_GET()

            def log_message(self, *args):
                pass

        self.broken, self.requests = broken, []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def environment(values: dict):
    """``os.environ`` with ``values`` set, restored after; the storage filesystems (cached per process,
    built from the environment's endpoint and credentials) are rebuilt on both sides."""
    from pipeline import storage

    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    storage._make_store.cache_clear()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        storage._make_store.cache_clear()
