"""A rolling restart never fails a test: a task stopped by a draining delegate runs again elsewhere."""

from __future__ import annotations

import aiohttp
import pytest

from agent.controlplane.core import ApiFailure, ControlPlaneSettings, task_deadline
from agent.protocol.errors import Code
from agent.protocol.models import AcquireRequest
from agent.runtime import executor
from tests.conftest import (
    FAST,
    AgentFactory,
    ControlPlaneFactory,
    ManualClock,
    delegate_client,
    done,
    register_request,
)
from tests.helpers import wait_for


async def test_a_task_cut_short_by_a_drain_is_finished_by_another_delegate(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """Two delegates, one drained mid-task: the other takes the task over and it ends in SUCCESS."""
    cp = await control_plane_factory(settings=FAST)
    first = await agent_factory(cp, name="old", tags=("prod",), drain_timeout=0.2)
    await first.registered()
    task = await cp.core.create_task(type="test.gate", payload={}, selectors=["prod"])
    await wait_for(lambda: task.id in first.gate.started, "the task to start on 'old'")
    second = await agent_factory(cp, name="new", tags=("prod",))
    await second.registered()

    assert await first.stop() == 0  # the drain times out with the task still running
    assert first.gate.cancelled == [task.id]
    await wait_for(lambda: task.id in second.gate.started, "the task to start again on 'new'")
    second.gate.open(task.id)
    finished = await done(cp, task.id)
    assert (finished.status, finished.delegate_name) == ("SUCCESS", "new")
    assert finished.attempts == 1  # giving a task back spends no attempt
    released = {"type": "test.gate", "outcome": "released"}
    assert first.agent.metrics.registry.get_sample_value("delegate_tasks_completed_total", released) == 1


async def test_a_release_that_fails_loses_nothing(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control plane refuses the release (503): deregistering hands the task back, and it still succeeds."""
    cp = await control_plane_factory(settings=FAST)

    def unavailable(lease_id: str) -> None:
        raise ApiFailure(503, Code.UNAVAILABLE, "not now")

    monkeypatch.setattr(cp.core, "release", unavailable)
    monkeypatch.setattr(executor, "RELEASE_SECONDS", 0.3)  # give up soon
    first = await agent_factory(cp, name="old", drain_timeout=0.1)
    await first.registered()
    task = await cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: task.id in first.gate.started, "the task to start on 'old'")
    assert await first.stop() == 0
    assert (await cp.core.get_task(task.id)).state == "queued"  # handed back when 'old' deregistered

    second = await agent_factory(cp, name="new")
    await wait_for(lambda: task.id in second.gate.started, "the task to start on 'new'")
    second.gate.open(task.id)
    assert (await done(cp, task.id)).status == "SUCCESS"


async def test_a_task_given_back_after_its_deadline_fails(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, clock: ManualClock
) -> None:
    """Only when the task's own deadline has passed does a drain end it, as a FAILURE saying why."""
    settings = ControlPlaneSettings(
        heartbeat_seconds=5, poll_wait_seconds=2, lease_seconds=30, sweep_interval_seconds=3600
    )
    cp = await control_plane_factory(settings=settings, clock=clock)
    a = await agent_factory(cp, drain_timeout=0.1)
    await a.registered()
    task = await cp.core.create_task(type="test.gate", payload={}, pickup_timeout=1, timeout=5)
    await wait_for(lambda: task.id in a.gate.started, "the task to start")
    clock.advance(task_deadline(task) - clock.now + 1)  # past the deadline, not past the lease (30 s)

    assert await a.stop() == 0
    result = await cp.core.get_task(task.id)
    assert (result.state, result.status, result.failure_reason) == ("done", "FAILURE", "cancelled")
    assert result.result is not None and result.result.error_summary is not None
    assert "shut down while running the task" in result.result.error_summary
    assert "deadline" in result.result.error_summary


async def test_a_task_cancelled_by_a_user_is_not_requeued_when_given_back(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """A release never revives a task someone cancelled: it ends as cancelled."""
    cp = await control_plane_factory()
    client = delegate_client(http, cp.url)
    d = (await client.register(register_request("d1"))).delegate_id
    task = await cp.core.create_task(type="test.echo", payload={})
    [leased] = (await client.acquire(d, AcquireRequest(max_tasks=1, wait_seconds=0))).tasks
    await cp.core.cancel_task(task.id)
    await client.release_lease(leased.lease_id)
    ended = await cp.core.get_task(task.id)
    assert (ended.state, ended.status, ended.failure_reason) == ("done", "FAILURE", "cancelled")


async def test_a_task_the_control_plane_cancels_during_a_drain_reports_cancelled(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """The delegate gives back only what shutdown stopped; a cancel it already heard is reported as such."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp, drain_timeout=30)
    await a.registered()
    task = await cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: task.id in a.gate.started, "the task to start")
    a.agent.request_shutdown()
    await wait_for(lambda: a.agent.state.draining, "draining")
    await cp.core.cancel_task(task.id)
    assert await a.task == 0
    ended = await cp.core.get_task(task.id)
    assert (ended.state, ended.status) == ("done", "FAILURE")
    assert ended.result is not None and ended.result.error_summary == "cancelled: cancelled by the control plane"
