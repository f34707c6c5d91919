"""Runs leased tasks: one asyncio task each, isolated, bounded, renewed, cancellable, always reported.

Whatever happens to a task (its handler returns, raises, times out, is cancelled by the control
plane, or the task type is unknown), exactly one result is written to the outbox, unless the lease
was lost, in which case the control plane would refuse it anyway. A task stopped because this
delegate shuts down (:meth:`Executor.give_back_all`) is not a result: its lease is released, so the
control plane re-queues it for another delegate. One task's crash never touches another: each
handler runs in its own asyncio task and every exception is caught at that boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from agent.observability.metrics import AgentMetrics
from agent.protocol.client import ControlPlaneClient
from agent.protocol.errors import LeaseFenced, ProtocolError
from agent.protocol.models import Task, TaskResult
from agent.protocol.results import Redact, ValidationResult, failure_result
from agent.protocol.signing import Refusal
from agent.protocol.wire import TaskStatus
from agent.runtime.outbox import Entry, Outbox
from agent.runtime.state import AgentState, RunningTask
from agent.taskapi import InvalidTask, TaskContext, TaskHandler

log = structlog.get_logger("agent.executor")

#: After cancelling a handler, how long to wait for it to unwind before reporting anyway.
UNWIND_SECONDS = 5.0
#: How early a lease renewal may run: below asyncio's timer resolution, so the keeper never spins.
_DUE_SLACK = 0.001
#: How long a shutting-down delegate keeps trying to give a task back (all tasks at once). Short,
#: because it comes out of the shutdown grace; and if it fails nothing is lost: deregistering hands
#: the task back too, and failing that its lease expires and re-queues it.
RELEASE_SECONDS = 2.0


class TaskCheck(Protocol):
    """Checks a task before it runs (agent/runtime/signing.py); returns why to refuse it, or None.

    ``delegate_id`` is the id this delegate registered as: a signed task names the delegate it was
    leased to, and runs nowhere else.
    """

    def __call__(self, task: Task, *, delegate_id: str) -> Refusal | None: ...


class Slots:
    """Capacity. The poller reserves every free slot *before* it asks for work, so it never asks for
    work it cannot start (and never asks while full); the slots it gets tasks for become busy, the
    rest go back. A finished task gives its slot back.

    ``busy`` counts slots running a task; ``polling`` counts slots a long poll in flight holds for
    work it may or may not get. Nothing runs in those: they are free in truth (``free``), only not
    available to another poll (``available``).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.busy = 0
        self.polling = 0
        self._freed = asyncio.Event()

    @property
    def free(self) -> int:
        """Slots not running a task (a waiting poll's reservation included)."""
        return self.capacity - self.busy

    @property
    def available(self) -> int:
        """Slots a new poll may reserve."""
        return self.capacity - self.busy - self.polling

    def reserve(self, n: int) -> None:
        """A poll holds ``n`` slots while it waits for work."""
        if n > self.available:
            raise RuntimeError(f"reserving {n} slots with only {self.available} available")
        self.polling += n

    def claim(self, n: int) -> None:
        """``n`` reserved slots got tasks: they are busy until each task finishes."""
        if n > self.polling:
            raise RuntimeError(f"claiming {n} slots with only {self.polling} reserved")
        self.polling -= n
        self.busy += n

    def unreserve(self, n: int) -> None:
        """The poll ended without work for ``n`` of its slots."""
        self.polling -= n
        self._freed.set()

    def release(self, n: int = 1) -> None:
        """``n`` tasks finished."""
        self.busy -= n
        self._freed.set()

    async def wait_available(self, at_least: int = 1, linger: float = 0.0) -> int:
        """Wait for a slot; then, for up to ``linger`` seconds more, for ``at_least`` of them.

        The linger lets a saturated delegate ask for several tasks in one poll instead of one poll
        per finished task (the poller decides when that is worth it).
        """
        while self.available <= 0:
            self._freed.clear()
            await self._freed.wait()
        if self.available < at_least and linger > 0:
            try:
                async with asyncio.timeout(linger):
                    while self.available < at_least:
                        self._freed.clear()
                        await self._freed.wait()
            except TimeoutError:
                pass
        return self.available


