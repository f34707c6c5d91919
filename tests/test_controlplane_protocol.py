"""Protocol v1 against the real control plane over HTTP: registration, routing, long polls, leases."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import aiohttp
import pytest

from agent.controlplane.core import ControlPlaneSettings
from agent.protocol.errors import LeaseFenced, RequestRejected, UnknownDelegate
from agent.protocol.models import MAX_RESULTS_PER_BATCH, AcquireRequest, HeartbeatRequest, TaskResult
from agent.protocol.results import ValidationResult, failed
from agent.protocol.wire import TaskStatus
from tests.conftest import ControlPlaneFactory, ManualClock, delegate_client, register_request
from tests.helpers import wait_for


def result(
    lease_id: str, status: TaskStatus = "SUCCESS", connector: str | None = None, category: str | None = None
) -> TaskResult:
    """A delegate's result; ``connector`` marks it so a test can tell which one was stored."""
    now = datetime.now(UTC)
    output = ValidationResult(status=status, tested_at=now, connector_identifier=connector)
    if category is not None:
        failed(output, step="describe_regions", category=category, message=category)
    return TaskResult(lease_id=lease_id, status=status, output=output, started_at=now, finished_at=now)


async def test_register_returns_an_id_and_the_servers_intervals(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """A fleet is tuned from the server: the intervals come back with the registration."""
    cp = await control_plane_factory(
        settings=ControlPlaneSettings(heartbeat_seconds=7, poll_wait_seconds=3, lease_seconds=21)
    )
    client = delegate_client(http, cp.url)
    resp = await client.register(register_request("alpha", ["eks", "Prod"]))
    assert resp.delegate_id.startswith("dlg_")
    assert (resp.intervals.heartbeat_seconds, resp.intervals.poll_wait_seconds, resp.intervals.lease_seconds) == (
        7,
        3,
        21,
    )
    [view] = await cp.core.delegate_views()
    assert view.tags == ["eks", "prod", "alpha"]  # lower-cased, and the name is a tag too (as in Harness)
    assert view.token_name == "default"


async def test_registering_again_with_the_same_instance_keeps_the_id(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """A delegate that retries registration (lost answer) does not become two delegates."""
    cp = await control_plane_factory()
    client = delegate_client(http, cp.url)
    req = register_request("alpha")
    first = await client.register(req)
    second = await client.register(req)
    assert first.delegate_id == second.delegate_id
    assert len(await cp.core.delegate_views()) == 1


@pytest.mark.parametrize(
    ("tags", "selectors", "eligible"),
    [
        (["gov", "prod", "eks"], ["gov", "prod"], True),  # all of the selectors present
        (["gov"], ["gov", "prod"], False),  # only some: not eligible
        (["GOV", "Prod"], ["gov", "PROD"], True),  # case-insensitive
        ([], [], True),  # no selectors: any delegate
        (["eks"], ["alpha"], True),  # the delegate's name counts as a tag
    ],
)
async def test_tasks_go_only_to_delegates_with_all_selectors(
    control_plane_factory: ControlPlaneFactory,
    http: aiohttp.ClientSession,
    tags: list[str],
    selectors: list[str],
    eligible: bool,
) -> None:
    """Routing is all-of, case-insensitive, and an empty selector list means any delegate."""
    cp = await control_plane_factory()
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("alpha", tags))
    task = await cp.core.create_task(type="test.echo", payload={}, selectors=selectors)
    got = await client.acquire(d.delegate_id, AcquireRequest(max_tasks=5, wait_seconds=0))
    assert [t.task_id for t in got.tasks] == ([task.id] if eligible else [])


async def test_a_task_of_an_unsupported_type_is_not_handed_out(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """A delegate only receives task types it registered for."""
    cp = await control_plane_factory()
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("alpha", task_types=["test.echo"]))
    await cp.core.create_task(type="aws.validate-connector", payload={})
    got = await client.acquire(d.delegate_id, AcquireRequest(max_tasks=5, wait_seconds=0))
    assert got.tasks == []


async def test_no_matching_delegate_fails_the_task_with_the_missing_tags(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, clock: ManualClock
) -> None:
    """A task nobody can take fails after its pickup timeout, naming the tags nobody has."""
    cp = await control_plane_factory(clock=clock)
    await delegate_client(http, cp.url).register(register_request("alpha", ["eks"]))
    task = await cp.core.create_task(type="test.echo", payload={}, selectors=["gov", "prod"], pickup_timeout=10)
    clock.advance(5)
    await cp.core.sweep()
    assert (await cp.core.get_task(task.id)).state == "queued"
    clock.advance(6)
    await cp.core.sweep()
    done = await cp.core.get_task(task.id)
    assert done.state == "done"
    assert done.status == "FAILURE"
    assert done.result is not None
    assert "no connected delegate has all of the tags [gov, prod]" in done.result.error_summary


async def test_a_long_poll_returns_as_soon_as_a_task_arrives(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """Pickup does not wait for a polling interval: the open request is answered when work arrives."""
    cp = await control_plane_factory(settings=ControlPlaneSettings(poll_wait_seconds=30))
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("alpha"))
    poll = asyncio.create_task(client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=30)))
    await wait_for(lambda: cp.core.queue._waiters, "the delegate's long poll to be waiting")
    assert not poll.done()
    task = await cp.core.create_task(type="test.echo", payload={"n": 1})
    got = await asyncio.wait_for(poll, 5)
    assert [t.task_id for t in got.tasks] == [task.id]
    assert got.tasks[0].payload == {"n": 1}


