"""Parsing small values from strings (environment variables, query parameters) with bounds, and
quoting a value back in a message without repeating all of it."""

from __future__ import annotations

import urllib.parse

#: How much of a value an error message repeats: enough to recognise it, not a megabyte of it.
QUOTE_LIMIT = 100


def clip(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text``, or its first ``limit`` characters, an ellipsis and how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\u2026 ({len(text):,} characters)"


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for a message, cut as :func:`clip` does: ``'abc\u2026' (5,000 characters)``."""
    if not isinstance(value, str):
        return clip(repr(value), limit)
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit] + chr(0x2026)!r} ({len(value):,} characters)"


def parse_bounded(raw: str, lo: float, hi: float, *, integer: bool = False) -> float | None:
    """The number in ``raw`` if it is one and within [lo, hi]; otherwise None."""
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        return None
    return value if lo <= value <= hi else None


def bounded_message(raw: str, lo: float, hi: float, *, integer: bool = False) -> str:
    kind = "a whole number" if integer else "a number"
    return f"must be {kind} from {lo:g} to {hi:g}, not {quoted(raw)}"


def http_url(url: str) -> str:
    """``url`` without a trailing slash if it is an http(s) URL with a host; ValueError saying what it must be."""
    try:
        parsed = urllib.parse.urlsplit(url)
        ok = parsed.scheme in ("http", "https") and bool(parsed.hostname)
        _ = parsed.port  # a port that is not a number in range raises here
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"must be an http(s) URL with a host, not {quoted(url)}")
    return url.rstrip("/")
