"""Shared fixtures: an isolated AWS environment, manual and loop clocks, and real control planes."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.controlplane.app import ControlPlaneConfig, ControlPlaneService
from agent.controlplane.core import ControlPlaneSettings
from agent.observability.logging import configure_logging
from agent.protocol.auth import RequestSigner, TokenSource
from agent.protocol.client import ControlPlaneClient
from agent.protocol.models import RegisterRequest
from agent.runtime.agent import Agent
from agent.runtime.settings import AgentSettings, ControlPlaneEndpoint
from tests.handlers import GateHandler, all_handlers
from tests.helpers import wait_for

pytest_plugins = ["tests.pgfixtures", "tests.browser"]

AWS_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_STS",
    "AWS_ENDPOINT_URL_EC2",
    "AWS_ENDPOINT_URL_IAM",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CA_BUNDLE",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
    "AWS_STS_REGIONAL_ENDPOINTS",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "NO_PROXY",
    "no_proxy",
    "DELEGATE_TOKEN",
    "DELEGATE_TOKEN_FILE",
    "MANAGER_HOST_AND_PORT",
    "DELEGATE_NAME",
    "DELEGATE_TAGS",
    "DELEGATE_TASK_CAPACITY",
    "CONTROL_PLANE_URL",
    "CONTROL_PLANE_API_KEY",
    "CONTROL_PLANE_DELEGATE_TOKENS",
)

TOKEN = "test-delegate-token-0123456789abcdef"
API_KEY = "test-api-key-0123456789abcdef"


@pytest.fixture(autouse=True)
def _logging() -> None:
    """Logs go to stderr as JSON, as they do in production; stdout stays for command output.

    Re-applied before every test: a CLI test configures logging onto pytest's capture stream,
    which is closed once that test ends.
    """
    configure_logging(fmt="json", level="info", stream=sys.__stderr__)


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test sees the developer's AWS config, credentials or proxies, nor talks to 169.254.169.254."""
    for var in AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    for var in [v for v in os.environ if v.startswith(("AGENT_", "AWS_"))]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


def _is_local(host: object) -> bool:
    if host is None:  # getaddrinfo(None, port): the wildcard, for binding
        return True
    name = host.decode() if isinstance(host, bytes) else str(host)
    if name.lower() in ("localhost", "ip6-localhost"):
        return True
    try:
        address = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process may look up and connect to loopback only: AWS, the control plane, Prometheus are local.

    A lookup of or a connection to anything else is refused with an OSError (so no packet leaves)
    and fails the test afterwards even if the code under test swallowed the error. Subprocesses
    (moto, delegates, Prometheus) are pointed at 127.0.0.1 by the tests that start them.
    """
    attempts: list[str] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(what: str) -> OSError:
        attempts.append(what)
        return OSError(f"the test suite talks to loopback only: refused {what}")

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_local(host):
            raise refuse(f"a lookup of {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            raise refuse(f"a connection to {address!r}")

    def connect(sock: socket.socket, address: Any) -> None:
        check(sock, address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        check(sock, address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield
    assert not attempts, f"the test tried to leave loopback: {attempts}"


class ManualClock:
    """Wall-clock time that only moves when a test says so."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


class LoopClock:
    """Wall-clock time that moves with the running event loop's clock.

    The control plane's deadlines (leases, heartbeats, pickup) are wall-clock times. In a test on
    virtual time (looptime) the delegate's timers run on the loop's clock, so the control plane must
    read the same clock, or a lease would never expire however long the delegate stayed silent.
    On a real-time loop this is the wall clock (offset by a constant).
    """

    def __init__(self) -> None:
        self._offset: float | None = None

    def __call__(self) -> float:
        now = asyncio.get_running_loop().time()
        if self._offset is None:
            self._offset = time.time() - now
        return self._offset + now


