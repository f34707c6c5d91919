"""Task signatures on the delegate: the check the executor runs before any handler.

On top of the signature itself (agent/protocol/signing.py) it refuses a task leased to another
delegate, one whose signature expired, and one already started here under the same lease. The
memory of started (task id, lease id) pairs lives in this process only, and need not outlive it:
a restarted delegate registers as a new instance and gets a new delegate id, so every task signed
for the old process is refused as "signed for another delegate".
"""

from __future__ import annotations

import heapq
import time

from agent.protocol.auth import CLOCK_LEEWAY_SECONDS, Clock
from agent.protocol.models import Task
from agent.protocol.signing import Refusal, TaskSignatureVerifier
from agent.runtime.executor import TaskCheck

#: (task id, lease id) pairs remembered at once. A pair is forgotten when its signature expires
#: (lease seconds + clock leeway after the hand-out, 90 s by default), so this holds a delegate
#: taking 360 tasks a second; past it, tasks are refused rather than risking a replay.
REPLAY_MEMORY_ENTRIES = 32_768


class TaskGuard:
    """Runs a task only if the control plane signed it for this delegate, recently, and only once."""

    def __init__(
        self,
        verifier: TaskSignatureVerifier,
        *,
        clock: Clock = time.time,
        leeway: float = CLOCK_LEEWAY_SECONDS,
        capacity: int = REPLAY_MEMORY_ENTRIES,
    ) -> None:
        self._verify = verifier
        self._clock = clock
        self._leeway = leeway
        self._capacity = capacity
        #: Started pairs -> when their signature is no longer accepted anyway (a heap to forget them).
        self._started: dict[tuple[str, str], float] = {}
        self._forget_at: list[tuple[float, tuple[str, str]]] = []

    def __call__(self, task: Task, *, delegate_id: str) -> Refusal | None:
        refusal = self._verify(task)
        if refusal is not None:
            return refusal
        assert task.signature_expires_at is not None  # the verifier refuses a signature without one
        if task.delegate_id != delegate_id:
            return Refusal(
                "other_delegate",
                f"refused: the task was signed for another delegate ({task.delegate_id}), not this one "
                f"({delegate_id or 'not registered'}): a task replayed from another delegate",
                "the task was not run, and it is not reported: its lease belongs to the other delegate",
            )
        now = self._clock()
        self._forget(now)
        pair = (task.task_id, task.lease_id)
        if pair in self._started:
            return Refusal(
                "replayed",
                f"refused: task {task.task_id} already ran on this delegate under lease {task.lease_id}: "
                "a replayed task",
                "the task was not run again, and it is not reported: the first run reports its lease",
            )
        expires = task.signature_expires_at.timestamp()
        if now > expires + self._leeway:
            return Refusal(
                "expired",
                f"refused: the task's signature expired at {task.signature_expires_at:%Y-%m-%d %H:%M:%S}Z, "
                f"{now - expires:.0f}s ago ({self._leeway:g}s are allowed for clock skew): a task replayed "
                "or delivered late, or the control plane's clock and this delegate's disagree",
                "the task was not run; check that the control plane's host and this delegate's node keep time "
                f"(NTP): their clocks may differ by {self._leeway:g}s at most",
            )
        if len(self._started) >= self._capacity:
            return Refusal(
                "replay_memory_full",
                f"refused: this delegate already remembers {self._capacity} tasks started within their "
                "signatures' lifetime, and cannot tell a replay from a new task",
                "the task was not run; the control plane hands out tasks faster than one delegate should take them",
            )
        self._started[pair] = expires + self._leeway
        heapq.heappush(self._forget_at, (expires + self._leeway, pair))
        return None

    def _forget(self, now: float) -> None:
        """Drop the pairs whose signature would be refused as expired anyway."""
        while self._forget_at and self._forget_at[0][0] < now:
            _, pair = heapq.heappop(self._forget_at)
            self._started.pop(pair, None)

    def __len__(self) -> int:
        return len(self._started)


def task_check_from_key(public_key: str | None, *, clock: Clock = time.time) -> TaskCheck | None:
    """None when no key is configured (tasks are not checked); otherwise the guard."""
    if public_key is None:
        return None
    return TaskGuard(TaskSignatureVerifier(public_key), clock=clock)
