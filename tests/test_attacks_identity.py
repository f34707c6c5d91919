"""Issue 12, point 1: a delegate is who its token says. Each attack from the security review, performed.

Two teams share a real control plane on loopback, each with its own delegate token: team A runs a
real delegate; the holder of team B's token (a real, accepted token with a scope of its own) attacks
A's delegate, leases and results through the delegate protocol. Every attack gets 403 with a message
that says why, changes nothing, and A keeps working.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
import structlog

from agent.cli import EXIT_OK, main
from agent.controlplane.app import ControlPlaneConfig, ControlPlaneService, CredentialsError, load_credentials
from agent.controlplane.core import ControlPlane, ControlPlaneSettings
from agent.controlplane.ratelimit import FailureLimiter, OncePerSecond
from agent.controlplane.store import SqliteStore
from agent.controlplane.tokens import TokenScope
from agent.protocol.client import ControlPlaneClient
from agent.protocol.errors import AuthError, Code, RateLimited, UnknownDelegate
from agent.protocol.models import AcquireRequest, HeartbeatRequest, RegisterRequest, TaskResult
from agent.protocol.results import ValidationResult
from tests.conftest import (
    API_KEY,
    FAST,
    AgentFactory,
    ControlPlaneFactory,
    ManualClock,
    Running,
    delegate_client,
    done,
    manual_connector,
    register_request,
)
from tests.helpers import wait_for

pytestmark = pytest.mark.attacks

TOKEN_A = "team-a-delegate-token-0123456789abcdef"
TOKEN_B = "team-b-delegate-token-fedcba9876543210"
TOKENS = f"team-a:{TOKEN_A} names=team-a* tags=eks\nteam-b:{TOKEN_B} names=team-b* tags=eks|lab"

MISMATCH = "was registered with another delegate token; only that token may act for it"
LEASE_MISMATCH = "this lease belongs to a delegate registered with another delegate token"


@dataclass
class Stack:
    """The control plane, A's running delegate and its id, and a client holding B's token."""

    cp: ControlPlaneService
    a: Running
    a_id: str
    b: ControlPlaneClient

    @property
    def core(self) -> ControlPlane:
        return self.cp.core


@pytest.fixture
async def stack(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, http: aiohttp.ClientSession
) -> Stack:
    cp = await control_plane_factory(tokens=TOKENS, settings=FAST)
    a = await agent_factory(cp, name="team-a", tags=("eks",), token=TOKEN_A)
    a_id = await a.registered()
    b = delegate_client(http, cp.url, token=TOKEN_B)
    await b.register(register_request("team-b-1", ["eks"]))  # B is a real, accepted token
    return Stack(cp, a, a_id, b)


async def refused(call: Awaitable[object], code: str, message: str) -> AuthError:
    """The call is refused with 403, the code and a message that says why."""
    with pytest.raises(AuthError) as err:
        await call
    assert (err.value.status, err.value.code) == (403, code), err.value
    assert message in err.value.message
    return err.value


async def a_keeps_working(s: Stack) -> None:
    """A task for team A still runs on A's delegate, registered as it was."""
    task = await s.core.create_task(type="test.echo", payload={"message": "still here"}, selectors=["team-a"])
    finished = await done(s.cp, task.id)
    assert (finished.status, finished.delegate_id) == ("SUCCESS", s.a_id)
    view = next(v for v in await s.core.delegate_views() if v.delegate_id == s.a_id)
    assert (view.state, view.token_name, view.name) == ("running", "team-a", "team-a")


async def gated_task_on_a(s: Stack, **kwargs: object) -> tuple[str, str]:
    """A task A's delegate is running and holds (the gate is shut): its id and lease id."""
    task = await s.core.create_task(type="test.gate", payload={}, selectors=["team-a"], **kwargs)
    await wait_for(lambda: task.id in s.a.gate.started, "A to start the task")
    row = await s.core.store.get_task(task.id)
    assert row.delegate_id == s.a_id and row.lease_id
    return task.id, row.lease_id


async def test_b_cannot_heartbeat_a_into_draining(stack: Stack) -> None:
    """A heartbeat saying "draining" for A's delegate id would stop A getting work."""
    await refused(
        stack.b.heartbeat(stack.a_id, HeartbeatRequest(state="draining")), Code.DELEGATE_TOKEN_MISMATCH, MISMATCH
    )
    await a_keeps_working(stack)


