"""Parsing small values from strings (environment variables, query parameters) with bounds."""

from __future__ import annotations


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
