"""Connector health: every connector re-tested on a schedule, its connectivity status and history.

Harness re-tests each connector every 30 minutes (its connector heartbeat) and shows a status;
ours does the same, with what Harness's users asked for on top:

- **No flood.** A re-test is skipped while one of the same connector is queued or running, and a
  connector failing the same way again waits twice as long each time (up to 6 hours, or its
  interval if longer), back to its interval after a success or a change.
- **No stampede.** Each connector has its own slot in the interval, from a hash of its identifier:
  10,000 connectors applied at once are tested once at once (they changed), then spread evenly
  over the interval for good. The next test is the connector's next slot at least half an interval
  away, so tests of one connector are between half and one and a half intervals apart.
- **No burst after downtime.** When the control plane comes back (the service as a whole was
  down), overdue tests are spread over the next ten minutes.
- **Status changes, not tests, are news.** One log line, one metric increment and one webhook
  call per change of status; history keeps the last N results of every test.

The schedule lives in the store (``next_test_at``), so it survives restarts and replicas share
it: a replica schedules a test only if it moves ``next_test_at`` from the value it read, so of
several replicas at once, one creates the task.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from agent.aws.connector import ConnectorInvalid
from agent.controlplane.clock import ts
from agent.controlplane.connectors import Connectors, connector_spec
from agent.controlplane.failures import ApiFailure
from agent.controlplane.metrics import ControlPlaneMetrics
from agent.controlplane.settings import ControlPlaneSettings
from agent.controlplane.store import ConnectorRow, HistoryRow, Store, TaskRow
from agent.protocol.auth import Clock
from agent.protocol.errors import Code
from agent.protocol.models import ConnectorHealth, ConnectorHistory, HistoryEntry
from agent.protocol.results import Failure, ValidationResult

log = structlog.get_logger("controlplane")

#: A connector changed while its previous test runs: look again this soon, to test the new version.
CHANGED_RETRY_SECONDS = 5.0
#: Due connectors handled per tick (the rest on the next one, half a second later).
TICK_LIMIT = 200


@dataclass(frozen=True)
class StatusChange:
    """A connector's connectivity changed (UNKNOWN to SUCCESS, SUCCESS to FAILURE, ...)."""

    identifier: str
    name: str
    old: str
    new: str
    tested_at: float
    error_summary: str | None
    failure: Failure | None
    delegate_name: str | None
    failures_in_row: int