async def test_b_cannot_deregister_a(stack: Stack) -> None:
    """Deregistering A would re-queue its work and mark it gone."""
    err = await refused(stack.b.deregister(stack.a_id), Code.DELEGATE_TOKEN_MISMATCH, MISMATCH)
    assert stack.a_id in err.message
    await a_keeps_working(stack)


async def test_b_cannot_acquire_as_a(stack: Stack) -> None:
    """Acquiring under A's id would hand B A's tasks (access key ids, role ARNs, External IDs)."""
    s = stack
    task_id, _ = await gated_task_on_a(s)  # A is busy with one; another waits for it
    queued = await s.core.create_task(type="test.echo", payload={"message": "secret"}, selectors=["team-a"])
    await refused(
        s.b.acquire(s.a_id, AcquireRequest(max_tasks=4, wait_seconds=0)), Code.DELEGATE_TOKEN_MISMATCH, MISMATCH
    )
    s.a.gate.open(task_id)
    assert (await done(s.cp, queued.id)).delegate_id == s.a_id
    await a_keeps_working(s)


async def test_b_cannot_register_a_again_under_its_instance_id(stack: Stack) -> None:
    """Registering A's instanceId (with a name B's scope allows) would take A's delegate id over."""
    s = stack
    request = RegisterRequest(
        name="team-b-2",
        instance_id=s.a.agent.state.instance_id,
        tags=["eks"],
        version="evil",
        task_types=["test.echo", "test.gate"],
        capacity=64,
    )
    err = await refused(
        s.b.register(request), Code.DELEGATE_TOKEN_MISMATCH, "is registered with another delegate token"
    )
    assert s.a_id not in err.message  # the refusal does not tell B which delegate holds it
    await a_keeps_working(s)


@pytest.mark.parametrize(
    ("name", "tags", "named"),
    [
        ("team-a", ["eks"], "name 'team-a'"),
        ("team-b-2", ["prod"], "tags [prod]"),
        ("team-b-2", ["team-a", "eks"], "tags [team-a]"),  # A's name is a routing tag too
        ("team-a-2", ["prod", "gov"], "name 'team-a-2' or the tags [prod, gov]"),
    ],
    ids=["a-name", "tag-outside-scope", "a-name-as-a-tag", "both"],
)
async def test_b_cannot_register_beyond_its_scope(stack: Stack, name: str, tags: list[str], named: str) -> None:
    """Registering with A's name or tags would route A's connector tests to B; the refusal names them."""
    s = stack
    before = {v.delegate_id for v in await s.core.delegate_views()}
    err = await refused(s.b.register(register_request(name, tags)), Code.TOKEN_SCOPE, named)
    assert "delegate token 'team-b' may not register the " in err.message
    assert "it allows names [team-b*] and tags [team-b*, eks, lab]" in err.message
    assert {v.delegate_id for v in await s.core.delegate_views()} == before
    await a_keeps_working(s)


async def test_b_cannot_renew_or_release_as_lease(stack: Stack) -> None:
    """Renewing keeps a dead lease alive; releasing re-queues A's running task: both A's business only."""
    s = stack
    task_id, lease_id = await gated_task_on_a(s)
    await refused(s.b.renew_lease(lease_id), Code.DELEGATE_TOKEN_MISMATCH, LEASE_MISMATCH)
    await refused(s.b.release_lease(lease_id), Code.DELEGATE_TOKEN_MISMATCH, LEASE_MISMATCH)
    row = await s.core.store.get_task(task_id)
    assert (row.state, row.lease_id, row.delegate_id) == ("running", lease_id, s.a_id)
    s.a.gate.open(task_id)
    finished = await done(s.cp, task_id)
    assert (finished.status, finished.delegate_id, finished.attempts) == ("SUCCESS", s.a_id, 1)
    await a_keeps_working(s)


