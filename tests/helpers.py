"""Test helpers: waiting on a condition with a deadline (never a fixed sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

#: How often a condition is looked at again: short enough not to slow a test down, long enough
#: not to starve the loop (or a subprocess) it is waiting on.
POLL_SECONDS = 0.01


async def wait_for(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Yield to the loop until ``condition()`` is truthy; fail with ``what`` after ``timeout`` seconds."""

    async def check() -> Any:
        return condition()

    return await wait_until(check, what, timeout, every=POLL_SECONDS)


async def wait_until(
    condition: Callable[[], Awaitable[Any]], what: str | Callable[[], str], timeout: float = 10.0, *, every: float = 0.1
) -> Any:
    """Like :func:`wait_for` for a condition that must itself await (an HTTP call, a thread).

    Returns the first truthy value; the condition may raise to fail the wait at once. ``what`` may be
    a function, called only on failure, to describe the last state seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what if isinstance(what, str) else what()}")
        await asyncio.sleep(every)
