"""Attacks: replaying a signed task (issue 12, point 2), performed against a real control plane and delegates.

The attacker sits on the path between the delegates and the control plane (:class:`ReplayProxy`, a
reverse proxy on loopback): it relays every call, keeps a copy of every task handed out, and can
answer a delegate's next poll with a copy of its choice, unchanged or altered. It has no signing
key. Every replay must be refused before any handler runs, and must not touch the genuine run.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import aiohttp
import msgspec
import pytest
import structlog
from aiohttp import web

from agent.controlplane.app import ControlPlaneService
from agent.protocol.auth import CLOCK_LEEWAY_SECONDS, Clock
from agent.protocol.models import Task
from agent.protocol.signing import TaskSignatureVerifier, TaskSigningKey
from agent.runtime.agent import Agent
from agent.runtime.settings import AgentSettings, ControlPlaneEndpoint
from agent.runtime.signing import TaskGuard, task_check_from_key
from tests.conftest import API_KEY, FAST, TOKEN, ControlPlaneFactory, ManualClock, done
from tests.handlers import all_handlers
from tests.helpers import wait_for, wait_task

_ACQUIRE = re.compile(r"/v1/delegates/([^/]+)/acquire")
_RESULT = re.compile(r"/v1/tasks/([^/]+)/result|/v1/(results)")


@dataclass
class Reported:
    """A result a delegate sent through the proxy, and the control plane's answer to it."""

    task_id: str
    body: dict[str, Any]
    status: int
    answer: dict[str, Any]


@dataclass
class ReplayProxy:
    """The attacker: ``async with proxy.running() as url``; delegates use ``url`` as their control plane."""

    upstream: str
    #: Every task handed out through the proxy, as it was on the wire.
    captured: list[dict[str, Any]] = field(default_factory=list)
    reported: list[Reported] = field(default_factory=list)
    #: While set, results are answered 503 (the control plane seems down) and kept from it.
    hold_results: bool = False
    held: int = 0
    _replays: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def replay(self, delegate_id: str, task: dict[str, Any]) -> None:
        """Answer that delegate's next poll with ``task`` (instead of asking the control plane)."""
        self._replays.setdefault(delegate_id, []).append(task)

    def results_for(self, task_id: str) -> list[Reported]:
        return [r for r in self.reported if r.task_id == task_id]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._relay)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._session = aiohttp.ClientSession()
        try:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            await self._session.close()
            await runner.cleanup()

    async def _relay(self, request: web.Request) -> web.Response:
        body = await request.read()
        acquire = _ACQUIRE.fullmatch(request.path)
        if acquire and self._replays.get(acquire[1]):
            return web.json_response({"tasks": self._replays.pop(acquire[1])})
        result = _RESULT.fullmatch(request.path)
        if result and self.hold_results:
            self.held += 1
            return web.Response(status=503)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        try:
            async with self._session.request(
                request.method, self.upstream + request.path_qs, data=body, headers=headers
            ) as upstream:
                answer, status = await upstream.read(), upstream.status
                kept = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
        except aiohttp.ClientError:  # the control plane went away (the test is ending)
            return web.Response(status=502)
        if acquire and status == 200:
            self.captured.extend(json.loads(answer)["tasks"])
        if result and request.method == "PUT":
            self.reported.append(Reported(result[1], json.loads(body), status, json.loads(answer or b"{}")))
        if result and result[2] and status == 200:  # a batch: each result with the answer its own PUT would get
            items, outcomes = json.loads(body)["results"], json.loads(answer)["outcomes"]
            for item, out in zip(items, outcomes, strict=True):
                said = {"outcome": out["outcome"]} if out["status"] == 200 else {"error": out["error"]}
                self.reported.append(Reported(item["taskId"], item["result"], out["status"], said))
        return web.Response(status=status, body=answer, headers=kept)


