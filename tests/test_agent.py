"""The daemon in-process against the real control plane: register, route, poll, run, report, drain."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import msgspec
import structlog

from agent.controlplane.core import ControlPlaneSettings
from tests.conftest import FAST, TOKEN, AgentFactory, ControlPlaneFactory, done, free_port
from tests.helpers import wait_for


async def test_registration_carries_name_tags_capacity_and_types(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """The control plane sees the delegate with its tags, capacity and task types."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp, name="eks-1", tags=("eks", "prod"), capacity=3)
    delegate_id = await a.registered()
    [view] = cp.core.delegate_views()
    assert (view.delegate_id, view.name, view.capacity) == (delegate_id, "eks-1", 3)
    assert view.tags == ["eks", "prod", "eks-1"]
    assert {"test.echo", "test.gate"} <= set(view.task_types)


async def test_tasks_are_routed_by_tags(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """Each task runs on the delegate whose tags cover its selectors."""
    cp = await control_plane_factory(settings=FAST)
    prod = await agent_factory(cp, name="prod-1", tags=("eks", "prod"))
    gov = await agent_factory(cp, name="gov-1", tags=("gov",))
    await prod.registered()
    await gov.registered()
    to_gov = cp.core.create_task(type="test.echo", payload={"message": "g"}, selectors=["gov"])
    to_prod = cp.core.create_task(type="test.echo", payload={"message": "p"}, selectors=["eks", "prod"])
    assert (await done(cp, to_gov.id)).delegate_name == "gov-1"
    assert (await done(cp, to_prod.id)).delegate_name == "prod-1"
    assert (await done(cp, to_prod.id)).result.connector_identifier == "p"


async def test_capacity_is_never_exceeded(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """With capacity 2 and 6 tasks queued, never more than 2 run; the rest wait on the server."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp, capacity=2)
    await a.registered()
    ids = [cp.core.create_task(type="test.gate", payload={}).id for _ in range(6)]
    await wait_for(lambda: len(a.gate.started) == 2, "two tasks to start")
    assert sum(1 for i in ids if cp.core.get_task(i).state == "running") == 2
    assert a.agent.state.capacity == 2
    for round_ in (1, 2, 3):
        await wait_for(lambda n=round_: len(a.gate.started) == 2 * n and a.gate.running == 2, f"round {round_}")
        a.gate.open_all()
    for i in ids:
        assert (await done(cp, i)).status == "SUCCESS"
    assert a.gate.max_running == 2


async def test_pickup_happens_within_the_long_poll(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """With a 30 s poll wait, a task queued while the delegate waits starts at once, not after the wait."""
    cp = await control_plane_factory(
        settings=ControlPlaneSettings(heartbeat_seconds=5, poll_wait_seconds=30, lease_seconds=30)
    )
    a = await agent_factory(cp)
    delegate_id = await a.registered()
    await wait_for(lambda: any(w.delegate_id == delegate_id for w in cp.core._waiters), "the long poll to wait")
    loop = asyncio.get_running_loop()
    queued = loop.time()
    task = cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: task.id in a.gate.started, "the task to start")
    assert loop.time() - queued < 5.0  # far inside the 30 s poll wait: no polling interval involved
    a.gate.open(task.id)
    await done(cp, task.id)


async def test_the_delegate_registers_again_when_the_control_plane_forgets_it(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """Removing the delegate on the server leads to a new registration, and work continues."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp)
    first = await a.registered()
    cp.core.forget_delegate(first, force=True)
    await wait_for(cp.core.delegate_views, "the delegate to register again")
    task = cp.core.create_task(type="test.echo", payload={"message": "again"})
    assert (await done(cp, task.id)).status == "SUCCESS"
    assert a.agent.metrics.registrations._value.get() >= 2


async def test_unknown_type_invalid_payload_and_crash_fail_alone(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """Bad tasks become FAILURE results naming the problem; a task running beside them is untouched."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp)
    await a.registered()
    survivor = cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: survivor.id in a.gate.started, "the long task to start")
    unknown = cp.core.create_task(type="test.echo", payload={"message": "x"})
    invalid = cp.core.create_task(type="test.echo", payload={})
    crash = cp.core.create_task(type="test.crash", payload={"secret": "boom-secret-123456"})
    # Nobody supports this type, so route it explicitly to our delegate with a type it does not have.
    r_invalid, r_crash = await done(cp, invalid.id), await done(cp, crash.id)
    assert r_invalid.status == "FAILURE"
    assert r_invalid.result.errors[0].message == "payload.message: is required"
    assert r_crash.status == "FAILURE"
    assert r_crash.result.failure.category == "internal"
    assert b"boom-secret" not in msgspec.json.encode(r_crash.result)
    assert (await done(cp, unknown.id)).status == "SUCCESS"
    a.gate.open(survivor.id)
    assert (await done(cp, survivor.id)).status == "SUCCESS"


async def test_a_task_of_an_unknown_type_fails_naming_the_type(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """A task the delegate cannot run (a misrouted or newer type) fails with the type named."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp)
    delegate_id = await a.registered()
    # Simulate a control plane that routes a type the delegate did not register for.
    cp.store.update_delegate(delegate_id, task_types=["test.echo", "test.newer"])
    task = cp.core.create_task(type="test.newer", payload={})
    result = await done(cp, task.id)
    assert result.status == "FAILURE"
    assert "cannot run tasks of type 'test.newer'" in result.result.error_summary


async def test_leases_are_renewed_while_a_task_runs(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """A task longer than the lease keeps it: the server does not re-queue it."""
    cp = await control_plane_factory(
        settings=ControlPlaneSettings(
            heartbeat_seconds=1, poll_wait_seconds=1, lease_seconds=0.6, sweep_interval_seconds=0.05
        )
    )
    a = await agent_factory(cp)
    await a.registered()
    task = cp.core.create_task(type="test.sleep", payload={"seconds": 2})
    result = await done(cp, task.id)
    assert (result.status, result.attempts) == ("SUCCESS", 1)


async def test_a_task_is_stopped_at_its_timeout(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """The task's own timeout bounds it; the result says timeout."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp)
    await a.registered()
    task = cp.core.create_task(type="test.sleep", payload={"seconds": 60}, timeout=0.5)
    result = await done(cp, task.id)
    assert result.status == "FAILURE"
    assert result.result.failure.category == "timeout"


async def test_cancellation_from_the_control_plane(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """A user's cancel reaches the delegate (heartbeat or renewal), which stops the task and says so."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp)
    await a.registered()
    task = cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: task.id in a.gate.started, "the task to start")
    cp.core.cancel_task(task.id)
    result = await done(cp, task.id)
    assert result.status == "FAILURE"
    assert result.result.error_summary == "cancelled: cancelled by the control plane"
    assert a.gate.cancelled == [task.id]


async def test_no_result_is_lost_or_counted_twice_across_an_outage(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """The control plane stops while a task runs and starts again: the result arrives exactly once."""
    port = free_port()
    data = tmp_path / "cp"
    cp = await control_plane_factory(settings=FAST, port=port, data_dir=data)
    a = await agent_factory(cp, data_dir=tmp_path / "agent")
    await a.registered()
    task = cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: task.id in a.gate.started, "the task to start")
    await cp.stop()
    a.gate.open(task.id)
    await wait_for(
        lambda: a.agent.metrics.cp_requests.labels("submit_result", "error")._value.get() >= 1,
        "the result to fail to send while the control plane is down",
    )
    await wait_for(lambda: not a.agent.state.running, "the task to leave the executor")
    cp2 = await control_plane_factory(settings=FAST, port=port, data_dir=data)
    result = await done(cp2, task.id, timeout=30)
    assert (result.status, result.attempts) == ("SUCCESS", 1)
    await wait_for(lambda: a.agent.metrics.outbox_depth._value.get() == 0, "the outbox to empty")
    accepted = a.agent.metrics.cp_requests.labels("submit_result", "200")._value.get()
    assert accepted == 1


async def test_results_left_in_the_outbox_are_delivered_after_a_restart(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """A delegate that stops with undelivered results sends them when it starts again."""
    port = free_port()
    data = tmp_path / "cp"
    agent_dir = tmp_path / "agent"
    cp = await control_plane_factory(settings=FAST, port=port, data_dir=data)
    a = await agent_factory(cp, data_dir=agent_dir, drain_timeout=0.2)
    await a.registered()
    task = cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: task.id in a.gate.started, "the task to start")
    await cp.stop()
    a.gate.open(task.id)
    await wait_for(lambda: not a.agent.state.running, "the task to finish on the delegate")
    assert await a.stop() == 0
    from agent.runtime.outbox import SqliteOutbox

    kept = SqliteOutbox(agent_dir / "outbox.sqlite3")
    assert [e.task_id for e in kept.pending()] == [task.id]
    kept.close()
    cp2 = await control_plane_factory(settings=FAST, port=port, data_dir=data)
    await agent_factory(cp2, data_dir=agent_dir)
    result = await done(cp2, task.id, timeout=30)
    assert result.status == "SUCCESS"


async def test_drain_finishes_running_work_then_deregisters(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, http: aiohttp.ClientSession
) -> None:
    """Shutdown: readiness 503 at once, no new work, running tasks finish and report, then deregister."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp, drain_timeout=20)
    await a.registered()
    running = cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: running.id in a.gate.started, "the task to start")
    async with http.get(a.agent.http_url + "/readyz") as resp:
        assert resp.status == 200
    a.agent.request_shutdown()
    await wait_for(lambda: a.agent.state.draining, "draining")
    async with http.get(a.agent.http_url + "/readyz") as resp:
        assert resp.status == 503
        assert "draining" in (await resp.json())["problems"][0]
    await wait_for(lambda: cp.core.delegate_views()[0].state == "draining", "the server to hear draining")
    late = cp.core.create_task(type="test.echo", payload={"message": "late"})
    a.gate.open(running.id)
    assert await asyncio.wait_for(a.task, 20) == 0
    assert cp.core.get_task(running.id).status == "SUCCESS"
    assert cp.core.get_task(late.id).state == "queued"  # never taken by the draining delegate
    assert cp.core.delegate_views()[0].state == "deregistered"


async def test_drain_timeout_gives_back_what_remains(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """Tasks still running at the drain deadline are stopped and given back: queued again, no attempt spent."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp, drain_timeout=0.5)
    await a.registered()
    task = cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: task.id in a.gate.started, "the task to start")
    assert await a.stop() == 0
    assert a.gate.cancelled == [task.id]
    back = cp.core.get_task(task.id)
    assert (back.state, back.status, back.attempts) == ("queued", None, 0)


async def test_a_second_request_cancels_at_once(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """The second signal skips the drain wait; the task stopped is given back, not failed."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp, drain_timeout=600)
    await a.registered()
    task = cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: task.id in a.gate.started, "the task to start")
    a.agent.request_shutdown()
    await wait_for(lambda: a.agent.state.draining, "draining")
    a.agent.request_shutdown()
    assert await asyncio.wait_for(a.task, 20) == 0
    assert a.gate.cancelled == [task.id]
    assert cp.core.get_task(task.id).state == "queued"


async def test_refused_token_keeps_retrying_and_recovers_after_rotation(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A refused token never ends the process: readiness and metrics say so; a rotated file fixes it live."""
    cp = await control_plane_factory(settings=FAST)
    token_file = tmp_path / "token"
    token_file.write_text("an-old-token-that-was-rotated-away\n")
    a = await agent_factory(cp, token=None, token_file=token_file)
    await wait_for(lambda: a.agent.state.auth_error, "the refusal to be noticed")
    async with http.get(a.agent.http_url + "/readyz") as resp:
        body = await resp.json()
    assert resp.status == 503
    assert any("refuses our token" in p for p in body["problems"])
    assert a.agent.metrics.auth_refused._value.get() == 1
    assert not a.task.done()
    token_file.write_text(TOKEN + "\n")
    await asyncio.wait_for(a.registered(), 30)  # the slow auth backoff starts at 5 s
    assert a.agent.state.auth_error is None
    assert a.agent.metrics.auth_refused._value.get() == 0


async def test_status_health_and_one_summary_line_per_task(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, http: aiohttp.ClientSession
) -> None:
    """/status says who and how the delegate is; each task leaves exactly one summary log line."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp, name="status-1", tags=("eks",))
    delegate_id = await a.registered()
    with structlog.testing.capture_logs() as logs:
        task = cp.core.create_task(type="test.echo", payload={"message": "hi"})
        await done(cp, task.id)
        await wait_for(lambda: any(e["event"] == "task.finished" for e in logs), "the summary line")
    summaries = [e for e in logs if e["event"] == "task.finished"]
    assert len(summaries) == 1
    assert (summaries[0]["task_id"], summaries[0]["task_type"], summaries[0]["status"]) == (
        task.id,
        "test.echo",
        "SUCCESS",
    )
    async with http.get(a.agent.http_url + "/status") as resp:
        status = await resp.json()
    assert (status["delegateId"], status["name"], status["state"], status["tags"]) == (
        delegate_id,
        "status-1",
        "running",
        ["eks"],
    )
    assert status["outboxDurable"] is False and status["lastContact"]
    async with http.get(a.agent.http_url + "/healthz") as resp:
        assert resp.status == 200
    async with http.get(a.agent.http_url + "/nope") as resp:
        assert resp.status == 404
    async with http.post(a.agent.http_url + "/status", data=b"x" * 5000) as resp:
        assert resp.status in (405, 413)


async def test_registration_retries_through_errors_and_honours_retry_after(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """503s are retried with backoff; a 429's Retry-After is waited out before the next try."""
    from tests.awsfakes import FaultProxy

    cp = await control_plane_factory(settings=FAST)
    proxy = FaultProxy(cp.url)
    proxy.plan = [503, 503, (429, 1)]
    async with proxy.running() as url:
        a = await agent_factory(url)
        await asyncio.wait_for(a.registered(), 30)
        statuses = [status for status, _ in proxy.answered]
        assert statuses[:4] == [503, 503, 429, 200]
        after_429 = proxy.answered[3][1] - proxy.answered[2][1]
        assert after_429 >= 0.95  # Retry-After: 1 is a floor for the next attempt
        await a.stop()


async def test_the_delegate_adopts_intervals_from_the_server(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """A fleet is retuned from the server: new intervals arrive with the next heartbeat."""
    import dataclasses

    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp)
    await a.registered()
    assert a.agent.state.intervals.lease_seconds == 3
    cp.core.settings = dataclasses.replace(cp.core.settings, lease_seconds=7, heartbeat_seconds=0.5)
    await wait_for(lambda: a.agent.state.intervals.lease_seconds == 7, "the new intervals")
    assert a.agent.state.intervals.heartbeat_seconds == 0.5


async def test_a_result_stuck_behind_errors_keeps_its_lease(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """Results refused with 503 for several leases' time keep their leases (the delegate renews them):
    the task is not handed out again, the result lands once, and nothing is reported as dropped."""
    from bench.chaos import ChaosProxy

    cp = await control_plane_factory(
        settings=ControlPlaneSettings(
            heartbeat_seconds=1, poll_wait_seconds=1, lease_seconds=0.6, sweep_interval_seconds=0.05
        )
    )
    proxy = ChaosProxy(cp.url, mode="error", share=1.0, only_suffix="/result")
    async with proxy.running() as url:
        a = await agent_factory(url)
        await a.registered()
        tasks = [cp.core.create_task(type="test.sleep", payload={"seconds": 0.05}) for _ in range(3)]
        metrics = a.agent.metrics
        await wait_for(lambda: proxy.seen["503"] >= 6, "results to be refused a few times")
        # Ten rounds of renewals for each of the three results: well over three leases' time.
        await wait_for(lambda: metrics.cp_requests.labels("renew_lease", "200")._value.get() >= 30, "renewals")
        assert [cp.core.get_task(t.id).attempts for t in tasks] == [1, 1, 1]
        proxy.set("pass")
        results = [await done(cp, t.id) for t in tasks]
        await wait_for(lambda: metrics.outbox_depth._value.get() == 0, "the outbox to empty")
    assert [(r.status, r.attempts) for r in results] == [("SUCCESS", 1)] * 3
    assert metrics.cp_requests.labels("submit_result", "200")._value.get() == 3
    dropped = [s.value for m in metrics.results_dropped.collect() for s in m.samples if s.name.endswith("_total")]
    assert sum(dropped) == 0
