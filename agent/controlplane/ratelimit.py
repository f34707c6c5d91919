"""Failed authentications per client address, so guessing credentials gets slow and cheap to refuse.

A sliding window on the control plane's clock: an address with ``limit`` failures in the last
``window`` seconds is refused (429) until its oldest failure leaves the window. Refused requests
are not verified and do not count as failures, so the window reopens on time. Addresses are kept
in least-recently-failed order and the table is bounded, so a flood of addresses cannot grow it.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from agent.protocol.auth import Clock


class FailureLimiter:
    """Counts failures per address; :meth:`retry_after` says how long a refused address waits."""

    def __init__(self, limit: int, window: float, clock: Clock, *, max_addresses: int = 10_000) -> None:
        self._limit = limit
        self._window = window
        self._clock = clock
        self._max = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, or None when it may try now."""
        times = self._recent(address)
        if times is None or len(times) < self._limit:
            return None
        return max(times[0] + self._window - self._clock(), 0.001)

    def failed(self, address: str) -> None:
        times = self._recent(address)
        if times is None:
            times = self._failures[address] = deque(maxlen=self._limit)
        times.append(self._clock())
        self._failures.move_to_end(address)
        while len(self._failures) > self._max:
            self._failures.popitem(last=False)

    def _recent(self, address: str) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        cutoff = self._clock() - self._window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times
