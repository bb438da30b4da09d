"""Read one img2dataset webdataset shard into decoded, fit-ready records.

img2dataset writes each sample as ``{key}.jpg|png|webp`` + ``{key}.txt``
(caption) + ``{key}.json`` (url and metadata) in one tar. Everything wrong with
a sample becomes a record with a status and a message, never an exception: one
bad image must not cost the other 9,999 of its shard. Only the shard stream
itself can fail, and then what was read before the failure is kept.
"""
from __future__ import annotations

import io
import json
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import torch
from PIL import Image, ImageOps
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from encoder import center_crop_resize, pil_to_tensor

from . import storage

# First match wins when a sample carries several images.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

# We check the pixel count ourselves, before decoding and against our own limit,
# so PIL's global warning (emitted from 89 MP on) would only be noise in worker logs.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass
class Record:
    """One input sample. ``status == 'ok'`` means ``target`` is ready to fit;
    any other status is a failure row with ``error_message`` saying why."""

    key: str
    caption: str | None = None
    url: str | None = None
    width: int | None = None  # original size, after EXIF rotation; None if undecodable
    height: int | None = None
    status: str = "ok"
    error_message: str | None = None
    target: torch.Tensor | None = None  # [3, S, S] float32 in [0, 1]
    meta: dict | None = None  # the sample's parsed .json (img2dataset's fields and the user's extra columns)


