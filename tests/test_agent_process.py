"""The delegate as a real process: signals, kill -9, PID 1, the watchdog, bad configuration."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from agent.controlplane.app import ControlPlaneService
from agent.controlplane.core import ControlPlaneSettings
from tests.conftest import TOKEN, ControlPlaneFactory, free_port
from tests.helpers import wait_task, wait_until, wait_views

ROOT = Path(__file__).resolve().parent.parent
FAST = ControlPlaneSettings(
    heartbeat_seconds=1, poll_wait_seconds=2, lease_seconds=1.5, pickup_timeout_seconds=60, sweep_interval_seconds=0.1
)


class Proc:
    def __init__(self, process: asyncio.subprocess.Process, http: str, log: Path) -> None:
        self.process = process
        self.http = http
        self.log = log

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    async def exit_code(self, timeout: float = 30) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout)

    def output(self) -> str:
        return self.log.read_text()


Spawn = Callable[..., Awaitable[Proc]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    procs: list[Proc] = []

    async def start(cp: ControlPlaneService, name: str, *, argv: list[str] | None = None, **env: str) -> Proc:
        port = free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AGENT_", "DELEGATE_"))}
        base.update(
            {
                "MANAGER_HOST_AND_PORT": cp.url,
                "DELEGATE_TOKEN": TOKEN,
                "DELEGATE_NAME": name,
                "AGENT_HTTP_LISTEN": f"127.0.0.1:{port}",
                "AGENT_DATA_DIR": str(tmp_path / name),
                "AGENT_DRAIN_TIMEOUT_SECONDS": "20",
                "AWS_EC2_METADATA_DISABLED": "true",
                **env,
            }
        )
        log = tmp_path / f"{name}.log"
        cmd = argv or [sys.executable, str(ROOT / "tests" / "agent_process.py")]
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                *cmd, env=base, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
            )
        proc = Proc(process, f"http://127.0.0.1:{port}", log)
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        if p.process.returncode is None:
            p.process.kill()
            await p.process.wait()


async def ready(http: aiohttp.ClientSession, proc: Proc) -> None:
    async def check() -> bool:
        if proc.process.returncode is not None:
            raise AssertionError(f"the delegate exited early:\n{proc.output()}")
        try:
            async with http.get(proc.http + "/readyz") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    await wait_until(check, "the delegate to become ready", timeout=30, every=0.02)


async def readyz(http: aiohttp.ClientSession, proc: Proc) -> int:
    async with http.get(proc.http + "/readyz") as resp:
        return resp.status


async def test_sigterm_drains_running_work_and_exits_0(
    control_plane_factory: ControlPlaneFactory, spawn: Spawn, http: aiohttp.ClientSession
) -> None:
    """SIGTERM: readiness 503 at once, the running task finishes and reports, the process exits 0."""
    cp = await control_plane_factory(settings=FAST)
    p = await spawn(cp, "drainer")
    await ready(http, p)
    task = await cp.core.create_task(type="test.sleep", payload={"seconds": 2})
    await wait_task(cp.core, task.id, lambda t: t.state == "running", "the task to start")
    p.signal(signal.SIGTERM)
    await wait_views(cp.core, lambda v: v[0].state == "draining", "draining")
    assert await readyz(http, p) == 503
    assert await p.exit_code() == 0, p.output()
    result = await cp.core.get_task(task.id)
    assert result.status == "SUCCESS"
    assert result.result is not None and result.result.status == "SUCCESS"
    assert '"event":"agent.drained"' in p.output()


async def test_a_second_signal_cancels_at_once(
    control_plane_factory: ControlPlaneFactory, spawn: Spawn, http: aiohttp.ClientSession
) -> None:
    """The second signal does not wait for the drain: the task is stopped and given back to the queue."""
    cp = await control_plane_factory(settings=FAST)
    p = await spawn(cp, "impatient")
    await ready(http, p)
    task = await cp.core.create_task(type="test.sleep", payload={"seconds": 120})
    await wait_task(cp.core, task.id, lambda t: t.state == "running", "the task to start")
    p.signal(signal.SIGTERM)
    await wait_views(cp.core, lambda v: v[0].state == "draining", "draining")
    p.signal(signal.SIGINT)
    assert await p.exit_code(timeout=15) == 0
    assert (await cp.core.get_task(task.id)).state == "queued"


async def test_kill_9_mid_task_requeues_it_to_another_delegate(
    control_plane_factory: ControlPlaneFactory, spawn: Spawn, http: aiohttp.ClientSession
) -> None:
    """A delegate killed outright stops renewing; the task re-queues and another delegate finishes it."""
    cp = await control_plane_factory(settings=FAST)
    first = await spawn(cp, "doomed")
    await ready(http, first)
    task = await cp.core.create_task(type="test.sleep", payload={"seconds": 2})
    await wait_task(cp.core, task.id, lambda t: t.delegate_name == "doomed", "the task to start on 'doomed'")
    second = await spawn(cp, "survivor")
    await ready(http, second)
    first.process.kill()
    await first.exit_code()
    result = await wait_task(cp.core, task.id, lambda t: t.state == "done", "the task to finish", timeout=30)
    assert (result.status, result.delegate_name, result.attempts) == ("SUCCESS", "survivor", 2)


async def test_the_watchdog_ends_a_shutdown_that_hangs(
    control_plane_factory: ControlPlaneFactory, spawn: Spawn, http: aiohttp.ClientSession
) -> None:
    """If the ladder cannot finish (here: the control plane vanished), the process still exits."""
    cp = await control_plane_factory(settings=FAST)
    p = await spawn(cp, "stuck", AGENT_DRAIN_TIMEOUT_SECONDS="0", AGENT_SHUTDOWN_GRACE_SECONDS="1")
    await ready(http, p)
    task = await cp.core.create_task(type="test.sleep", payload={"seconds": 0.1})
    await wait_task(cp.core, task.id, lambda t: t.state == "running", "the task to start")
    await cp.stop()
    p.signal(signal.SIGTERM)
    assert await p.exit_code(timeout=15) == 70
    assert "shutdown did not finish within 1s; exiting hard" in p.output()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
async def test_sigterm_works_as_pid_1(
    control_plane_factory: ControlPlaneFactory, spawn: Spawn, http: aiohttp.ClientSession
) -> None:
    """As PID 1 (a container), a process without its own SIGTERM handler ignores SIGTERM; ours drains."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.decode().strip()}")
    cp = await control_plane_factory(settings=FAST)
    script = ROOT / "tests" / "agent_process.py"
    # `unshare --fork` stays the parent; the delegate is PID 1 inside the new namespace.
    p = await spawn(
        cp,
        "pid1",
        argv=[
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            sys.executable,
            "-c",
            f"import os, runpy; assert os.getpid() == 1; runpy.run_path({str(script)!r}, run_name='__main__')",
        ],
    )
    await ready(http, p)
    # Signal the delegate itself (PID 1 in its namespace), as the kubelet would.
    pid = int(
        subprocess.run(["pgrep", "-P", str(p.process.pid)], capture_output=True, text=True, check=True).stdout.split()[
            0
        ]
    )
    os.kill(pid, signal.SIGTERM)
    assert await p.exit_code() == 0, p.output()
    assert '"event":"agent.stopped"' in p.output()


