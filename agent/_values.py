"""Parsing small values from strings (environment variables, query parameters) with bounds."""

from __future__ import annotations

import urllib.parse


def parse_bounded(raw: str, lo: float, hi: float, *, integer: bool = False) -> float | None:
    """The number in ``raw`` if it is one and within [lo, hi]; otherwise None."""
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        return None
    return value if lo <= value <= hi else None


def bounded_message(raw: str, lo: float, hi: float, *, integer: bool = False) -> str:
    kind = "a whole number" if integer else "a number"
    return f"must be {kind} from {lo:g} to {hi:g}, not {raw!r}"


def http_url(url: str) -> str:
    """``url`` without a trailing slash if it is an http(s) URL with a host; ValueError saying what it must be."""
    try:
        parsed = urllib.parse.urlsplit(url)
        ok = parsed.scheme in ("http", "https") and bool(parsed.hostname)
        _ = parsed.port  # a port that is not a number in range raises here
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"must be an http(s) URL with a host, not {url!r}")
    return url.rstrip("/")
