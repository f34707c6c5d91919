"""The control plane's clock: wall-clock seconds that never jump and stop while the process stands still.

Deadlines (pickup, lease expiry, a delegate's silence) are about *elapsed* time, so they must not
move when someone steps the wall clock (NTP, a VM restore: +45 s failed a thousand queued tasks
before this). And time the control plane itself did not run (SIGSTOP, a frozen VM, a stop-the-world
pause) is time nobody could pick up a task or renew a lease: it should be given back, as a
restart gives it back. So the clock reads ``time.time()`` once, at start, then advances with
``time.monotonic()``, except for stalls: a ticker notes every half second that the event loop ran,
and a reading that finds the ticker silent for longer than ``stall_after`` seconds removes the
silence from the clock. Persisted times follow this clock; they are re-anchored to the wall clock
at every start (and :meth:`ControlPlane.recover` gives every deadline a fresh allowance then).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

log = structlog.get_logger("controlplane.clock")

#: How often the ticker notes that the event loop runs.
TICK_SECONDS = 0.5
#: A silence longer than this is a stall, not a busy loop.
STALL_AFTER_SECONDS = 5.0


class SteadyClock:
    """Call it for the time (wall seconds); ``start()`` its ticker inside the event loop."""

    def __init__(
        self,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        stall_after: float = STALL_AFTER_SECONDS,
    ) -> None:
        self._monotonic = monotonic
        self._offset = wall() - monotonic()
        self._stall_after = stall_after
        self._last_tick: float | None = None  # None until started: no ticker, no stall detection
        self._ticker: asyncio.Task[None] | None = None
        #: Seconds of stall removed so far (for the log and the tests).
        self.stalled_seconds = 0.0

    def __call__(self) -> float:
        mono = self._monotonic()
        if self._last_tick is not None:
            silent = mono - self._last_tick
            if silent > self._stall_after:
                # The loop did not run: nobody could act, so nobody's deadline should have run either.
                lost = silent - TICK_SECONDS
                self._offset -= lost
                self.stalled_seconds += lost
                self._last_tick = mono
                log.warning(
                    "controlplane.stalled",
                    seconds=round(lost, 1),
                    hint="the control plane did not run for this long (stopped, frozen or starved); "
                    "deadlines were extended by as much",
                )
        return self._offset + mono

    async def start(self) -> None:
        if self._ticker is None:
            self._last_tick = self._monotonic()
            self._ticker = asyncio.create_task(self._tick(), name="controlplane-clock")

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
            self._last_tick = None

    async def _tick(self) -> None:
        while True:
            self()  # a stall is noticed (and logged) here at the latest
            self._last_tick = self._monotonic()
            await asyncio.sleep(TICK_SECONDS)


def ts(value: float) -> datetime:
    """Seconds since the epoch as an aware UTC datetime (what the wire models carry)."""
    return datetime.fromtimestamp(value, UTC)
