"""Where files live: local folders and object stores behind one small interface.

Shard sources, the output folder and datasets may be local paths or URIs of a
filesystem: ``s3://bucket/prefix`` and ``gs://bucket/prefix`` through
pyarrow's own S3/GCS filesystems, any other scheme fsspec knows (``memory://``,
``hf://``, ``abfs://``, ...) through fsspec. Credentials and endpoints come
from the usual environment: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN`` / ``AWS_PROFILE``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``
(or ``AWS_ENDPOINT_URL_S3``) for S3-compatible stores (MinIO, R2, moto);
``GOOGLE_APPLICATION_CREDENTIALS`` for GCS.

``location(x)`` gives a ``pathlib.Path`` for a local path (so local behaviour is
plain pathlib and os calls) and a ``RemotePath`` for a URI: a small pathlib-like
value (``/``, ``name``, ``parent``, ``with_name``, ``is_file``, ``unlink``,
``glob``, ...) so the code that names output files serves both.

Commit semantics are the same everywhere: a file is written under a hidden
temporary name and ``commit`` gives it its final name. Locally that is
``fsync`` + ``os.replace`` (a rename, atomic). An object store has no rename;
there ``commit`` is a server-side copy to the final key then a delete of the
temporary key (``FileSystem.move``), and a copy creates the destination object
whole or not at all, so a reader never sees a partial object under a final
name. (Writing straight to the final key would not do: pyarrow's output stream
completes the upload when it is closed, also when closed by an error
handler, which would publish a partial object.)
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Union
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

# Not filesystems: sources.py streams these (an http GET, a command run without a shell).
STREAM_SCHEMES = ("http", "https", "pipe")
# Object stores pyarrow serves natively; their filesystem path is "bucket/key".
ARROW_SCHEMES = ("s3", "gs", "gcs")
GLOB_CHARS = "*?["


def _scheme(target: str) -> str:
    head, sep, _ = target.partition(":")
    # "pipe:cmd" has no "//"; a one-letter scheme is a Windows drive, not a URI.
    if head == "pipe" and sep:
        return "pipe"
    return head.lower() if "://" in target and len(head) > 1 else ""


def is_fs_uri(target) -> bool:
    """A URI of a filesystem other than the local one (``s3://``, ``gs://``, ``memory://``, ...)."""
    if not isinstance(target, (str, RemotePath)):
        return False
    return isinstance(target, RemotePath) or _scheme(target) not in ("", "file", *STREAM_SCHEMES)


def is_local(target) -> bool:
    """A local path (``str``/``Path``) or a ``file://`` URI."""
    return isinstance(target, Path) or (isinstance(target, str) and _scheme(target) in ("", "file"))


@dataclass(frozen=True)
class _Store:
    """One filesystem and how its paths map to URIs and back."""

    fs: pafs.FileSystem
    to_path: Callable[[str], str]  # URI -> filesystem path
    to_uri: Callable[[str], str]  # filesystem path -> URI
    has_folders: bool  # False for object stores: a "folder" is a key prefix and needs no creating


def _s3_filesystem(netloc: str) -> pafs.FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        # from_uri looks up the bucket's region, which a plain S3FileSystem would not.
        return pafs.FileSystem.from_uri(f"s3://{netloc}")[0]
    # Built explicitly so that pyarrow versions that do not read AWS_ENDPOINT_URL themselves
    # still reach an S3-compatible store; credentials still come from the default chain.
    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs = {"region": region} if region else {}
    return pafs.S3FileSystem(endpoint_override=parts.netloc, scheme=parts.scheme, **kwargs)


def _store(scheme: str, netloc: str) -> _Store:
    """The filesystem serving ``scheme://netloc``; one per process (S3 clients are costly to make).

    Keyed by pid too: a DataLoader worker forked from a process that already used a
    store must not share its S3 client (connection pools and threads do not survive a fork).
    """
    return _make_store(scheme, netloc, os.getpid())


@lru_cache(maxsize=None)
def _make_store(scheme: str, netloc: str, pid: int) -> _Store:
    if scheme in ARROW_SCHEMES:
        fs = _s3_filesystem(netloc) if scheme == "s3" else pafs.FileSystem.from_uri(f"{scheme}://{netloc}")[0]
        prefix = f"{scheme}://"
        return _Store(fs, lambda uri: uri[len(prefix):].split("?", 1)[0].rstrip("/"), lambda path: prefix + path, False)
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec comes with torch
        raise ValueError(f"{scheme}:// needs fsspec (pip install fsspec and the package for {scheme})") from exc
    try:
        spec_fs = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"no filesystem for {scheme}:// ({exc})") from exc
    return _Store(pafs.PyFileSystem(pafs.FSSpecHandler(spec_fs)), lambda uri: spec_fs._strip_protocol(uri).rstrip("/"),
                  spec_fs.unstrip_protocol, True)  # fmt: skip