async def test_acquire_never_hands_out_more_than_asked(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """maxTasks is the delegate's free slots; the server respects it and keeps the rest queued, oldest first."""
    cp = await control_plane_factory()
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("alpha"))
    ids = [(await cp.core.create_task(type="test.echo", payload={"i": i})).id for i in range(5)]
    first = await client.acquire(d.delegate_id, AcquireRequest(max_tasks=2, wait_seconds=0))
    second = await client.acquire(d.delegate_id, AcquireRequest(max_tasks=10, wait_seconds=0))
    assert [t.task_id for t in first.tasks] == ids[:2]
    assert [t.task_id for t in second.tasks] == ids[2:]


async def test_an_expired_lease_requeues_and_fences_the_late_result(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, clock: ManualClock
) -> None:
    """After a lease expires another delegate gets the task, and the first delegate's result is refused."""
    cp = await control_plane_factory(clock=clock)
    client = delegate_client(http, cp.url)
    a = await client.register(register_request("a"))
    b = await client.register(register_request("b"))
    task = await cp.core.create_task(type="test.echo", payload={})
    [first] = (await client.acquire(a.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))).tasks
    clock.advance(31)  # lease is 30 s and was never renewed
    await cp.core.sweep()
    assert (await cp.core.get_task(task.id)).state == "queued"
    [second] = (await client.acquire(b.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))).tasks
    assert second.task_id == task.id
    assert second.lease_id != first.lease_id
    assert second.attempt == 2
    with pytest.raises(LeaseFenced):
        await client.submit_result(task.id, result(first.lease_id))
    accepted = await client.submit_result(task.id, result(second.lease_id, connector="b"))
    assert accepted.outcome == "accepted"
    stored = (await cp.core.get_task(task.id)).result
    assert stored is not None and (stored.status, stored.connector_identifier) == ("SUCCESS", "b")


async def test_the_same_result_twice_is_accepted_once(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """Result submission is idempotent per lease: a retry after a lost answer is a success, not a second result."""
    cp = await control_plane_factory()
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("a"))
    await cp.core.create_task(type="test.echo", payload={})
    [t] = (await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))).tasks
    first = await client.submit_result(t.task_id, result(t.lease_id, connector="n1"))
    again = await client.submit_result(t.task_id, result(t.lease_id, connector="n1"))
    assert (first.outcome, again.outcome) == ("accepted", "duplicate")
    stored = (await cp.core.get_task(t.task_id)).result
    assert stored is not None and (stored.status, stored.connector_identifier) == ("SUCCESS", "n1")


async def test_a_late_result_is_fenced_even_before_the_sweeper_runs(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, clock: ManualClock
) -> None:
    """Fencing does not depend on timing of the background sweep: expiry is checked on arrival."""
    cp = await control_plane_factory(clock=clock)
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("a"))
    await cp.core.create_task(type="test.echo", payload={})
    [t] = (await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))).tasks
    clock.advance(45)
    with pytest.raises(LeaseFenced):
        await client.submit_result(t.task_id, result(t.lease_id))
    assert (await cp.core.get_task(t.task_id)).state == "queued"


async def test_renewal_keeps_a_lease_alive_and_release_requeues_at_once(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, clock: ManualClock
) -> None:
    """Renewals extend the lease; giving a task back re-queues it without spending an attempt."""
    cp = await control_plane_factory(clock=clock)
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("a"))
    task = await cp.core.create_task(type="test.echo", payload={})
    [t] = (await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))).tasks
    for _ in range(4):
        clock.advance(20)
        renewed = await client.renew_lease(t.lease_id)
        assert renewed.lease_seconds == 30
        await cp.core.sweep()
    assert (await cp.core.get_task(task.id)).state == "running"
    await client.release_lease(t.lease_id)
    again = await cp.core.get_task(task.id)
    assert (again.state, again.attempts) == ("queued", 0)
    with pytest.raises(LeaseFenced):
        await client.renew_lease(t.lease_id)