@dataclass
class Delegate:
    agent: Agent
    run: asyncio.Task[int]
    handlers: dict[str, Any]

    @property
    def id(self) -> str:
        assert self.agent.state.delegate_id is not None
        return self.agent.state.delegate_id


@contextlib.asynccontextmanager
async def delegates(
    url: str, public_key: str, *names: str, tags: tuple[str, ...] = (), clock: Clock = time.time
) -> AsyncIterator[list[Delegate]]:
    """Real delegates that check task signatures with ``public_key`` (``clock``: their wall clock)."""
    started: list[Delegate] = []
    try:
        for name in names:
            settings = AgentSettings(
                control_plane=ControlPlaneEndpoint(url=url, request_timeout=5, task_public_key=public_key),
                token=TOKEN,
                name=name,
                tags=tags if name == names[0] else (),
                http_host="127.0.0.1",
                http_port=0,
                drain_timeout=2,
                shutdown_grace=3,
            )
            handlers = all_handlers()
            agent = Agent(
                settings,
                handlers=list(handlers.values()),
                watchdog=False,
                task_check=task_check_from_key(public_key, clock=clock),
            )
            run = asyncio.create_task(agent.run())
            started.append(Delegate(agent, run, handlers))
            await wait_for(partial(getattr, agent.state, "registered"), f"{name} to register")
        yield started
    finally:
        for d in started:
            d.agent.request_shutdown()
            d.agent.request_shutdown()
        await asyncio.wait_for(asyncio.gather(*(d.run for d in started), return_exceptions=True), 30)


def refusals(logs: Sequence[Mapping[str, Any]], task_id: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == "task.refused" and e["task_id"] == task_id]


def key(cp: ControlPlaneService) -> str:
    """The public key the control plane publishes (GET /v1/info), as an operator configures it."""
    assert cp.task_public_key is not None
    return cp.task_public_key


async def captured(proxy: ReplayProxy, task_id: str) -> dict[str, Any]:
    """The copy the attacker kept of a task's hand-out."""
    found: dict[str, Any] = await wait_for(
        lambda: next((t for t in proxy.captured if t["taskId"] == task_id), None), "the task to pass the proxy"
    )
    return copy.deepcopy(found)


async def start(cp_factory: ControlPlaneFactory, **kwargs: Any) -> ControlPlaneService:
    return await cp_factory(settings=FAST, **kwargs)


@pytest.mark.attacks
@pytest.mark.parametrize("when", ["while it runs", "after it finished"])
async def test_a_task_replayed_to_the_same_delegate_is_refused_as_already_run(
    control_plane_factory: ControlPlaneFactory, when: str
) -> None:
    """A second delivery of the same (task, lease) never runs, and never touches the genuine result."""
    cp = await start(control_plane_factory)
    proxy = ReplayProxy(cp.url)
    with structlog.testing.capture_logs() as logs:
        async with proxy.running() as url, delegates(url, key(cp), "a") as (a,):
            task = await cp.core.create_task(type="test.gate", payload={})
            await wait_for(lambda: a.handlers["test.gate"].started == [task.id], "the genuine run to start")
            stolen = await captured(proxy, task.id)
            if when == "after it finished":
                a.handlers["test.gate"].open(task.id)
                await done(cp, task.id)
            proxy.replay(a.id, stolen)
            (refusal,) = await wait_for(lambda: refusals(logs, task.id), "the replay to be refused")
            a.handlers["test.gate"].open(task.id)
            result = await done(cp, task.id)
    assert refusal["error"] == (
        f"refused: task {task.id} already ran on this delegate under lease {stolen['leaseId']}: a replayed task"
    )
    assert refusal["reason"] == "replayed" and refusal["reported"] is False
    # No effect: the task ran once, and the one result the control plane got is the genuine SUCCESS.
    assert a.handlers["test.gate"].started == [task.id]
    assert result.status == "SUCCESS" and result.delegate_name == "a"
    assert [(r.body["status"], r.status, r.answer["outcome"]) for r in proxy.results_for(task.id)] == [
        ("SUCCESS", 200, "accepted")
    ]


