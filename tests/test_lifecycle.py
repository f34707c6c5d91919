"""Lifecycle of the two owner objects: construct without I/O, start once, shut down in order, twice safely."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
import structlog
import structlog.testing

from agent.aws.connector import AwsConnector
from agent.controlplane.app import ControlPlaneConfig, ControlPlaneService
from agent.protocol.results import ValidationResult
from agent.runtime.agent import Agent
from agent.runtime.settings import AgentSettings, ControlPlaneEndpoint
from agent.taskapi import TaskContext
from tests.conftest import API_KEY, TOKEN, ControlPlaneFactory
from tests.handlers import EchoHandler, outcome
from tests.helpers import wait_for, wait_task


class ClosingHandler:
    """Records warm and close; its close can fail, as a buggy handler's might."""

    def __init__(self, task_type: str, *, fail_close: bool = False) -> None:
        self.task_type = task_type
        self.fail_close = fail_close
        self.warmed = self.closed = False

    async def warm(self) -> None:
        self.warmed = True

    async def aclose(self) -> None:
        self.closed = True
        if self.fail_close:
            raise RuntimeError("close failed")

    async def __call__(self, ctx: TaskContext) -> ValidationResult:
        return outcome(ctx)


def settings(url: str, tmp_path: Path) -> AgentSettings:
    return AgentSettings(
        control_plane=ControlPlaneEndpoint(url=url, request_timeout=5),
        token=TOKEN,
        name="life",
        http_host="127.0.0.1",
        http_port=0,
        data_dir=tmp_path / "agent",
        drain_timeout=5,
        shutdown_grace=5,
    )


async def refused(url: str) -> bool:
    """True when nothing listens at ``url`` any more."""
    try:
        async with aiohttp.ClientSession() as s, s.get(url + "/healthz"):
            return False
    except aiohttp.ClientConnectionError:
        return True


async def test_an_agent_runs_in_async_with_and_stops_in_order_even_when_a_close_fails(
    control_plane_factory: ControlPlaneFactory, tmp_path: Path
) -> None:
    """`async with` starts the loops and drains on exit; a failing handler close does not stop the rest."""
    cp = await control_plane_factory()
    bad, good = ClosingHandler("test.bad", fail_close=True), ClosingHandler("test.good")
    agent = Agent(settings(cp.url, tmp_path), handlers=[bad, good, EchoHandler()], watchdog=False)
    with structlog.testing.capture_logs() as logs:
        await run_and_stop(agent, cp, bad, good)
    assert bad.closed and good.closed
    assert await refused(agent.http_url)  # the HTTP server stopped after the failed close
    assert (await cp.core.delegate_views())[0].state == "deregistered"  # deregistered before the closes
    assert "agent.handler_close_failed" in [e["event"] for e in logs]


async def run_and_stop(agent: Agent, cp: ControlPlaneService, bad: ClosingHandler, good: ClosingHandler) -> None:
    async with agent:
        assert bad.warmed and good.warmed  # warmed before the first poll
        await wait_for(lambda: agent.state.registered, "registration")
        task = await cp.core.create_task(type="test.echo", payload={"message": "hi"})
        await wait_task(cp.core, task.id, lambda t: t.state == "done", "the task")


async def test_shutdown_is_idempotent_and_an_agent_runs_once(
    control_plane_factory: ControlPlaneFactory, tmp_path: Path
) -> None:
    cp = await control_plane_factory()
    agent = Agent(settings(cp.url, tmp_path), handlers=[EchoHandler()], watchdog=False)
    run = asyncio.create_task(agent.run())
    await asyncio.wait_for(agent.started.wait(), 10)
    await asyncio.gather(agent.shutdown(), agent.shutdown())  # both return once stopped
    assert run.done() and run.result() == 0
    await agent.shutdown()  # and again, after the fact
    with pytest.raises(RuntimeError, match="already run"):
        await agent.run()


async def test_shutdown_before_run_means_it_never_starts(tmp_path: Path) -> None:
    agent = Agent(settings("http://127.0.0.1:9", tmp_path), handlers=[EchoHandler()], watchdog=False)
    await agent.shutdown()
    with pytest.raises(RuntimeError, match="already run"):
        await agent.run()
    assert not (tmp_path / "agent").exists()  # constructing and shutting down touched no disk


def test_two_handlers_for_one_task_type_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"two handlers for the task type 'test\.echo'"):
        Agent(settings("http://127.0.0.1:9", tmp_path), handlers=[EchoHandler(), EchoHandler()])


class FailingPlatform:
    closed = False

    async def __call__(self, connector: AwsConnector, task_id: str, permissions: tuple[str, ...]) -> ValidationResult:
        return ValidationResult(status="SUCCESS", tested_at=datetime.now(UTC))

    async def aclose(self) -> None:
        self.closed = True
        raise RuntimeError("close failed")


async def test_the_control_plane_service_starts_once_and_closes_everything_in_reverse(tmp_path: Path) -> None:
    platform = FailingPlatform()
    config = ControlPlaneConfig(port=0, data_dir=tmp_path / "cp", api_key=API_KEY, delegate_tokens=f"d:{TOKEN}")
    service = ControlPlaneService(config, platform_validator=platform)
    assert not (tmp_path / "cp").exists()  # no I/O in the constructor
    with pytest.raises(RuntimeError, match="not set up"):
        _ = service.core
    with structlog.testing.capture_logs() as logs:
        url = await start_and_stop(service)
    assert platform.closed
    assert await refused(url)
    with pytest.raises(Exception, match="closed"):
        await service.store.count_tasks()  # closed after the platform validator's failed close
    await service.shutdown()  # idempotent
    events = [e["event"] for e in logs]
    assert events[-2:] == ["controlplane.close_failed", "controlplane.stopped"]


async def start_and_stop(service: ControlPlaneService) -> str:
    async with service:
        url = service.url
        with pytest.raises(RuntimeError, match="already been started"):
            await service.start()
        async with aiohttp.ClientSession() as s, s.get(url + "/healthz") as resp:
            assert resp.status == 200
    return url


async def test_a_failed_start_closes_what_was_opened(tmp_path: Path) -> None:
    """A port already taken: `async with` raises, and the store it had opened is closed again."""
    config = ControlPlaneConfig(port=0, data_dir=tmp_path / "a", api_key=API_KEY, delegate_tokens=f"d:{TOKEN}")
    async with ControlPlaneService(config) as first:
        port = int(first.url.rsplit(":", 1)[1])
        taken = ControlPlaneConfig(port=port, data_dir=tmp_path / "b", api_key=API_KEY, delegate_tokens=f"d:{TOKEN}")
        second = ControlPlaneService(taken)
        with pytest.raises(OSError, match="address already in use"):
            async with second:
                pass
        with pytest.raises(Exception, match="closed"):
            await second.store.count_tasks()