async def test_a_task_fails_after_its_attempts_run_out(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, clock: ManualClock
) -> None:
    """Re-queueing is bounded: a task whose every delegate dies fails with a reason."""
    cp = await control_plane_factory(clock=clock)
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("a"))
    task = await cp.core.create_task(type="test.echo", payload={}, max_attempts=2)
    for _ in range(2):
        got = await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))
        assert len(got.tasks) == 1
        clock.advance(31)
        await client.heartbeat(d.delegate_id, HeartbeatRequest(state="running"))
        await cp.core.sweep()
    done = await cp.core.get_task(task.id)
    assert (done.state, done.status, done.failure_reason) == ("done", "FAILURE", "delegate_lost")


async def test_a_silent_delegate_is_disconnected_and_its_tasks_requeue(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, clock: ManualClock
) -> None:
    """Missing a few heartbeats disconnects a delegate; its leased tasks go back to the queue."""
    cp = await control_plane_factory(clock=clock)
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("a"))
    task = await cp.core.create_task(type="test.echo", payload={})
    await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))
    clock.advance(16)  # heartbeat 5 s -> disconnected after 15 s of silence
    await cp.core.sweep()
    [view] = await cp.core.delegate_views()
    assert view.state == "lost"
    assert (await cp.core.get_task(task.id)).state == "queued"
    await client.heartbeat(d.delegate_id, HeartbeatRequest(state="running"))
    assert (await cp.core.delegate_views())[0].state == "running"


async def test_heartbeat_carries_cancellations(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """A cancel requested by a user reaches the delegate on its next heartbeat and lease renewal."""
    cp = await control_plane_factory()
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("a"))
    task = await cp.core.create_task(type="test.echo", payload={})
    [t] = (await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))).tasks
    assert (await client.heartbeat(d.delegate_id, HeartbeatRequest(state="running"))).cancel == []
    await cp.core.cancel_task(task.id)
    assert (await client.heartbeat(d.delegate_id, HeartbeatRequest(state="running"))).cancel == [task.id]
    assert (await client.renew_lease(t.lease_id)).cancel_requested is True


async def test_an_unknown_delegate_is_told_to_register_again(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """When the server forgot a delegate, its calls say so with a code the delegate acts on."""
    cp = await control_plane_factory()
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("a"))
    await cp.core.forget_delegate(d.delegate_id, force=True)
    with pytest.raises(UnknownDelegate):
        await client.heartbeat(d.delegate_id, HeartbeatRequest(state="running"))
    with pytest.raises(UnknownDelegate):
        await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))


async def test_a_draining_delegate_gets_no_new_work(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """Once a delegate reports draining, the server stops handing it tasks."""
    cp = await control_plane_factory()
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("a"))
    await client.heartbeat(d.delegate_id, HeartbeatRequest(state="draining"))
    await cp.core.create_task(type="test.echo", payload={})
    got = await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))
    assert got.tasks == []


async def test_deregistering_hands_running_tasks_back(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """A delegate that leaves gives its leases back; another delegate picks them up at once."""
    cp = await control_plane_factory()
    client = delegate_client(http, cp.url)
    a = await client.register(register_request("a"))
    b = await client.register(register_request("b"))
    task = await cp.core.create_task(type="test.echo", payload={})
    await client.acquire(a.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))
    await client.deregister(a.delegate_id)
    got = await client.acquire(b.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))
    assert [t.task_id for t in got.tasks] == [task.id]
    assert {v.name: v.state for v in await cp.core.delegate_views()} == {"a": "deregistered", "b": "running"}


async def test_a_gone_or_draining_waiter_does_not_swallow_the_wakeup(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """A delegate that hung up (or began draining) mid long poll never keeps a task from a live one."""
    cp = await control_plane_factory(settings=ControlPlaneSettings(poll_wait_seconds=30))
    client = delegate_client(http, cp.url)
    dead = await client.register(register_request("dead"))
    draining = await client.register(register_request("draining"))
    live = await client.register(register_request("live"))
    hung_up = asyncio.create_task(client.acquire(dead.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=30)))
    await wait_for(lambda: len(cp.core.queue._waiters) == 1, "the first long poll")
    hung_up.cancel()  # the delegate's connection closes mid poll
    await asyncio.gather(hung_up, return_exceptions=True)
    await wait_for(lambda: not cp.core.queue._waiters, "the server to drop the dead long poll")
    poll_d = asyncio.create_task(client.acquire(draining.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=30)))
    await wait_for(lambda: len(cp.core.queue._waiters) == 1, "the draining delegate's long poll")
    poll_live = asyncio.create_task(client.acquire(live.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=30)))
    await wait_for(lambda: len(cp.core.queue._waiters) == 2, "both long polls")
    await cp.store.update_delegate(draining.delegate_id, state="draining")  # as its heartbeat would say
    task = await cp.core.create_task(type="test.echo", payload={})
    got = await asyncio.wait_for(poll_live, 5)  # long before the 30 s wait runs out
    assert [t.task_id for t in got.tasks] == [task.id]
    assert (await asyncio.wait_for(poll_d, 5)).tasks == []