@pytest.mark.attacks
async def test_a_task_replayed_to_another_delegate_is_refused_as_signed_for_another(
    control_plane_factory: ControlPlaneFactory,
) -> None:
    """A copy of a's task sent to b (same token, same control plane) is refused; a's run goes on."""
    cp = await start(control_plane_factory)
    proxy = ReplayProxy(cp.url)
    with structlog.testing.capture_logs() as logs:
        async with (
            proxy.running() as url,
            delegates(url, key(cp), "a", "b", tags=("a-only",)) as ab,
        ):
            a, b = ab
            task = await cp.core.create_task(type="test.gate", payload={}, selectors=["a-only"])
            await wait_for(lambda: a.handlers["test.gate"].started == [task.id], "a to start the task")
            proxy.replay(b.id, await captured(proxy, task.id))
            (refusal,) = await wait_for(lambda: refusals(logs, task.id), "b to refuse the replay")
            a.handlers["test.gate"].open(task.id)
            result = await done(cp, task.id)
    assert refusal["error"] == (
        f"refused: the task was signed for another delegate ({a.id}), not this one ({b.id}): "
        "a task replayed from another delegate"
    )
    assert refusal["reported"] is False
    assert b.handlers["test.gate"].started == []
    assert result.status == "SUCCESS" and result.delegate_id == a.id
    assert [(r.body["status"], r.answer["outcome"]) for r in proxy.results_for(task.id)] == [("SUCCESS", "accepted")]


@pytest.mark.attacks
async def test_a_task_replayed_after_its_signature_expired_is_refused_as_expired(
    control_plane_factory: ControlPlaneFactory,
) -> None:
    """Replayed once the pair is forgotten (past expiry + leeway), the copy is refused as expired."""
    cp = await start(control_plane_factory)
    proxy = ReplayProxy(cp.url)
    clock = ManualClock(time.time())
    async with proxy.running() as url, delegates(url, key(cp), "a", clock=clock) as (a,):
        task = await cp.core.create_task(type="test.echo", payload={"message": "once"})
        genuine = await done(cp, task.id)
        stolen = await captured(proxy, task.id)
        clock.advance(FAST.lease_seconds + CLOCK_LEEWAY_SECONDS + 1)
        proxy.replay(a.id, stolen)
        (reported,) = await wait_for(lambda: proxy.results_for(task.id)[1:], "the refusal to be reported")
    assert reported.body["status"] == "FAILURE"
    failure = reported.body["output"]
    assert failure["errorSummary"].startswith("refused: the task's signature expired at ")
    assert "(60s are allowed for clock skew): a task replayed or delivered late" in failure["errorSummary"]
    assert failure["failure"]["step"] == "verify_signature"
    assert "NTP" in failure["failure"]["hint"]
    # No effect: the lease was already answered, so the control plane keeps the genuine result.
    assert (reported.status, reported.answer) == (200, {"outcome": "duplicate"})
    assert a.handlers["test.echo"].seen == [task.id]
    assert (await cp.core.get_task(task.id)).status == genuine.status == "SUCCESS"


@pytest.mark.attacks
@pytest.mark.parametrize(("altered", "value"), [("leaseId", "lse_000000000000000000000000"), ("attempt", 2)])
async def test_a_replay_with_an_altered_lease_is_refused_as_a_signature_mismatch(
    control_plane_factory: ControlPlaneFactory, altered: str, value: Any
) -> None:
    """Changing the lease id or the attempt of a copy (to escape the replay memory) breaks the signature."""
    cp = await start(control_plane_factory)
    proxy = ReplayProxy(cp.url)
    with structlog.testing.capture_logs() as logs:
        async with proxy.running() as url, delegates(url, key(cp), "a") as (a,):
            task = await cp.core.create_task(type="test.echo", payload={"message": "once"})
            await done(cp, task.id)
            stolen = await captured(proxy, task.id)
            stolen[altered] = value
            proxy.replay(a.id, stolen)
            (reported,) = await wait_for(lambda: proxy.results_for(task.id)[1:], "the refusal to be reported")
    assert reported.body["status"] == "FAILURE"
    assert reported.body["output"]["errorSummary"].startswith(
        "refused: the task's signature does not match the control plane's key"
    )
    assert refusals(logs, task.id)[0]["reason"] == "bad_signature"
    # No effect: an unknown lease is fenced, the known one was already answered.
    if altered == "leaseId":
        assert reported.status == 409
        assert reported.answer["error"]["code"] == "lease_fenced"
    else:
        assert (reported.status, reported.answer) == (200, {"outcome": "duplicate"})
    assert a.handlers["test.echo"].seen == [task.id]
    assert (await cp.core.get_task(task.id)).status == "SUCCESS"


