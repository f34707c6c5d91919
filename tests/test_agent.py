"""The daemon in-process against the real control plane: register, route, poll, run, report, drain.

Every test here runs on virtual time (looptime): heartbeats, leases, long polls, back-off and drain
deadlines take no real time, and the loop's clock says exactly how long each took. Loopback I/O with
the in-process control plane takes no loop time at all, so "at once" is an exact 0, and the control
plane's deadlines run on the same clock (see ``LoopClock`` in conftest).
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import msgspec
import pytest
import structlog

from agent.controlplane.core import ControlPlaneSettings
from agent.runtime.executor import UNWIND_SECONDS
from tests.conftest import FAST, TOKEN, AgentFactory, ControlPlaneFactory, done, free_port
from tests.helpers import results_held_then_released, sample, wait_for, wait_views

if TYPE_CHECKING:
    from tests.awsfakes import FaultProxy

pytestmark = pytest.mark.looptime

REQUESTS = "delegate_control_plane_requests_total"


def registrations(proxy: FaultProxy) -> tuple[list[int], list[float]]:
    """The statuses of the registration attempts ``proxy`` answered, and the loop time from each to the next."""
    attempts = [(status, at) for path, status, at in proxy.answered if path == "/v1/delegates/register"]
    return [status for status, _ in attempts], [later - at for (_, at), (_, later) in itertools.pairwise(attempts)]


async def test_registration_carries_name_tags_capacity_and_types(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """The control plane sees the delegate with its tags, capacity and task types."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp, name="eks-1", tags=("eks", "prod"), capacity=3)
    delegate_id = await a.registered()
    [view] = await cp.core.delegate_views()
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
    to_gov = await cp.core.create_task(type="test.echo", payload={"message": "g"}, selectors=["gov"])
    to_prod = await cp.core.create_task(type="test.echo", payload={"message": "p"}, selectors=["eks", "prod"])
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
    ids = [(await cp.core.create_task(type="test.gate", payload={})).id for _ in range(6)]
    await wait_for(lambda: len(a.gate.started) == 2, "two tasks to start")
    assert sum([1 for i in ids if (await cp.core.get_task(i)).state == "running"]) == 2
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
    """With a 30 s poll wait, a task queued while the delegate waits starts at once (0 s of loop time)."""
    cp = await control_plane_factory(
        settings=ControlPlaneSettings(heartbeat_seconds=5, poll_wait_seconds=30, lease_seconds=30)
    )
    a = await agent_factory(cp)
    delegate_id = await a.registered()
    await wait_for(lambda: any(w.delegate.id == delegate_id for w in cp.core.queue._waiters), "the long poll to wait")
    loop = asyncio.get_running_loop()
    queued = loop.time()
    task = await cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: task.id in a.gate.started, "the task to start")
    assert a.gate.started_at[task.id] - queued == 0  # the waiting poll answers: no polling interval involved
    a.gate.open(task.id)
    await done(cp, task.id)


async def test_the_delegate_registers_again_when_the_control_plane_forgets_it(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """Removing the delegate on the server leads to a new registration (its long poll is answered 404 at
    once, or the next heartbeat is), and work continues."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp)
    first = await a.registered()
    forgotten = asyncio.get_running_loop().time()
    await cp.core.forget_delegate(first, force=True)
    state = a.agent.state
    await wait_for(lambda: state.registered and state.delegate_id != first, "the delegate to register again")
    assert state.last_heartbeat is not None  # set by the registration
    assert 0 <= state.last_heartbeat - forgotten <= FAST.heartbeat_seconds
    assert [v.delegate_id for v in await cp.core.delegate_views()] == [state.delegate_id]
    task = await cp.core.create_task(type="test.echo", payload={"message": "again"})
    assert (await done(cp, task.id)).status == "SUCCESS"
    assert sample(a.agent.metrics, "delegate_registrations_total") == 2


async def test_unknown_type_invalid_payload_and_crash_fail_alone(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """Bad tasks become FAILURE results naming the problem; a task running beside them is untouched."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp)
    await a.registered()
    survivor = await cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: survivor.id in a.gate.started, "the long task to start")
    unknown = await cp.core.create_task(type="test.echo", payload={"message": "x"})
    invalid = await cp.core.create_task(type="test.echo", payload={})
    crash = await cp.core.create_task(type="test.crash", payload={"secret": "boom-secret-123456"})
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
    await cp.store.update_delegate(delegate_id, task_types=["test.echo", "test.newer"])
    task = await cp.core.create_task(type="test.newer", payload={})
    result = await done(cp, task.id)
    assert result.status == "FAILURE"
    assert "cannot run tasks of type 'test.newer'" in result.result.error_summary


