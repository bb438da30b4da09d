"""Read one img2dataset webdataset shard into decoded, fit-ready records.

img2dataset writes each sample as ``{key}.jpg|png|webp`` + ``{key}.txt``
(caption) + ``{key}.json`` (url and metadata) in one tar. Everything wrong with
a sample becomes a record with a status and a message, never an exception: one
bad image must not cost the other 9,999 of its shard.

The shard itself is read strictly: it is either read to a verified end (every
header valid, every member whole, the compressed stream complete, the
end-of-archive marker present) or ``ShardReadError`` says what went wrong,
after the records of every sample read whole before it. Python's ``tarfile``
in stream mode does the parsing; it stops silently at a corrupt or truncated
header after the first, so ``_TarTail`` watches the bytes and the end is
checked explicitly. Out-of-memory errors are never a sample's fault: they
propagate and fail the shard.
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import tarfile
import warnings
import zlib
from collections import deque
from contextlib import closing
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from encoder import center_crop_resize, pil_to_tensor

from .records import Record, Status, is_out_of_memory
from .sources import ShardReadError, Timeouts, is_remote, open_source

# First match wins when a sample carries several images.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
BLOCK = tarfile.BLOCKSIZE

# We check the pixel count ourselves, before decoding and against our own limit,
# so PIL's global warning (emitted from 89 MP on) would only be noise in worker logs.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class SampleError(Exception):
    def __init__(self, status: Status, message: str):
        super().__init__(message)
        self.status = status


def _scale_exotic(image: Image.Image) -> Image.Image:
    """32-bit float (F) and 32-bit integer (I) images -> 8-bit greyscale the encoder can take.

    PIL's own conversion clips them (a float image in [0, 1] becomes black), so
    their values are mapped here: F in [0, 1] as is; I within 16 bits by the
    encoder (65535 is white); anything else by its actual range (min black, max
    white). Non-finite pixels cannot be mapped: the sample is refused.
    """
    if image.mode not in ("F", "I"):
        return image
    array = np.asarray(image, dtype=np.float64)
    if not np.isfinite(array).all():
        raise SampleError(Status.DECODE_ERROR, f"mode {image.mode} image with non-finite pixel values")
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if image.mode == "I" and lo >= 0 and hi <= 65535:
        return image
    if image.mode == "F" and lo >= 0 and hi <= 1:
        scaled = array
    else:
        scaled = (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
    return Image.fromarray((scaled * 255.0 + 0.5).astype(np.uint8), mode="L")


def decode_image(data: bytes, size: int, max_pixels: int, min_side: int, draft: bool = True):
    """Image bytes -> (``[3, size, size]`` target, width, height); raises SampleError.

    The pixel limit is checked on the header, before any pixel is decoded, so a
    decompression bomb costs a few bytes of reading. Out-of-memory errors are
    re-raised as they are: they say nothing about the image.
    """
    if not data:
        raise SampleError(Status.DECODE_ERROR, "empty image file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise SampleError(Status.TOO_LARGE,
                                  f"{width}x{height} = {width * height} pixels > max_image_pixels {max_pixels}")  # fmt: skip
            if min(width, height) < min_side:
                raise SampleError(Status.TOO_SMALL, f"{width}x{height}: short side < min_image_side {min_side}")
            orientation = image.getexif().get(0x0112, 1)
            if orientation in (5, 6, 7, 8):  # a quarter turn: the picture as shown is h x w
                width, height = height, width
            if draft and image.format == "JPEG":
                # DCT-domain downscale; keeps both sides >= size, which center_crop_resize needs.
                image.draft("RGB", (size, size))
            image.load()
            if orientation != 1:
                image = ImageOps.exif_transpose(image)
            target = pil_to_tensor(center_crop_resize(_scale_exotic(image), size))
    except SampleError:
        raise
    except Image.DecompressionBombError as exc:
        raise SampleError(Status.TOO_LARGE, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - every decoder failure is a row, never a crash...
        if is_out_of_memory(exc):
            raise  # ... except the machine running out of memory: that fails the shard, which is retried
        message = str(exc) or type(exc).__name__
        raise SampleError(Status.DECODE_ERROR, f"{type(exc).__name__}: {message}") from None
    return target, width, height


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace")


def _meta(data: bytes | None) -> dict | None:
    if not data:
        return None
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError):
        # Metadata is a nicety: a broken .json, or one nested deeper than the parser's stack (a
        # forged sample), does not fail the image, let alone the shard.
        return None
    return meta if isinstance(meta, dict) else None


def _url(meta: dict | None) -> str | None:
    url = (meta or {}).get("url")
    return url if isinstance(url, str) else None


# -- the container: compression and tar ----------------------------------------------------
# Leading bytes of the compressed formats; the name of a shard is not trusted.
_DECOMPRESSORS = {
    b"\x1f\x8b": ("gzip", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    b"BZh": ("bzip2", bz2.BZ2File),
    b"\xfd7zXZ\x00": ("xz", lzma.LZMAFile),
}
_UNSUPPORTED = {b"\x28\xb5\x2f\xfd": "zstd"}


class _Prefixed:
    """A stream with its first bytes already read (to sniff the format) put back in front."""

    def __init__(self, head: bytes, raw):
        self.head, self.raw = head, raw

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.raw.read(n)
        if n is None or n < 0:
            data, self.head = self.head + self.raw.read(), b""
        else:
            data, self.head = self.head[:n], self.head[n:]
        return data


def _decompressed(raw):
    """(the tar byte stream, the compression's name or None); refuses formats we cannot read."""
    head = b""
    while len(head) < 6:
        data = raw.read(6 - len(head))
        if not data:
            break
        head += data
    stream = _Prefixed(head, raw)
    for magic, name in _UNSUPPORTED.items():
        if head.startswith(magic):
            raise ShardReadError(f"{name}-compressed tar: not supported (decompress it, e.g. 'zstd -d', "
                                 "or use .tar, .tar.gz, .tar.bz2 or .tar.xz)")  # fmt: skip
    for magic, (name, opener) in _DECOMPRESSORS.items():
        if head.startswith(magic):
            return opener(stream), name
    return stream, None


class _TarTail:
    """Pass-through reader counting bytes and remembering where the last non-zero byte was.

    tarfile ends its iteration silently at a corrupt or cut header after the
    first; what follows the last member must then be checked: only zeros, at
    least the two zero blocks of the end-of-archive marker.
    """

    def __init__(self, raw):
        self.raw = raw
        self.total = 0
        self.last_nonzero = -1

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            kept = len(data.rstrip(b"\0"))
            if kept:
                self.last_nonzero = self.total + kept - 1
            self.total += len(data)
        return data

    def check_end(self, end: int) -> None:
        """``end``: where tarfile stopped (the offset of the first block that is not a member header)."""
        while self.read(1 << 16):
            pass  # the end marker and padding; also lets a pipe's command finish writing
        if self.last_nonzero >= end and self.total - end < BLOCK:
            raise ShardReadError(f"tar ends inside a member header at byte {end} (truncated)")
        if self.last_nonzero >= end:
            raise ShardReadError(f"corrupt tar header at byte {end}: the archive stops being readable there "
                                 f"({self.total - end} more bytes not read)")  # fmt: skip
        if self.total - end < 2 * BLOCK:
            raise ShardReadError(f"tar ends at byte {self.total} without its end-of-archive marker (truncated)")


def _open_tar(tail: _TarTail, compression: str | None) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=tail, mode="r|")
    except tarfile.ReadError as exc:
        if tail.total == 0:
            raise ShardReadError("empty file (0 bytes): not a tar archive") from None
        what = f"{compression}-compressed data" if compression else "data"
        raise ShardReadError(f"not a tar archive: the {what} does not start with a valid tar header ({exc})") from None