async def test_b_cannot_report_a_forged_success_for_as_task(stack: Stack) -> None:
    """A forged SUCCESS would be stored as the connector's last test: it is refused and nothing changes."""
    s = stack
    await s.core.apply_connector(manual_connector("Team A prod", delegateSelectors=["team-a"]))
    first = await s.core.create_task(
        type="test.echo", payload={"message": "x", "fail": True}, selectors=["team-a"], connector_id="Team_A_prod"
    )
    assert (await done(s.cp, first.id)).status == "FAILURE"
    last = (await s.core.connector_record(await s.core.get_connector("Team_A_prod"))).last_test
    assert last is not None and (last.task_id, last.status) == (first.id, "FAILURE")

    task_id, lease_id = await gated_task_on_a(s, connector_id="Team_A_prod")
    now = datetime.now(UTC)
    forged = TaskResult(
        lease_id=lease_id,
        status="SUCCESS",
        output=ValidationResult(status="SUCCESS", tested_at=now, delegate_name="team-a"),
        started_at=now,
        finished_at=now,
    )
    await refused(s.b.submit_result(task_id, forged), Code.DELEGATE_TOKEN_MISMATCH, LEASE_MISMATCH)
    assert (await s.core.connector_record(await s.core.get_connector("Team_A_prod"))).last_test == last
    assert (await s.core.store.get_task(task_id)).state == "running"
    s.a.gate.open(task_id)
    assert (await done(s.cp, task_id)).delegate_id == s.a_id
    await a_keeps_working(s)


