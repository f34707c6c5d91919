"""Failed authentications per client address, so guessing credentials gets slow and cheap to refuse.

A fixed window on the control plane's clock: an address's first failure opens a window of
``window`` seconds; once it holds ``limit`` failures the address is refused (429) until the window
ends. Refused requests are not verified and do not count, so the window reopens on time. Each
address costs one small entry, kept in least-recently-failed order and bounded in number, so a
flood of addresses cannot grow the table.
"""

from __future__ import annotations

from collections import OrderedDict

from agent.protocol.auth import Clock


class FailureLimiter:
    """Counts failures per address; :meth:`retry_after` says how long a refused address waits."""

    def __init__(self, limit: int, window: float, clock: Clock, *, max_addresses: int = 10_000) -> None:
        self._limit = limit
        self._window = window
        self._clock = clock
        self._max = max_addresses
        #: address -> (when its window opened, failures in it)
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def __len__(self) -> int:
        """Addresses remembered (those with failures, up to ``max_addresses``)."""
        return len(self._windows)

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, or None when it may try now."""
        opened, failures = self._current(address)
        if failures < self._limit:
            return None
        return max(opened + self._window - self._clock(), 0.001)

    def failed(self, address: str) -> None:
        opened, failures = self._current(address)
        self._windows[address] = (opened, failures + 1)
        self._windows.move_to_end(address)
        while len(self._windows) > self._max:
            self._windows.popitem(last=False)

    def _current(self, address: str) -> tuple[float, int]:
        now = self._clock()
        opened, failures = self._windows.get(address, (now, 0))
        if now >= opened + self._window:
            self._windows.pop(address, None)
            return now, 0
        return opened, failures