def _describe(exc: BaseException, compression: str | None) -> str:
    """One line saying which layer failed: the compressed stream or the tar."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, (EOFError, gzip.BadGzipFile, lzma.LZMAError, zlib.error)) or (compression and isinstance(exc, OSError)):
        return f"corrupt or truncated {compression or 'compressed'} stream: {text}"
    if isinstance(exc, tarfile.ReadError) and "unexpected end of data" in str(exc):
        return f"truncated tar: a member is cut short ({text})"
    return f"corrupt tar: {text}"


class ShardReader:
    """Stream the samples of one shard and decode them on a few threads, in order.

    ``records()`` yields every sample read whole, then raises ``ShardReadError``
    if the source failed. ``files`` counts the tar members read; ``compression``
    names the container's compression (None for a plain tar).
    """

    def __init__(
        self,
        url: str,
        size: int,
        max_image_pixels: int = 100_000_000,
        min_image_side: int = 16,
        jpeg_draft: bool = True,
        threads: int = 2,
        max_member_bytes: int = 128 * 1024 * 1024,
        timeouts: Timeouts = Timeouts(),
    ):
        self.url = url
        self.size = size
        self.max_image_pixels = max_image_pixels
        self.min_image_side = min_image_side
        self.jpeg_draft = jpeg_draft
        self.threads = max(1, threads)
        self.max_member_bytes = max_member_bytes
        self.timeouts = timeouts
        self.files = 0
        self.compression: str | None = None

    # -- raw members and samples ------------------------------------------------------
    def _members(self, tar: tarfile.TarFile) -> Iterator[tuple[str, bytes | None, tuple | None]]:
        """(name, data, None), or (name, None, (status, why)) for a member over ``max_member_bytes`` or a
        link (never read)."""
        for member in tar:
            self.files += 1
            if member.issym() or member.islnk():
                # A link's data is elsewhere (outside the tar, or an earlier member a stream cannot
                # go back to): never followed, but its sample gets a row that says so.
                kind = "symbolic link" if member.issym() else "hard link"
                yield member.name, None, (Status.LINK_MEMBER, f"member {member.name} is a {kind} to "
                                                              f"{member.linkname!r}: links are not followed")
                continue
            if not member.isfile():
                continue  # folders, devices: no sample data
            if member.size > self.max_member_bytes:
                yield member.name, None, (Status.TOO_LARGE, f"member {member.name} is {member.size} bytes > "
                                                             f"max_member_bytes {self.max_member_bytes}")
                continue  # tarfile skips its data on the next step, in bounded chunks
            yield member.name, tar.extractfile(member).read(), None

    def samples(self) -> Iterator[dict]:
        """Group tar members by key: ``{'__key__': key, ext: bytes, ...}``, in tar order.

        A sample whose key an earlier sample had (non-adjacent members, or a
        member repeated) gets ``'__status__'`` DUPLICATE_KEY; one with an
        oversized member gets TOO_LARGE, one with a link member LINK_MEMBER. Raises ShardReadError, after the
        samples read whole, if the source or the container is damaged.
        """
        seen: dict[str, int] = {}
        current: dict | None = None
        try:
            # closing(): a pipe: command is reaped, and its exit status checked, even when reading stops early.
            with closing(open_source(self.url, self.timeouts)) as raw:
                stream, self.compression = _decompressed(raw)
                tail = _TarTail(stream)
                try:
                    tar = _open_tar(tail, self.compression)
                    for name, data, refused in self._members(tar):
                        key, ext = _split(name)
                        if key is None:
                            continue  # a file without an extension belongs to no sample
                        if current is None or key != current["__key__"] or ext in current:
                            if current is not None:
                                yield current
                            current = _start_sample(key, seen)
                        if refused:
                            current["__status__"] = refused
                        else:
                            current[ext] = data
                    tail.check_end(tar.offset)
                except ShardReadError:
                    raise
                except Exception as exc:  # noqa: BLE001 - corrupt or truncated: which layer, and why
                    if is_out_of_memory(exc):
                        raise
                    raise ShardReadError(_describe(exc, self.compression)) from None
        except ShardReadError as exc:
            # The sample being read when the source failed may be missing members: it is not kept.
            message = str(exc)
            raise ShardReadError(message if message.startswith(self.url) else f"{self.url}: {message}") from None
        if current is not None:
            yield current

    # -- decoded records -------------------------------------------------------------
    def decode(self, sample: dict) -> Record:
        """One raw sample -> Record; raises only for out-of-memory."""
        meta = _meta(sample.get("json"))
        record = Record(key=sample["__key__"], caption=_text(sample.get("txt")), url=_url(meta), meta=meta)
        if "__status__" in sample:
            record.status, record.error_message = sample["__status__"]
            return record
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            record.status = Status.MISSING_IMAGE
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
        """Decoded records in tar order, ``threads`` images decoding at once; then the source's error, if any."""
        with ThreadPoolExecutor(self.threads, thread_name_prefix="decode") as pool:
            window: deque = deque()
            error: ShardReadError | None = None
            try:
                for sample in self.samples():
                    window.append(pool.submit(self.decode, sample))
                    if len(window) >= 4 * self.threads:
                        yield window.popleft().result()
            except ShardReadError as exc:
                error = exc  # the samples read before it still become records
            while window:
                yield window.popleft().result()
            if error is not None:
                raise error


def _split(name: str) -> tuple[str | None, str]:
    """``'dir/000123.jpg'`` -> ``('dir/000123', 'jpg')``: the key ends at the base name's first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None, ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _start_sample(key: str, seen: dict[str, int]) -> dict:
    sample: dict = {"__key__": key}
    if key in seen:
        sample["__status__"] = (Status.DUPLICATE_KEY, f"key already used by sample #{seen[key]} of this shard (kept)")
    else:
        seen[key] = len(seen)
    return sample


__all__ = ["Record", "SampleError", "ShardReadError", "ShardReader", "decode_image", "is_remote"]
