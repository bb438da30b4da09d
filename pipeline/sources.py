"""Open a shard's source by its url: a binary stream whose every wait is bounded, never through a shell.

    local path, file:PATH   open()
    http://, https://       requests, streamed; (connect, read) timeouts from the config;
                            a status other than 200 or a body shorter than its Content-Length is an error
    pipe:CMD                CMD split with shlex and run as an argv (no shell: no pipes, redirections
                            or $VARS); stdout read with the read timeout; a non-zero exit is an error

    s3://, gs://, any       storage.py (pyarrow's S3/GCS filesystems, fsspec for other schemes;
    fsspec scheme           credentials and endpoints from the environment)

A scheme no opener serves (and no filesystem knows) is refused by name; an
opener for it goes into ``OPENERS``. Every failure to open or read is a ``ShardReadError``
naming the url; the worker turns it into a failed (and retried) shard.
webdataset's ``gopen`` is not used: it hands http(s) urls to ``curl`` through
``shell=True`` and has no read timeout.
"""
from __future__ import annotations

import os
import select
import shlex
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, Callable

from .redact import redact


class ShardReadError(RuntimeError):
    """The shard's source failed: unreachable, stalled, cut short, corrupt or in an unsupported format.

    Its message names the source with every credential masked (``redact``): it is logged and stored.
    """

    def __init__(self, message) -> None:
        super().__init__(redact(message))


@dataclass(frozen=True)
class Timeouts:
    connect: float = 30.0  # seconds to establish a connection (or start a command)
    read: float = 60.0  # seconds any single read may wait for data


def scheme(url: str) -> str:
    """``'https'``, ``'pipe'``, ``'s3'``, ... or ``'file'`` for a local path."""
    if url.startswith("pipe:"):
        return "pipe"
    head, sep, _ = url.partition("://")
    if sep and head.isalnum():
        return head.lower()
    return "file"


def local_path(url: str) -> str | None:
    """The filesystem path of a local source (a path or ``file:`` url), else None."""
    if scheme(url) != "file":
        return None
    if url.startswith("file://"):
        return url[len("file://"):]
    return url[len("file:"):] if url.startswith("file:") else url


def is_remote(url: str) -> bool:
    return scheme(url) != "file"


# -- local files -------------------------------------------------------------------------
def _open_file(url: str, timeouts: Timeouts) -> BinaryIO:
    try:
        return open(local_path(url), "rb")  # noqa: SIM115 - the reader closes it
    except OSError as exc:
        raise ShardReadError(f"{url}: cannot open: {exc.strerror or exc}") from None


class _GuardedStream:
    """A source's byte stream whose read errors (timeout, connection cut, short body, a key gone) become
    ShardReadError naming the url. ``read_some(n)`` reads up to n bytes, n None meaning to the end."""

    def __init__(self, url: str, read_some: Callable[[int | None], bytes], close: Callable[[], None]):
        self.url = url
        self.read_some, self.close = read_some, close

    def read(self, n: int = -1) -> bytes:
        try:
            return self.read_some(n if n and n > 0 else None)
        except Exception as exc:  # noqa: BLE001 - urllib3's, pyarrow's and fsspec's errors alike
            raise ShardReadError(f"{self.url}: read failed: {type(exc).__name__}: {exc}") from None


# -- http(s) -----------------------------------------------------------------------------
def _http_stream(url: str, response) -> _GuardedStream:
    """The body of a streamed response (decode_content=False: we asked for identity; a tar is
    compressed by its own format)."""
    return _GuardedStream(url, lambda n: response.raw.read(n, decode_content=False), response.close)


