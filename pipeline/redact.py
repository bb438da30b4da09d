"""Secrets out of everything the pipeline stores or prints: ``redact(text)``.

A shard's source may carry a credential: ``http://user:PASSWORD@host/00000.tar``, a presigned
object-store URL (``?X-Amz-Credential=...&X-Amz-Signature=...``), a ``?token=``, or, the webdataset
idiom for gated Hugging Face datasets, ``pipe:curl -H 'Authorization:Bearer hf_...' URL``. The
source is opened as given, but whatever is written down (Parquet footers, stats, settings, the
summary, log lines, error messages, the gallery) goes through ``redact`` first:

- every URL in the text keeps its scheme, host, port and path; its userinfo becomes ``***@``,
  each query value ``***`` (the names stay, so a reader sees which parameters were there) and a
  fragment ``***``;
- a ``pipe:`` command keeps its program and the URLs and tar paths among its arguments (URLs
  redacted), not its options or headers: ``pipe:curl ... https://host/00000.tar``;
- ``Authorization:``/``Cookie:`` header values and ``Bearer`` tokens anywhere else in the text
  become ``***``.

Redacting is idempotent, and two sources that differ only in their secrets redact alike, so checks
that compare recorded sources (resume) compare the redacted forms.
"""
from __future__ import annotations

import re
import shlex
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
_TARS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
# scheme://anything up to whitespace or a quote or bracket (how a URL ends inside a message)
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]+")
_HEADER = re.compile(r"(?i)\b(authorization|proxy-authorization|cookie|x-api-key|x-auth-token)(\s*[:=]\s*)[^'\"\n]+")
_BEARER = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}")


def redact_url(url: str) -> str:
    """``url`` with its userinfo, query values and fragment masked (anything unparsable: masked whole
    after the scheme)."""
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        netloc = f"{MASK}@{host}" if "@" in parts.netloc else parts.netloc
        query = "&".join(f"{k}={MASK}" if v or "=" in pair else k
                         for pair in parts.query.split("&") if pair
                         for k, v in [pair.partition("=")[::2]])
        fragment = MASK if parts.fragment else ""
        return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))
    except ValueError:
        return url.split("://", 1)[0] + "://" + MASK


def _redact_pipe(command: str) -> str:
    try:
        words = shlex.split(command)
    except ValueError:
        return f"pipe:{MASK}"
    if not words:
        return "pipe:"
    urls = [redact_url(w) if _URL.fullmatch(w) else w for w in words[1:]
            if _URL.fullmatch(w) or (w.endswith(_TARS) and not w.startswith("-") and "@" not in w)]
    rest = len(words) - 1 - len(urls)
    return "pipe:" + " ".join([words[0].rsplit("/", 1)[-1], *(["..."] if rest else []), *urls])


def _split_command(text: str) -> tuple[str, str]:
    """``"CMD: message"`` -> (CMD, ": message"): the first ``": "`` outside the command's quotes."""
    pos = 0
    while True:
        cut = text.find(": ", pos)
        head = text if cut < 0 else text[:cut]
        try:
            shlex.split(head)
            return head, ("" if cut < 0 else text[cut:])
        except ValueError:  # the ": " is inside a quoted argument ('Authorization: Bearer ...')
            if cut < 0:
                return text, ""
            pos = cut + 2


def redact(text) -> str:
    """``text`` (a source, a message, any string) with every credential in it masked; see the module."""
    text = str(text)
    before, sep, after = text.partition("pipe:")
    if sep:  # a pipe: command, alone or inside a message: mask its options, then what follows it
        command, rest = _split_command(after)
        return redact(before) + _redact_pipe(command) + redact(rest)
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    text = _HEADER.sub(lambda m: m.group(1) + m.group(2) + MASK, text)
    return _BEARER.sub(lambda m: m.group(1) + m.group(2) + MASK, text)


__all__ = ["MASK", "redact", "redact_url"]
