"""Retry delays: exponential, full jitter, capped in seconds, and ``Retry-After`` honoured.

Full jitter (a uniform draw between 0 and the exponential ceiling) keeps a fleet of delegates
from retrying in step after a control plane outage. A server's ``Retry-After`` is a floor.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

#: Never wait longer than this for a Retry-After, whatever the server says.
MAX_RETRY_AFTER = 300.0


@dataclass
class Backoff:
    base: float = 0.5
    cap: float = 30.0
    rand: Callable[[], float] = random.random
    attempt: int = 0

    def next(self, retry_after: float | None = None) -> float:
        """The delay before the next try (and count this failure)."""
        ceiling = min(self.cap, self.base * 2**self.attempt)
        self.attempt += 1
        delay = float(self.rand() * ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        return delay

    def reset(self) -> None:
        self.attempt = 0


def transient_backoff() -> Backoff:
    """Connection errors and 5xx: start fast, settle at half a minute."""
    return Backoff(base=0.5, cap=30.0)


def auth_backoff() -> Backoff:
    """Refused credentials: retry slowly (minutes), but never give up (no crash loop)."""
    return Backoff(base=5.0, cap=120.0)