async def test_stats_count_results_and_failures_by_reason(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """/api/v1/stats says what happened: each result once, duplicates apart, and why tasks failed (the
    control plane's reason, or else the handler's failure category)."""
    from tests.conftest import API_KEY

    cp = await control_plane_factory()
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("a"))
    for _ in range(3):
        await cp.core.create_task(type="test.echo", payload={})
    leased = (await client.acquire(d.delegate_id, AcquireRequest(max_tasks=3, wait_seconds=0))).tasks
    ok, throttled, denied = leased
    await client.submit_result(ok.task_id, result(ok.lease_id))
    await client.submit_result(ok.task_id, result(ok.lease_id))  # a retry: counted as a duplicate
    for t, category in ((throttled, "throttled"), (denied, "permission_denied")):
        await client.submit_result(t.task_id, result(t.lease_id, "FAILURE", category=category))
    cancelled = await cp.core.create_task(type="test.echo", payload={}, selectors=["nobody"])
    await cp.core.cancel_task(cancelled.id)
    async with http.get(f"{cp.url}/api/v1/stats", headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
        assert resp.status == 200
        stats = await resp.json()
    assert stats["tasks"] == {"done": 4}
    assert stats["doneByStatus"] == {"SUCCESS": 1, "FAILURE": 3}
    assert stats["failuresByReason"] == {"throttled": 1, "permission_denied": 1, "cancelled": 1}
    assert (stats["resultsAccepted"], stats["resultsDuplicate"]) == (3, 1)


async def test_a_wait_that_gives_up_does_not_deafen_another_wait_for_the_same_task(
    control_plane_factory: ControlPlaneFactory,
) -> None:
    """Two callers wait for one task's result; the first gives up. The second still hears the end at
    once, not when its own timeout runs out (the first used to remove the shared event)."""
    cp = await control_plane_factory()
    task = await cp.core.create_task(type="test.echo", payload={"message": "x"})
    patient = asyncio.create_task(cp.core.wait_task(task.id, 60))
    assert (await cp.core.wait_task(task.id, 0.05)).state == "queued"  # the impatient one gives up
    await cp.core.cancel_task(task.id)  # the task ends
    assert (await asyncio.wait_for(patient, 5)).state == "done"


async def test_a_batch_of_results_is_judged_result_by_result(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, clock: ManualClock
) -> None:
    """POST /v1/results answers, for each result in order, what its own PUT would have: accepted,
    duplicate, fenced (checked per result), unknown; one bad result costs the others nothing."""
    cp = await control_plane_factory(clock=clock)
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("a"))
    for _ in range(3):
        await cp.core.create_task(type="test.echo", payload={})
    ok, done, late = (await client.acquire(d.delegate_id, AcquireRequest(max_tasks=3, wait_seconds=0))).tasks
    await client.submit_result(done.task_id, result(done.lease_id, connector="first"))
    answers = await client.submit_results(
        [
            (ok.task_id, result(ok.lease_id, connector="ok")),
            (done.task_id, result(done.lease_id, connector="first")),  # a retry: duplicate
            (late.task_id, result(ok.lease_id)),  # another task's lease: fenced
            ("task_unknown", result(ok.lease_id)),
        ]
    )
    assert [type(a).__name__ for a in answers] == [
        "SubmitResultResponse",
        "SubmitResultResponse",
        "LeaseFenced",
        "NotFound",
    ]
    assert [getattr(a, "outcome", None) for a in answers[:2]] == ["accepted", "duplicate"]
    stored = (await cp.core.get_task(ok.task_id)).result
    assert stored is not None and stored.connector_identifier == "ok"
    assert (await cp.core.get_task(late.task_id)).state == "running"  # the fenced one changed nothing
    # The fence is checked per result at arrival, as for PUT: an expired lease in a batch is fenced too.
    clock.advance(45)
    [answer] = await client.submit_results([(late.task_id, result(late.lease_id))])
    assert isinstance(answer, LeaseFenced)
    assert (await cp.core.get_task(late.task_id)).state == "queued"


async def test_a_batch_is_bounded_and_an_invalid_one_records_nothing(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    cp = await control_plane_factory()
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("a"))
    await cp.core.create_task(type="test.echo", payload={})
    [t] = (await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))).tasks
    with pytest.raises(RequestRejected, match="results"):
        await client.submit_results([(t.task_id, result(t.lease_id))] * (MAX_RESULTS_PER_BATCH + 1))
    assert (await cp.core.get_task(t.task_id)).state == "running"