class RemotePath:
    """A file or folder on a non-local filesystem, with the few pathlib methods the pipeline uses."""

    __slots__ = ("store", "path")

    def __init__(self, store: _Store, path: str):
        self.store = store
        self.path = path.rstrip("/")

    @classmethod
    def from_uri(cls, uri: str) -> "RemotePath":
        parts = urlsplit(uri)
        store = _store(parts.scheme.lower(), parts.netloc)
        return cls(store, store.to_path(uri))

    # -- names -------------------------------------------------------------------------
    def __str__(self) -> str:
        return self.store.to_uri(self.path)

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, name: str) -> "RemotePath":
        return RemotePath(self.store, f"{self.path}/{name}")

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.store, self.path.rsplit("/", 1)[0]) if "/" in self.path else self

    def with_name(self, name: str) -> "RemotePath":
        return self.parent / name

    # -- queries (one request each) ------------------------------------------------------
    def _info(self) -> pafs.FileInfo:
        return self.store.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def stat(self) -> SimpleNamespace:
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(str(self))
        return SimpleNamespace(st_size=info.size)

    def listing(self) -> list[pafs.FileInfo]:
        """The folder's direct entries: one listing (paged by the store, not one request per entry)."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        return self.store.fs.get_file_info(selector)

    def iterdir(self) -> list["RemotePath"]:
        return [RemotePath(self.store, info.path) for info in self.listing()]

    def glob(self, pattern: str) -> list["RemotePath"]:
        """Entries of this folder whose name matches ``pattern`` (one level, no ``/``), from one listing."""
        if "/" in pattern:
            raise ValueError(f"only one-level patterns are supported on {self}, got {pattern!r}")
        return [p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern)]

    # -- changes ---------------------------------------------------------------------------
    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        if self.store.has_folders:
            self.store.fs.create_dir(self.path, recursive=parents)
            return
        # A prefix needs no creating, but its bucket must exist: say so now, once, rather
        # than through every shard's failed upload.
        bucket = self.path.split("/", 1)[0]
        if self.store.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"bucket {self.store.to_uri(bucket)} does not exist (or is not visible)")

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.store.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError:
            # Some stores report a missing key as a generic error: look before deciding.
            if not (missing_ok and not self.exists()):
                raise

    def read_bytes(self) -> bytes:
        with self.store.fs.open_input_stream(self.path) as handle:
            return handle.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)


AnyPath = Union[Path, RemotePath]


def location(target: str | Path | RemotePath) -> AnyPath:
    """``Path`` for a local path or ``file://`` URI, ``RemotePath`` for a filesystem URI."""
    if isinstance(target, (Path, RemotePath)):
        return target
    target = str(target)
    scheme = _scheme(target)
    if scheme == "":
        return Path(target)
    if scheme == "file":
        return Path(urlsplit(target).path)
    if scheme in STREAM_SCHEMES:
        raise ValueError(f"{target!r} is a stream, not a filesystem location")
    return RemotePath.from_uri(target)