class SampleError(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


class ShardReadError(RuntimeError):
    """The shard stream failed where a retry may help (a remote source)."""


def decode_image(data: bytes, size: int, max_pixels: int, min_side: int, draft: bool = True):
    """Image bytes -> (``[3, size, size]`` target, width, height); raises SampleError.

    The pixel limit is checked on the header, before any pixel is decoded, so a
    decompression bomb costs a few bytes of reading.
    """
    if not data:
        raise SampleError("decode_error", "empty image file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise SampleError("too_large", f"{width}x{height} = {width * height} pixels > max_image_pixels {max_pixels}")
            if min(width, height) < min_side:
                raise SampleError("too_small", f"{width}x{height}: short side < min_image_side {min_side}")
            orientation = image.getexif().get(0x0112, 1)
            if orientation in (5, 6, 7, 8):  # a quarter turn: the picture as shown is h x w
                width, height = height, width
            if draft and image.format == "JPEG":
                # DCT-domain downscale; keeps both sides >= size, which center_crop_resize needs.
                image.draft("RGB", (size, size))
            image.load()
            if orientation != 1:
                image = ImageOps.exif_transpose(image)
            target = pil_to_tensor(center_crop_resize(image, size))
    except SampleError:
        raise
    except Image.DecompressionBombError as exc:
        raise SampleError("too_large", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - every decoder failure is a row, never a crash
        message = str(exc) or type(exc).__name__
        raise SampleError("decode_error", f"{type(exc).__name__}: {message}") from None
    return target, width, height


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace")


def _meta(data: bytes | None) -> dict | None:
    if not data:
        return None
    try:
        meta = json.loads(data)
    except ValueError:
        return None  # metadata is a nicety; a broken .json does not fail the image
    return meta if isinstance(meta, dict) else None


def _url(meta: dict | None) -> str | None:
    url = (meta or {}).get("url")
    return url if isinstance(url, str) else None


COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


class _TailStream:
    """Pass-through reader remembering the first and last bytes of the stream.

    tarfile stops silently when a tar is cut exactly at a block boundary: the
    missing end-of-archive marker (two zero blocks) is the only trace, and
    only this wrapper sees it.
    """

    def __init__(self, raw):
        self.raw = raw
        self.head = b""
        self.tail = b""
        self.total = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            if len(self.head) < 8:
                self.head = (self.head + data)[:8]
            self.tail = (self.tail + data)[-1024:]
            self.total += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 16):
            pass

    def lacks_end_marker(self) -> bool:
        if self.total == 0 or self.head.startswith(COMPRESSED_MAGIC):
            return False  # empty: tarfile said so; compressed: the decompressor reports truncation
        return len(self.tail) < 1024 or any(self.tail)


class ShardReader:
    """Stream the samples of one shard and decode them on a few threads, in order.

    ``errors`` collects shard-level problems (truncated or corrupt tar, a pipe
    that exited non-zero); ``files`` counts the tar members read.
    """

    def __init__(
        self,
        url: str,
        size: int,
        max_image_pixels: int = 100_000_000,
        min_image_side: int = 16,
        jpeg_draft: bool = True,
        threads: int = 2,
        strict: bool = False,
    ):
        self.url = url
        self.size = size
        self.max_image_pixels = max_image_pixels
        self.min_image_side = min_image_side
        self.jpeg_draft = jpeg_draft
        self.threads = max(1, threads)
        # strict: raise ShardReadError on a stream error instead of keeping a partial
        # shard. The worker sets it for remote sources on all but the last attempt,
        # since a network hiccup deserves a retry while a corrupt file never heals.
        self.strict = strict
        self.errors: list[str] = []
        self.files = 0

    # -- raw samples -----------------------------------------------------------------
    def samples(self) -> Iterator[dict]:
        """Group tar members by key: ``{'__key__': key, ext: bytes, ...}``, in tar order."""
        # Object stores through pyarrow/fsspec (credentials and endpoint from the environment);
        # gopen would shell out to a CLI (aws, gsutil) that may not be installed.
        raw = storage.open_input_stream(self.url) if storage.is_fs_uri(self.url) else gopen(self.url, "rb")
        stream = _TailStream(raw)
        current: dict | None = None
        member_errors: list[Exception] = []

        def stop_on_error(exc: Exception) -> bool:
            member_errors.append(exc)
            return False  # the stream is unusable after a bad member: stop, keep what we have

        try:
            for member in tar_file_iterator(stream, handler=stop_on_error):
                self.files += 1
                key, ext = base_plus_ext(member["fname"])
                if key is None:
                    continue  # a file without an extension belongs to no sample
                ext = ext.lower()
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                if ext in current:
                    self.errors.append(f"{self.url}: duplicate member {member['fname']} ignored")
                    continue
                current[ext] = member["data"]
            if not member_errors:
                stream.drain()  # the end marker and padding; lets a pipe's command finish writing
                if stream.lacks_end_marker():
                    member_errors.append(ShardReadError("tar ends without its end-of-archive marker (truncated)"))
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt tar: keep the samples read so far
            member_errors.append(exc)
        finally:
            try:
                raw.close()  # a pipe: source reports its exit status here
            except Exception as exc:  # noqa: BLE001
                member_errors.append(exc)
        for exc in member_errors:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        if member_errors and self.strict:
            raise ShardReadError(f"{self.url}: {self.errors[-1]}")
        if current is not None:
            yield current

    # -- decoded records -------------------------------------------------------------
    def decode(self, sample: dict) -> Record:
        """One raw sample -> Record; never raises."""
        meta = _meta(sample.get("json"))
        record = Record(key=sample["__key__"], caption=_text(sample.get("txt")), url=_url(meta), meta=meta)
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            record.status = "missing_image"
            others = sorted(k for k in sample if not k.startswith("__"))
            record.error_message = f"sample has no image member (found: {others})"
            return record
        try:
            record.target, record.width, record.height = decode_image(
                sample[ext], self.size, self.max_image_pixels, self.min_image_side, self.jpeg_draft
            )
        except SampleError as exc:
            record.status, record.error_message = exc.status, f"{ext}: {exc}"
        return record

    def records(self) -> Iterator[Record]:
        """Decoded records in tar order, ``threads`` images decoding at once."""
        with ThreadPoolExecutor(self.threads, thread_name_prefix="decode") as pool:
            window: deque = deque()
            for sample in self.samples():
                window.append(pool.submit(self.decode, sample))
                if len(window) >= 4 * self.threads:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()


def is_remote(url: str) -> bool:
    """Sources where a read error may be transient (network, a command)."""
    remote = ("http://", "https://", "pipe:", "s3://", "gs://", "ais://", "sftp://", "scp://", "ftps://")
    return url.startswith(remote) or storage.is_fs_uri(url)


__all__ = ["Record", "SampleError", "ShardReadError", "ShardReader", "decode_image", "is_remote"]
