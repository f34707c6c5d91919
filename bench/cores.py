"""One core for the process being measured, the other core(s) for everything else.

CPU time per operation is not a fixed cost on a shared machine: a process that is switched out
for a neighbour loses its caches and pays again when it resumes. Measured on the bench machine
(2 cores, 2026-12), the SDK's floor alone against the canned AWS spent 1.50-1.77 ms per
validation; with two busy loops beside it, 1.70-1.99 ms. The delegate is measured with the
control plane, the AWS stand-in and the bench itself all busy beside it, the floor with only the
stand-in, so without pinning the comparison is skewed against the delegate by about that much.
Pinning both to a core of their own, with everything else on the other, makes the two alike.

Linux only (``sched_setaffinity``); with fewer than two cores it does nothing and says so.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


def _set(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` (a thread keeps the affinity it was started with)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, cpus)


@dataclass
class Split:
    """Which cores are whose; ``active`` is False where pinning is not possible (then nothing moved)."""

    active: bool
    measured: set[int] = field(default_factory=set)
    rest: set[int] = field(default_factory=set)
    _moved: list[int] = field(default_factory=list)

    def measure(self, pid: int) -> None:
        """Put ``pid`` (all its threads) on the measured core."""
        if self.active:
            _set(pid, self.measured)
            self._moved.append(pid)

    def aside(self, pid: int) -> None:
        """Put ``pid`` (all its threads) on the other cores."""
        if self.active:
            _set(pid, self.rest)
            self._moved.append(pid)


@contextlib.contextmanager
def split(measured: Iterable[int] = (), aside: Iterable[int] = ()) -> Iterator[Split]:
    """Pin ``measured`` to the first core and ``aside`` (and this process) to the others; undo on exit."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(available) < 2 or not Path("/proc/self/task").is_dir():
        yield Split(active=False)
        return
    everything = set(available)
    s = Split(active=True, measured={available[0]}, rest=set(available[1:]))
    for pid in measured:
        s.measure(pid)
    for pid in (*aside, os.getpid()):
        s.aside(pid)
    try:
        yield s
    finally:
        for pid in s._moved:
            _set(pid, everything)
