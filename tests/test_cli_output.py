"""What the CLI prints (issue 14, point 9): no Python None, errors once and as JSON with -o json,
colour only on a terminal, shell completion, a documented control-plane --help, and when a test ran."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime, timedelta

from agent.cli import main
from agent.protocol.models import AcquireRequest, TaskResult, TestRequest
from agent.protocol.results import ValidationResult
from tests.conftest import ControlPlaneFactory, manual_connector, register_request


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


# --- lastTest.testedAt ---------------------------------------------------------------------------------------------


async def test_last_test_time_is_when_the_test_ran_not_when_the_result_arrived(
    control_plane_factory: ControlPlaneFactory,
) -> None:
    """A result delivered late (an outbox replay) keeps the time its test ran."""
    cp = await control_plane_factory()
    cp.core.apply_connector(manual_connector("Late"))
    reg = cp.core.register(register_request("d1"), token_name=None)
    testing = asyncio.create_task(cp.core.test_connector("Late", TestRequest(wait_seconds=0)))
    [task] = (await cp.core.acquire(reg.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=5))).tasks
    ran = datetime.now(UTC) - timedelta(minutes=5)
    output = ValidationResult(status="SUCCESS", tested_at=ran)
    cp.core.submit_result(
        task.task_id,
        TaskResult(lease_id=task.lease_id, status="SUCCESS", output=output, started_at=ran, finished_at=ran),
    )
    await testing
    record = cp.core.connector_record(cp.core.get_connector("Late"))
    assert record.last_test is not None
    assert record.last_test.tested_at == ran