#: looptime's tick, in seconds: a binary fraction (about a microsecond), so that loop times and
#: intervals such as 0.5, 0.75 or 2.5 add up exactly in floating point. With looptime's default
#: decimal tick (1e-6), ``last + period`` can exceed the loop time it should equal by one ulp;
#: asyncio then runs the timer for it before looptime moves the clock (it is due within the clock
#: resolution), and code that sleeps "until last + period" and re-checks (the reporter's lease
#: keepalive) spins forever at a standstill. Intervals in tests on virtual time are binary fractions.
LOOPTIME_RESOLUTION = 2**-20


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test on virtual time (marked, or all with ``--looptime``) ticks in binary fractions."""
    everywhere = bool(config.getoption("looptime", default=None))
    for item in items:
        if everywhere or item.get_closest_marker("looptime") is not None:
            item.add_marker(pytest.mark.looptime(resolution=LOOPTIME_RESOLUTION), append=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ControlPlaneFactory = Callable[..., Awaitable[ControlPlaneService]]


@pytest.fixture
async def control_plane_factory(tmp_path: Path) -> AsyncIterator[ControlPlaneFactory]:
    """Start real control planes on 127.0.0.1 (stopped at the end of the test).

    Their clock is the event loop's (one :class:`LoopClock` for every control plane of the test, so a
    restarted one continues where the first stopped) unless the test passes its own.
    """
    started: list[ControlPlaneService] = []
    loop_clock = LoopClock()

    async def make(
        *,
        data_dir: Path | None = None,
        settings: ControlPlaneSettings | None = None,
        tokens: str = f"default:{TOKEN}",
        clock: Any = None,
        port: int = 0,
        **kwargs: Any,
    ) -> ControlPlaneService:
        data_dir = data_dir or tmp_path / f"cp-{len(started)}"
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        token_file = data_dir / "tokens.txt"
        if not token_file.exists():
            token_file.write_text(tokens + "\n")
        config_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in ControlPlaneConfig.__dataclass_fields__}
        config = ControlPlaneConfig(
            host="127.0.0.1",
            port=port,
            data_dir=data_dir,
            delegate_token_file=token_file,
            api_key=API_KEY,
            **config_fields,
            settings=settings
            or ControlPlaneSettings(
                heartbeat_seconds=5,
                poll_wait_seconds=2,
                lease_seconds=30,
                pickup_timeout_seconds=30,
                sweep_interval_seconds=3600,
            ),
        )
        service = ControlPlaneService(config, clock=clock or loop_clock, **kwargs)
        await service.start()
        started.append(service)
        return service

    yield make
    for service in reversed(started):
        await service.shutdown()  # idempotent: a test may have stopped it already


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def delegate_client(
    http: aiohttp.ClientSession,
    url: str,
    *,
    token: str = TOKEN,
    clock: Callable[[], float] | None = None,
    audience: str | None = None,
) -> ControlPlaneClient:
    kwargs: dict[str, Any] = {"issuer": "test-delegate"}
    if clock is not None:
        kwargs["clock"] = clock
    if audience is not None:
        kwargs["audience"] = audience
    signer = RequestSigner(TokenSource(value=token), **kwargs)
    return ControlPlaneClient(http, url, signer)


def register_request(
    name: str = "d1", tags: list[str] | None = None, *, capacity: int = 4, task_types: list[str] | None = None
) -> RegisterRequest:
    return RegisterRequest(
        name=name,
        instance_id=f"{name}-{uuid.uuid4().hex[:8]}",
        tags=tags or [],
        version="test",
        task_types=task_types or ["aws.validate-connector", "test.echo"],
        capacity=capacity,
    )


def manual_connector(name: str = "Prod account", **spec_extra: Any) -> dict[str, Any]:
    """A valid ManualConfig connector document; keyword arguments override parts of ``spec``."""
    credential = {
        "type": "ManualConfig",
        "spec": {"accessKey": "AKIAIOSFODNN7EXAMPLE", "secretKeyRef": "account.aws_secret_key"},
        "region": "us-east-1",
    }
    spec: dict[str, Any] = {"credential": credential, "delegateSelectors": [], "executeOnDelegate": True}
    spec.update(spec_extra)
    return {"connector": {"name": name, "type": "Aws", "spec": spec}}


# --- AWS: moto as a real server on loopback -------------------------------------------------------


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """moto's server on 127.0.0.1 (its in-process mock does not work with aiobotocore)."""
    from moto.server import ThreadedMotoServer

    os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = "false"  # makes /moto-api/reset fast
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def moto(moto_url: str) -> Iterator[str]:
    """A moto with empty state for this test (and IAM enforcement off)."""
    from tests.awsfakes import moto_api

    moto_api(moto_url, "/moto-api/reset")
    yield moto_url
    moto_api(moto_url, "/moto-api/reset-auth", b"inf")


