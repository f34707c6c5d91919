"""Failed authentications per client address, so guessing credentials gets slow and cheap to refuse;
and a repeated refusal logged once a second, so a flood of them cannot fill the log.

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


class OncePerSecond:
    """Which repeats of an event to log: the first for a key, then one a second at most, with a count.

    :meth:`held_back` answers None for a repeat within the second (count it, do not log it), else how
    many were held back since the last line. Keys are kept in least-recently-seen order and bounded
    in number, as :class:`FailureLimiter`'s addresses are.
    """

    def __init__(self, clock: Clock, *, interval: float = 1.0, max_keys: int = 10_000) -> None:
        self._clock = clock
        self._interval = interval
        self._max = max_keys
        #: key -> (when it was last logged, repeats held back since)
        self._keys: OrderedDict[tuple[str, ...], tuple[float, int]] = OrderedDict()

    def __len__(self) -> int:
        """Keys remembered (up to ``max_keys``)."""
        return len(self._keys)

    def held_back(self, *key: str) -> int | None:
        now = self._clock()
        logged = self._keys.get(key)
        if logged is not None and now - logged[0] < self._interval:
            self._keys[key] = (logged[0], logged[1] + 1)
            self._keys.move_to_end(key)
            return None
        self._keys[key] = (now, 0)
        self._keys.move_to_end(key)
        while len(self._keys) > self._max:
            self._keys.popitem(last=False)
        return logged[1] if logged is not None else 0
