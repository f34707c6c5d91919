"""Leases: the delegate that holds a task renews it, gives it back, or reports its one result.

A lease is fenced twice: by its id, which is new at every hand-out, and by the task's lease
number (``lease_seq``), which only grows. Every write a lease makes (renew, release, result) names
both, so a delegate whose lease expired (and whose task another delegate now holds, perhaps through
another replica) changes nothing. Only the current lease's result is accepted, once; the same
result again is a harmless duplicate.
"""

from __future__ import annotations

import msgspec
import structlog

from agent.controlplane.clock import ts
from agent.controlplane.delegates import Registry
from agent.controlplane.failures import ApiFailure, failure_document
from agent.controlplane.metrics import ControlPlaneMetrics
from agent.controlplane.queue import TaskQueue, task_deadline
from agent.controlplane.settings import ControlPlaneSettings
from agent.controlplane.store import Store, TaskRow, with_updates
from agent.controlplane.tokens import Caller
from agent.protocol.auth import Clock
from agent.protocol.errors import Code
from agent.protocol.models import LeaseResponse, TaskResult

log = structlog.get_logger("controlplane")


class Leases:
    """Renewals, give-backs and results of leased tasks, and their deadlines."""

    def __init__(
        self,
        store: Store,
        settings: ControlPlaneSettings,
        metrics: ControlPlaneMetrics,
        clock: Clock,
        *,
        queue: TaskQueue,
        registry: Registry,
    ) -> None:
        self.store, self.settings, self.metrics, self._clock = store, settings, metrics, clock
        self._queue, self._registry = queue, registry

    async def _lease(self, lease_id: str, caller: Caller | None = None) -> TaskRow:
        now = self._clock()
        t = await self.store.task_by_lease(lease_id)
        if t is None:
            raise ApiFailure(
                409, Code.LEASE_FENCED, "the lease is no longer valid: the task expired, was reassigned or is finished"
            )
        await self._check_holder(t, caller)
        if (t.lease_expires_at or 0) < now:
            self.metrics.lease_expiries.inc()
            await self._queue.requeue(t, reason="lease expired before renewal")
            raise ApiFailure(409, Code.LEASE_FENCED, "the lease expired; the task went back to the queue")
        return t

    async def _check_holder(self, t: TaskRow, caller: Caller | None) -> None:
        """Refuse a lease or result call for a task leased to a delegate bound to another token."""
        if caller is None or t.delegate_id is None:
            return
        d = await self.store.get_delegate(t.delegate_id)
        if d is not None and d.token_name != caller.token_name:
            raise ApiFailure(
                403,
                Code.DELEGATE_TOKEN_MISMATCH,
                "this lease belongs to a delegate registered with another delegate token; "
                "only that token may renew, release or report it",
            )

    async def renew(self, lease_id: str, *, caller: Caller | None = None) -> LeaseResponse:
        t = await self._lease(lease_id, caller)
        expires = self._clock() + self.settings.lease_seconds
        if not await self.store.update_task(t.id, expect=t.expect, lease_expires_at=expires):
            self._queue.stale(t, "renewal")
            raise ApiFailure(409, Code.LEASE_FENCED, "the lease is no longer valid: the task changed meanwhile")
        t = with_updates(t, lease_expires_at=expires)
        if t.delegate_id:
            d = await self.store.get_delegate(t.delegate_id)
            if d is not None:
                await self._registry.touch(d)
        return LeaseResponse(
            lease_expires_at=ts(expires), lease_seconds=self.settings.lease_seconds, cancel_requested=t.cancel_requested
        )

    async def release(self, lease_id: str, *, caller: Caller | None = None) -> None:
        """The delegate gives a task back (draining): it re-queues at once, without using an attempt.

        Unless the task's own deadline (:func:`task_deadline`) has passed: nobody is waiting for
        it any more, so it fails instead of starting over on another delegate. A task someone asked
        to cancel is not re-queued either: it ends as cancelled.
        """
        t = await self._lease(lease_id, caller)
        if t.cancel_requested:  # someone cancelled it meanwhile: it ends here, whoever gave it back
            await self._queue.complete(
                t,
                status="FAILURE",
                result=failure_document("The task was cancelled while it ran.", reason="cancelled"),
                failure_reason="cancelled",
            )
            return
        deadline = task_deadline(t)
        if self._clock() < deadline:
            await self._queue.requeue(
                t, reason=f"given back by {t.delegate_name}, which is shutting down", count_attempt=False
            )
            return
        await self._queue.complete(
            t,
            status="FAILURE",
            result=failure_document(
                f"The delegate {t.delegate_name} shut down while running the task, and the task's deadline "
                f"({ts(deadline):%Y-%m-%d %H:%M:%S}Z) had passed, so it was not run again.",
                reason="cancelled",
            ),
            failure_reason="cancelled",
        )

    async def submit_result(self, task_id: str, result: TaskResult, *, caller: Caller | None = None) -> str:
        """Record a delegate's result; returns "accepted" or "duplicate" (idempotent per lease)."""
        t = await self.store.get_task(task_id)
        if t is None:
            raise ApiFailure(404, Code.NOT_FOUND, f"unknown task {task_id}")
        await self._check_holder(t, caller)
        if t.state == "done":
            if t.result_lease_id == result.lease_id:
                await self.store.bump("duplicate")
                return "duplicate"
            await self.store.bump("fenced")
            raise ApiFailure(409, Code.LEASE_FENCED, "the task was already completed under another lease")
        if t.state != "running" or t.lease_id != result.lease_id:
            await self.store.bump("fenced")
            raise ApiFailure(
                409,
                Code.LEASE_FENCED,
                "this lease no longer owns the task (it expired and the task was re-queued or reassigned)",
            )
        if (t.lease_expires_at or 0) < self._clock():
            await self.store.bump("fenced")
            self.metrics.lease_expiries.inc()
            await self._queue.requeue(t, reason="result arrived after the lease expired")
            raise ApiFailure(
                409, Code.LEASE_FENCED, "the lease expired before the result arrived; the task was re-queued"
            )
        # The task's status is the one the delegate reported for it; the document says the same.
        output = msgspec.structs.replace(result.output, status=result.status)
        async with self.store.transaction():  # the count and the result land together, or neither does
            done = await self._queue.complete(t, status=result.status, result=output, lease_id=result.lease_id)
            if done.state == "done":
                await self.store.bump("accepted")
        if done.state != "done":  # it changed between reading and writing (another replica ended it)
            await self.store.bump("fenced")
            raise ApiFailure(409, Code.LEASE_FENCED, "this lease no longer owns the task: it changed meanwhile")
        return "accepted"

    async def sweep(self, now: float) -> None:
        """Expire leases not renewed in time, and fail tasks running past their timeout."""
        for t in await self.store.overdue_tasks(now, self.settings.execution_grace_seconds):
            if (t.lease_expires_at or 0) < now:
                self.metrics.lease_expiries.inc()
                await self._queue.requeue(t, reason=f"lease held by {t.delegate_name} expired")
            elif t.started_at and now > t.started_at + t.timeout_seconds + self.settings.execution_grace_seconds:
                await self._queue.complete(
                    t,
                    status="FAILURE",
                    result=failure_document(
                        f"The delegate {t.delegate_name} did not finish the task within its timeout "
                        f"({t.timeout_seconds:.0f}s).",
                        reason="timeout",
                    ),
                    failure_reason="timeout",
                )