@pytest.mark.attacks
@pytest.mark.parametrize(("behind", "runs"), [(30.0, True), (600.0, False)])
async def test_a_control_plane_clock_behind_the_delegate_s(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, behind: float, runs: bool
) -> None:
    """Within the leeway a skewed clock is tolerated; beyond it the user sees why the task was refused."""
    cp = await start(control_plane_factory, clock=ManualClock(time.time() - behind))
    async with delegates(cp.url, key(cp), "a") as (a,):
        task = await cp.core.create_task(type="test.echo", payload={"message": "late"})
        await done(cp, task.id)
        async with http.get(f"{cp.url}/api/v1/tasks/{task.id}", headers={"X-API-Key": API_KEY}) as resp:
            assert resp.status == 200
            view = await resp.json()
    assert a.handlers["test.echo"].seen == ([task.id] if runs else [])
    if runs:
        assert view["status"] == "SUCCESS"
        return
    assert view["status"] == "FAILURE"
    assert view["result"]["errorSummary"].startswith("refused: the task's signature expired at ")
    assert view["result"]["failure"]["hint"].startswith("the task was not run; check that the control plane's host")


@pytest.mark.attacks
@pytest.mark.parametrize("genuine", ["running", "its result waiting in the outbox"])
async def test_a_tampered_copy_of_a_task_never_replaces_the_genuine_result(
    control_plane_factory: ControlPlaneFactory, genuine: str
) -> None:
    """A copy stripped of its signature or altered is refused; while our run holds its lease, it is not reported."""
    cp = await start(control_plane_factory)
    proxy = ReplayProxy(cp.url)
    with structlog.testing.capture_logs() as logs:
        async with proxy.running() as url, delegates(url, key(cp), "a") as (a,):
            if genuine == "running":
                task = await cp.core.create_task(type="test.gate", payload={})
                await wait_for(lambda: a.handlers["test.gate"].started == [task.id], "the genuine run to start")
                stolen = await captured(proxy, task.id)
                stolen["signature"] = None
            else:
                proxy.hold_results = True  # the genuine SUCCESS waits in the delegate's outbox
                task = await cp.core.create_task(type="test.echo", payload={"message": "once"})
                await wait_for(lambda: proxy.held, "the genuine result to be sent (and held)")
                stolen = await captured(proxy, task.id)
                stolen["attempt"] += 1
            proxy.replay(a.id, stolen)
            (refusal,) = await wait_for(lambda: refusals(logs, task.id), "the copy to be refused")
            a.handlers["test.gate"].open(task.id)
            proxy.hold_results = False
            result = await done(cp, task.id)
    assert refusal["error"].startswith(
        "refused: the task is not signed"
        if genuine == "running"
        else "refused: the task's signature does not match the control plane's key"
    )
    assert refusal["reported"] is False
    assert result.status == "SUCCESS"
    assert {r.body["status"] for r in proxy.results_for(task.id)} == {"SUCCESS"}