@dataclass
class _Job:
    """One leased task on this delegate: its handler's asyncio task and why it may be stopped."""

    task: Task
    work: asyncio.Task[ValidationResult] | None = None
    cancel_reason: str | None = None
    lease_lost: bool = False
    #: Stopped because this delegate shuts down: give the task back instead of reporting a result.
    give_back: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    #: The lease's renewal interval (a third of the lease, as the control plane last said).
    interval: float = 0.0


class Executor:
    def __init__(
        self,
        *,
        handlers: Mapping[str, TaskHandler],
        client: ControlPlaneClient,
        outbox: Outbox,
        slots: Slots,
        state: AgentState,
        metrics: AgentMetrics,
        redact: Redact,
        check: TaskCheck | None = None,
    ) -> None:
        self._handlers = dict(handlers)
        self._client = client
        self._outbox = outbox
        self._slots = slots
        self._state = state
        self._metrics = metrics
        self._redact = redact
        self._check = check
        self._runs: dict[str, _Job] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        #: Lease renewals due: (loop time, sequence, task id), one timer for all running tasks.
        self._due: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._keeper: asyncio.Task[None] | None = None
        self._keeper_wake = asyncio.Event()

    @property
    def task_types(self) -> list[str]:
        return sorted(self._handlers)

    @property
    def in_flight(self) -> list[str]:
        return list(self._runs)

    def start(self, task: Task) -> None:
        """Run a leased task; its slot is already taken and is released when it finishes."""
        if self._check is not None:
            # Before the task is registered anywhere: a replay of a running task must not touch it.
            refusal = self._check(task, delegate_id=self._state.delegate_id or "")
            if refusal is not None:
                self._refuse(task, refusal)
                return
        run = _Job(task)
        self._runs[task.task_id] = run
        self._idle.clear()
        job = asyncio.create_task(self._run(run), name=f"task-{task.task_id}")
        self._jobs.add(job)  # keep a reference until it finishes
        job.add_done_callback(self._jobs.discard)

    def cancel(self, task_id: str, reason: str) -> bool:
        run = self._runs.get(task_id)
        if run is None:
            return False
        if run.cancel_reason is None:
            run.cancel_reason = reason
        if run.work is not None and not run.work.done():
            run.work.cancel(reason)
        return True

    def cancel_all(self, reason: str) -> int:
        return sum(self.cancel(task_id, reason) for task_id in list(self._runs))

    def give_back_all(self, reason: str) -> int:
        """Stop every running task and release its lease, so the control plane re-queues it.

        A handler that still finishes while it unwinds reports its result as usual; one that is
        cut short is given back, never reported: a delegate shutting down is no verdict on the task.
        """
        for run in self._runs.values():
            # One already being stopped for another reason (a cancel, a timeout) still reports it.
            run.give_back = run.cancel_reason is None
        return self.cancel_all(reason)

    async def wait_idle(self, timeout: float) -> bool:
        """True when nothing is running (within ``timeout`` seconds)."""
        if not self._runs:
            return True
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    # --- one task ----------------------------------------------------------------------------

    async def _run(self, run: _Job) -> None:
        task = run.task
        loop = asyncio.get_running_loop()
        started_wall = datetime.now(UTC)
        started = loop.time()
        self._state.running[task.task_id] = RunningTask(task.task_id, task.type, task.lease_id, started, task.attempt)
        self._metrics.labelled(self._metrics.tasks_started, task.type).inc()
        self._metrics.pickup_latency.observe(max(0.0, time.time() - task.created_at.timestamp()))
        run.interval = max(0.05, task.lease_seconds / 3)
        self._schedule_renewal(run, run.interval * random.uniform(0.8, 1.0))  # noqa: S311 - jitter, not crypto
        outcome_kind = "error"
        output: ValidationResult
        try:
            # This asyncio task's own context (a copy made when it was created): bound here, the
            # fields reach every line the task and its handler log, and go with the task.
            structlog.contextvars.bind_contextvars(task_id=task.task_id, task_type=task.type, attempt=task.attempt)
            outcome_kind, output = await self._execute(run, loop)
            if outcome_kind == "cancelled" and run.give_back and not run.lease_lost:
                await self._give_back(task, run.cancel_reason or "the delegate is shutting down")
                self._metrics.tasks_completed.labels(task.type, "released").inc()
                return
            status: TaskStatus = "SUCCESS" if outcome_kind == "success" else "FAILURE"
            output = self._redact(output)
            finished = datetime.now(UTC)
            seconds = loop.time() - started
            if run.lease_lost:
                log.warning(
                    "task.result_dropped",
                    reason="lease lost: the control plane gave the task to another delegate",
                    duration_ms=round(seconds * 1000),
                )
            else:
                self._outbox.put(
                    Entry(
                        task.task_id,
                        TaskResult(
                            lease_id=task.lease_id,
                            status=status,
                            output=output,
                            started_at=started_wall,
                            finished_at=finished,
                        ),
                    )
                )
            self._metrics.labelled(self._metrics.tasks_completed, task.type, outcome_kind).inc()
            self._metrics.labelled(self._metrics.task_duration, task.type).observe(seconds)
            _summary(task, outcome_kind, status, output, seconds)
        except Exception:
            # The boundary: nothing a task does may escape into the delegate.
            log.exception("task.executor_error", task_id=task.task_id)
        finally:
            self._state.running.pop(task.task_id, None)
            self._runs.pop(task.task_id, None)
            self._slots.release()
            run.done.set()
            if not self._runs:
                self._idle.set()
                self._due.clear()  # nothing left to renew: the keeper ends
                self._keeper_wake.set()

    async def _execute(self, run: _Job, loop: asyncio.AbstractEventLoop) -> tuple[str, ValidationResult]:
        task = run.task
        handler = self._handlers.get(task.type)
        if handler is None:
            return "invalid", self._failure(
                "invalid_task",
                f"this delegate cannot run tasks of type {task.type!r} (it runs: "
                f"{', '.join(self.task_types) or 'nothing'})",
                step="dispatch",
            )
        ctx = TaskContext(
            task_id=task.task_id,
            type=task.type,
            payload=task.payload,
            delegate_id=self._state.delegate_id or "",
            delegate_name=self._state.name,
            timeout=task.timeout_seconds,
            attempt=task.attempt,
            oidc_token=task.oidc_token,
        )
        run.work = asyncio.create_task(handler(ctx), name=f"work-{task.task_id}")
        if run.cancel_reason is not None:  # cancelled before it even started
            run.work.cancel()
        if not await _finished(run.work, task.timeout_seconds):
            run.cancel_reason = run.cancel_reason or "timeout"
            run.work.cancel()
            await _finished(run.work, UNWIND_SECONDS)
        if run.cancel_reason is not None and (run.work.cancelled() or not run.work.done()):
            if run.cancel_reason == "timeout":
                return "timeout", self._failure(
                    "timeout",
                    f"the task did not finish within its timeout of {task.timeout_seconds:g}s",
                    step="execute",
                    hint="the task was stopped; check what the handler waits on",
                )
            return "cancelled", self._failure("cancelled", f"cancelled: {run.cancel_reason}", step="execute")
        if run.work.cancelled():
            return "cancelled", self._failure("cancelled", "cancelled", step="execute")
        exc = run.work.exception()
        if isinstance(exc, InvalidTask):
            return "invalid", self._failure(
                "invalid_task", f"invalid task: {exc}", step="dispatch", problems=[(exc.field, exc.message)]
            )
        if exc is not None:
            log.error("task.handler_crashed", error_type=type(exc).__name__, exc_info=exc)
            return "error", self._failure(
                "internal",
                f"the handler failed with {type(exc).__name__}",
                step="execute",
                hint="a bug in the delegate; see its log",
            )
        result = run.work.result()
        return ("success" if result.status == "SUCCESS" else "failure"), result

    def _refuse(self, task: Task, refusal: Refusal) -> None:
        """A task that fails its check never runs: a FAILURE naming why, reported when that is safe.

        Reported only under a lease that is this delegate's and that no run of ours reports: a
        replayed copy of a running task, or of one whose result waits in the outbox, must not
        replace the genuine result. Whatever is not reported is still logged and counted.
        """
        try:
            output = self._redact(
                self._failure("invalid_task", refusal.message, step="verify_signature", hint=refusal.hint)
            )
            reported = refusal.lease_is_ours and not self._lease_reported(task.lease_id)
            if reported:
                now = datetime.now(UTC)
                result = TaskResult(
                    lease_id=task.lease_id, status="FAILURE", output=output, started_at=now, finished_at=now
                )
                self._outbox.put(Entry(task.task_id, result))
            # A refused task's type is not trusted: only the types this delegate runs become labels.
            label = task.type if task.type in self._handlers else "unknown"
            self._metrics.tasks_completed.labels(label, "invalid").inc()
            log.warning(
                "task.refused",
                task_id=task.task_id,
                task_type=task.type,
                attempt=task.attempt,
                status="FAILURE",
                reason=refusal.reason,
                error=output.error_summary,
                hint=refusal.hint,
                reported=reported,
            )
        except Exception:
            log.exception("task.executor_error", task_id=task.task_id)
        finally:
            self._slots.release()

    def _lease_reported(self, lease_id: str) -> bool:
        """Whether a run of ours holds this lease, or its result waits in the outbox."""
        if any(run.task.lease_id == lease_id for run in self._runs.values()):
            return True
        return any(entry.key == lease_id for entry in self._outbox.pending(limit=len(self._outbox)))

    async def _give_back(self, task: Task, reason: str) -> None:
        """Release the task's lease (the control plane re-queues it), retrying briefly.

        The control plane decides what the task becomes: queued again without spending an attempt,
        or a FAILURE when the task's own deadline has passed. A release that cannot be delivered
        loses nothing: deregistering hands the task back as well, and its lease would expire anyway.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RELEASE_SECONDS
        delay = 0.1
        while True:
            try:
                async with asyncio.timeout(max(0.05, deadline - loop.time())):
                    await self._client.release_lease(task.lease_id)
            except LeaseFenced:
                log.info("task.release_not_needed", reason="the lease was already gone")
                return
            except (ProtocolError, TimeoutError) as exc:
                transient = isinstance(exc, TimeoutError) or exc.transient
                if transient and loop.time() + delay < deadline:
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not crypto
                    delay = min(1.0, delay * 2)
                    continue
                log.warning(
                    "task.release_failed",
                    error=str(exc) or "timed out",
                    hint="the control plane re-queues the task when this delegate deregisters or the lease expires",
                )
                return
            log.info("task.given_back", reason=reason, hint="the control plane re-queues it for another delegate")
            return

    def _failure(
        self,
        category: str,
        message: str,
        *,
        step: str,
        hint: str | None = None,
        problems: Iterable[tuple[str, str]] = (),
    ) -> ValidationResult:
        return failure_result(
            category,
            message,
            step=step,
            hint=hint,
            problems=problems,
            delegate_id=self._state.delegate_id,
            delegate_name=self._state.name,
        )

    # --- lease renewal: one keeper for every running task -------------------------------------

    def _schedule_renewal(self, run: _Job, delay: float) -> None:
        """Renew ``run``'s lease in ``delay`` seconds. One keeper task sleeps until the earliest
        renewal for all running tasks: most tasks finish long before their first renewal, and a
        task and a timer of its own each cost more than the validation's bookkeeping."""
        due = asyncio.get_running_loop().time() + delay
        earliest = self._due[0][0] if self._due else None
        heapq.heappush(self._due, (due, next(self._seq), run.task.task_id))
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep_leases(), name="lease-keeper")
        elif earliest is None or due < earliest:
            self._keeper_wake.set()

    async def _keep_leases(self) -> None:
        loop = asyncio.get_running_loop()
        while self._due:
            self._keeper_wake.clear()
            wait = self._due[0][0] - loop.time()
            # asyncio may wake a timer up to its clock resolution early: a remainder below a
            # millisecond counts as due, or the keeper would spin on zero-length waits (and, on a
            # virtual clock that only moves when the loop is idle, never get past them).
            if wait > _DUE_SLACK:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._keeper_wake.wait()
                continue
            _, _, task_id = heapq.heappop(self._due)
            run = self._runs.get(task_id)
            if run is not None and not run.done.is_set():
                # Each renewal is its own request: a slow control plane must not hold up the others.
                job = asyncio.create_task(self._renew(run), name=f"renew-{task_id}")
                self._jobs.add(job)
                job.add_done_callback(self._jobs.discard)

    async def _renew(self, run: _Job) -> None:
        """Renew the lease once; stop the task if the lease is lost or cancelled, else schedule the next."""
        task = run.task
        try:
            lease = await self._client.renew_lease(task.lease_id)
        except LeaseFenced:
            run.lease_lost = True
            self.cancel(task.task_id, "the lease was lost (the control plane reassigned the task)")
            return
        except ProtocolError as exc:
            # Try again soon: two missed renewals in a row must not cost the lease.
            delay = max(0.05, min(1.0, run.interval / 3))
            log.warning("task.lease_renewal_failed", error=str(exc), retry_in=round(delay, 2))
            if not run.done.is_set():
                self._schedule_renewal(run, delay)
            return
        if lease.cancel_requested:
            self.cancel(task.task_id, "cancelled by the control plane")
            return
        run.interval = max(0.05, lease.lease_seconds / 3)
        if not run.done.is_set():
            self._schedule_renewal(run, run.interval * random.uniform(0.8, 1.0))  # noqa: S311 - jitter, not crypto


