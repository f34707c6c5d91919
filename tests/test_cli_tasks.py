"""`connector test` while waiting (progress, timeout, Ctrl-C) and the `tasks` commands, against real parts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from agent.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PENDING, main
from agent.controlplane.app import ControlPlaneService
from agent.protocol.models import TASK_TYPE_AWS_VALIDATE, TestRequest
from tests.conftest import API_KEY, FAST, AgentFactory, ControlPlaneFactory, manual_connector
from tests.handlers import GateHandler
from tests.helpers import wait_for


async def run_cli(*argv: str) -> int:
    """Run the CLI in a thread: it is synchronous, and the control plane runs on this loop."""
    return await asyncio.to_thread(main, list(argv))


def common(cp: ControlPlaneService) -> tuple[str, ...]:
    return ("--control-plane", cp.url, "--api-key", API_KEY)


class GatedValidation(GateHandler):
    """Stands in for the AWS validation: each connection test runs until the test opens its gate."""

    task_type = TASK_TYPE_AWS_VALIDATE


async def test_a_test_outlasting_its_timeout_exits_4_and_the_tasks_commands_follow_it(
    control_plane_factory: ControlPlaneFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """Timeout: its own exit code and how to fetch the result; then tasks get, list and cancel."""
    cp = await control_plane_factory()
    await cp.core.apply_connector(manual_connector("Lonely", delegateSelectors=["nobody"]))

    assert await run_cli("connector", "test", "Lonely", "--timeout", "0.2", *common(cp)) == EXIT_PENDING
    captured = capsys.readouterr()
    task_id = captured.out.split()[2]
    assert captured.out.startswith(f"QUEUED  task {task_id}")
    assert captured.err.splitlines() == [
        f"delegate-agent: no result within 0.2s: task {task_id} is still queued. "
        f"Fetch it later with `delegate-agent tasks get {task_id} --wait 60`"
    ]

    assert await run_cli("tasks", "get", task_id, *common(cp)) == EXIT_PENDING
    assert capsys.readouterr().err.startswith(f"delegate-agent: task {task_id} is still queued;")
    assert await run_cli("tasks", "list", "--state", "queued", "--connector", "Lonely", *common(cp)) == EXIT_OK
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["ID", "TYPE", "CONNECTOR", "STATE", "STATUS"]
    assert table[1].split()[:5] == [task_id, TASK_TYPE_AWS_VALIDATE, "Lonely", "queued", "-"]
    assert await run_cli("tasks", "list", "--state", "done", *common(cp)) == EXIT_OK
    assert task_id not in capsys.readouterr().out

    assert await run_cli("tasks", "cancel", task_id, *common(cp)) == EXIT_OK
    assert capsys.readouterr().out == f"task {task_id} cancelled\n"
    assert await run_cli("tasks", "get", task_id, *common(cp)) == EXIT_FAILED
    assert capsys.readouterr().out.startswith(f"FAILURE  task {task_id}")
    assert await run_cli("tasks", "get", task_id, "-o", "json", *common(cp)) == EXIT_FAILED
    assert json.loads(capsys.readouterr().out)["failureReason"] == "cancelled"


async def test_waiting_when_piped_prints_no_progress_and_tasks_get_waits_for_a_running_task(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """Piped stderr stays quiet; `tasks get --wait` follows a task a real delegate is running, or cancels."""
    cp = await control_plane_factory(settings=FAST)
    gated = GatedValidation()
    await (await agent_factory(cp, name="runner", extra_handlers=(gated,))).registered()
    await cp.core.apply_connector(manual_connector("Gated"))

    testing = asyncio.create_task(run_cli("connector", "test", "Gated", "--timeout", "30", *common(cp)))
    await wait_for(lambda: gated.started, "the delegate to start the test")
    gated.open_all()
    assert await testing == EXIT_OK
    captured = capsys.readouterr()
    assert captured.out.startswith(f"SUCCESS  task {gated.started[0]}  delegate runner")
    assert captured.err == ""

    task_id = (await cp.core.test_connector("Gated", TestRequest(wait_seconds=0))).id
    await wait_for(lambda: len(gated.started) == 2, "the delegate to start the second test")
    getting = asyncio.create_task(run_cli("tasks", "get", task_id, "--wait", "30", *common(cp)))
    assert await run_cli("tasks", "cancel", task_id, *common(cp)) == EXIT_OK
    assert f"task {task_id}: cancel requested; runner stops it shortly" in capsys.readouterr().out
    assert await getting == EXIT_FAILED
    assert gated.cancelled == [task_id]
    assert capsys.readouterr().out.startswith(f"FAILURE  task {task_id}  delegate runner")


# --- on a terminal: a real pty as stderr, the CLI as a real process --------------------------------


@dataclass
class Terminal:
    """The CLI in a subprocess whose stderr is a pseudo-terminal; what it wrote there accumulates in ``text``."""

    proc: asyncio.subprocess.Process
    fd: int
    text: str = ""
    chunks: list[bytes] = field(default_factory=list)

    def read(self) -> bool:
        """Take what the process wrote; False once it has closed the terminal."""
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: every writer closed the terminal
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.fd)
        self.text += data.decode(errors="replace").replace("\r\n", "\n")
        return bool(data)

    async def shows(self, text: str) -> None:
        await wait_for(lambda: text in self.text, f"{text!r} on the terminal (got {self.text!r})", 20)

    async def exit_code(self) -> tuple[int, str]:
        """The exit code and stdout, once the process ended and all it wrote to the terminal is in ``text``."""
        out, _ = await asyncio.wait_for(self.proc.communicate(), 30)
        while self.read():  # it has exited: the rest is buffered, then EIO (no read blocks)
            pass
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode()


Spawn = Callable[..., Awaitable[Terminal]]


@pytest.fixture
async def terminal() -> AsyncIterator[Spawn]:
    started: list[Terminal] = []

    async def spawn(*argv: str) -> Terminal:
        master, slave = os.openpty()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent",
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=slave,
        )
        os.close(slave)
        t = Terminal(proc, master)
        asyncio.get_running_loop().add_reader(master, t.read)
        started.append(t)
        return t

    yield spawn
    for t in started:
        if t.proc.returncode is None:
            t.proc.kill()
            await t.proc.wait()
        asyncio.get_running_loop().remove_reader(t.fd)  # a no-op once it read EIO
        os.close(t.fd)


async def test_on_a_terminal_progress_shows_queued_then_running_on_the_delegate_then_done(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, terminal: Spawn
) -> None:
    """stderr a TTY: one line per state change, and the result on stdout as usual."""
    cp = await control_plane_factory(settings=FAST)
    gated = GatedValidation()
    await (await agent_factory(cp, name="tty-delegate", extra_handlers=(gated,))).registered()
    await cp.core.apply_connector(manual_connector("Tty", delegateSelectors=[]))

    tty = await terminal("connector", "test", "Tty", "--timeout", "60", *common(cp))
    await tty.shows("running on tty-delegate")
    gated.open_all()
    code, out = await tty.exit_code()
    assert code == EXIT_OK
    assert out.startswith("SUCCESS")
    states = [re.sub(r"\s+\[[\d.]+s\]$", "", line) for line in tty.text.splitlines()]
    task_id = gated.started[0]
    assert states == [
        f"task {task_id} queued: waiting for a delegate",
        f"task {task_id} running on tty-delegate",
        f"task {task_id} done: SUCCESS",
    ]


async def test_ctrl_c_on_a_terminal_leaves_the_task_running_and_names_it(
    control_plane_factory: ControlPlaneFactory, terminal: Spawn
) -> None:
    """Ctrl-C stops the wait, not the task: exit 130 with the task id and how to fetch or cancel it."""
    cp = await control_plane_factory()
    await cp.core.apply_connector(manual_connector("Waiting", delegateSelectors=["nobody", "prod"]))

    tty = await terminal("connector", "test", "Waiting", *common(cp))
    await tty.shows("queued: waiting for a delegate with tags nobody, prod")
    match = re.search(r"task (\S+) queued", tty.text)
    assert match
    task_id = match[1]
    tty.proc.send_signal(signal.SIGINT)
    code, out = await tty.exit_code()
    assert code == EXIT_INTERRUPTED
    assert out == ""
    assert f"interrupted: task {task_id} keeps running" in tty.text
    assert f"delegate-agent tasks cancel {task_id}" in tty.text
    assert "Traceback" not in tty.text
    assert (await cp.core.get_task(task_id)).state == "queued"