@pytest.mark.attacks
async def test_a_task_replayed_to_the_same_delegate_after_a_restart_is_refused(
    control_plane_factory: ControlPlaneFactory,
) -> None:
    """The replay memory dies with the process; the new process is a new delegate id, so the copy is refused."""
    cp = await start(control_plane_factory)
    proxy = ReplayProxy(cp.url)
    with structlog.testing.capture_logs() as logs:
        async with proxy.running() as url:
            async with delegates(url, key(cp), "a") as (before,):
                task = await cp.core.create_task(type="test.echo", payload={"message": "once"})
                await done(cp, task.id)
                stolen = await captured(proxy, task.id)
            async with delegates(url, key(cp), "a") as (after,):
                proxy.replay(after.id, stolen)
                (refusal,) = await wait_for(lambda: refusals(logs, task.id), "the restarted delegate to refuse it")
    assert before.id != after.id
    assert refusal["error"].startswith(
        f"refused: the task was signed for another delegate ({before.id}), not this one ({after.id})"
    )
    assert after.handlers["test.echo"].seen == []
    assert [r.body["status"] for r in proxy.results_for(task.id)] == ["SUCCESS"]


async def test_a_task_runs_on_past_its_signature_expiry_while_its_lease_is_renewed(
    control_plane_factory: ControlPlaneFactory,
) -> None:
    """The expiry bounds when a task may start, not how long it runs."""
    cp = await start(control_plane_factory)
    proxy = ReplayProxy(cp.url)
    clock = ManualClock(time.time())
    async with proxy.running() as url, delegates(url, key(cp), "a", clock=clock) as (a,):
        task = await cp.core.create_task(type="test.gate", payload={})
        await wait_for(lambda: a.handlers["test.gate"].started == [task.id], "the task to start")
        expires = datetime.fromisoformat((await captured(proxy, task.id))["signatureExpiresAt"]).timestamp()
        await wait_task(
            cp.core, task.id, lambda t: (t.lease_expires_at or 0) > expires + 1, "the lease to be renewed past it"
        )
        clock.advance(3600)
        a.handlers["test.gate"].open(task.id)
        result = await done(cp, task.id)
    assert result.status == "SUCCESS"


# --- the delegate's replay memory -----------------------------------------------------------------


def signed(key: TaskSigningKey, n: int, *, expires: float, delegate_id: str = "dlg_1") -> Task:
    created = datetime.fromtimestamp(expires, UTC) - timedelta(seconds=30)
    task = Task(
        task_id=f"tsk_{n}",
        lease_id=f"lse_{n}",
        type="test.echo",
        payload={},
        created_at=created,
        lease_seconds=30,
        lease_expires_at=datetime.fromtimestamp(expires, UTC),
        timeout_seconds=120,
        attempt=1,
        delegate_id=delegate_id,
        signature_expires_at=datetime.fromtimestamp(expires, UTC),
    )
    return msgspec.structs.replace(task, signature=key.sign(task))


def test_the_replay_memory_is_bounded_and_forgets_at_expiry() -> None:
    """Full of live pairs it refuses new tasks (never forgets one early); expired pairs are dropped."""
    key, clock = TaskSigningKey.generate(), ManualClock()
    guard = TaskGuard(TaskSignatureVerifier(key.public_key_b64), clock=clock, leeway=60, capacity=2)
    expires = clock.now + 30
    assert guard(signed(key, 1, expires=expires), delegate_id="dlg_1") is None
    assert guard(signed(key, 2, expires=expires), delegate_id="dlg_1") is None
    full = guard(signed(key, 3, expires=expires), delegate_id="dlg_1")
    assert full is not None and full.reason == "replay_memory_full"
    assert full.message.startswith("refused: this delegate already remembers 2 tasks")
    clock.advance(30 + 60 + 1)  # both signatures are refused as expired now: no need to remember them
    assert guard(signed(key, 4, expires=clock.now + 30), delegate_id="dlg_1") is None
    assert len(guard) == 1
    replay = guard(signed(key, 1, expires=expires), delegate_id="dlg_1")
    assert replay is not None and replay.reason == "expired"