async def test_bad_configuration_exits_2_naming_every_problem(tmp_path: Path) -> None:
    """Every problem at once, with the variable or file key, and no traceback."""
    config = tmp_path / "agent.yaml"
    config.write_text("delegate:\n  capacity: many\n  colour: blue\nhttp:\n  listen: nowhere\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AGENT_", "DELEGATE_", "MANAGER_"))}
    env.update(
        {
            "MANAGER_HOST_AND_PORT": "ftp://cp",
            "AGENT_LOG_FORMAT": "xml",
            "AWS_MAX_ATTEMPTS": "lots",
            "AGENT_SECRETS_DIR": str(tmp_path / "nope"),
        }
    )
    out = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert out.returncode == 2
    err = out.stderr
    for words in (
        "MANAGER_HOST_AND_PORT: must be an http(s) URL",
        "DELEGATE_TOKEN: is required",
        f"{config}: delegate.capacity: must be a whole number from 1 to 1024",
        f"{config}: delegate.colour: unknown setting",
        f"{config}: http.listen: must be HOST:PORT",
        "AGENT_LOG_FORMAT: must be json or console",
        "AWS_MAX_ATTEMPTS: must be a whole number",
        "AGENT_SECRETS_DIR:",
    ):
        assert words in err, err
    assert "Traceback" not in err
    ok_env = {
        **env,
        "MANAGER_HOST_AND_PORT": "https://cp.example:8443",
        "DELEGATE_TOKEN": "t" * 20,
        "AGENT_LOG_FORMAT": "json",
        "AWS_MAX_ATTEMPTS": "2",
    }
    del ok_env["AGENT_SECRETS_DIR"]
    out = subprocess.run(
        [sys.executable, "-m", "agent", "check-config"],
        capture_output=True,
        text=True,
        env=ok_env,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "controlPlane:\n  url: https://cp.example:8443\n" in out.stdout
    assert "t" * 20 not in out.stdout + out.stderr


async def test_the_daemon_as_shipped_runs_frozenlist_without_its_cpp_extension(
    control_plane_factory: ControlPlaneFactory, spawn: Spawn, http: aiohttp.ClientSession
) -> None:
    """`delegate-agent run` (the image's entry point): frozenlist runs without its C++ extension, which
    is what maps the C++ runtime into the image's delegate (1 MiB of idle memory). (This test venv
    has greenlet, which structlog loads and which maps it anyway: the extension is what is checked.)"""
    cp = await control_plane_factory(settings=FAST)
    p = await spawn(cp, "shipped", argv=[sys.executable, "-m", "agent", "run"])
    await ready(http, p)
    maps = Path(f"/proc/{p.process.pid}/maps").read_text()
    assert "_frozenlist" not in maps
    assert "_http_parser" in maps  # the right process, aiohttp loaded: its own extensions are mapped
    p.signal(signal.SIGTERM)
    assert await p.exit_code() == 0, p.output()