@pytest.fixture
def iam_enforced(moto: str) -> Iterator[None]:
    """moto checks IAM policies from now on (request this after seeding users and roles)."""
    from tests.awsfakes import moto_api

    moto_api(moto, "/moto-api/reset-auth", b"0")
    yield
    moto_api(moto, "/moto-api/reset-auth", b"inf")


# --- delegates in-process -------------------------------------------------------------------------

FAST = ControlPlaneSettings(
    heartbeat_seconds=1, poll_wait_seconds=2, lease_seconds=3, pickup_timeout_seconds=30, sweep_interval_seconds=0.1
)


@dataclass
class Running:
    agent: Agent
    task: asyncio.Task[int]
    handlers: dict[str, Any]

    @property
    def gate(self) -> GateHandler:
        return self.handlers["test.gate"]  # type: ignore[no-any-return]

    async def registered(self, timeout: float = 10) -> str:
        await wait_for(lambda: self.agent.state.registered, f"{self.agent.settings.name} to register", timeout)
        assert self.agent.state.delegate_id is not None
        return self.agent.state.delegate_id

    async def stop(self, timeout: float = 30) -> int:
        self.agent.request_shutdown()
        return await asyncio.wait_for(self.task, timeout)


AgentFactory = Callable[..., Awaitable[Running]]


@pytest.fixture
async def agent_factory(tmp_path: Path) -> AsyncIterator[AgentFactory]:
    started: list[Running] = []

    async def make(
        cp: ControlPlaneService | str,
        *,
        name: str = "d1",
        tags: tuple[str, ...] = (),
        capacity: int = 4,
        data_dir: Path | None = None,
        token: str | None = TOKEN,
        token_file: Path | None = None,
        drain_timeout: float = 5.0,
        extra_handlers: tuple[Any, ...] = (),
        allow_insecure: bool = False,
    ) -> Running:
        url = cp if isinstance(cp, str) else cp.url
        settings = AgentSettings(
            control_plane=ControlPlaneEndpoint(url=url, request_timeout=5, allow_insecure=allow_insecure),
            token=token,
            token_file=token_file,
            name=name,
            tags=tags,
            capacity=capacity,
            http_host="127.0.0.1",
            http_port=0,
            data_dir=data_dir,
            drain_timeout=drain_timeout,
            shutdown_grace=5,
        )
        handlers = all_handlers()
        handlers.update({h.task_type: h for h in extra_handlers})
        agent = Agent(settings, handlers=list(handlers.values()), watchdog=False)
        task = asyncio.create_task(agent.run())
        await asyncio.wait_for(agent.started.wait(), 10)
        running = Running(agent, task, handlers)
        started.append(running)
        return running

    yield make
    for r in started:
        if not r.task.done():
            r.agent.request_shutdown()
            r.agent.request_shutdown()
            await asyncio.wait_for(r.task, 30)


async def done(cp: ControlPlaneService, task_id: str, timeout: float = 15) -> Any:
    """The task once the control plane has its result (waited on, not polled; ``timeout`` in loop time)."""
    task = await cp.core.wait_task(task_id, timeout)
    assert task.state == "done", f"timed out after {timeout}s waiting for task {task_id} to finish ({task.state})"
    return task
