"""The control plane's behaviour, independent of HTTP: routing, leases, long polls, connectors.

Routing follows Harness: a task goes only to a connected delegate that supports its type and whose
tags (its name included, case-insensitively) contain **all** of the task's selectors. Leases fence
results: only the current lease's result is accepted, once; an expired lease re-queues the task
(bounded attempts). Every state change is written to SQLite before it is acted on, and
:meth:`ControlPlane.recover` rebuilds the in-memory index after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec
import structlog

from agent.aws.connector import AwsConnector, ConnectorInvalid, parse_actions, parse_connector
from agent.controlplane.clock import SteadyClock
from agent.controlplane.metrics import ControlPlaneMetrics
from agent.controlplane.store import (
    ConnectorRow,
    DelegateRow,
    Store,
    StoreUnavailable,
    TaskRow,
    connector_change,
    with_updates,
)
from agent.controlplane.tokens import Caller
from agent.protocol.auth import CLOCK_LEEWAY_SECONDS, DEFAULT_AUDIENCE, Clock
from agent.protocol.errors import Code
from agent.protocol.models import (
    TASK_TYPE_AWS_VALIDATE,
    AcquireRequest,
    AcquireResponse,
    ApplyResult,
    ConnectorRecord,
    DelegateView,
    HeartbeatRequest,
    HeartbeatResponse,
    Intervals,
    Latency,
    LeaseResponse,
    Problem,
    RegisterRequest,
    RegisterResponse,
    Stats,
    Task,
    TaskResult,
    TaskView,
    TestRequest,
    ValidationSummary,
)
from agent.protocol.results import ValidationResult, failure_result, harness_result

#: Signs a lease hand-out for its delegate (detached signature over the task's canonical bytes).
TaskSigner = Callable[[Task], str]

log = structlog.get_logger("controlplane")


class ApiFailure(Exception):
    """A request the control plane refuses; the HTTP layer turns it into an error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        problems: Iterable[Problem] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.problems = list(problems)
        self.retry_after = retry_after


@dataclass(frozen=True)
class ControlPlaneSettings:
    """Timings the control plane enforces and hands to every delegate at registration."""

    heartbeat_seconds: float = 10.0
    poll_wait_seconds: float = 20.0
    lease_seconds: float = 30.0
    #: A delegate silent this long is disconnected and its leases re-queue (default 3 heartbeats).
    disconnect_after_seconds: float | None = None
    #: How long a task may wait for an eligible delegate before it fails.
    pickup_timeout_seconds: float = 30.0
    #: Execution budget handed to the delegate (Harness: 2 minutes).
    task_timeout_seconds: float = 120.0
    max_attempts: int = 3
    #: After timeout plus this, a running task fails even if its lease is still renewed.
    execution_grace_seconds: float = 30.0
    sweep_interval_seconds: float = 0.5
    forget_disconnected_after_seconds: float = 6 * 3600.0
    keep_done_tasks_seconds: float = 7 * 86400.0
    audience: str = DEFAULT_AUDIENCE
    #: Failed authentications (delegate token or API key) one client address may make per window;
    #: beyond that it gets 429 with Retry-After until the window its first failure opened ends.
    auth_failure_limit: int = 1000
    auth_failure_window_seconds: float = 60.0
    #: Tolerated difference between a delegate's clock and this server's when checking request tokens.
    clock_leeway_seconds: float = CLOCK_LEEWAY_SECONDS

    @property
    def disconnect_after(self) -> float:
        return self.disconnect_after_seconds or 3 * self.heartbeat_seconds

    def intervals(self) -> Intervals:
        return Intervals(
            heartbeat_seconds=self.heartbeat_seconds,
            poll_wait_seconds=self.poll_wait_seconds,
            lease_seconds=self.lease_seconds,
        )


def ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def normalise_tags(tags: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t.strip().lower() for t in tags if t.strip()))


@dataclass
class _Waiter:
    delegate_id: str
    tags: frozenset[str]
    types: frozenset[str]
    event: asyncio.Event = field(default_factory=asyncio.Event)


QueueKey = tuple[str, frozenset[str]]

#: Delegate states that count as connected. The others: ``deregistered`` (it said goodbye) and
#: ``lost`` (it went silent); rows written before that distinction say ``disconnected`` (read: lost).
CONNECTED = frozenset({"running", "draining"})


class PlatformValidator(Protocol):
    """Runs a connector test inside the control plane (``executeOnDelegate: false``)."""

    async def __call__(
        self, connector: AwsConnector, task_id: str, permissions: tuple[str, ...]
    ) -> ValidationResult: ...

    async def aclose(self) -> None: ...