def _open_http(url: str, timeouts: Timeouts) -> _GuardedStream:
    try:
        import requests  # only http(s) shards need it: a local run imports nothing more
    except ImportError:
        raise ShardReadError(f"{url}: http(s) shards need the 'requests' package (pip install requests)") from None
    try:
        response = requests.get(url, stream=True, timeout=(timeouts.connect, timeouts.read),
                                headers={"Accept-Encoding": "identity"})  # fmt: skip
    except requests.RequestException as exc:
        raise ShardReadError(f"{url}: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        response.close()
        raise ShardReadError(f"{url}: HTTP {response.status_code} {response.reason}")
    return _http_stream(url, response)


# -- pipe: commands ----------------------------------------------------------------------
class _PipeStream:
    """stdout of a command run without a shell; ``close`` reaps it and reports a failed exit."""

    def __init__(self, url: str, argv: list[str], timeouts: Timeouts):
        self.url = url
        self.timeouts = timeouts
        # stderr to a file: a pipe nobody reads could fill and stall the command.
        self.stderr = tempfile.TemporaryFile()
        try:
            # A session of its own, so the command and anything it starts are ended together.
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr,
                                         start_new_session=True)  # fmt: skip
        except OSError as exc:
            self.stderr.close()
            raise ShardReadError(f"{url}: cannot run {argv[0]!r}: {exc.strerror or exc}") from None
        self.fd = self.proc.stdout.fileno()
        self.eof = False

    def read(self, n: int = -1) -> bytes:
        if self.eof:
            return b""
        ready, _, _ = select.select([self.fd], [], [], self.timeouts.read)
        if not ready:
            self._kill()
            raise ShardReadError(f"{self.url}: no data for {self.timeouts.read:g} s (read timeout)")
        data = os.read(self.fd, n if n and n > 0 else 1 << 20)
        self.eof = not data
        return data

    def _kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session we started, by its id
            except (ProcessLookupError, PermissionError):
                pass

    def close(self) -> None:
        finished = self.eof
        if not finished:
            self._kill()  # stopped early (an error upstream): the rest of the output is not wanted
        try:
            code = self.proc.wait(timeout=self.timeouts.read)
        except subprocess.TimeoutExpired:
            self._kill()
            code = self.proc.wait(timeout=self.timeouts.read)
        finally:
            self.proc.stdout.close()
        self.stderr.seek(0)
        message = self.stderr.read()[-500:].decode("utf-8", "replace").strip()
        self.stderr.close()
        if finished and code != 0:
            raise ShardReadError(f"{self.url}: command exited with status {code}" + (f": {message}" if message else ""))


# -- object stores and other filesystems (storage.py) ------------------------------------
def _open_storage(url: str, timeouts: Timeouts) -> _GuardedStream:
    """A storage.py input stream (pyarrow's S3/GCS filesystems, fsspec for other schemes)."""
    from . import storage  # pyarrow.fs (and fsspec) only for runs that read from a filesystem URI

    try:
        stream = storage.open_input_stream(url)
        return _GuardedStream(url, stream.read, stream.close)
    except (OSError, ValueError) as exc:
        raise ShardReadError(f"{url}: cannot open: {type(exc).__name__}: {exc}") from None


def _open_pipe(url: str, timeouts: Timeouts) -> _PipeStream:
    try:
        argv = shlex.split(url[len("pipe:"):])
    except ValueError as exc:
        raise ShardReadError(f"{url}: cannot parse the command: {exc}") from None
    if not argv:
        raise ShardReadError(f"{url}: empty command")
    return _PipeStream(url, argv, timeouts)


OPENERS: dict[str, Callable[[str, Timeouts], BinaryIO]] = {
    "file": _open_file,
    "http": _open_http,
    "https": _open_http,
    "pipe": _open_pipe,
    "s3": _open_storage,
    "gs": _open_storage,
    "gcs": _open_storage,
}


def _opener(url: str) -> Callable[[str, Timeouts], BinaryIO] | None:
    """The opener for ``url``'s scheme: OPENERS, else storage.py for any scheme fsspec knows."""
    opener = OPENERS.get(scheme(url))
    if opener is not None:
        return opener
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme(url))
    except (ImportError, ValueError):
        return None
    return _open_storage


def check_url(url: str) -> None:
    """Raise ValueError for a url no opener handles (checked before a run starts)."""
    if _opener(url) is None:
        raise ValueError(f"unsupported shard source {redact(url)!r}: no opener or filesystem for {scheme(url)}:// "
                         f"(supported: local paths, file:, http://, https://, pipe:, s3://, gs://, "
                         f"fsspec URIs)")  # fmt: skip


def open_source(url: str, timeouts: Timeouts = Timeouts()) -> BinaryIO:
    """A readable binary stream of the shard at ``url``; close it to reap and check the source."""
    check_url(url)
    return _opener(url)(url, timeouts)


__all__ = ["OPENERS", "ShardReadError", "Timeouts", "check_url", "is_remote", "local_path", "open_source", "scheme"]
