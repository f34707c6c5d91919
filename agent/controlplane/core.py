"""The control plane's owner object, independent of HTTP: it wires the parts and runs their lifecycle.

The parts, each in its own module: :class:`~.delegates.Registry` (who is connected),
:class:`~.queue.TaskQueue` (tasks, long polls, every task's end), :class:`~.leases.Leases`
(renewals, give-backs, results) and :class:`~.connectors.Connectors`. All of them read and write
the :class:`~.store.Store` (SQLite or Postgres) and keep no copy of the queue, so several
control-plane processes can share one Postgres database.

Lifecycle: ``ControlPlane(store, ...)``, then :meth:`recover` (a fresh allowance for every deadline
after downtime), :meth:`start` (the clock and the sweeper), :meth:`stop` (the sweeper, then waiting
long polls are released, then the clock). The store is closed by whoever opened it, after stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from agent.controlplane.clock import SteadyClock, ts
from agent.controlplane.connectors import Connectors, PlatformValidator
from agent.controlplane.delegates import Registry
from agent.controlplane.failures import ApiFailure, failure_document
from agent.controlplane.health import HealthMonitor
from agent.controlplane.leases import Leases
from agent.controlplane.metrics import ControlPlaneMetrics
from agent.controlplane.queue import TaskQueue, TaskSigner, TokenMinter, explain_unpicked, task_deadline
from agent.controlplane.routing import CONNECTED, describe_tags, normalise_tags
from agent.controlplane.settings import ControlPlaneSettings
from agent.controlplane.store import ConnectorRow, Store, StoreUnavailable, TaskRow
from agent.controlplane.tokens import Caller
from agent.protocol.auth import Clock
from agent.protocol.models import (
    AcquireRequest,
    AcquireResponse,
    ApplyResult,
    ConnectorHistory,
    ConnectorRecord,
    DelegateView,
    HeartbeatRequest,
    HeartbeatResponse,
    Latency,
    LeaseResponse,
    RegisterRequest,
    RegisterResponse,
    Stats,
    TaskResult,
    TaskView,
    TestRequest,
)

__all__ = [
    "CONNECTED",
    "ApiFailure",
    "ControlPlane",
    "ControlPlaneSettings",
    "PlatformValidator",
    "TaskSigner",
    "describe_tags",
    "failure_document",
    "normalise_tags",
    "task_deadline",
    "ts",
]

log = structlog.get_logger("controlplane")

#: The store mark of the last sweep, by any replica: a replica starting while others sweep gives no allowance.
SWEPT_AT = "swept_at"


class ControlPlane:
    """Owner of the control plane's logic; one per process, over one store."""

    def __init__(
        self,
        store: Store,
        settings: ControlPlaneSettings | None = None,
        *,
        clock: Clock | None = None,
        platform_validator: PlatformValidator | None = None,
        task_signer: TaskSigner | None = None,
        task_tokens: TokenMinter | None = None,
        metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        self.store = store
        self._settings = settings or ControlPlaneSettings()
        self.metrics = metrics or ControlPlaneMetrics()
        # Deadlines run on a clock that wall-clock steps and stalls cannot move (controlplane/clock.py);
        # a test passes its own.
        self._steady = SteadyClock() if clock is None else None
        self._clock: Clock = clock or self._steady or time.time
        self.queue = TaskQueue(
            store,
            self.settings,
            self.metrics,
            self._clock,
            to_wall=self._to_wall,
            task_signer=task_signer,
            task_tokens=task_tokens,
        )
        self.registry = Registry(store, self.settings, self._clock, self.queue)
        self.leases = Leases(store, self.settings, self.metrics, self._clock, queue=self.queue, registry=self.registry)
        self.connectors = Connectors(store, self.settings, self._clock, self.queue, platform_validator)
        self.health = HealthMonitor(store, self.settings, self.metrics, self._clock, self.connectors)
        # Connector health hears every connector test's end, every change, and answers for its record.
        self.queue.on_connector_result = self.health.record
        self.connectors.on_changed = self.health.connector_changed
        self.connectors.health_of = self.health.view
        self.connectors.on_test_created = lambda trigger: self.metrics.connector_tests_created.labels(trigger).inc()
        self._sweeper: asyncio.Task[None] | None = None
        self._sweep_failing = False
        self._fault_seen = False

    @property
    def settings(self) -> ControlPlaneSettings:
        return self._settings

    @settings.setter
    def settings(self, value: ControlPlaneSettings) -> None:
        """Retune a running control plane (tests do): every part reads the new settings from now on."""
        self._settings = value
        for part in (self.queue, self.registry, self.leases, self.connectors, self.health):
            part.settings = value

    # --- lifecycle ---------------------------------------------------------------------------

    def now(self) -> float:
        """The control plane's clock (wall seconds; a test's manual clock when one was given)."""
        return self._clock()

    async def recover(self) -> None:
        """After downtime, give every deadline a fresh allowance instead of punishing anyone for it.

        Delegates could not heartbeat and leases could not be renewed while nobody served them, so
        both get a fresh allowance instead of expiring the moment we come back. With a shared store
        that is only so when no replica swept lately: a replica joining running ones changes nothing.
        """
        now = self._clock()
        if self.store.shared:
            swept = await self.store.get_mark(SWEPT_AT)
            if swept is not None and now - swept < max(5.0, 4 * self.settings.sweep_interval_seconds):
                return
        async with self.store.transaction():
            await self.store.grant_allowance(now, self.settings.lease_seconds)
            await self.store.set_mark(SWEPT_AT, now)
        await self.health.spread_overdue(now)

    def _to_wall(self, when: float) -> float:
        """A time on this process's clock, said on the wall clock (the same unless a stall was removed)."""
        if self._steady is None:
            return when
        return when + (time.time() - self._steady())

    async def _after_fault(self) -> None:
        """The first thing done once the store takes writes again, before any deadline is judged.

        Nobody could lease, heartbeat, renew or report while the store refused: as after a restart,
        everyone gets their allowance back instead of failing for what was not their fault.
        """
        if self.store.fault is not None:
            self._fault_seen = True
        elif self._fault_seen:
            self._fault_seen = False
            log.info("controlplane.store_recovered")
            await self.recover()

    @property
    def write_fault(self) -> str | None:
        """Why the store refuses writes (disk full, I/O error, connection lost), until one succeeds again."""
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
        self.queue.wake_all()
        await self.connectors.aclose()
        if self._steady is not None:
            await self._steady.stop()

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
                self._sweep_failing = False
            except StoreUnavailable as exc:
                self._fault_seen = True
                if not self._sweep_failing:  # once per episode, not once per sweep
                    log.warning("controlplane.sweep_not_recorded", error=str(exc), hint="retried at every sweep")
                self._sweep_failing = True
            except Exception:
                log.exception("controlplane.sweep_failed")
            await asyncio.sleep(self.settings.sweep_interval_seconds)

    async def sweep(self) -> None:
        """Apply every deadline that has passed: disconnections, lease expiry, pickup, timeouts."""
        if self.store.fault is not None and not await self.store.probe():
            self._fault_seen = True
            return  # the store still refuses writes: nothing here could be recorded
        await self._after_fault()
        now = self._clock()
        async with self.store.sweep_turn() as mine:
            if not mine:
                return  # another replica is sweeping this round
            await self.registry.sweep(now)
            await self.leases.sweep(now)
            unpicked = await self.store.queued_past_deadline(now)
            if unpicked:
                delegates = await self.store.delegates()
                for t in unpicked:
                    await self.queue.fail_unpicked(t, delegates)
            await self.store.purge_done_tasks(now - self.settings.keep_done_tasks_seconds)
            await self.health.tick(now)
            await self.store.set_mark(SWEPT_AT, now)

    async def refresh_gauges(self) -> None:
        """Read the state gauges (queue depth, tasks, connected delegates) from the store, for a scrape."""
        self.metrics.store_available.set(0 if self.store.fault is not None else 1)
        connected = sum(1 for d in await self.store.delegates() if d.state in CONNECTED)
        self.metrics.set_state(
            queue=await self.store.queue_depth(), tasks=await self.store.count_tasks(), connected=connected
        )
        await self.health.refresh_gauges(self._clock())

    async def stats(self) -> Stats:
        rows = await self.store.latencies()
        latency = Latency(count=len(rows))
        if rows:
            rows.sort()

            def pick(q: float) -> float:
                return rows[min(len(rows) - 1, int(q * len(rows)))]

            latency = Latency(count=len(rows), p50=pick(0.5), p90=pick(0.9), p99=pick(0.99), max=rows[-1])
        c = {"accepted": 0, "duplicate": 0, "fenced": 0, "requeued": 0, "unpicked": 0, **await self.store.counters()}
        return Stats(
            tasks=await self.store.count_tasks(),
            done_by_status=await self.store.count_done_by_status(),
            failures_by_reason=await self.store.count_failures_by_reason(),
            results_accepted=c["accepted"],
            results_duplicate=c["duplicate"],
            results_fenced=c["fenced"],
            tasks_requeued=c["requeued"],
            tasks_failed_unpicked=c["unpicked"],
            latency=latency,
        )

    # --- delegates ---------------------------------------------------------------------------

    async def register(self, req: RegisterRequest, *, caller: Caller | None = None) -> RegisterResponse:
        return await self.registry.register(req, caller=caller)

    async def heartbeat(
        self, delegate_id: str, req: HeartbeatRequest, *, caller: Caller | None = None
    ) -> HeartbeatResponse:
        return await self.registry.heartbeat(delegate_id, req, caller=caller)

    async def deregister(self, delegate_id: str, *, caller: Caller | None = None) -> None:
        await self.registry.deregister(delegate_id, caller=caller)

    async def forget_delegate(self, delegate_id: str, *, force: bool = False) -> None:
        await self.registry.forget(delegate_id, force=force)

    async def delegate_views(self) -> list[DelegateView]:
        return await self.registry.views()

    async def acquire(
        self,
        delegate_id: str,
        req: AcquireRequest,
        *,
        gone: Callable[[], bool] = lambda: False,
        caller: Caller | None = None,
    ) -> AcquireResponse:
        """Lease up to ``max_tasks`` tasks, holding the request open up to ``wait_seconds``."""
        d = await self.registry.touch(await self.registry.delegate(delegate_id, caller))
        await self._after_fault()
        return await self.queue.acquire(d, req.max_tasks, req.wait_seconds, gone=gone, refresh=self.store.get_delegate)

    # --- leases and results ------------------------------------------------------------------

    async def renew(self, lease_id: str, *, caller: Caller | None = None) -> LeaseResponse:
        await self._after_fault()
        return await self.leases.renew(lease_id, caller=caller)

    async def release(self, lease_id: str, *, caller: Caller | None = None) -> None:
        await self._after_fault()
        await self.leases.release(lease_id, caller=caller)

    async def submit_result(self, task_id: str, result: TaskResult, *, caller: Caller | None = None) -> str:
        await self._after_fault()
        return await self.leases.submit_result(task_id, result, caller=caller)

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
    ) -> TaskRow:
        return await self.queue.create_task(
            type=type,
            payload=payload,
            selectors=selectors,
            connector_id=connector_id,
            pickup_timeout=pickup_timeout,
            timeout=timeout,
            max_attempts=max_attempts,
        )

    async def get_task(self, task_id: str) -> TaskRow:
        return await self.queue.get_task(task_id)

    async def wait_task(self, task_id: str, timeout: float) -> TaskRow:
        return await self.queue.wait_task(task_id, timeout)

    async def cancel_task(self, task_id: str) -> TaskRow:
        return await self.queue.cancel_task(task_id)

    def task_view(self, t: TaskRow) -> TaskView:
        return self.queue.task_view(t)

    async def explain_unpicked(self, t: TaskRow) -> str:
        return explain_unpicked(t, await self.store.delegates())

    # --- connectors --------------------------------------------------------------------------

    async def apply_connector(self, document: Any, *, dry_run: bool = False) -> ApplyResult:
        return await self.connectors.apply(document, dry_run=dry_run)

    async def get_connector(self, identifier: str) -> ConnectorRow:
        return await self.connectors.get(identifier)

    async def connector_record(self, row: ConnectorRow) -> ConnectorRecord:
        return await self.connectors.record(row)

    async def connector_records(self) -> list[ConnectorRecord]:
        """Every connector with its health, as ``GET /api/v1/connectors`` and the console list them."""
        return [await self.connectors.record(row) for row in await self.store.connectors()]

    async def servable_connectors(self) -> dict[str, list[str]]:
        """For each connected delegate (by id), the connectors whose tests it may pick up (the queue's rule)."""
        return await self.connectors.servable_by(await self.store.delegates())

    async def delete_connector(self, identifier: str) -> None:
        await self.connectors.delete(identifier)

    async def test_connector(self, identifier: str, req: TestRequest) -> TaskRow:
        return await self.connectors.test(identifier, req)

    async def connector_history(self, identifier: str, limit: int) -> ConnectorHistory:
        return await self.health.history(identifier, limit)