class ControlPlane:
    """Owner of the control plane's state; one per process."""

    def __init__(
        self,
        store: Store,
        settings: ControlPlaneSettings | None = None,
        *,
        clock: Clock | None = None,
        platform_validator: PlatformValidator | None = None,
        task_signer: TaskSigner | None = None,
        metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        self.store = store
        self.settings = settings or ControlPlaneSettings()
        self.metrics = metrics or ControlPlaneMetrics()
        # Deadlines run on a clock that wall-clock steps and stalls cannot move (controlplane/clock.py);
        # a test passes its own.
        self._steady = SteadyClock() if clock is None else None
        self._clock: Clock = clock or self._steady or time.time
        self._platform_validator = platform_validator
        self._task_signer = task_signer
        # In-memory index over the queued and running tasks (rebuilt by recover()).
        self._heaps: dict[QueueKey, list[tuple[float, str]]] = {}
        self._queued: dict[str, QueueKey] = {}
        self._running: dict[str, TaskRow] = {}
        self._waiters: list[_Waiter] = []
        self._done_events: dict[str, asyncio.Event] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.metrics.sample(queue=self._queue_depth, tasks=store.count_tasks, connected=self._connected)
        #: When each delegate was last heard, even if the disk refused to record it.
        self._seen: dict[str, float] = {}
        self._unindexed = 0
        self._reindexes = 0
        self._next_reindex_log = 0.0
        self._sweep_failing = False
        self._fault_seen = False
        # A write the disk refused was rolled back: what memory holds is rebuilt from what the disk holds.
        store.on_write_failure = self._reindex
        self.recover()

    # --- lifecycle ---------------------------------------------------------------------------

    def now(self) -> float:
        """The control plane's clock (wall seconds; a test's manual clock when one was given)."""
        return self._clock()

    def recover(self) -> None:
        """Rebuild the index from the database after a (re)start, without punishing anyone.

        Delegates could not heartbeat and leases could not be renewed while we were down, so both
        get a fresh allowance instead of expiring the moment we come back.
        """
        now = self._clock()
        self._heaps.clear()
        self._queued.clear()
        self._running.clear()
        with self.store.transaction():
            for d in self.store.delegates():
                if d.state in CONNECTED:
                    self.store.update_delegate(d.id, last_heartbeat=now)
            for queued in self.store.tasks_in_state("queued"):
                deadline = max(queued.pickup_deadline, now + queued.pickup_timeout)
                self.store.update_task(queued.id, pickup_deadline=deadline)
                self._enqueue(with_updates(queued, pickup_deadline=deadline))
            for running in self.store.tasks_in_state("running"):
                expires = max(running.lease_expires_at or 0.0, now + self.settings.lease_seconds)
                self.store.update_task(running.id, lease_expires_at=expires)
                self._running[running.id] = with_updates(running, lease_expires_at=expires)

    def _to_wall(self, when: float) -> float:
        """A time on this process's clock, said on the wall clock (the same unless a stall was removed)."""
        if self._steady is None:
            return when
        return when + (time.time() - self._steady())

    def _reindex(self) -> None:
        """Rebuild the queue and lease index from the database, writing nothing (after a failed write)."""
        self._heaps.clear()
        self._queued.clear()
        self._running.clear()
        for queued in self.store.tasks_in_state("queued"):
            self._enqueue(queued)
        for running in self.store.tasks_in_state("running"):
            if running.lease_id is not None:  # not a platform test, which runs in this process
                self._running[running.id] = running
        self._unindexed = self.store.count_leased() - len(self._running)  # damaged rows left out
        self._fault_seen = self._fault_seen or self.store.fault is not None
        mono = time.monotonic()
        self._reindexes += 1
        if mono >= self._next_reindex_log:  # a flapping disk must not flood the log
            log.warning(
                "controlplane.reindexed",
                queued=len(self._queued),
                running=len(self._running),
                reason=self.store.fault,
                times=self._reindexes,
            )
            self._reindexes = 0
            self._next_reindex_log = mono + 10.0

    def _after_fault(self) -> None:
        """The first thing done once the disk takes writes again, before any deadline is judged.

        Nobody could lease, heartbeat, renew or report while the disk refused: as after a restart,
        everyone gets their allowance back instead of failing for what was this server's fault.
        """
        if self._fault_seen and self.store.fault is None:
            self._fault_seen = False
            log.info("controlplane.store_recovered")
            self.recover()

    def _stale(self, t: TaskRow, what: str) -> None:
        """A transition found the task no longer as we knew it: change nothing, and re-read the truth."""
        log.error(
            "controlplane.stale_transition",
            task_id=t.id,
            transition=what,
            expected_state=t.state,
            hint="the database changed under this process (a second control plane on the same data?)",
        )
        self.store.after_commit(self._reindex)

    @property
    def write_fault(self) -> str | None:
        """Why the database refuses writes (disk full, I/O error), until one succeeds again."""
        return self.store.fault

    async def start(self) -> None:
        if self._steady is not None:
            await self._steady.start()
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="controlplane-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for w in self._waiters:
            w.event.set()
        if self._steady is not None:
            await self._steady.stop()

    async def _sweep_forever(self) -> None:
        while True:
            try:
                self.sweep()
                self._sweep_failing = False
            except StoreUnavailable as exc:
                if not self._sweep_failing:  # once per episode, not once per sweep
                    log.warning("controlplane.sweep_not_recorded", error=str(exc), hint="retried at every sweep")
                self._sweep_failing = True
            except Exception:
                log.exception("controlplane.sweep_failed")
            await asyncio.sleep(self.settings.sweep_interval_seconds)

    # --- delegates ---------------------------------------------------------------------------

    def register(self, req: RegisterRequest, *, caller: Caller | None = None) -> RegisterResponse:
        """Register (or register again) a delegate, bound to the token that signed the request.

        ``caller`` is None only for in-process callers (tests, the demo): the HTTP layer always
        passes the request's token, and the delegate stays bound to that token's name.
        """
        now = self._clock()
        existing = self.store.delegate_by_instance(req.instance_id)
        tags = normalise_tags([*req.tags, req.name])
        if caller is not None:
            self._check_scope(req, tags, caller)
            if existing is not None and existing.token_name not in (None, caller.token_name):
                self._rebind(existing, caller)
                existing = None
        delegate_id = existing.id if existing else "dlg_" + secrets.token_hex(8)
        row = DelegateRow(
            id=delegate_id,
            name=req.name,
            instance_id=req.instance_id,
            hostname=req.hostname,
            tags=tags,
            version=req.version,
            task_types=tuple(req.task_types),
            capacity=req.capacity,
            state="running",
            in_flight=existing.in_flight if existing else 0,
            token_name=caller.token_name if caller else existing.token_name if existing else None,
            registered_at=existing.registered_at if existing else now,
            last_heartbeat=now,
        )
        self.store.save_delegate(row)
        log.info(
            "controlplane.delegate_registered",
            delegate_id=delegate_id,
            delegate=req.name,
            tags=list(tags),
            token_name=row.token_name,
            again=existing is not None,
        )
        self._wake_for_delegate(row)
        return RegisterResponse(delegate_id=delegate_id, intervals=self.settings.intervals(), server_time=ts(now))

    def _check_scope(self, req: RegisterRequest, tags: tuple[str, ...], caller: Caller) -> None:
        """Refuse a registration whose name or tags the token's scope does not allow, naming them."""
        bad_name, bad_tags = caller.scope.refused(req.name, tags)
        if bad_name is None and not bad_tags:
            return
        refused, problems = [], []
        if bad_name is not None:
            refused.append(f"name {bad_name!r}")
            problems.append(Problem(field="name", message=f"{bad_name!r} is not allowed"))
        if bad_tags:
            refused.append(f"tags [{', '.join(bad_tags)}]")
            problems += [Problem(field="tags", message=f"{t!r} is not allowed") for t in bad_tags]
        raise ApiFailure(
            403,
            Code.TOKEN_SCOPE,
            f"delegate token {caller.token_name!r} may not register the {' or the '.join(refused)}: "
            f"it allows {caller.scope.describe()}",
            problems=problems,
        )

    def _rebind(self, existing: DelegateRow, caller: Caller) -> None:
        """Another token registers an instance: refused while the instance's own token still counts.

        Once that token is revoked or no longer configured, its delegate can no longer speak, and
        this registration starts afresh: a new delegate id, and the old one's leases re-queued, so
        the new token gains nothing it could not get by registering a new instance.
        """
        assert existing.token_name is not None
        if caller.is_active(existing.token_name):
            raise ApiFailure(
                403,
                Code.DELEGATE_TOKEN_MISMATCH,
                f"instance {existing.instance_id!r} is registered with another delegate token; only that token "
                "may register it again. A new delegate process uses a new instanceId",
            )
        with self.store.transaction():
            for t in list(self._running.values()):
                if t.delegate_id == existing.id:
                    self._requeue(
                        t, reason=f"delegate {existing.name} registered again with another token", count_attempt=False
                    )
            self.store.delete_delegate(existing.id)
        log.warning(
            "controlplane.delegate_rebound",
            delegate_id=existing.id,
            delegate=existing.name,
            old_token_name=existing.token_name,
            token_name=caller.token_name,
        )

    def _delegate(self, delegate_id: str, caller: Caller | None = None) -> DelegateRow:
        """The delegate, when ``caller`` (None: in-process) is the token it is bound to."""
        d = self.store.get_delegate(delegate_id)
        if d is None:
            raise ApiFailure(404, Code.UNKNOWN_DELEGATE, f"unknown delegate {delegate_id}: register again")
        if caller is not None and d.token_name != caller.token_name:
            if d.token_name is None or not caller.is_active(d.token_name):
                # Bound to no token (an older row) or to one that is gone: its holder may register again.
                raise ApiFailure(404, Code.UNKNOWN_DELEGATE, f"unknown delegate {delegate_id}: register again")
            raise ApiFailure(
                403,
                Code.DELEGATE_TOKEN_MISMATCH,
                f"delegate {delegate_id} was registered with another delegate token; only that token may act for it",
            )
        return d

    def _touch(self, d: DelegateRow, **values: Any) -> DelegateRow:
        values["last_heartbeat"] = self._seen[d.id] = self._clock()
        if d.state not in CONNECTED and "state" not in values:
            values["state"] = "running"
            log.info("controlplane.delegate_reconnected", delegate_id=d.id, delegate=d.name)
        self.store.update_delegate(d.id, **values)
        return with_updates(d, **values)

    def heartbeat(self, delegate_id: str, req: HeartbeatRequest, *, caller: Caller | None = None) -> HeartbeatResponse:
        d = self._touch(self._delegate(delegate_id, caller), state=req.state, in_flight=len(req.in_flight))
        cancel = [t.id for t in self._running.values() if t.delegate_id == d.id and t.cancel_requested]
        return HeartbeatResponse(cancel=cancel, intervals=self.settings.intervals())

    def deregister(self, delegate_id: str, *, caller: Caller | None = None) -> None:
        d = self._delegate(delegate_id, caller)
        with self.store.transaction():
            self.store.update_delegate(d.id, state="deregistered", in_flight=0)
            for t in list(self._running.values()):
                if t.delegate_id == d.id:
                    self._requeue(t, reason=f"delegate {d.name} deregistered", count_attempt=False)
        log.info("controlplane.delegate_deregistered", delegate_id=d.id, delegate=d.name)

    def forget_delegate(self, delegate_id: str, *, force: bool = False) -> None:
        """Remove a delegate entirely. A connected one only with ``force``: if alive, it registers again."""
        d = self._delegate(delegate_id)
        if d.state in CONNECTED and not force:
            raise ApiFailure(
                409,
                Code.CONFLICT,
                f"delegate {d.name} ({d.id}) is connected ({d.state}): stop it first, or pass force (--force); "
                "a live delegate registers again",
            )
        with self.store.transaction():
            for t in list(self._running.values()):
                if t.delegate_id == d.id:
                    self._requeue(t, reason=f"delegate {d.name} was removed", count_attempt=False)
            self.store.delete_delegate(d.id)

    def delegate_views(self) -> list[DelegateView]:
        return [self._delegate_view(d) for d in self.store.delegates()]

    def _delegate_view(self, d: DelegateRow) -> DelegateView:
        return DelegateView(
            delegate_id=d.id,
            name=d.name,
            instance_id=d.instance_id,
            hostname=d.hostname,
            tags=list(d.tags),
            version=d.version,
            task_types=list(d.task_types),
            capacity=d.capacity,
            state="lost" if d.state == "disconnected" else d.state,  # type: ignore[arg-type]
            in_flight=sum(1 for t in self._running.values() if t.delegate_id == d.id),
            registered_at=ts(d.registered_at),
            last_heartbeat_at=ts(d.last_heartbeat),
            token_name=d.token_name,
        )

    # --- acquisition -------------------------------------------------------------------------

    async def acquire(
        self,
        delegate_id: str,
        req: AcquireRequest,
        *,
        gone: Callable[[], bool] = lambda: False,
        caller: Caller | None = None,
    ) -> AcquireResponse:
        """Lease up to ``max_tasks`` tasks, holding the request open up to ``wait_seconds``."""
        d = self._touch(self._delegate(delegate_id, caller))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(req.wait_seconds, self.settings.poll_wait_seconds + 5)
        while True:
            if d.state == "draining":
                return AcquireResponse(tasks=[])
            tasks = self._take(d, req.max_tasks)
            if tasks:
                return AcquireResponse(tasks=tasks)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return AcquireResponse(tasks=[])
            waiter = _Waiter(d.id, frozenset(d.tags), frozenset(d.task_types))
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(remaining):
                    await waiter.event.wait()
            except TimeoutError:
                return AcquireResponse(tasks=[])
            finally:
                self._waiters.remove(waiter)
            if gone():
                # The delegate hung up while we waited: lease nothing into a closed socket, and hand
                # the wakeup on so the task still reaches someone.
                self._pass_wakeup()
                return AcquireResponse(tasks=[])
            refreshed = self.store.get_delegate(d.id)
            if refreshed is None:
                self._pass_wakeup()
                raise ApiFailure(404, Code.UNKNOWN_DELEGATE, f"unknown delegate {delegate_id}: register again")
            d = refreshed
            if d.state == "draining":
                self._pass_wakeup()

    def _queue_depth(self) -> dict[QueueKey, int]:
        depth: dict[QueueKey, int] = {}
        for key in self._queued.values():
            depth[key] = depth.get(key, 0) + 1
        return depth

    def _connected(self) -> int:
        return sum(1 for d in self.store.delegates() if d.state in CONNECTED)

    def _eligible_keys(self, d: DelegateRow) -> list[QueueKey]:
        tags, types = frozenset(d.tags), frozenset(d.task_types)
        return [k for k, heap in self._heaps.items() if heap and k[0] in types and k[1] <= tags]

    def _take(self, d: DelegateRow, limit: int) -> list[Task]:
        self._after_fault()
        now = self._clock()
        keys = self._eligible_keys(d)
        chosen: list[str] = []
        while keys and len(chosen) < limit:
            # Oldest first across every queue this delegate may serve.
            best: QueueKey | None = None
            for k in keys:
                heap = self._heaps[k]
                while heap and self._queued.get(heap[0][1]) != k:
                    heapq.heappop(heap)  # lazily drop entries already leased or failed
                if heap and (best is None or heap[0] < self._heaps[best][0]):
                    best = k
            if best is None:
                break
            _, task_id = heapq.heappop(self._heaps[best])
            del self._queued[task_id]
            chosen.append(task_id)
        if not chosen:
            return []
        leased: list[Task] = []
        with self.store.transaction():
            for task_id in chosen:
                t = self.store.get_task(task_id)
                if t is None or t.state != "queued":
                    continue
                if t.pickup_deadline < now:
                    self._fail_unpicked(t)
                    continue
                lease_id = "lse_" + secrets.token_hex(12)
                values = {
                    "state": "running",
                    "lease_id": lease_id,
                    "delegate_id": d.id,
                    "delegate_name": d.name,
                    "lease_expires_at": now + self.settings.lease_seconds,
                    "started_at": now,
                    "attempts": t.attempts + 1,
                }
                if not self.store.update_task(t.id, expect=("queued", None), **values):
                    self._stale(t, "lease")
                    continue
                t = with_updates(t, **values)
                self._running[t.id] = t
                leased.append(self._wire_task(t))
        return leased

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
        )
        if self._task_signer is None:
            return task
        return msgspec.structs.replace(task, signature=self._task_signer(task))

    # --- leases and results ------------------------------------------------------------------

    def _lease(self, lease_id: str, caller: Caller | None = None) -> TaskRow:
        self._after_fault()
        now = self._clock()
        t = next((r for r in self._running.values() if r.lease_id == lease_id), None)
        if t is None:
            raise ApiFailure(
                409, Code.LEASE_FENCED, "the lease is no longer valid: the task expired, was reassigned or is finished"
            )
        self._check_holder(t, caller)
        if (t.lease_expires_at or 0) < now:
            self.metrics.lease_expiries.inc()
            self._requeue(t, reason="lease expired before renewal")
            raise ApiFailure(409, Code.LEASE_FENCED, "the lease expired; the task went back to the queue")
        return t

    def _check_holder(self, t: TaskRow, caller: Caller | None) -> None:
        """Refuse a lease or result call for a task leased to a delegate bound to another token."""
        if caller is None or t.delegate_id is None:
            return
        d = self.store.get_delegate(t.delegate_id)
        if d is not None and d.token_name != caller.token_name:
            raise ApiFailure(
                403,
                Code.DELEGATE_TOKEN_MISMATCH,
                "this lease belongs to a delegate registered with another delegate token; "
                "only that token may renew, release or report it",
            )

    def renew(self, lease_id: str, *, caller: Caller | None = None) -> LeaseResponse:
        t = self._lease(lease_id, caller)
        expires = self._clock() + self.settings.lease_seconds
        if not self.store.update_task(t.id, expect=("running", lease_id), lease_expires_at=expires):
            self._stale(t, "renewal")
            raise ApiFailure(409, Code.LEASE_FENCED, "the lease is no longer valid: the task changed meanwhile")
        t = with_updates(t, lease_expires_at=expires)
        self._running[t.id] = t
        if t.delegate_id:
            d = self.store.get_delegate(t.delegate_id)
            if d is not None:
                self._touch(d)
        return LeaseResponse(
            lease_expires_at=ts(expires), lease_seconds=self.settings.lease_seconds, cancel_requested=t.cancel_requested
        )

    def release(self, lease_id: str, *, caller: Caller | None = None) -> None:
        """The delegate gives a task back (draining): it re-queues at once, without using an attempt.

        Unless the task's own deadline (:func:`task_deadline`) has passed: nobody is waiting for
        it any more, so it fails instead of starting over on another delegate. A task someone asked
        to cancel is not re-queued either: it ends as cancelled.
        """
        t = self._lease(lease_id, caller)
        if t.cancel_requested:  # someone cancelled it meanwhile: it ends here, whoever gave it back
            self._complete(
                t,
                status="FAILURE",
                result=failure_document("The task was cancelled while it ran.", reason="cancelled"),
                failure_reason="cancelled",
            )
            return
        deadline = task_deadline(t)
        if self._clock() < deadline:
            self._requeue(t, reason=f"given back by {t.delegate_name}, which is shutting down", count_attempt=False)
            return
        self._complete(
            t,
            status="FAILURE",
            result=failure_document(
                f"The delegate {t.delegate_name} shut down while running the task, and the task's deadline "
                f"({ts(deadline):%Y-%m-%d %H:%M:%S}Z) had passed, so it was not run again.",
                reason="cancelled",
            ),
            failure_reason="cancelled",
        )

    def submit_result(self, task_id: str, result: TaskResult, *, caller: Caller | None = None) -> str:
        """Record a delegate's result; returns "accepted" or "duplicate" (idempotent per lease)."""
        self._after_fault()
        t = self.store.get_task(task_id)
        if t is None:
            raise ApiFailure(404, Code.NOT_FOUND, f"unknown task {task_id}")
        self._check_holder(t, caller)
        if t.state == "done":
            if t.result_lease_id == result.lease_id:
                self.store.bump("duplicate")
                return "duplicate"
            self.store.bump("fenced")
            raise ApiFailure(409, Code.LEASE_FENCED, "the task was already completed under another lease")
        if t.state != "running" or t.lease_id != result.lease_id:
            self.store.bump("fenced")
            raise ApiFailure(
                409,
                Code.LEASE_FENCED,
                "this lease no longer owns the task (it expired and the task was re-queued or reassigned)",
            )
        if (t.lease_expires_at or 0) < self._clock():
            self.store.bump("fenced")
            self.metrics.lease_expiries.inc()
            self._requeue(t, reason="result arrived after the lease expired")
            raise ApiFailure(
                409, Code.LEASE_FENCED, "the lease expired before the result arrived; the task was re-queued"
            )
        # The task's status is the one the delegate reported for it; the document says the same.
        output = msgspec.structs.replace(result.output, status=result.status)
        with self.store.transaction():  # the count and the result land together, or neither does
            self._complete(t, status=result.status, result=output, lease_id=result.lease_id)
            self.store.bump("accepted")
        return "accepted"

    def _complete(
        self,
        t: TaskRow,
        *,
        status: str,
        result: ValidationResult,
        lease_id: str | None = None,
        failure_reason: str | None = None,
    ) -> TaskRow:
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
        with self.store.transaction():
            if t.state == "done" or not self.store.update_task(t.id, expect=(t.state, t.lease_id), **values):
                self._stale(t, "completion")
                return t
            if t.connector_id:
                self.store.update_connector(
                    t.connector_id,
                    last_task_id=t.id,
                    last_status=status,
                    last_tested_at=result.tested_at.timestamp(),  # when the test ran, not when its result arrived
                    last_delegate_name=t.delegate_name if lease_id else None,
                    last_error_summary=result.error_summary if status != "SUCCESS" else None,
                )
        self._running.pop(t.id, None)
        self._queued.pop(t.id, None)

        def announce() -> None:  # only once the result is on disk
            self.metrics.task_completed(status, failure_reason)
            event = self._done_events.pop(t.id, None)
            if event is not None:
                event.set()
            log.info(
                "controlplane.task_done", task_id=t.id, status=status, delegate=t.delegate_name, reason=failure_reason
            )

        self.store.after_commit(announce)
        return with_updates(t, **values)

    def _requeue(self, t: TaskRow, *, reason: str, count_attempt: bool = True) -> None:
        attempts = t.attempts if count_attempt else max(0, t.attempts - 1)
        if count_attempt and attempts >= t.max_attempts:
            self._complete(
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
        with self.store.transaction():
            if not self.store.update_task(t.id, expect=("running", t.lease_id), **values):
                self._stale(t, "re-queue")
                return
            self.store.bump("requeued")
        self._running.pop(t.id, None)
        t = with_updates(t, **values)
        self._enqueue(t)
        log.info("controlplane.task_requeued", task_id=t.id, reason=reason, attempts=attempts)

    # --- tasks -------------------------------------------------------------------------------

    def create_task(
        self,
        *,
        type: str,
        payload: dict[str, Any],
        selectors: Iterable[str] = (),
        connector_id: str | None = None,
        pickup_timeout: float | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
    ) -> TaskRow:
        now = self._clock()
        pickup = pickup_timeout or self.settings.pickup_timeout_seconds
        row = TaskRow(
            id="tsk_" + secrets.token_hex(10),
            type=type,
            payload=payload,
            selectors=normalise_tags(selectors),
            connector_id=connector_id,
            state="queued",
            created_at=now,
            pickup_timeout=pickup,
            pickup_deadline=now + pickup,
            timeout_seconds=timeout or self.settings.task_timeout_seconds,
            attempts=0,
            max_attempts=max_attempts or self.settings.max_attempts,
        )
        self.store.insert_task(row)
        self._enqueue(row)
        return row

    def _enqueue(self, t: TaskRow) -> None:
        key: QueueKey = (t.type, frozenset(t.selectors))
        heapq.heappush(self._heaps.setdefault(key, []), (t.created_at, t.id))
        self._queued[t.id] = key
        # Wake one long-polling delegate that can take it (the one waiting longest).
        for w in self._waiters:
            if not w.event.is_set() and t.type in w.types and key[1] <= w.tags:
                w.event.set()
                break

    def _pass_wakeup(self) -> None:
        """A woken waiter that takes nothing wakes, for each non-empty queue, one waiter that can serve it."""
        for key, heap in self._heaps.items():
            if not any(self._queued.get(task_id) == key for _, task_id in heap[:8]):
                continue
            for w in self._waiters:
                if not w.event.is_set() and key[0] in w.types and key[1] <= w.tags:
                    w.event.set()
                    break

    def _wake_for_delegate(self, d: DelegateRow) -> None:
        for w in self._waiters:
            if w.delegate_id == d.id:
                w.event.set()

    def get_task(self, task_id: str) -> TaskRow:
        t = self.store.get_task(task_id)
        if t is None:
            raise ApiFailure(404, Code.NOT_FOUND, f"unknown task {task_id}")
        return t

    async def wait_task(self, task_id: str, timeout: float) -> TaskRow:
        """The task once it is done, or as it is when ``timeout`` runs out."""
        t = self.get_task(task_id)
        if t.state == "done" or timeout <= 0:
            return t
        event = self._done_events.setdefault(task_id, asyncio.Event())
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            pass
        return self.get_task(task_id)

    def cancel_task(self, task_id: str) -> TaskRow:
        t = self.get_task(task_id)
        if t.state == "queued":
            return self._complete(
                t,
                status="FAILURE",
                result=failure_document("The task was cancelled before any delegate picked it up.", reason="cancelled"),
                failure_reason="cancelled",
            )
        if t.state == "running":
            if not self.store.update_task(t.id, expect=("running", t.lease_id), cancel_requested=True):
                self._stale(t, "cancellation")
                return self.get_task(task_id)
            t = with_updates(t, cancel_requested=True)
            self._running[t.id] = t
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

    # --- the sweeper -------------------------------------------------------------------------

    def sweep(self) -> None:
        """Apply every deadline that has passed: disconnections, lease expiry, pickup, timeouts."""
        if self.store.fault is not None and not self.store.probe():
            return  # the disk still refuses writes: nothing here could be recorded
        self._after_fault()
        now = self._clock()
        if self.store.count_leased() - len(self._running) != self._unindexed:
            self._reindex()  # a task left running without a lease we know of: the sweep below expires it
        with self.store.transaction():
            for d in self.store.delegates():
                silent = now - max(d.last_heartbeat, self._seen.get(d.id, 0.0))
                if d.state in CONNECTED and silent > self.settings.disconnect_after:
                    self.store.update_delegate(d.id, state="lost")
                    log.warning(
                        "controlplane.delegate_disconnected",
                        delegate_id=d.id,
                        delegate=d.name,
                        silent_seconds=round(silent, 1),
                    )
                    for t in list(self._running.values()):
                        if t.delegate_id == d.id:
                            self._requeue(t, reason=f"delegate {d.name} disconnected")
                elif d.state not in CONNECTED and silent > self.settings.forget_disconnected_after_seconds:
                    self.store.delete_delegate(d.id)
            for t in list(self._running.values()):
                if (t.lease_expires_at or 0) < now:
                    self.metrics.lease_expiries.inc()
                    self._requeue(t, reason=f"lease held by {t.delegate_name} expired")
                elif t.started_at and now > t.started_at + t.timeout_seconds + self.settings.execution_grace_seconds:
                    self._complete(
                        t,
                        status="FAILURE",
                        result=failure_document(
                            f"The delegate {t.delegate_name} did not finish the task within its timeout "
                            f"({t.timeout_seconds:.0f}s).",
                            reason="timeout",
                        ),
                        failure_reason="timeout",
                    )
            for task_id in list(self._queued):
                queued = self.store.get_task(task_id)
                if queued is None or queued.state != "queued":
                    self._queued.pop(task_id, None)
                elif queued.pickup_deadline < now:
                    self._fail_unpicked(queued)
            self.store.purge_done_tasks(now - self.settings.keep_done_tasks_seconds)

    def stats(self) -> Stats:
        rows = self.store.latencies()
        latency = Latency(count=len(rows))
        if rows:
            rows.sort()

            def pick(q: float) -> float:
                return rows[min(len(rows) - 1, int(q * len(rows)))]

            latency = Latency(count=len(rows), p50=pick(0.5), p90=pick(0.9), p99=pick(0.99), max=rows[-1])
        c = {"accepted": 0, "duplicate": 0, "fenced": 0, "requeued": 0, "unpicked": 0, **self.store.counters()}
        return Stats(
            tasks=self.store.count_tasks(),
            done_by_status=self.store.count_done_by_status(),
            failures_by_reason=self.store.count_failures_by_reason(),
            results_accepted=c["accepted"],
            results_duplicate=c["duplicate"],
            results_fenced=c["fenced"],
            tasks_requeued=c["requeued"],
            tasks_failed_unpicked=c["unpicked"],
            latency=latency,
        )

    def _fail_unpicked(self, t: TaskRow) -> None:
        self.store.bump("unpicked")
        self._complete(
            t,
            status="FAILURE",
            result=failure_document(self.explain_unpicked(t), reason="no_eligible_delegate"),
            failure_reason="no_eligible_delegate",
        )

    def explain_unpicked(self, t: TaskRow) -> str:
        """Why nobody took a task, in the words a user needs to fix it."""
        selectors = list(t.selectors)
        connected = [d for d in self.store.delegates() if d.state in CONNECTED]
        eligible = [d for d in connected if set(selectors) <= set(d.tags) and t.type in d.task_types]
        wanted = f"[{', '.join(selectors)}]"
        waited = f"{t.pickup_timeout:.0f}s"
        if not connected:
            return f"No delegate is connected, so nobody picked up the task within {waited}."
        if not eligible:
            if selectors:
                return (
                    f"no connected delegate has all of the tags {wanted} (waited {waited}). {describe_tags(connected)}"
                )
            return f"no connected delegate supports tasks of type {t.type} (waited {waited})."
        names = ", ".join(sorted(d.name for d in eligible))
        return (
            f"Eligible delegates [{names}] did not pick up the task within {waited}: they may be busy "
            "(all slots in use), draining, or have lost connectivity."
        )

    # --- connectors --------------------------------------------------------------------------

    def apply_connector(self, document: Any, *, dry_run: bool = False) -> ApplyResult:
        """Create or replace a connector; with ``dry_run``, check it and say what would happen, storing nothing."""
        try:
            connector = parse_connector(document)
        except ConnectorInvalid as exc:
            raise ApiFailure(
                400, Code.INVALID_CONNECTOR, f"the connector has {exc.total:,} problem(s)", problems=exc.problems
            ) from None
        now = self._clock()
        if dry_run:
            return self._preview_apply(connector, now)
        outcome = self.store.put_connector(connector.identifier, connector.name, connector.to_document(), now)
        row = self.store.get_connector(connector.identifier)
        assert row is not None
        return ApplyResult(
            identifier=connector.identifier,
            outcome=outcome,
            connector=self.connector_record(row),
            warnings=[*connector.notices, *self._routing_warnings(connector)],
        )

    def _preview_apply(self, connector: AwsConnector, now: float) -> ApplyResult:
        """The answer an apply would give, from the stored row as it is (the row is not written)."""
        body = connector.to_document()
        existing = self.store.get_connector(connector.identifier)
        outcome = connector_change(existing, connector.name, body)
        if existing is None:
            row = ConnectorRow(connector.identifier, connector.name, body, now, now)
        elif outcome == "updated":
            row = with_updates(existing, name=connector.name, body=body, updated_at=now)
        else:
            row = existing
        return ApplyResult(
            identifier=connector.identifier,
            outcome=outcome,
            connector=self.connector_record(row),
            dry_run=True,
            warnings=[*connector.notices, *self._routing_warnings(connector)],
        )

    def _routing_warnings(self, connector: AwsConnector) -> list[str]:
        """Say now, not after a pickup timeout, when no connected delegate could test this connector."""
        if not connector.execute_on_delegate:
            return []
        selectors = normalise_tags(connector.delegate_selectors)
        wanted = f"[{', '.join(selectors)}]"
        waits = f"a test waits {self.settings.pickup_timeout_seconds:.0f}s for one, then fails"
        connected = [d for d in self.store.delegates() if d.state in CONNECTED]
        if not connected:
            wanted_one = f" with all of the tags {wanted}" if selectors else ""
            return [f"no delegate is connected: {waits}. Start a delegate{wanted_one}."]
        connected = [d for d in connected if TASK_TYPE_AWS_VALIDATE in d.task_types]
        if not connected:
            return [f"no connected delegate runs connector tests ({TASK_TYPE_AWS_VALIDATE}): {waits}."]
        if any(set(selectors) <= set(d.tags) for d in connected):
            return []
        return [
            f"no connected delegate has all of the tags {wanted} ({waits}). {describe_tags(connected)} "
            "Add the missing tags to a delegate (DELEGATE_TAGS) or change the connector's delegateSelectors."
        ]

    def get_connector(self, identifier: str) -> ConnectorRow:
        row = self.store.get_connector(identifier)
        if row is None:
            raise ApiFailure(404, Code.NOT_FOUND, f"no connector with identifier {identifier!r}")
        return row

    def connector_record(self, row: ConnectorRow) -> ConnectorRecord:
        last = None
        if row.last_task_id and row.last_status and row.last_tested_at:
            last = ValidationSummary(
                task_id=row.last_task_id,
                status=row.last_status,  # type: ignore[arg-type]
                tested_at=ts(row.last_tested_at),
                delegate_name=row.last_delegate_name,
                error_summary=row.last_error_summary,
                stale=self._tested_an_older_spec(row),
            )
        return ConnectorRecord(
            identifier=row.identifier,
            name=row.name,
            connector=row.body,
            created_at=ts(row.created_at),
            updated_at=ts(row.updated_at),
            last_test=last,
        )

    def _tested_an_older_spec(self, row: ConnectorRow) -> bool:
        """Whether the last test ran against a spec the connector no longer has.

        Exact while the test's task is kept (its payload holds the connector as tested, so an apply
        racing a running test is caught too); after the task is purged, whether the connector
        changed after the test finished.
        """
        task = self.store.get_task(row.last_task_id) if row.last_task_id else None
        if task is not None:
            return bool(_spec(task.payload.get("connector")) != _spec(row.body))
        return row.last_tested_at is not None and row.updated_at > row.last_tested_at

    def delete_connector(self, identifier: str) -> None:
        if not self.store.delete_connector(identifier):
            raise ApiFailure(404, Code.NOT_FOUND, f"no connector with identifier {identifier!r}")

    async def test_connector(self, identifier: str, req: TestRequest) -> TaskRow:
        """Queue a validation (or run it here for ``executeOnDelegate: false``) and wait for it."""
        row = self.get_connector(identifier)
        try:
            connector = parse_connector(row.body)
            permissions = parse_actions(None, req.permissions, "permissions") if req.permissions else ()
        except ConnectorInvalid as exc:
            raise ApiFailure(400, Code.INVALID_REQUEST, str(exc), problems=exc.problems) from None
        payload: dict[str, Any] = {"connector": row.body}
        if permissions:
            payload["permissions"] = list(permissions)
        if not connector.execute_on_delegate:
            return await self._test_on_platform(connector, payload, permissions, req)
        task = self.create_task(
            type=TASK_TYPE_AWS_VALIDATE,
            payload=payload,
            selectors=connector.delegate_selectors,
            connector_id=identifier,
            pickup_timeout=req.pickup_timeout_seconds,
            timeout=req.timeout_seconds,
        )
        return await self.wait_task(task.id, req.wait_seconds)

    async def _test_on_platform(
        self, connector: AwsConnector, payload: dict[str, Any], permissions: tuple[str, ...], req: TestRequest
    ) -> TaskRow:
        task = self.create_task(
            type=TASK_TYPE_AWS_VALIDATE, payload=payload, connector_id=connector.identifier, timeout=req.timeout_seconds
        )
        # It never enters the delegate queue: the platform runs it now.
        self._queued.pop(task.id, None)
        now = self._clock()
        self.store.update_task(
            task.id, expect=("queued", None), state="running", delegate_name="platform", started_at=now, attempts=1
        )
        task = with_updates(task, state="running", delegate_name="platform", started_at=now, attempts=1)
        if self._platform_validator is None:
            return self._complete(
                task,
                status="FAILURE",
                result=failure_document(
                    "This control plane has no platform validator configured.", reason="unsupported"
                ),
                failure_reason="unsupported",
            )
        try:
            async with asyncio.timeout(task.timeout_seconds):
                result = await self._platform_validator(connector, task.id, permissions)
        except TimeoutError:
            return self._complete(
                task,
                status="FAILURE",
                result=failure_document(
                    f"The platform validation did not finish within {task.timeout_seconds:.0f}s.", reason="timeout"
                ),
                failure_reason="timeout",
            )
        return self._complete(task, status=result.status, result=result, lease_id="platform")


def _spec(document: Any) -> Any:
    """The part of a connector document a test depends on (not its name, description or tags)."""
    connector = document.get("connector") if isinstance(document, dict) else None
    return connector.get("spec") if isinstance(connector, dict) else None


def describe_tags(delegates: Iterable[DelegateRow], limit: int = 6) -> str:
    """The tag sets the given delegates have, each with the names that have it.

    For example ``Connected delegates: eks-1, eks-2 have [eks, prod]; lab has no tags but its name.``
    """
    groups: dict[tuple[str, ...], list[str]] = {}
    for d in delegates:
        tags = tuple(sorted(t for t in d.tags if t != d.name.lower()))
        names = groups.setdefault(tags, [])
        if d.name not in names:
            names.append(d.name)
    parts = []
    for tags, names in sorted(groups.items(), key=lambda g: (not g[0], g[0])):  # the untagged last
        verb = "has" if len(names) == 1 else "have"
        what = f"[{', '.join(tags)}]" if tags else "no tags but " + ("its name" if len(names) == 1 else "their names")
        parts.append(f"{', '.join(sorted(names))} {verb} {what}")
    more = f"; and {len(parts) - limit} more" if len(parts) > limit else ""
    return "Connected delegates: " + "; ".join(parts[:limit]) + more + "."


def task_deadline(t: TaskRow) -> float:
    """When a task stops being worth running: its pickup window plus its execution budget after creation.

    By default 30 s + 120 s, the 150 s a ``connector test`` waits for its result. A task given back by
    a delegate that shuts down is re-queued before this, and fails after it.
    """
    return t.created_at + t.pickup_timeout + t.timeout_seconds


def failure_document(message: str, *, reason: str) -> ValidationResult:
    """A failure decided here (no delegate, lease lost, cancelled), in the result every side reads."""
    step = "delegate_selection" if reason == "no_eligible_delegate" else "control_plane"
    return failure_result(reason, message, step=step)
