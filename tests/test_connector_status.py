"""A connector's status tells the truth early: a stale last test, and selectors no delegate has."""

from __future__ import annotations

import asyncio
import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from agent.cli import EXIT_FAILED, EXIT_OK, main
from agent.controlplane.app import ControlPlaneService
from agent.protocol.client import ControlPlaneClient
from agent.protocol.models import AcquireRequest, HeartbeatRequest, TaskResult, TestRequest
from agent.protocol.results import ValidationResult
from tests.conftest import (
    API_KEY,
    ControlPlaneFactory,
    ManualClock,
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
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
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
    capsys.readouterr()
    common = ["--control-plane", cp.url, "--api-key", API_KEY]
    assert await asyncio.to_thread(main, ["connector", "list", *common]) == EXIT_OK
    assert "SUCCESS" in (listed := capsys.readouterr().out) and "(stale)" in listed
    assert await asyncio.to_thread(main, ["connector", "get", "Prod", *common]) == EXIT_OK
    assert "ran an earlier version of the spec" in capsys.readouterr().out

    running = await start_test(cp, client, d)  # tests eu-west-1 ...
    await apply(http, cp.url, original)  # ... while the spec changes back under it
    await succeed(client, *running)
    assert (await last_test(http, cp.url, "Prod"))["stale"] is True

    await succeed(client, *await start_test(cp, client, d))
    assert (await last_test(http, cp.url, "Prod"))["stale"] is False


async def test_apply_warns_when_no_connected_delegate_has_the_selectors(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """The warning comes with the apply, naming the tag sets the connected delegates do have."""
    cp = await control_plane_factory()
    gov = manual_connector("Gov", delegateSelectors=["gov", "prod"])
    [alone] = (await apply(http, cp.url, gov))["warnings"]
    assert alone.startswith("no delegate is connected") and "[gov, prod]" in alone

    client = delegate_client(http, cp.url)
    for name, tags in (("eks-1", ["eu", "prod"]), ("eks-2", ["prod", "eu"]), ("lab", [])):
        await client.register(register_request(name, tags))
    [missing] = (await apply(http, cp.url, gov))["warnings"]
    assert "no connected delegate has all of the tags [gov, prod]" in missing
    assert "Connected delegates: eks-1, eks-2 have [eu, prod]; lab has no tags but its name." in missing
    assert "DELEGATE_TAGS" in missing
    assert (await apply(http, cp.url, manual_connector("Eu", delegateSelectors=["EU"])))["warnings"] == []
    assert (await apply(http, cp.url, manual_connector("Lab", delegateSelectors=["lab"])))["warnings"] == []
    await client.register(register_request("gov-echo", ["gov", "prod"], task_types=["test.echo"]))
    [cannot] = (await apply(http, cp.url, gov))["warnings"]  # it has the tags but runs no connector tests
    assert "no connected delegate has all of the tags [gov, prod]" in cannot and "gov-echo" not in cannot
    platform = manual_connector("Platform", delegateSelectors=["gov"], executeOnDelegate=False)
    assert (await apply(http, cp.url, platform))["warnings"] == []


async def test_the_no_eligible_delegate_failure_lists_the_tag_sets_there_are(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, clock: ManualClock
) -> None:
    """When nobody picks the task up, the failure says which tags the connected delegates do have."""
    cp = await control_plane_factory(clock=clock)
    client = delegate_client(http, cp.url)
    eks = (await client.register(register_request("eks-1", ["eu", "prod"]))).delegate_id
    await cp.core.apply_connector(manual_connector("Gov", delegateSelectors=["gov"]))
    task = await cp.core.test_connector("Gov", TestRequest(wait_seconds=0))
    clock.advance(31)  # past the 30 s pickup timeout
    await client.heartbeat(eks, HeartbeatRequest(state="running"))  # still connected
    await cp.core.sweep()
    failed = await cp.core.get_task(task.id)
    assert (failed.status, failed.failure_reason) == ("FAILURE", "no_eligible_delegate")
    assert failed.result is not None and failed.result.error_summary is not None
    assert "no connected delegate has all of the tags [gov]" in failed.result.error_summary
    assert "Connected delegates: eks-1 has [eu, prod]." in failed.result.error_summary


async def test_the_cli_prints_apply_warnings(
    control_plane_factory: ControlPlaneFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`connector apply` prints the answer's warnings on stderr; stdout keeps the one line per connector."""
    cp = await control_plane_factory()
    f = tmp_path / "gov.yaml"
    f.write_text(yaml.safe_dump(manual_connector("Gov", delegateSelectors=["gov"])))
    argv = ["connector", "apply", "-f", str(f), "--control-plane", cp.url, "--api-key", API_KEY]
    assert await asyncio.to_thread(main, argv) == EXIT_OK
    out, err = capsys.readouterr()
    assert out.strip() == "connector/Gov created"
    assert err.startswith("delegate-agent: warning: connector/Gov: no delegate is connected")


async def test_an_api_export_is_applied_with_one_notice(
    control_plane_factory: ControlPlaneFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A document exported from Harness's API is applied as its `connector`; the answer's warnings say
    once what was ignored around it, `connector apply` prints that, and only the connector is stored."""
    cp = await control_plane_factory()
    export = Path(__file__).parent / "data" / "connectors" / "api-export.json"
    argv = ["connector", "apply", "-f", str(export), "--control-plane", cp.url, "--api-key", API_KEY]
    assert await asyncio.to_thread(main, argv) == EXIT_OK
    out, err = capsys.readouterr()
    assert out.strip() == "connector/api_exported created"
    notices = [line for line in err.splitlines() if "Harness API export" in line]
    assert notices == [
        "delegate-agent: warning: connector/api_exported: read .connector from a Harness API export; ignored "
        "what Harness keeps around it: createdAt, lastModifiedAt, status, activityDetails, harnessManaged, "
        "gitDetails, entityValidityDetails, isFavorite"
    ]
    stored = (await cp.core.get_connector("api_exported")).body
    assert list(stored) == ["connector"]
    assert stored["connector"]["accountIdentifier"] == "kmpySmUISimoRrJL6NL73w"
    preview = await cp.core.apply_connector(yaml.safe_load(export.read_text()), dry_run=True)
    assert (preview.outcome, preview.warnings[0]) == ("unchanged", notices[0].split(": ", 3)[3])


async def test_validate_says_the_same_notice(capsys: pytest.CaptureFixture[str]) -> None:
    """`delegate-agent validate` on an API export prints the notice on stderr and tests the connector."""
    export = Path(__file__).parent / "data" / "connectors" / "api-export.json"
    code = await asyncio.to_thread(main, ["validate", "-f", str(export), "-o", "json"])  # no secrets dir
    out, err = capsys.readouterr()
    assert "notice: read .connector from a Harness API export; ignored what Harness keeps around it" in err
    assert code == EXIT_FAILED and json.loads(out)["failure"]["category"] == "secret_not_found"