async def test_a_revoked_tokens_instance_starts_afresh_without_its_leases(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """Once A's token is revoked, A is locked out; re-registering its instanceId (the way a delegate moved
    to a new token comes back) makes a new delegate, and A's running task is re-queued, not inherited."""
    s = stack
    task_id, _ = await gated_task_on_a(s)
    async with http.post(s.cp.url + "/api/v1/delegate-tokens/team-a/revoke", headers={"X-API-Key": API_KEY}) as resp:
        assert resp.status == 200
    with pytest.raises(UnknownDelegate):  # A's old id now answers as unknown: its holder registers again
        await s.b.heartbeat(s.a_id, HeartbeatRequest(state="running"))
    request = RegisterRequest(
        name="team-b-3",
        instance_id=s.a.agent.state.instance_id,
        tags=["eks"],
        version="test",
        task_types=["test.gate"],
        capacity=1,
    )
    new_id = (await s.b.register(request)).delegate_id
    assert new_id != s.a_id
    assert await s.core.store.get_delegate(s.a_id) is None
    row = await s.core.store.get_task(task_id)
    assert (row.state, row.delegate_id, row.attempts) == ("queued", None, 0)  # nobody's, and no attempt used
    s.a.gate.open(task_id)


async def test_the_delegates_status_page_does_not_show_its_identity(stack: Stack, http: aiohttp.ClientSession) -> None:
    """Anyone who reaches the probe port reads /status: it no longer tells them A's delegateId or instanceId."""
    async with http.get(stack.a.agent.http_url + "/status") as resp:
        assert resp.status == 200
        text = await resp.text()
        body = await resp.json()
    assert body["name"] == "team-a" and body["state"] == "running"
    assert "delegateId" not in body and "instanceId" not in body
    assert stack.a_id not in text and stack.a.agent.state.instance_id not in text


# --- scopes ------------------------------------------------------------------------------------------


def test_the_token_file_syntax_for_scopes(tmp_path: Path) -> None:
    """``name:token names=a|b tags=c|d``; the environment uses the same, entries separated by commas."""
    creds = load_credentials(
        ControlPlaneConfig(
            delegate_tokens=f"team-a:{TOKEN_A} names=Team-A-*|ops tags=eks|prod, team-b:{TOKEN_B}", api_key=API_KEY
        )
    )
    assert creds.scopes == {
        "team-a": TokenScope(names=("team-a-*", "ops"), tags=("eks", "prod")),
        "team-b": TokenScope(),
    }
    for line, message in [
        (f"t:{TOKEN_A} name=x", "line 1: word 2 is not names=A|B or tags=A|B"),
        (f"t:{TOKEN_A[:20]} {TOKEN_A[20:]}", "line 1: word 2 is not names=A|B or tags=A|B"),  # a space in it
        (f"t:{TOKEN_A} tags=", "line 1: tags= needs at least one pattern"),
        (f"t:{TOKEN_A} tags=a tags=b", "line 1: tags= is given twice"),
        (f"t:{TOKEN_A} tags=a,b", "line 1: tags= has 'a,b', which is not a tag pattern"),
        (f"t:{TOKEN_A} tags=a\nt:{TOKEN_B} tags=b", "line 2: token 't' is listed before with another scope"),
    ]:
        path = tmp_path / "tokens"
        path.write_text(line + "\n")
        with pytest.raises(CredentialsError) as err:
            load_credentials(ControlPlaneConfig(delegate_token_file=path, api_key=API_KEY))
        assert message in str(err.value)
        assert TOKEN_A[:20] not in str(err.value) and TOKEN_A[20:] not in str(err.value)
        assert TOKEN_B[:20] not in str(err.value) and TOKEN_B[20:] not in str(err.value)


async def test_a_created_token_carries_its_scope_across_a_restart(
    control_plane_factory: ControlPlaneFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``tokens create --names --tags`` stores the scope with the token; ``tokens list`` shows it."""
    data_dir = tmp_path / "cp"
    cp = await control_plane_factory(data_dir=data_dir)
    assert await cli(cp.url, "tokens", "create", "team-c", "--names", "team-c-*", "--tags", "eks,lab") == EXIT_OK
    token = capsys.readouterr().out.strip()
    assert await cli(cp.url, "tokens", "list") == EXIT_OK
    listing = capsys.readouterr().out
    assert "names=team-c-* tags=eks|lab" in listing and "any" in listing  # the default token has no scope
    await cp.shutdown()
    again = await control_plane_factory(data_dir=data_dir)
    c = delegate_client(http, again.url, token=token)
    await c.register(register_request("team-c-1", ["lab"]))
    await refused(c.register(register_request("team-c-1", ["prod"])), Code.TOKEN_SCOPE, "tags [prod]")


async def test_an_older_database_gets_the_scope_columns(tmp_path: Path) -> None:
    """A database written before scopes opens, and its created tokens may register anything."""
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE issued_tokens(kid TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, "
            "signing_key BLOB NOT NULL, created_at REAL NOT NULL)"
        )
        db.execute("INSERT INTO issued_tokens VALUES('kid1', 'old', x'00', 1.0)")
    store = SqliteStore(path)
    try:
        assert await store.issued_token_scopes() == {"kid1": (None, None)}
    finally:
        await store.close()


async def cli(url: str, *argv: str) -> int:
    """Run the CLI in a thread (it is synchronous; the control plane runs on this loop)."""
    return await asyncio.to_thread(main, [*argv, "--control-plane", url, "--api-key", API_KEY])


# --- failed authentications are rate-limited -----------------------------------------------------------


async def test_failed_authentications_are_rate_limited_per_address(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """After the burst of wrong credentials, the address gets 429 with Retry-After (even with a good key),
    counted; the window reopens on the control plane's clock."""
    clock = ManualClock()
    settings = ControlPlaneSettings(sweep_interval_seconds=3600, auth_failure_limit=3, auth_failure_window_seconds=60)
    cp = await control_plane_factory(settings=settings, clock=clock)
    bad_delegate = delegate_client(http, cp.url, token="not-a-token-this-server-knows")
    for headers in ({}, {"X-API-Key": "guess-1"}, {"X-API-Key": "guess-2"}):  # no credential: not a guess
        async with http.get(cp.url + "/api/v1/connectors", headers=headers) as resp:
            assert resp.status == 401
    with pytest.raises(AuthError):
        await bad_delegate.register(register_request())
    clock.advance(10)
    async with http.get(cp.url + "/api/v1/connectors", headers={"X-API-Key": API_KEY}) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "50"
        body = await resp.json()
    assert body["error"]["code"] == Code.RATE_LIMITED
    assert body["error"]["message"] == "too many failed authentications from 127.0.0.1: try again in 50s"
    with pytest.raises(RateLimited):
        await delegate_client(http, cp.url, token=TOKEN_A).register(register_request())

    metric = cp.core.metrics.registry.get_sample_value
    name = "controlplane_auth_refusals_total"
    assert metric(name, {"credential": "api_key", "reason": "unauthenticated"}) == 3
    assert metric(name, {"credential": "delegate", "reason": "unauthenticated"}) == 1
    assert metric(name, {"credential": "api_key", "reason": "rate_limited"}) == 1
    assert metric(name, {"credential": "delegate", "reason": "rate_limited"}) == 1

    clock.advance(50)
    async with http.get(cp.url + "/api/v1/connectors", headers={"X-API-Key": API_KEY}) as resp:
        assert resp.status == 200
    await delegate_client(http, cp.url).register(register_request())


async def test_refused_delegates_are_counted(stack: Stack) -> None:
    """Token mismatches and scope refusals show in the same metric, by reason."""
    await refused(stack.b.deregister(stack.a_id), Code.DELEGATE_TOKEN_MISMATCH, MISMATCH)
    await refused(stack.b.register(register_request("team-a")), Code.TOKEN_SCOPE, "name 'team-a'")
    metric = stack.core.metrics.registry.get_sample_value
    for reason in (Code.DELEGATE_TOKEN_MISMATCH, Code.TOKEN_SCOPE):
        assert metric("controlplane_auth_refusals_total", {"credential": "delegate", "reason": reason}) == 1


async def test_a_flood_of_refused_delegate_requests_is_rate_limited_and_logged_once_a_second(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """Review #7: B's token sent 3000 heartbeats for A's delegate in 2 s: 3000 403s and 3000 warnings.

    A valid token acting for another's delegate (or beyond its scope) now counts against the address
    as a wrong credential does, so the flood turns into 429s; and each (address, code) is logged once
    a second, with the count of the ones held back.
    """
    clock = ManualClock()
    settings = ControlPlaneSettings(sweep_interval_seconds=3600, auth_failure_limit=5, auth_failure_window_seconds=60)
    cp = await control_plane_factory(tokens=TOKENS, settings=settings, clock=clock)
    a_id = (await delegate_client(http, cp.url, token=TOKEN_A).register(register_request("team-a"))).delegate_id
    b = delegate_client(http, cp.url, token=TOKEN_B)
    with structlog.testing.capture_logs() as logs:
        for _ in range(4):
            await refused(b.heartbeat(a_id, HeartbeatRequest(state="draining")), Code.DELEGATE_TOKEN_MISMATCH, MISMATCH)
        await refused(b.register(register_request("team-a")), Code.TOKEN_SCOPE, "name 'team-a'")
        for _ in range(2):  # five refusals from this address: B waits out the window, as a guesser does
            with pytest.raises(RateLimited) as limited:
                await b.heartbeat(a_id, HeartbeatRequest(state="draining"))
            assert limited.value.retry_after == 60
    refusals = [e for e in logs if e["event"] == "controlplane.delegate_refused"]
    assert [(e["code"], e["held_back"], e["log_level"]) for e in refusals] == [
        (Code.DELEGATE_TOKEN_MISMATCH, 0, "warning"),  # the first of each (address, code); the rest held back
        (Code.TOKEN_SCOPE, 0, "warning"),
    ]
    assert refusals[0]["address"] == "127.0.0.1"
    metric = cp.core.metrics.registry.get_sample_value
    name = "controlplane_auth_refusals_total"
    assert metric(name, {"credential": "delegate", "reason": Code.DELEGATE_TOKEN_MISMATCH}) == 4
    assert metric(name, {"credential": "delegate", "reason": Code.RATE_LIMITED}) == 2

    clock.advance(60)  # the window reopens: the next refusal is a 403 again, and its line counts the three
    with structlog.testing.capture_logs() as logs:
        await refused(b.heartbeat(a_id, HeartbeatRequest(state="draining")), Code.DELEGATE_TOKEN_MISMATCH, MISMATCH)
    [line] = [e for e in logs if e["event"] == "controlplane.delegate_refused"]
    assert (line["code"], line["held_back"]) == (Code.DELEGATE_TOKEN_MISMATCH, 3)


def test_a_flood_of_addresses_cannot_grow_the_failure_table() -> None:
    """Each address costs one small entry, and the table keeps only the most recent ones."""
    clock = ManualClock()
    limiter = FailureLimiter(2, 60, clock, max_addresses=100)
    for n in range(10_000):
        limiter.failed(f"10.0.{n // 256}.{n % 256}")
    assert len(limiter) == 100
    limiter.failed("10.0.39.15")  # the newest address, twice now: refused, while it lasts
    assert limiter.retry_after("10.0.39.15") == 60
    clock.advance(60)
    assert limiter.retry_after("10.0.39.15") is None


def test_refusals_are_logged_once_a_second_per_key_and_a_flood_of_keys_cannot_grow_the_table() -> None:
    """The first of each key is logged, repeats within the second are counted; old keys are forgotten."""
    clock = ManualClock()
    once = OncePerSecond(clock, max_keys=100)
    assert [once.held_back("10.0.0.1", "token_scope") for _ in range(3)] == [0, None, None]
    assert once.held_back("10.0.0.1", "delegate_token_mismatch") == 0  # another code: its own line
    clock.advance(1)
    assert once.held_back("10.0.0.1", "token_scope") == 2
    for n in range(10_000):
        once.held_back(f"10.0.{n // 256}.{n % 256}", "token_scope")
    assert len(once) == 100
