"""The Harness-typed view of a connector test: what a client written against Harness parses."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aiohttp
import msgspec

from agent.protocol.models import AcquireRequest, TaskResult, TestRequest
from agent.protocol.results import (
    HarnessErrorDetail,
    HarnessValidationResult,
    ValidationResult,
    epoch_ms,
    failed,
    harness_result,
)
from tests.conftest import API_KEY, ControlPlaneFactory, delegate_client, manual_connector, register_request

H = {"X-API-Key": API_KEY}


def test_a_failure_becomes_harness_errors_with_code_450() -> None:
    """Each of our errors is one Harness error: our category as reason, our message, the generic 450."""
    result = failed(
        ValidationResult(status="SUCCESS", tested_at=datetime(2026, 12, 3, 8, 0, 0, 123999, tzinfo=UTC)),
        step="describe_regions",
        category="permission_denied",
        message="DescribeRegions was denied",
        aws_error_code="UnauthorizedOperation",
    )
    result.delegate_id = "dlg_1"
    assert msgspec.to_builtins(harness_result(result, task_id="tsk_1")) == {
        "status": "FAILURE",
        "testedAt": 1796284800123,
        "errorSummary": "DescribeRegions was denied",
        "errors": [{"reason": "permission_denied", "message": "DescribeRegions was denied", "code": 450}],
        "delegateId": "dlg_1",
        "taskId": "tsk_1",
    }


def test_epoch_milliseconds_are_exact() -> None:
    """No float rounding: .123999 s is 123 ms, and a naive time counts as UTC."""
    assert epoch_ms(datetime(1970, 1, 1, 0, 0, 1, 999999, tzinfo=UTC)) == 1999
    assert epoch_ms(datetime(2026, 12, 3, 8, 0)) == epoch_ms(datetime(2026, 12, 3, 8, 0, tzinfo=UTC))


async def get_task(http: aiohttp.ClientSession, url: str, task_id: str) -> dict[str, Any]:
    async with http.get(f"{url}/api/v1/tasks/{task_id}", headers=H) as resp:
        assert resp.status == 200
        return await resp.json()  # type: ignore[no-any-return]


async def test_served_connector_tests_carry_the_harness_result(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """GET /api/v1/tasks/{id} serves `harness` beside `result`, typed as Harness types it: a delegate's
    failure names the delegate; a failure the control plane decides (cancelled) names none."""
    cp = await control_plane_factory()
    client = delegate_client(http, cp.url)
    delegate_id = (await client.register(register_request("d1"))).delegate_id
    await cp.core.apply_connector(manual_connector("Prod"))
    task = await cp.core.test_connector("Prod", TestRequest(wait_seconds=0))
    assert (await get_task(http, cp.url, task.id))["harness"] is None  # queued: nothing to say yet

    [leased] = (await client.acquire(delegate_id, AcquireRequest(max_tasks=1, wait_seconds=1))).tasks
    now = datetime.now(UTC)
    output = failed(
        ValidationResult(status="SUCCESS", tested_at=now, delegate_id=delegate_id),
        step="get_caller_identity",
        category="credentials_invalid",
        message="GetCallerIdentity rejected the credentials",
        aws_error_code="InvalidClientTokenId",
    )
    report = TaskResult(lease_id=leased.lease_id, status="FAILURE", output=output, started_at=now, finished_at=now)
    assert (await client.submit_result(leased.task_id, report)).outcome == "accepted"

    view = await get_task(http, cp.url, task.id)
    harness = msgspec.convert(view["harness"], HarnessValidationResult, strict=True)  # ints are ints
    assert harness == HarnessValidationResult(
        status="FAILURE",
        tested_at=epoch_ms(now),
        error_summary="GetCallerIdentity rejected the credentials",
        errors=[HarnessErrorDetail(reason="credentials_invalid", message="GetCallerIdentity rejected the credentials")],
        delegate_id=delegate_id,
        task_id=task.id,
    )
    assert view["result"]["errors"][0]["code"] == "InvalidClientTokenId"  # the richer result is unchanged

    cancelled = await cp.core.test_connector("Prod", TestRequest(wait_seconds=0))
    await cp.core.cancel_task(cancelled.id)
    harness = msgspec.convert((await get_task(http, cp.url, cancelled.id))["harness"], HarnessValidationResult)
    assert (harness.status, harness.delegate_id, harness.task_id) == ("FAILURE", None, cancelled.id)
    assert [e.code for e in harness.errors] == [450] and harness.error_summary is not None
