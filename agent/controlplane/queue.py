"""The task queue: creating tasks, handing them out through long polls, and every task's end.

The queue lives in the store, not here: a long poll claims from it (:meth:`Store.claim`, atomic
across replicas), and each transition of a task (done, re-queued, cancelled) is a conditional write
that names the state, lease and lease number it was decided on. What this process keeps is only
who is waiting: long polls wait on an event that a :class:`TaskQueued` announcement sets (from this
process, or from another replica through the store), and, where the store says wakeups can be
missed, they look at the queue again every ``poll_backstop`` seconds anyway.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from agent.controlplane.clock import ts
from agent.controlplane.failures import ApiFailure, failure_document
from agent.controlplane.metrics import ControlPlaneMetrics
from agent.controlplane.routing import CONNECTED, describe_tags, normalise_tags
from agent.controlplane.settings import ControlPlaneSettings
from agent.controlplane.store import (
    DelegateRow,
    Store,
    StoreEvent,
    TaskDone,
    TaskQueued,
    TaskRow,
    eligible,
    with_updates,
)
from agent.protocol.auth import Clock
from agent.protocol.errors import Code
from agent.protocol.models import TASK_TYPE_AWS_VALIDATE, AcquireResponse, Task, TaskView
from agent.protocol.results import ValidationResult, harness_result

#: The OIDC token for a task hand-out, or None (agent/controlplane/oidc.py): (task, delegate id) -> token.
TokenMinter = Callable[[TaskRow, str], "str | None"]
#: Signs a lease hand-out for its delegate (detached signature over the task's canonical bytes).
TaskSigner = Callable[[Task], str]
#: What a finished connector test says about its connector: (task, status, result, lease id).
ConnectorResult = Callable[[TaskRow, str, ValidationResult, str | None], Awaitable[None]]
#: Reads a delegate again by id (None once it is gone).
Refresh = Callable[[str], Awaitable[DelegateRow | None]]

log = structlog.get_logger("controlplane")


@dataclass
class _Waiter:
    delegate: DelegateRow
    event: asyncio.Event = field(default_factory=asyncio.Event)
    #: What woke it: passed on to another waiter if this one takes nothing.
    woken_by: TaskQueued | None = None

    def wants(self, e: TaskQueued) -> bool:
        return e.type in self.delegate.task_types and set(e.selectors) <= set(self.delegate.tags)


def task_deadline(t: TaskRow) -> float:
    """When a task stops being worth running: its pickup window plus its execution budget after creation.

    By default 30 s + 120 s, the 150 s a ``connector test`` waits for its result. A task given back by
    a delegate that shuts down is re-queued before this, and fails after it.
    """
    return t.created_at + t.pickup_timeout + t.timeout_seconds


class TaskQueue:
    """Tasks from creation to their one accepted end."""

    def __init__(
        self,
        store: Store,
        settings: ControlPlaneSettings,
        metrics: ControlPlaneMetrics,
        clock: Clock,
        *,
        to_wall: Callable[[float], float],
        task_signer: TaskSigner | None,
        task_tokens: TokenMinter | None = None,
    ) -> None:
        self.store, self.settings, self.metrics, self._clock = store, settings, metrics, clock
        self._to_wall = to_wall
        self._task_signer = task_signer
        #: Mints the OIDC token a hand-out carries (OidcAuthentication connectors), given the task and who runs it.
        self.task_tokens: TokenMinter = task_tokens or (lambda row, delegate_id: None)
        self._waiters: list[_Waiter] = []
        self._done_events: dict[str, asyncio.Event] = {}
        #: Told each finished connector test inside its transaction (the owner wires connector health).
        self.on_connector_result: ConnectorResult = self._last_test
        store.subscribe(self._heard)

    async def _last_test(self, t: TaskRow, status: str, result: ValidationResult, lease_id: str | None) -> None:
        assert t.connector_id is not None
        await self.store.update_connector(
            t.connector_id,
            last_task_id=t.id,
            last_status=status,
            last_tested_at=result.tested_at.timestamp(),  # when the test ran, not when its result arrived
            last_delegate_name=t.delegate_name if lease_id else None,
            last_error_summary=result.error_summary if status != "SUCCESS" else None,
        )

    # --- wakeups -----------------------------------------------------------------------------

    def _heard(self, event: StoreEvent) -> None:
        if isinstance(event, TaskDone):
            done = self._done_events.pop(event.task_id, None)
            if done is not None:
                done.set()
        else:
            self._wake_one(event)

    def _wake_one(self, e: TaskQueued) -> None:
        """Wake one long-polling delegate that can take it (the one waiting longest)."""
        for w in self._waiters:
            if not w.event.is_set() and w.wants(e):
                w.woken_by = e
                w.event.set()
                return

    def wake_delegate(self, delegate_id: str) -> None:
        """A delegate's own long poll looks again (it registered again, its state changed)."""
        for w in self._waiters:
            if w.delegate.id == delegate_id:
                w.event.set()

    def wake_all(self) -> None:
        for w in self._waiters:
            w.event.set()

    async def acquire(
        self, d: DelegateRow, limit: int, wait_seconds: float, *, gone: Callable[[], bool], refresh: Refresh
    ) -> AcquireResponse:
        """Lease up to ``limit`` tasks to ``d``, holding the request open up to ``wait_seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(wait_seconds, self.settings.poll_wait_seconds + 5)
        backstop = self.store.poll_backstop
        while True:
            if d.state == "draining":
                return AcquireResponse(tasks=[])
            # Listen first, then look: a task announced while the claim is on its way to the store (an
            # await, with Postgres) wakes this waiter instead of being lost until the backstop poll.
            waiter = _Waiter(d)
            self._waiters.append(waiter)
            try:
                tasks = await self.take(d, limit)
                if tasks:
                    return AcquireResponse(tasks=tasks)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return AcquireResponse(tasks=[])
                try:
                    async with asyncio.timeout(remaining if backstop is None else min(remaining, backstop)):
                        await waiter.event.wait()
                except TimeoutError:
                    if loop.time() >= deadline:
                        return AcquireResponse(tasks=[])
            finally:
                self._waiters.remove(waiter)
            if gone():
                # The delegate hung up while we waited: lease nothing into a closed socket, and hand
                # the wakeup on so the task still reaches someone.
                self._pass_on(waiter)
                return AcquireResponse(tasks=[])
            refreshed = await refresh(d.id)
            if refreshed is None:
                self._pass_on(waiter)
                raise ApiFailure(404, Code.UNKNOWN_DELEGATE, f"unknown delegate {d.id}: register again")
            d = refreshed
            if d.state == "draining":
                self._pass_on(waiter)

    def _pass_on(self, waiter: _Waiter) -> None:
        if waiter.woken_by is not None:
            self._wake_one(waiter.woken_by)

    async def take(self, d: DelegateRow, limit: int) -> list[Task]:
        now = self._clock()
        rows = await self.store.claim(d, limit, now=now, lease_seconds=self.settings.lease_seconds)
        return [self._wire_task(t) for t in rows]

    def _wire_task(self, t: TaskRow) -> Task:
        """The lease hand-out, signed for the delegate it was just leased to.

        The signature expires with the first lease: a delegate that has not started the task by
        then has lost it anyway (the task is re-queued), and a renewed lease runs on regardless.
        """
        assert t.lease_id is not None and t.lease_expires_at is not None and t.delegate_id is not None
        # The delegate compares these with its wall clock: after a stall this process's steady
        # clock runs behind the wall clock, so say them in wall time.
        lease_expires = ts(self._to_wall(t.lease_expires_at))
        task = Task(
            task_id=t.id,
            lease_id=t.lease_id,
            type=t.type,
            payload=t.payload,
            created_at=ts(t.created_at),
            lease_seconds=self.settings.lease_seconds,
            lease_expires_at=lease_expires,
            timeout_seconds=t.timeout_seconds,
            attempt=t.attempts,
            delegate_id=t.delegate_id,
            signature_expires_at=lease_expires,
            oidc_token=self.task_tokens(t, t.delegate_id),
        )
        if self._task_signer is None:
            return task
        return msgspec.structs.replace(task, signature=self._task_signer(task))

    # --- tasks -------------------------------------------------------------------------------

    async def create_task(
        self,
        *,
        type: str,
        payload: dict[str, Any],
        selectors: Iterable[str] = (),
        connector_id: str | None = None,
        pickup_timeout: float | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        on_platform: bool = False,
        trigger: str | None = None,
    ) -> TaskRow:
        """Queue a task; ``on_platform`` creates it running here instead, never seen by a delegate."""
        now = self._clock()
        pickup = pickup_timeout or self.settings.pickup_timeout_seconds
        row = TaskRow(
            id="tsk_" + secrets.token_hex(10),
            type=type,
            payload=payload,
            selectors=normalise_tags(selectors),
            connector_id=connector_id,
            state="running" if on_platform else "queued",
            created_at=now,
            pickup_timeout=pickup,
            pickup_deadline=now + pickup,
            timeout_seconds=timeout or self.settings.task_timeout_seconds,
            attempts=1 if on_platform else 0,
            max_attempts=max_attempts or self.settings.max_attempts,
            delegate_name="platform" if on_platform else None,
            started_at=now if on_platform else None,
            trigger=trigger,
        )
        async with self.store.transaction():
            await self.store.insert_task(row)
            if not on_platform:
                self.store.announce(TaskQueued(row.type, row.selectors))
        return row

    async def get_task(self, task_id: str) -> TaskRow:
        t = await self.store.get_task(task_id)
        if t is None:
            raise ApiFailure(404, Code.NOT_FOUND, f"unknown task {task_id}")
        return t

    async def wait_task(self, task_id: str, timeout: float) -> TaskRow:
        """The task once it is done, or as it is when ``timeout`` runs out."""
        if timeout <= 0:
            return await self.get_task(task_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        backstop = self.store.poll_backstop
        # The event is shared by everyone waiting for this task and removed when the task ends (_heard):
        # a wait that gives up leaves it in place, or another waiter would never hear the end.
        while True:
            # Listen first, then read: the task ending during the read still wakes this wait.
            event = self._done_events.setdefault(task_id, asyncio.Event())
            t = await self.get_task(task_id)
            remaining = deadline - loop.time()
            if t.state == "done" or remaining <= 0:
                return t
            try:
                async with asyncio.timeout(remaining if backstop is None else min(remaining, backstop)):
                    await event.wait()
            except TimeoutError:
                pass

    async def cancel_task(self, task_id: str) -> TaskRow:
        t = await self.get_task(task_id)
        if t.state == "queued":
            return await self.complete(
                t,
                status="FAILURE",
                result=failure_document("The task was cancelled before any delegate picked it up.", reason="cancelled"),
                failure_reason="cancelled",
            )
        if t.state == "running":
            if not await self.store.update_task(t.id, expect=t.expect, cancel_requested=True):
                self.stale(t, "cancellation")
                return await self.get_task(task_id)
            t = with_updates(t, cancel_requested=True)
        return t

    def task_view(self, t: TaskRow) -> TaskView:
        return TaskView(
            task_id=t.id,
            type=t.type,
            state=t.state,  # type: ignore[arg-type]
            status=t.status,  # type: ignore[arg-type]
            selectors=list(t.selectors),
            connector_id=t.connector_id,
            created_at=ts(t.created_at),
            completed_at=ts(t.completed_at) if t.completed_at else None,
            attempts=t.attempts,
            delegate_id=t.delegate_id,
            delegate_name=t.delegate_name,
            failure_reason=t.failure_reason,
            result=t.result,
            harness=(
                harness_result(t.result, task_id=t.id)
                if t.result is not None and t.type == TASK_TYPE_AWS_VALIDATE
                else None
            ),
        )

    # --- transitions -------------------------------------------------------------------------

    def stale(self, t: TaskRow, what: str) -> None:
        """A transition found the task no longer as it was read: nothing was changed.

        With a shared store that is another replica getting there first, which is normal; with a
        store this process owns alone it means something else writes to it.
        """
        if self.store.shared:
            log.debug("controlplane.transition_lost", task_id=t.id, transition=what, expected_state=t.state)
            return
        log.error(
            "controlplane.stale_transition",
            task_id=t.id,
            transition=what,
            expected_state=t.state,
            hint="the database changed under this process (a second control plane on the same data?)",
        )

    async def complete(
        self,
        t: TaskRow,
        *,
        status: str,
        result: ValidationResult,
        lease_id: str | None = None,
        failure_reason: str | None = None,
    ) -> TaskRow:
        """End a task with ``result``, if it is still as ``t`` says (else nothing changes)."""
        now = self._clock()
        values = {
            "state": "done",
            "status": status,
            "result": result,
            "result_lease_id": lease_id,
            "failure_reason": failure_reason,
            "completed_at": now,
            "lease_expires_at": None,
        }
        async with self.store.transaction():
            if t.state == "done" or not await self.store.update_task(t.id, expect=t.expect, **values):
                self.stale(t, "completion")
                return t
            if t.connector_id:  # what the test says about its connector lands with the result
                await self.on_connector_result(t, status, result, lease_id)

            def announce() -> None:  # only once the result is stored
                self.metrics.task_completed(status, failure_reason)
                log.info(
                    "controlplane.task_done",
                    task_id=t.id,
                    status=status,
                    delegate=t.delegate_name,
                    reason=failure_reason,
                )

            self.store.after_commit(announce)
            self.store.announce(TaskDone(t.id))
        return with_updates(t, **values)

    async def requeue(self, t: TaskRow, *, reason: str, count_attempt: bool = True) -> None:
        """Put a running task back in the queue (or fail it when it used its last attempt)."""
        attempts = t.attempts if count_attempt else max(0, t.attempts - 1)
        if count_attempt and attempts >= t.max_attempts:
            await self.complete(
                t,
                status="FAILURE",
                result=failure_document(
                    f"The delegate {t.delegate_name} stopped responding while running the task "
                    f"({attempts} attempt(s); last: {reason}).",
                    reason="delegate_lost",
                ),
                failure_reason="delegate_lost",
            )
            return
        now = self._clock()
        values = {
            "state": "queued",
            "lease_id": None,
            "delegate_id": None,
            "lease_expires_at": None,
            "started_at": None,
            "attempts": attempts,
            "pickup_deadline": now + t.pickup_timeout,
        }
        async with self.store.transaction():
            if not await self.store.update_task(t.id, expect=t.expect, **values):
                self.stale(t, "re-queue")
                return
            await self.store.bump("requeued")
            self.store.announce(TaskQueued(t.type, t.selectors))
            self.store.after_commit(
                lambda: log.info("controlplane.task_requeued", task_id=t.id, reason=reason, attempts=attempts)
            )

    async def fail_unpicked(self, t: TaskRow, delegates: list[DelegateRow]) -> None:
        async with self.store.transaction():
            done = await self.complete(
                t,
                status="FAILURE",
                result=failure_document(explain_unpicked(t, delegates), reason="no_eligible_delegate"),
                failure_reason="no_eligible_delegate",
            )
            if done.state == "done":
                await self.store.bump("unpicked")


def explain_unpicked(t: TaskRow, delegates: list[DelegateRow]) -> str:
    """Why nobody took a task, in the words a user needs to fix it."""
    selectors = list(t.selectors)
    connected = [d for d in delegates if d.state in CONNECTED]
    fits = [d for d in connected if eligible(t.type, t.selectors, d)]
    wanted = f"[{', '.join(selectors)}]"
    waited = f"{t.pickup_timeout:.0f}s"
    if not connected:
        return f"No delegate is connected, so nobody picked up the task within {waited}."
    if not fits:
        if selectors:
            return f"no connected delegate has all of the tags {wanted} (waited {waited}). {describe_tags(connected)}"
        return f"no connected delegate supports tasks of type {t.type} (waited {waited})."
    names = ", ".join(sorted(d.name for d in fits))
    return (
        f"Eligible delegates [{names}] did not pick up the task within {waited}: they may be busy "
        "(all slots in use), draining, or have lost connectivity."
    )