async def test_leases_are_renewed_while_a_task_runs(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """A task twenty leases long keeps its lease: the server, sweeping every 50 ms, never re-queues it."""
    lease = 0.5
    cp = await control_plane_factory(
        settings=ControlPlaneSettings(
            heartbeat_seconds=1, poll_wait_seconds=1, lease_seconds=lease, sweep_interval_seconds=0.05
        )
    )
    a = await agent_factory(cp)
    await a.registered()
    task = await cp.core.create_task(type="test.sleep", payload={"seconds": 10})
    result = await done(cp, task.id)
    assert (result.status, result.attempts) == ("SUCCESS", 1)
    assert sample(a.agent.metrics, "delegate_task_duration_seconds_sum", type="test.sleep") == 10
    # At least one renewal per lease (the delegate renews every third of one).
    assert sample(a.agent.metrics, REQUESTS, operation="renew_lease", status="200") >= 10 / lease


async def test_a_task_is_stopped_at_its_timeout(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """The task's own timeout bounds it, to the tick: it ran for exactly its timeout; the result says timeout."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp)
    await a.registered()
    task = await cp.core.create_task(type="test.sleep", payload={"seconds": 60}, timeout=0.5)
    result = await done(cp, task.id)
    assert result.status == "FAILURE"
    assert result.result.failure.category == "timeout"
    assert sample(a.agent.metrics, "delegate_task_duration_seconds_sum", type="test.sleep") == 0.5


async def test_a_handler_deaf_to_cancellation_is_reported_after_the_unwind_grace(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """A handler that swallows the cancel at its timeout cannot hold the task hostage: the delegate
    waits UNWIND_SECONDS for it, then reports the timeout and frees the slot."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp)
    await a.registered()
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = await cp.core.create_task(type="test.deaf", payload={}, timeout=0.5)
    result = await done(cp, task.id)
    assert result.status == "FAILURE"
    assert result.result.failure.category == "timeout"
    assert "did not finish within its timeout of 0.5s" in result.result.error_summary
    assert 0.5 + UNWIND_SECONDS <= loop.time() - started < 0.5 + UNWIND_SECONDS + FAST.poll_wait_seconds
    await wait_for(lambda: a.agent.state.running == {}, "the slot to be free")
    echo = await cp.core.create_task(type="test.echo", payload={"message": "after"})
    assert (await done(cp, echo.id)).status == "SUCCESS"


async def test_cancellation_from_the_control_plane(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """A user's cancel reaches the delegate with its next heartbeat or renewal (within a heartbeat
    interval), which stops the task and says so."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp)
    await a.registered()
    task = await cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: task.id in a.gate.started, "the task to start")
    asked = asyncio.get_running_loop().time()
    await cp.core.cancel_task(task.id)
    result = await done(cp, task.id)
    assert 0 <= a.gate.cancelled_at[task.id] - asked <= FAST.heartbeat_seconds
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
    task = await cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: task.id in a.gate.started, "the task to start")
    await cp.stop()
    a.gate.open(task.id)
    await wait_for(
        lambda: sample(a.agent.metrics, REQUESTS, operation="submit_results", status="error") >= 1,
        "the result to fail to send while the control plane is down",
    )
    await wait_for(lambda: not a.agent.state.running, "the task to leave the executor")
    cp2 = await control_plane_factory(settings=FAST, port=port, data_dir=data)
    result = await done(cp2, task.id, timeout=30)
    assert (result.status, result.attempts) == ("SUCCESS", 1)
    await wait_for(lambda: sample(a.agent.metrics, "delegate_outbox_depth") == 0, "the outbox to empty")
    assert sample(a.agent.metrics, REQUESTS, operation="submit_results", status="200") == 1


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
    task = await cp.core.create_task(type="test.gate", payload={})
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
    running = await cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: running.id in a.gate.started, "the task to start")
    async with http.get(a.agent.http_url + "/readyz") as resp:
        assert resp.status == 200
    a.agent.request_shutdown()
    await wait_for(lambda: a.agent.state.draining, "draining")
    async with http.get(a.agent.http_url + "/readyz") as resp:
        assert resp.status == 503
        assert "draining" in (await resp.json())["problems"][0]
    await wait_views(cp.core, lambda v: v[0].state == "draining", "the server to hear draining")
    late = await cp.core.create_task(type="test.echo", payload={"message": "late"})
    loop = asyncio.get_running_loop()
    opened = loop.time()
    a.gate.open(running.id)
    assert await asyncio.wait_for(a.task, 20) == 0
    assert loop.time() == opened  # the drain ends with the last task, not at its 20 s deadline
    assert (await cp.core.get_task(running.id)).status == "SUCCESS"
    assert (await cp.core.get_task(late.id)).state == "queued"  # never taken by the draining delegate
    assert (await cp.core.delegate_views())[0].state == "deregistered"


async def test_drain_timeout_gives_back_what_remains(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """Tasks still running at the drain deadline are stopped exactly then and given back: queued again,
    no attempt spent; the whole shutdown took exactly the drain timeout."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp, drain_timeout=2.5)
    await a.registered()
    task = await cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: task.id in a.gate.started, "the task to start")
    loop = asyncio.get_running_loop()
    asked = loop.time()
    assert await a.stop() == 0
    assert a.gate.cancelled_at[task.id] - asked == 2.5
    assert loop.time() - asked == 2.5
    back = await cp.core.get_task(task.id)
    assert (back.state, back.status, back.attempts) == ("queued", None, 0)


async def test_a_second_request_cancels_at_once(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """The second signal skips the drain wait; the task stopped is given back, not failed."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp, drain_timeout=600)
    await a.registered()
    task = await cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: task.id in a.gate.started, "the task to start")
    a.agent.request_shutdown()
    await wait_for(lambda: a.agent.state.draining, "draining")
    loop = asyncio.get_running_loop()
    forced = loop.time()
    a.agent.request_shutdown()
    assert await asyncio.wait_for(a.task, 20) == 0
    assert a.gate.cancelled_at[task.id] == forced
    assert loop.time() == forced  # not a moment of the 600 s drain is waited
    assert (await cp.core.get_task(task.id)).state == "queued"  # given back to the queue


async def test_refused_token_keeps_retrying_and_recovers_after_rotation(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A refused token never ends the process: readiness and metrics say so, registration is retried
    on the slow back-off (full jitter under ceilings of 5 s, 10 s, 20 s ...), and a rotated file fixes it live."""
    from tests.awsfakes import FaultProxy

    cp = await control_plane_factory(settings=FAST)
    token_file = tmp_path / "token"
    token_file.write_text("an-old-token-that-was-rotated-away\n")
    proxy = FaultProxy(cp.url)  # forwards everything; it only records when each registration was answered
    async with proxy.running() as url:
        a = await agent_factory(url, token=None, token_file=token_file)
        await wait_for(lambda: a.agent.state.auth_error, "the refusal to be noticed")
        async with http.get(a.agent.http_url + "/readyz") as resp:
            body = await resp.json()
        assert resp.status == 503
        assert any("refuses our token" in p for p in body["problems"])
        assert sample(a.agent.metrics, "delegate_control_plane_auth_refused") == 1
        # Up to 35 s of back-off: look every quarter second (each look is a step of the virtual clock).
        await wait_for(lambda: len(proxy.answered) >= 4, "four refused registrations", timeout=60, every=0.25)
        assert not a.task.done()
        token_file.write_text(TOKEN + "\n")
        await a.registered(timeout=160)
        assert a.agent.state.auth_error is None
        assert sample(a.agent.metrics, "delegate_control_plane_auth_refused") == 0
        await a.stop()
    statuses, gaps = registrations(proxy)
    refused = len(statuses) - 1
    assert refused >= 4
    assert statuses == [401] * refused + [200]
    for n, gap in enumerate(gaps):
        assert 0 <= gap <= min(120, 5 * 2**n), f"retry {n + 1} came {gap}s after the refusal before it"


async def test_status_health_and_one_summary_line_per_task(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, http: aiohttp.ClientSession
) -> None:
    """/status says who and how the delegate is; each task leaves exactly one summary log line."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp, name="status-1", tags=("eks",))
    await a.registered()
    with structlog.testing.capture_logs() as logs:
        task = await cp.core.create_task(type="test.echo", payload={"message": "hi"})
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
    assert (status["name"], status["state"], status["tags"]) == ("status-1", "running", ["eks"])
    assert "delegateId" not in status and "instanceId" not in status  # unauthenticated: no identity
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
    """503s are retried after a full-jitter delay under the exponential ceiling (0.5 s, then 1 s);
    a 429's Retry-After of 1 s is a floor for the next try, and that try's 2 s ceiling its top."""
    from tests.awsfakes import FaultProxy

    cp = await control_plane_factory(settings=FAST)
    proxy = FaultProxy(cp.url)
    proxy.plan = [503, 503, (429, 1)]
    async with proxy.running() as url:
        a = await agent_factory(url)
        await asyncio.wait_for(a.registered(), 30)
        await a.stop()
    statuses, gaps = registrations(proxy)
    assert statuses == [503, 503, 429, 200]
    assert 0 <= gaps[0] <= 0.5
    assert 0 <= gaps[1] <= 1.0
    assert 1.0 <= gaps[2] <= 2.0


async def test_the_delegate_adopts_intervals_from_the_server(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """A fleet is retuned from the server: new intervals arrive with the next heartbeat (within the
    old interval), and the heartbeat after it comes at the new pace (0.9 to 1 times 0.5 s)."""
    import dataclasses

    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp)
    await a.registered()
    state = a.agent.state
    assert state.intervals.lease_seconds == 3
    changed = asyncio.get_running_loop().time()
    cp.core.settings = dataclasses.replace(cp.core.settings, lease_seconds=7, heartbeat_seconds=0.5)
    await wait_for(lambda: state.intervals.lease_seconds == 7, "the new intervals")
    assert state.intervals.heartbeat_seconds == 0.5
    adopted = state.last_heartbeat
    assert adopted is not None
    assert 0 < adopted - changed <= FAST.heartbeat_seconds
    await wait_for(lambda: state.last_heartbeat != adopted, "the next heartbeat")
    assert 0.45 <= state.last_heartbeat - adopted <= 0.5


async def test_a_result_stuck_behind_errors_keeps_its_lease(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """Results refused with 503 for several leases' time keep their leases (the delegate renews them):
    the task is not handed out again, the result lands once, and nothing is reported as dropped."""
    from bench.chaos import ChaosProxy

    cp = await control_plane_factory(
        settings=ControlPlaneSettings(
            heartbeat_seconds=1, poll_wait_seconds=1, lease_seconds=0.5, sweep_interval_seconds=0.05
        )
    )
    proxy = ChaosProxy(cp.url, mode="error", share=1.0, only_suffix="/results")
    async with proxy.running() as url:
        a = await agent_factory(url)
        await a.registered()
        tasks = [await cp.core.create_task(type="test.sleep", payload={"seconds": 0.05}) for _ in range(3)]
        metrics = a.agent.metrics
        await wait_for(lambda: proxy.seen["503"] >= 6, "results to be refused a few times")
        # Ten rounds of renewals for each of the three results: well over three leases' time.
        await wait_for(lambda: sample(metrics, REQUESTS, operation="renew_lease", status="200") >= 30, "renewals")
        assert [(await cp.core.get_task(t.id)).attempts for t in tasks] == [1, 1, 1]
        proxy.set("pass")
        results = [await done(cp, t.id) for t in tasks]
        await wait_for(lambda: sample(metrics, "delegate_outbox_depth") == 0, "the outbox to empty")
    assert [(r.status, r.attempts) for r in results] == [("SUCCESS", 1)] * 3
    assert 1 <= sample(metrics, REQUESTS, operation="submit_results", status="200") <= 3
    dropped = [s.value for m in metrics.results_dropped.collect() for s in m.samples if s.name.endswith("_total")]
    assert sum(dropped) == 0


async def test_results_waiting_together_go_in_one_request(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """Results that wait together (here: behind 503s) are delivered by one POST /v1/results, each
    accepted once; a result no longer costs the delegate a request of its own."""
    cp = await control_plane_factory(settings=FAST)
    async with results_held_then_released(cp, agent_factory) as (a, results):
        pass
    assert [(r.status, r.attempts) for r in results] == [("SUCCESS", 1)] * 12
    # One request (two if a retry built before the twelfth result arrived was still on its way).
    assert sample(a.agent.metrics, REQUESTS, operation="submit_results", status="200") <= 2
    assert sample(a.agent.metrics, REQUESTS, operation="submit_result", status="200") == 0
    assert (await cp.core.stats()).results_accepted == 12


async def test_a_result_alone_goes_at_once_and_results_close_together_share_a_request(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """A result with no request sent just before it is delivered the moment it finishes; under load,
    results that finish within the reporter's pace (50 ms) share one request, not one each."""
    from agent.runtime.reporter import RESULTS_PACE_SECONDS

    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp, capacity=32)
    await a.registered()
    loop = asyncio.get_running_loop()
    queued = loop.time()
    lone = await cp.core.create_task(type="test.sleep", payload={"seconds": 1})
    await done(cp, lone.id)
    assert loop.time() - queued == pytest.approx(1.0, abs=1e-6)  # no pace without a recent request
    await wait_for(lambda: sample(a.agent.metrics, REQUESTS, operation="submit_results", status="200") == 1, "1")
    # Twenty results, one every 5 ms over 100 ms: one request per result before the pace.
    tasks = [await cp.core.create_task(type="test.sleep", payload={"seconds": 0.005 * (i + 1)}) for i in range(20)]
    started = loop.time()
    results = [await done(cp, t.id) for t in tasks]
    assert [r.status for r in results] == ["SUCCESS"] * 20
    # The last result waits at most one pace after it finished.
    assert loop.time() - started <= 0.1 + RESULTS_PACE_SECONDS + 1e-6
    requests = sample(a.agent.metrics, REQUESTS, operation="submit_results", status="200") - 1
    assert 2 <= requests <= 3  # the first at once, then one per 50 ms over 100 ms (20 before the pace)


async def test_a_saturated_delegate_asks_for_several_tasks_per_poll(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With work queued behind a full delegate, a freed slot waits a moment (50 ms at most) for
    others, so one poll brings several tasks: against the same queue without that wait, half the
    polls or fewer, and the queue drains in about the same time (the tasks waited on the server anyway)."""
    from agent.runtime import poller

    async def drain(linger: float, name: str) -> tuple[float, float]:
        monkeypatch.setattr(poller, "ACQUIRE_LINGER_SECONDS", linger)
        cp = await control_plane_factory(settings=FAST)
        a = await agent_factory(cp, name=name, capacity=32)
        await a.registered()
        polls = sample(a.agent.metrics, REQUESTS, operation="acquire", status="200")
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Different lengths, so slots free one at a time, as they do over a real AWS.
        seconds = [0.01 * (1 + (7 * i) % 23) for i in range(160)]
        tasks = [await cp.core.create_task(type="test.sleep", payload={"seconds": s}) for s in seconds]
        assert [(await done(cp, t.id)).status for t in tasks] == ["SUCCESS"] * 160
        assert a.agent.state.capacity == 32
        return sample(a.agent.metrics, REQUESTS, operation="acquire", status="200") - polls, loop.time() - started

    linger = poller.ACQUIRE_LINGER_SECONDS
    polls_at_once, took_at_once = await drain(0.0, "eager")
    polls, took = await drain(linger, "patient")
    assert polls_at_once >= 64  # the workload does make a slot-by-slot delegate poll often
    assert polls <= polls_at_once / 2
    assert took <= took_at_once * 1.25
