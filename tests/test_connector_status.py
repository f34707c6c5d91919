"""A connector's status tells the truth: a stale last test."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import aiohttp

from agent.controlplane.app import ControlPlaneService
from agent.protocol.client import ControlPlaneClient
from agent.protocol.models import AcquireRequest, TaskResult, TestRequest
from agent.protocol.results import ValidationResult
from tests.conftest import (
    API_KEY,
    ControlPlaneFactory,
    delegate_client,
    manual_connector,
    register_request,
)

H = {"X-API-Key": API_KEY}


async def last_test(http: aiohttp.ClientSession, url: str, identifier: str) -> dict[str, Any]:
    async with http.get(f"{url}/api/v1/connectors/{identifier}", headers=H) as resp:
        assert resp.status == 200
        return (await resp.json())["lastTest"]  # type: ignore[no-any-return]


async def apply(http: aiohttp.ClientSession, url: str, document: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url + "/api/v1/connectors", json=document, headers=H) as resp:
        assert resp.status in (200, 201), await resp.text()
        return await resp.json()  # type: ignore[no-any-return]


async def start_test(cp: ControlPlaneService, client: ControlPlaneClient, delegate_id: str) -> tuple[str, str]:
    """Queue a test of 'Prod' and lease it to the delegate: (task id, lease id)."""
    task = await cp.core.test_connector("Prod", TestRequest(wait_seconds=0))
    [leased] = (await client.acquire(delegate_id, AcquireRequest(max_tasks=1, wait_seconds=1))).tasks
    assert leased.task_id == task.id
    return leased.task_id, leased.lease_id


async def succeed(client: ControlPlaneClient, task_id: str, lease_id: str) -> None:
    now = datetime.now(UTC)
    output = ValidationResult(status="SUCCESS", tested_at=now)
    result = TaskResult(lease_id=lease_id, status="SUCCESS", output=output, started_at=now, finished_at=now)
    assert (await client.submit_result(task_id, result)).outcome == "accepted"


async def test_a_changed_spec_marks_the_last_test_stale_until_tested_again(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """lastTest.stale: false after a test; true once the spec changes (even mid-test); false after a new test."""
    cp = await control_plane_factory()
    client = delegate_client(http, cp.url)
    d = (await client.register(register_request("d1"))).delegate_id
    original = manual_connector("Prod")
    await apply(http, cp.url, original)
    await succeed(client, *await start_test(cp, client, d))
    assert (await last_test(http, cp.url, "Prod"))["stale"] is False

    described = copy.deepcopy(original)
    described["connector"]["description"] = "the production account"
    assert (await apply(http, cp.url, described))["outcome"] == "updated"
    assert (await last_test(http, cp.url, "Prod"))["stale"] is False  # not the spec: the test still holds

    moved = manual_connector("Prod")
    moved["connector"]["spec"]["credential"]["region"] = "eu-west-1"
    await apply(http, cp.url, moved)
    stale = await last_test(http, cp.url, "Prod")
    assert (stale["status"], stale["stale"]) == ("SUCCESS", True)  # the previous version's result

    running = await start_test(cp, client, d)  # tests eu-west-1 ...
    await apply(http, cp.url, original)  # ... while the spec changes back under it
    await succeed(client, *running)
    assert (await last_test(http, cp.url, "Prod"))["stale"] is True

    await succeed(client, *await start_test(cp, client, d))
    assert (await last_test(http, cp.url, "Prod"))["stale"] is False