class HealthMonitor:
    """Schedules connector tests and keeps what each test said about its connector."""

    def __init__(
        self,
        store: Store,
        settings: ControlPlaneSettings,
        metrics: ControlPlaneMetrics,
        clock: Clock,
        connectors: Connectors,
        *,
        rng: random.Random | None = None,
        on_change: Callable[[StatusChange], None] | None = None,
    ) -> None:
        self.store, self.settings, self.metrics, self._clock = store, settings, metrics, clock
        self._connectors = connectors
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self.on_change = on_change

    # --- intervals ---------------------------------------------------------------------------

    def interval_of(self, row: ConnectorRow) -> float:
        """Seconds between scheduled tests of ``row`` (0: none)."""
        return row.test_interval if row.test_interval is not None else self.settings.connector_test_interval_seconds

    def effective_interval(self, row: ConnectorRow, backoff: int | None = None) -> float:
        """The interval, doubled for each repeat of the same failure, up to the back-off cap."""
        base = self.interval_of(row)
        level = row.backoff if backoff is None else backoff
        if base <= 0 or level <= 0:
            return base
        cap = max(base, self.settings.connector_backoff_max_seconds)
        return float(min(base * 2 ** min(level, 32), cap))

    def next_slot(self, row: ConnectorRow, now: float, period: float) -> float:
        """The connector's next slot at least half a ``period`` after ``now``.

        Slots are ``phase + k * period`` on the wall clock, the phase a hash of the identifier, so
        connectors spread evenly over the interval whenever they were created, and stay spread.
        """
        phase = zlib.crc32(row.identifier.encode()) / 2**32 * period
        k = math.ceil((now + period / 2 - phase) / period)
        return phase + k * period

    # --- the schedule ------------------------------------------------------------------------

    async def tick(self, now: float) -> int:
        """Create the tests that are due; returns how many were created."""
        created = 0
        for row in await self.store.due_connectors(now, TICK_LIMIT):
            interval = self.interval_of(row)
            trigger = row.next_trigger or "scheduled"
            if interval <= 0 and trigger == "scheduled":  # the schedule was switched off meanwhile
                await self.store.reschedule_connector(row.identifier, was=row.next_test_at, to=None)
                continue
            if await self.store.connector_testing(row.identifier):
                # One test per connector at a time: the schedule skips its turn; a change waits for
                # the running test (of the previous version) to end.
                later = (
                    now + CHANGED_RETRY_SECONDS
                    if trigger == "changed"
                    else self.next_slot(row, now, self.effective_interval(row))
                )
                await self.store.reschedule_connector(
                    row.identifier, was=row.next_test_at, to=later, trigger=row.next_trigger
                )
                continue
            following = self.next_slot(row, now, self.effective_interval(row)) if interval > 0 else None
            if not await self.store.reschedule_connector(row.identifier, was=row.next_test_at, to=following):
                continue  # another replica scheduled it first
            try:
                await self._connectors.start_test(
                    row, trigger=trigger, timeout=self.settings.connector_test_timeout_seconds
                )
            except (ConnectorInvalid, ApiFailure) as exc:  # a stored document this version refuses
                log.error("controlplane.connector_unschedulable", connector=row.identifier, error=str(exc))
                continue
            self.metrics.connector_tests_created.labels(trigger).inc()
            created += 1
        return created

    async def spread_overdue(self, now: float) -> None:
        """After downtime: overdue tests start over the next few minutes, not all at once."""
        for row in await self.store.due_connectors(now, 100_000):
            window = min(self.settings.connector_restart_spread_seconds, self.interval_of(row) or CHANGED_RETRY_SECONDS)
            to = now + self._rng.uniform(0, window)
            await self.store.reschedule_connector(row.identifier, was=row.next_test_at, to=to, trigger=row.next_trigger)

    async def connector_changed(self, identifier: str, test_interval: float | None, test_now: bool) -> None:
        """A connector was created or changed: its back-off ends, and it is tested at once (if asked)."""
        row = await self.store.get_connector(identifier)
        if row is None:
            return
        interval = test_interval if test_interval is not None else self.settings.connector_test_interval_seconds
        values: dict[str, Any] = {"test_interval": test_interval, "backoff": 0}
        if test_now and interval > 0:
            values.update(next_test_at=self._clock(), next_trigger="changed")
        elif interval <= 0:
            values.update(next_test_at=None, next_trigger=None)
        elif row.next_test_at is None:
            values.update(next_test_at=self.next_slot(row, self._clock(), interval), next_trigger=None)
        await self.store.update_connector(identifier, **values)

    # --- results -----------------------------------------------------------------------------

    async def record(self, t: TaskRow, status: str, result: ValidationResult, lease_id: str | None) -> None:
        """What a finished test says about its connector (inside the transaction that ends the task)."""
        assert t.connector_id is not None
        row = await self.store.get_connector(t.connector_id)
        if row is None:  # deleted meanwhile
            return
        now = self._clock()
        # The delegate's word for when it tested, but never later than now: a clock far ahead (or a
        # forged date) must not outrank every later test and freeze the status.
        tested_at = min(result.tested_at.timestamp(), now + self.settings.clock_leeway_seconds)
        failure = result.failure if status != "SUCCESS" else None
        history = HistoryRow(
            task_id=t.id,
            connector_id=t.connector_id,
            tested_at=tested_at,
            status=status,
            trigger=t.trigger or "manual",
            delegate_name=t.delegate_name if lease_id else None,
            error_summary=result.error_summary if status != "SUCCESS" else None,
            failure=msgspec.to_builtins(failure) if failure is not None else None,
            duration_ms=result.duration_ms,
        )
        await self.store.add_history(history, self.settings.connector_history)
        if row.last_tested_at is not None and tested_at < row.last_tested_at:
            return  # an older test that finished late: history, not status
        values: dict[str, Any] = {
            "last_task_id": t.id,
            "last_status": status,
            "last_tested_at": tested_at,
            "last_delegate_name": history.delegate_name,
            "last_error_summary": history.error_summary,
        }
        if connector_spec(t.payload.get("connector")) != connector_spec(row.body):
            # A test of the spec as it was before a change: it is the last test (shown as stale), but
            # it says nothing of the connector as it is, so the status waits for the change's own test.
            await self.store.update_connector(t.connector_id, **values)
            return
        if status == "SUCCESS":
            values.update(
                health_status="SUCCESS",
                last_connected_at=tested_at,
                last_failure=None,
                failures_in_row=0,
                failing_since=None,
                backoff=0,
            )
        else:
            same = row.health_status == "FAILURE" and _reason(row.last_failure) == _reason(history.failure)
            values.update(
                health_status="FAILURE",
                last_failure=history.failure,
                failures_in_row=row.failures_in_row + 1,
                failing_since=row.failing_since if row.health_status == "FAILURE" else tested_at,
                backoff=row.backoff + 1 if same else 0,
            )
        backoff = int(values["backoff"])
        interval = self.interval_of(row)
        if row.next_trigger is None:  # a pending change keeps its test due now
            following = self.next_slot(row, now, self.effective_interval(row, backoff)) if interval > 0 else None
            values["next_test_at"] = following
        await self.store.update_connector(t.connector_id, **values)
        if values["health_status"] != row.health_status:
            change = StatusChange(
                identifier=row.identifier,
                name=row.name,
                old=row.health_status,
                new=str(values["health_status"]),
                tested_at=tested_at,
                error_summary=history.error_summary,
                failure=failure,
                delegate_name=history.delegate_name,
                failures_in_row=int(values["failures_in_row"]),
            )
            self.store.after_commit(lambda: self._announce(change))

    def _announce(self, change: StatusChange) -> None:
        self.metrics.connector_status_changes.labels(change.new.lower()).inc()
        (log.warning if change.new == "FAILURE" else log.info)(
            "controlplane.connector_status_changed",
            connector=change.identifier,
            old=change.old,
            new=change.new,
            error_summary=change.error_summary,
            category=change.failure.category if change.failure else None,
            hint=change.failure.hint if change.failure else None,
        )
        if self.on_change is not None:
            self.on_change(change)

    # --- views -------------------------------------------------------------------------------

    async def view(self, row: ConnectorRow) -> ConnectorHealth:
        interval = self.interval_of(row)
        failure = msgspec.convert(row.last_failure, Failure) if row.last_failure else None
        return ConnectorHealth(
            status=row.health_status,  # type: ignore[arg-type]
            tested_at=ts(row.last_tested_at) if row.last_tested_at else None,
            last_connected_at=ts(row.last_connected_at) if row.last_connected_at else None,
            error_summary=row.last_error_summary if row.health_status == "FAILURE" else None,
            failure=failure if row.health_status == "FAILURE" else None,
            delegate_name=row.last_delegate_name,
            failures_in_row=row.failures_in_row,
            failing_since=ts(row.failing_since) if row.failing_since else None,
            test_interval_seconds=interval,
            backoff_seconds=self.effective_interval(row) if row.backoff and interval > 0 else 0.0,
            next_test_at=ts(row.next_test_at) if row.next_test_at else None,
            testing=await self.store.connector_testing(row.identifier),
        )

    async def history(self, identifier: str, limit: int) -> ConnectorHistory:
        if await self.store.get_connector(identifier) is None:
            raise ApiFailure(404, Code.NOT_FOUND, f"no connector with identifier {identifier!r}")
        rows = await self.store.connector_history(identifier, limit)
        return ConnectorHistory(
            identifier=identifier,
            entries=[
                HistoryEntry(
                    task_id=h.task_id,
                    status=h.status,  # type: ignore[arg-type]
                    tested_at=ts(h.tested_at),
                    trigger=h.trigger,  # type: ignore[arg-type]
                    delegate_name=h.delegate_name,
                    error_summary=h.error_summary,
                    failure=msgspec.convert(h.failure, Failure) if h.failure else None,
                    duration_ms=h.duration_ms,
                )
                for h in rows
            ],
        )

    async def refresh_gauges(self, now: float) -> None:
        summary = await self.store.health_summary(now, self.settings.connector_test_interval_seconds)
        self.metrics.set_connector_state(
            by_status=summary.by_status,
            failing_seconds_max=summary.failing_seconds_max,
            untested_intervals_max=summary.untested_intervals_max,
        )


def _reason(failure: dict[str, Any] | None) -> tuple[Any, Any] | None:
    """What makes two failures "the same" for back-off: their category and step."""
    if not failure:
        return None
    return failure.get("category"), failure.get("step")