def absolute(target: str | Path | RemotePath) -> str:
    """The location as a string that means the same from any process: local paths made absolute."""
    loc = location(target)
    return str(loc.resolve() if isinstance(loc, Path) else loc)


def folder_of(source: str) -> str | None:
    """The absolute folder holding a file source (local or remote), None for streams (http, pipe)."""
    if not (is_local(source) or is_fs_uri(source)):
        return None
    return absolute(location(source).parent)


def arrow_target(target: str | Path | RemotePath) -> tuple[str, pafs.FileSystem | None]:
    """``(path, filesystem)`` for pyarrow's ``filesystem=`` arguments; filesystem None for local paths."""
    loc = location(target)
    return (str(loc), None) if isinstance(loc, Path) else (loc.path, loc.store.fs)


def open_input_stream(target) -> pa.NativeFile:
    """A sequential reader (what the tar reader needs); closing it closes the connection."""
    loc = location(target)
    if isinstance(loc, Path):
        return pa.OSFile(str(loc), "rb")
    return loc.store.fs.open_input_stream(loc.path)


def open_input_file(target):
    """A random-access source for pyarrow (Parquet footers, row groups): the path itself when local."""
    loc = location(target)
    return str(loc) if isinstance(loc, Path) else loc.store.fs.open_input_file(loc.path)


def open_output(target):
    """A binary writer for a temporary file (``commit`` moves it into place)."""
    loc = location(target)
    if isinstance(loc, Path):
        return open(loc, "wb")
    return loc.store.fs.open_output_stream(loc.path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: AnyPath, final: AnyPath) -> None:
    """Give a complete temporary file its final name, atomically for readers of the final name.

    Local: ``fsync`` the file, ``os.replace`` (atomic rename), ``fsync`` the folder.
    Object store: ``move`` = server-side copy (the destination appears whole) + delete.
    """
    if isinstance(tmp, Path) and isinstance(final, Path):
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return
    if not (isinstance(tmp, RemotePath) and isinstance(final, RemotePath) and tmp.store is final.store):
        raise ValueError(f"cannot commit {tmp} to {final}: not on one filesystem")
    tmp.store.fs.move(tmp.path, final.path)


def names_in(folders: set[AnyPath] | list[AnyPath]) -> dict[str, set[str]]:
    """``str(folder) -> names of its files``, one listing per folder (a missing folder lists empty).

    Resume reads thousands of done markers this way: a request per shard would
    cost minutes on an object store.
    """
    out: dict[str, set[str]] = {}
    for folder in folders:
        if isinstance(folder, Path):
            out[str(folder)] = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
        else:
            out[str(folder)] = {i.base_name for i in folder.listing() if i.type == pafs.FileType.File}
    return out


def expand(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """A remote spec -> sorted file URIs, listing at most once and only when needed.

    ``.../name.tar`` (a name ending in one of ``suffixes``) is taken as is, without
    a request, so a brace range of 100,000 shards costs nothing here; a pattern
    in the last component (``s3://b/shards/*.tar``) lists its folder and matches
    names; anything else is a folder whose matching files are listed. Hidden
    names (the writer's temporaries) are skipped.
    """
    loc = location(uri)
    if not isinstance(loc, RemotePath):
        raise ValueError(f"{uri!r} is not a remote filesystem URI")
    if any(ch in loc.name for ch in GLOB_CHARS):
        if any(ch in str(loc.parent) for ch in GLOB_CHARS):
            raise ValueError(f"{uri}: patterns are only supported in the last path component")
        found = [p for p in loc.parent.glob(loc.name) if p.name.endswith(suffixes)]
    elif loc.name.endswith(suffixes):
        return [uri]
    else:
        found = [p for p in loc.iterdir() if p.name.endswith(suffixes)]
    return sorted(str(p) for p in found if not p.name.startswith("."))


__all__ = ["RemotePath", "absolute", "arrow_target", "commit", "expand", "folder_of", "is_fs_uri", "is_local",
           "location", "names_in", "open_input_file", "open_input_stream", "open_output"]  # fmt: skip
