"""Attacks on batched results (issue 20): ``POST /v1/results`` and the reporter that sends it.

Each result in a batch must be judged exactly as its own ``PUT /v1/tasks/{taskId}/result`` would
be: the holder per token (and a refusal counted as one, as the PUT's is), the fence, idempotency
per lease, and one broken result must cost the others nothing. Everything runs against the real
control plane on loopback and, for the reporter, a real delegate.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import aiohttp
import pytest
import structlog

from agent.controlplane.core import ControlPlaneSettings
from agent.protocol.errors import AuthError, Code, LeaseFenced, RateLimited, TransientError
from agent.protocol.models import AcquireRequest, SubmitResultResponse, TaskResult
from agent.protocol.results import ValidationResult
from bench.chaos import ChaosProxy, Mode
from tests.conftest import (
    FAST,
    AgentFactory,
    ControlPlaneFactory,
    ManualClock,
    delegate_client,
    done,
    register_request,
)
from tests.helpers import results_held_then_released, sample, wait_for

REQUESTS = "delegate_control_plane_requests_total"

pytestmark = pytest.mark.attacks

TOKEN_A = "team-a-delegate-token-0123456789abcdef"
TOKEN_B = "team-b-delegate-token-fedcba9876543210"
TOKENS = f"team-a:{TOKEN_A}\nteam-b:{TOKEN_B}"


def result(lease_id: str, connector: str | None = None) -> TaskResult:
    now = datetime.now(UTC)
    output = ValidationResult(status="SUCCESS", tested_at=now, connector_identifier=connector)
    return TaskResult(lease_id=lease_id, status="SUCCESS", output=output, started_at=now, finished_at=now)


async def test_anothers_results_in_a_batch_are_refused_one_by_one_and_counted_as_refusals(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """B's token reporting A's task inside a batch gets 403 for that item alone (B's own is
    accepted), and each such item counts against B's address as its own PUT would: a batch must
    not be a way to probe 64 foreign leases per request without ever meeting the 429."""
    settings = ControlPlaneSettings(sweep_interval_seconds=3600, auth_failure_limit=3, auth_failure_window_seconds=60)
    cp = await control_plane_factory(tokens=TOKENS, settings=settings)
    a, b = delegate_client(http, cp.url, token=TOKEN_A), delegate_client(http, cp.url, token=TOKEN_B)
    a_id = (await a.register(register_request("a"))).delegate_id
    for _ in range(3):
        await cp.core.create_task(type="test.echo", payload={})
    mine = (await a.acquire(a_id, AcquireRequest(max_tasks=3, wait_seconds=0))).tasks
    b_id = (await b.register(register_request("b"))).delegate_id
    await cp.core.create_task(type="test.echo", payload={})
    [theirs] = (await b.acquire(b_id, AcquireRequest(max_tasks=1, wait_seconds=0))).tasks

    answers = await b.submit_results(
        [(t.task_id, result(t.lease_id, connector="forged")) for t in mine[:2]]
        + [(theirs.task_id, result(theirs.lease_id))]
    )
    assert [type(x).__name__ for x in answers] == ["AuthError", "AuthError", "SubmitResultResponse"]
    assert all(
        isinstance(x, AuthError) and (x.status, x.code) == (403, Code.DELEGATE_TOKEN_MISMATCH) for x in answers[:2]
    )
    assert [(await cp.core.get_task(t.task_id)).state for t in mine] == ["running"] * 3  # A's untouched
    metric = cp.core.metrics.registry.get_sample_value
    refusals = {"credential": "delegate", "reason": Code.DELEGATE_TOKEN_MISMATCH}
    assert metric("controlplane_auth_refusals_total", refusals) == 2
    # The third refused item reaches the limit of 3, as three refused PUTs would: the next request waits.
    [third] = await b.submit_results([(mine[2].task_id, result(mine[2].lease_id))])
    assert isinstance(third, AuthError)
    with pytest.raises(RateLimited):
        await b.submit_results([(theirs.task_id, result(theirs.lease_id))])


async def test_the_same_task_twice_in_one_batch_is_accepted_once(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, clock: ManualClock
) -> None:
    """The same lease twice: accepted, then duplicate. An older lease of the same task after the
    newer one: fenced. The task is completed once and counted once."""
    cp = await control_plane_factory(clock=clock)
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("a"))
    task = await cp.core.create_task(type="test.echo", payload={})
    [first] = (await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))).tasks
    answers = await client.submit_results(
        [(task.id, result(first.lease_id, "x")), (task.id, result(first.lease_id, "y"))]
    )
    assert [getattr(x, "outcome", None) for x in answers] == ["accepted", "duplicate"]
    answers = await client.submit_results(
        [(task.id, result(first.lease_id, "x")), (task.id, result(first.lease_id, "y"))]
    )
    assert [getattr(x, "outcome", None) for x in answers] == ["duplicate", "duplicate"]
    assert (await cp.core.get_task(task.id)).result.connector_identifier == "x"  # type: ignore[union-attr]

    other = await cp.core.create_task(type="test.echo", payload={})
    [old] = (await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))).tasks
    clock.advance(45)
    await cp.core.sweep()  # the lease expired: the task is queued again and leased anew
    [new] = (await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))).tasks
    assert new.task_id == other.id and new.lease_id != old.lease_id
    answers = await client.submit_results([(other.id, result(new.lease_id, "new")), (other.id, result(old.lease_id))])
    assert [type(x) for x in answers] == [SubmitResultResponse, LeaseFenced]
    assert (await cp.core.get_task(other.id)).result.connector_identifier == "new"  # type: ignore[union-attr]
    assert (await cp.core.stats()).results_accepted == 2


async def test_one_damaged_task_row_fails_its_own_result_not_the_batch(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """A task row damaged in the control plane's database answers its own PUT with a 500; in a
    batch it must be that item's 500 alone. A whole-batch 500 is retried by the delegate forever
    with the same results, so the results after the damaged one would never be recorded."""
    cp = await control_plane_factory()
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("a"))
    for _ in range(3):
        await cp.core.create_task(type="test.echo", payload={})
    tasks = (await client.acquire(d.delegate_id, AcquireRequest(max_tasks=3, wait_seconds=0))).tasks
    path = cp.core.store.path  # type: ignore[attr-defined]
    with sqlite3.connect(path) as db:
        db.execute("UPDATE tasks SET payload = '{not json' WHERE id = ?", (tasks[1].task_id,))
    with structlog.testing.capture_logs() as logs:
        answers = await client.submit_results([(t.task_id, result(t.lease_id)) for t in tasks])
    assert isinstance(answers[1], TransientError) and answers[1].status == 500, answers[1]
    assert tasks[1].task_id in answers[1].message
    assert [getattr(x, "outcome", None) for x in (answers[0], answers[2])] == ["accepted", "accepted"]
    assert [(await cp.core.get_task(t.task_id)).state for t in (tasks[0], tasks[2])] == ["done", "done"]
    assert any(e["event"] == "controlplane.http.row_damaged" for e in logs)


@pytest.mark.parametrize(
    "body",
    [
        {"results": []},
        {"results": [{"taskId": "tsk_1"}]},
        {"results": [{"taskId": 7, "result": {}}]},
        {"results": "all of them"},
        # A secret in a field that is fine, next to one that is not: the refusal names the bad one only.
        {"results": [{"taskId": "tsk_1", "result": {"leaseId": "SECRET-CANARY-7f3a", "status": 3}}]},
    ],
    ids=["empty", "no-result", "wrong-type", "not-a-list", "canary"],
)
async def test_a_malformed_batch_is_a_400_naming_the_field_and_echoing_no_value(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, body: dict[str, object]
) -> None:
    cp = await control_plane_factory()
    client = delegate_client(http, cp.url)
    await client.register(register_request("a"))
    headers = {"Authorization": client._signer.header()}
    async with http.post(cp.url + "/v1/results", json=body, headers=headers) as resp:
        text = await resp.text()
    assert resp.status == 400, text
    assert "results" in text
    assert "SECRET-CANARY" not in text


@pytest.mark.parametrize("mode", ["missing", "not_allowed"])
async def test_a_control_plane_without_the_route_is_asked_once_then_gets_puts(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, mode: Mode
) -> None:
    """404 (no such path) and 405 (the path, for other methods) both mean "no batch route": results
    go one PUT each, and the delegate does not ask again (a 405 is also a 4xx RequestRejected, and
    was taken for "this batch was bad": the route was asked again for every batch)."""
    cp = await control_plane_factory(settings=FAST)
    proxy = ChaosProxy(cp.url, mode=mode, share=1.0, only_suffix="/v1/results")
    async with proxy.running() as url:
        a = await agent_factory(url, capacity=4)
        await a.registered()
        for _ in range(3):
            task = await cp.core.create_task(type="test.echo", payload={"message": "m"})
            assert (await done(cp, task.id)).status == "SUCCESS"
        await wait_for(lambda: sample(a.agent.metrics, "delegate_outbox_depth") == 0, "the outbox to empty")
    assert sample(a.agent.metrics, REQUESTS, operation="submit_result", status="200") == 3
    assert sum(proxy.seen[k] for k in ("404", "405")) == 1


async def test_a_batch_too_large_for_the_server_is_sent_one_by_one_and_nothing_is_dropped(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A control plane with a smaller body limit answers 413 for a batch whose results each fit:
    the batch is sent again one result per PUT, every result is accepted once, none dropped, and
    the next batch still tries the batch route."""
    import agent.controlplane.app as app_module

    monkeypatch.setattr(app_module, "MAX_BODY_BYTES", 4096)
    cp = await control_plane_factory(settings=FAST)
    async with results_held_then_released(cp, agent_factory) as (a, results):
        last = await cp.core.create_task(type="test.echo", payload={"message": "m"})
        assert (await done(cp, last.id)).status == "SUCCESS"
    metrics = a.agent.metrics
    assert [(r.status, r.attempts) for r in results] == [("SUCCESS", 1)] * 12
    assert sample(metrics, REQUESTS, operation="submit_results", status="413") >= 1
    assert sample(metrics, REQUESTS, operation="submit_result", status="200") == 12
    # The last one's (and, should a retry have left before the twelfth arrived, one more).
    assert sample(metrics, REQUESTS, operation="submit_results", status="200") >= 1
    dropped = [s.value for m in metrics.results_dropped.collect() for s in m.samples if s.name.endswith("_total")]
    assert sum(dropped) == 0
    assert (await cp.core.stats()).results_accepted == 13