async def _finished(work: asyncio.Task[Any], timeout: float) -> bool:
    """Whether ``work`` is done within ``timeout`` seconds; it is not cancelled here. One future and
    one timer: ``asyncio.wait`` builds sets, a waiter and a callback per awaitable for the general case."""
    if work.done():
        return True
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: object) -> None:
        if not waiter.done():
            waiter.set_result(None)

    work.add_done_callback(wake)
    timer = loop.call_later(timeout, wake, None)
    try:
        await waiter
    finally:
        timer.cancel()
        work.remove_done_callback(wake)
    return work.done()


def _summary(task: Task, outcome: str, status: str, output: ValidationResult, seconds: float) -> None:
    """The one line per task: enough to know what happened without reading the result."""
    failure, identity = output.failure, output.identity
    fields: dict[str, Any] = {
        "task_id": task.task_id,
        "task_type": task.type,
        "status": status,
        "outcome": outcome,
        "duration_ms": round(seconds * 1000),
        "attempt": task.attempt,
    }
    for key, value in (
        ("connector", output.connector_identifier),
        ("credential_type", output.credential_type),
        ("region", output.test_region),
        ("identity", identity.arn if identity else None),
        ("failed_step", failure.step if failure else None),
        ("category", failure.category if failure else None),
        ("aws_error_code", failure.aws_error_code if failure else None),
        ("error", output.error_summary),
    ):
        if value:
            fields[key] = value
    (log.info if status == "SUCCESS" else log.warning)("task.finished", **fields)
