"""Connectors: stored AWS connector documents, their tests, and what their last test said.

A test is a task like any other (``executeOnDelegate: true``, the default) or runs here, in the
control plane, for ``executeOnDelegate: false``. Applying a connector says at once when no
connected delegate could test it, rather than after a pickup timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from agent.aws.connector import AwsConnector, ConnectorInvalid, parse_actions, parse_connector
from agent.controlplane.clock import ts
from agent.controlplane.failures import ApiFailure, failure_document
from agent.controlplane.queue import TaskQueue
from agent.controlplane.routing import CONNECTED, describe_tags, normalise_tags
from agent.controlplane.settings import ControlPlaneSettings
from agent.controlplane.store import ConnectorRow, DelegateRow, Store, TaskRow, connector_change, eligible, with_updates
from agent.protocol.auth import Clock
from agent.protocol.errors import Code
from agent.protocol.models import (
    TASK_TYPE_AWS_VALIDATE,
    ApplyResult,
    ConnectorHealth,
    ConnectorRecord,
    TestRequest,
    ValidationSummary,
)
from agent.protocol.results import ValidationResult


class PlatformValidator(Protocol):
    """Runs a connector test inside the control plane (``executeOnDelegate: false``)."""

    async def __call__(
        self, connector: AwsConnector, task_id: str, permissions: tuple[str, ...], *, oidc_token: str | None = None
    ) -> ValidationResult: ...

    async def aclose(self) -> None: ...


class Connectors:
    """Apply, read, delete and test connectors."""

    def __init__(
        self,
        store: Store,
        settings: ControlPlaneSettings,
        clock: Clock,
        queue: TaskQueue,
        platform_validator: PlatformValidator | None,
    ) -> None:
        self.store, self.settings, self._clock, self._queue = store, settings, clock, queue
        self._platform_validator = platform_validator
        #: Told each connector created or changed: (identifier, its testInterval, whether to test it now).
        self.on_changed: Callable[[str, float | None, bool], Awaitable[None]] | None = None
        #: Told each test created: its trigger (metrics).
        self.on_test_created: Callable[[str], None] = lambda trigger: None
        self._platform_runs: set[asyncio.Task[TaskRow]] = set()
        #: The connector's connectivity, for its record (the owner wires connector health).
        self.health_of: Callable[[ConnectorRow], Awaitable[ConnectorHealth]] | None = None

    async def apply(self, document: Any, *, dry_run: bool = False) -> ApplyResult:
        """Create or replace a connector; with ``dry_run``, check it and say what would happen, storing nothing."""
        try:
            connector = parse_connector(document)
        except ConnectorInvalid as exc:
            raise ApiFailure(
                400, Code.INVALID_CONNECTOR, f"the connector has {exc.total:,} problem(s)", problems=exc.problems
            ) from None
        now = self._clock()
        warnings = [*connector.notices, *await self._routing_warnings(connector)]
        if dry_run:
            return await self._preview(connector, now, warnings)
        outcome = await self.store.put_connector(connector.identifier, connector.name, connector.to_document(), now)
        if outcome != "unchanged" and self.on_changed is not None:
            # Tested at once (Harness tests on save), unless the connector says not to.
            await self.on_changed(connector.identifier, connector.test_interval, not connector.ignore_test_connection)
        row = await self.get(connector.identifier)
        return ApplyResult(
            identifier=connector.identifier, outcome=outcome, connector=await self.record(row), warnings=warnings
        )

    async def _preview(self, connector: AwsConnector, now: float, warnings: list[str]) -> ApplyResult:
        """The answer an apply would give, from the stored row as it is (the row is not written)."""
        body = connector.to_document()
        existing = await self.store.get_connector(connector.identifier)
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
            connector=await self.record(row),
            dry_run=True,
            warnings=warnings,
        )

    async def _routing_warnings(self, connector: AwsConnector) -> list[str]:
        """Say now, not after a pickup timeout, when no connected delegate could test this connector."""
        if not connector.execute_on_delegate:
            return []
        selectors = normalise_tags(connector.delegate_selectors)
        wanted = f"[{', '.join(selectors)}]"
        waits = f"a test waits {self.settings.pickup_timeout_seconds:.0f}s for one, then fails"
        connected = [d for d in await self.store.delegates() if d.state in CONNECTED]
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

    async def get(self, identifier: str) -> ConnectorRow:
        row = await self.store.get_connector(identifier)
        if row is None:
            raise ApiFailure(404, Code.NOT_FOUND, f"no connector with identifier {identifier!r}")
        return row

    async def record(self, row: ConnectorRow) -> ConnectorRecord:
        last = None
        if row.last_task_id and row.last_status and row.last_tested_at:
            last = ValidationSummary(
                task_id=row.last_task_id,
                status=row.last_status,  # type: ignore[arg-type]
                tested_at=ts(row.last_tested_at),
                delegate_name=row.last_delegate_name,
                error_summary=row.last_error_summary,
                stale=await self._tested_an_older_spec(row),
            )
        return ConnectorRecord(
            identifier=row.identifier,
            name=row.name,
            connector=row.body,
            created_at=ts(row.created_at),
            updated_at=ts(row.updated_at),
            last_test=last,
            health=await self.health_of(row) if self.health_of is not None else ConnectorHealth(),
        )

    async def _tested_an_older_spec(self, row: ConnectorRow) -> bool:
        """Whether the last test ran against a spec the connector no longer has.

        Exact while the test's task is kept (its payload holds the connector as tested, so an apply
        racing a running test is caught too); after the task is purged, whether the connector
        changed after the test finished.
        """
        task = await self.store.get_task(row.last_task_id) if row.last_task_id else None
        if task is not None:
            return bool(connector_spec(task.payload.get("connector")) != connector_spec(row.body))
        return row.last_tested_at is not None and row.updated_at > row.last_tested_at

    async def servable_by(self, delegates: list[DelegateRow]) -> dict[str, list[str]]:
        """Delegate id -> identifiers of the connectors it may test now: connected, and :func:`eligible` as
        the queue decides (task type, all selectors). Platform-run connectors need no delegate."""
        connected = [d for d in delegates if d.state in CONNECTED]
        servable: dict[str, list[str]] = {d.id: [] for d in connected}
        for row in await self.store.connectors():
            try:
                connector = parse_connector(row.body)
            except ConnectorInvalid:
                continue  # a stored row that no longer parses is tested by nobody
            if not connector.execute_on_delegate:
                continue
            selectors = normalise_tags(connector.delegate_selectors)
            for d in connected:
                if eligible(TASK_TYPE_AWS_VALIDATE, selectors, d):
                    servable[d.id].append(row.identifier)
        return servable

    async def delete(self, identifier: str) -> None:
        if not await self.store.delete_connector(identifier):
            raise ApiFailure(404, Code.NOT_FOUND, f"no connector with identifier {identifier!r}")

    async def test(self, identifier: str, req: TestRequest) -> TaskRow:
        """Queue a validation (or run it here for ``executeOnDelegate: false``) and wait for it."""
        row = await self.get(identifier)
        try:
            connector = parse_connector(row.body)
            permissions = parse_actions(None, req.permissions, "permissions") if req.permissions else ()
        except ConnectorInvalid as exc:
            raise ApiFailure(400, Code.INVALID_REQUEST, str(exc), problems=exc.problems) from None
        payload: dict[str, Any] = {"connector": row.body}
        if permissions:
            payload["permissions"] = list(permissions)
        self.on_test_created("manual")
        if row.next_trigger == "changed":
            # This test is of the connector as it is now: it answers the change, which needs no second one.
            # Its end schedules the next test; until then, a minute's allowance in case it never ends.
            await self.store.reschedule_connector(
                identifier, was=row.next_test_at, to=self._clock() + 60.0, trigger=None
            )
        if not connector.execute_on_delegate:
            return await self._test_on_platform(connector, payload, permissions, req.timeout_seconds, "manual")
        task = await self._queue.create_task(
            type=TASK_TYPE_AWS_VALIDATE,
            payload=payload,
            selectors=connector.delegate_selectors,
            connector_id=identifier,
            pickup_timeout=req.pickup_timeout_seconds,
            timeout=req.timeout_seconds,
            trigger="manual",
        )
        return await self._queue.wait_task(task.id, req.wait_seconds)

    async def start_test(self, row: ConnectorRow, *, trigger: str, timeout: float) -> TaskRow:
        """Create a test of ``row`` without waiting for it (the schedule's); a platform test runs in the
        background."""
        connector = parse_connector(row.body)
        payload: dict[str, Any] = {"connector": row.body}
        if not connector.execute_on_delegate:
            task = await self._platform_task(connector, payload, timeout, trigger)
            run = asyncio.create_task(self._run_on_platform(connector, task, ()), name=f"platform-test-{task.id}")
            self._platform_runs.add(run)
            run.add_done_callback(self._platform_runs.discard)
            return task
        return await self._queue.create_task(
            type=TASK_TYPE_AWS_VALIDATE,
            payload=payload,
            selectors=connector.delegate_selectors,
            connector_id=row.identifier,
            timeout=timeout,
            trigger=trigger,
        )

    async def aclose(self) -> None:
        """Cancel the platform tests still running in the background (the control plane stops)."""
        for run in list(self._platform_runs):
            run.cancel()
        await asyncio.gather(*self._platform_runs, return_exceptions=True)

    async def _test_on_platform(
        self,
        connector: AwsConnector,
        payload: dict[str, Any],
        permissions: tuple[str, ...],
        timeout: float | None,
        trigger: str,
    ) -> TaskRow:
        task = await self._platform_task(connector, payload, timeout, trigger)
        return await self._run_on_platform(connector, task, permissions)

    async def _platform_task(
        self, connector: AwsConnector, payload: dict[str, Any], timeout: float | None, trigger: str
    ) -> TaskRow:
        # It never enters the delegate queue: it is created running, here.
        return await self._queue.create_task(
            type=TASK_TYPE_AWS_VALIDATE,
            payload=payload,
            connector_id=connector.identifier,
            timeout=timeout,
            on_platform=True,
            trigger=trigger,
        )

    async def _run_on_platform(self, connector: AwsConnector, task: TaskRow, permissions: tuple[str, ...]) -> TaskRow:
        if self._platform_validator is None:
            return await self._queue.complete(
                task,
                status="FAILURE",
                result=failure_document(
                    "This control plane has no platform validator configured.", reason="unsupported"
                ),
                failure_reason="unsupported",
            )
        try:
            async with asyncio.timeout(task.timeout_seconds):
                # The platform runs the task as a delegate would: with the token its hand-out would carry.
                token = self._queue.task_tokens(task, "platform")
                result = await self._platform_validator(connector, task.id, permissions, oidc_token=token)
        except TimeoutError:
            return await self._queue.complete(
                task,
                status="FAILURE",
                result=failure_document(
                    f"The platform validation did not finish within {task.timeout_seconds:.0f}s.", reason="timeout"
                ),
                failure_reason="timeout",
            )
        return await self._queue.complete(task, status=result.status, result=result, lease_id="platform")


def connector_spec(document: Any) -> Any:
    """The part of a connector document a test depends on (not its name, description or tags)."""
    connector = document.get("connector") if isinstance(document, dict) else None
    return connector.get("spec") if isinstance(connector, dict) else None
