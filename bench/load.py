"""Load run: N AWS validations through the control plane and 3 delegates, as separate processes.

    python -m bench.load --tasks 10000            # make load
    python -m bench.load --tasks 10000 --faults   # the same with faults switched on

Everything runs on 127.0.0.1: moto (its own process), the control plane (its own process), the
delegates (one process each) and, with --faults, a chaos proxy between delegates and control plane
that resets connections, answers 503 and 429 and adds latency in turns, while the control plane is
killed (SIGKILL) and restarted once. It reports count, lost, duplicates and end-to-end percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.protocol.api_client import ApiClient
from agent.protocol.models import TASK_TYPE_AWS_VALIDATE, CreateTaskRequest
from bench.chaos import ChaosProxy, Mode

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "AGENT_", "DELEGATE_", "MANAGER_", "CONTROL_PLANE_"))
    }
    env.update(
        {
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost",
            **extra,
        }
    )
    return env


def _wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


@dataclass
class Stack:
    """The processes of one run; stop() ends them all."""

    workdir: Path
    capacity: int = 32
    lease_seconds: float = 5.0
    agent_handlers: str = "aws"  # "aws": the real delegate; "test": tests/agent_process.py with test handlers
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: Bench-only: rewrites a process's command line before it starts (bench/pickup_trace.py), or None.
    wrap: Callable[[str, list[str]], list[str]] | None = None
    moto_url: str = ""
    cp_url: str = ""
    cp_port: int = 0

    def start_moto(self, *, keepalive: bool = False, name: str = "moto") -> str:
        """moto on a free port: its own server (a connection per request) or kept alive, as AWS does."""
        port = free_port()
        if keepalive:
            command = [sys.executable, "-m", "bench.motoserver", str(port)]
        else:
            command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        self._spawn(name, command, _clean_env(MOTO_EC2_LOAD_DEFAULT_AMIS="false"))
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/moto-api/")
        if name == "moto":
            self.moto_url = url
        return url

    def start_control_plane(self) -> str:
        self.cp_port = self.cp_port or free_port()
        data = self.workdir / "control-plane"
        self._spawn(
            "control-plane",
            [
                sys.executable,
                "-m",
                "agent",
                "control-plane",
                "--listen",
                f"127.0.0.1:{self.cp_port}",
                "--data-dir",
                str(data),
                "--heartbeat-seconds",
                "1",
                "--poll-wait-seconds",
                "5",
                "--lease-seconds",
                str(self.lease_seconds),
                "--pickup-timeout-seconds",
                "900",
                "--task-timeout-seconds",
                "60",
                "--log-format",
                "json",
                "--log-level",
                os.environ.get("LOAD_CP_LOG_LEVEL", "warning"),
            ],
            _clean_env(),
        )
        self.cp_url = f"http://127.0.0.1:{self.cp_port}"
        _wait_http(self.cp_url + "/healthz")
        return self.cp_url

    @property
    def api_key(self) -> str:
        """The key the control plane generated into its data dir."""
        return (self.workdir / "control-plane" / "api-key").read_text().strip()

    @property
    def api(self) -> ApiClient:
        return ApiClient(self.cp_url, self.api_key, timeout=60)

    def start_agent(self, name: str, cp_url: str, *, tags: str = "load", aws_url: str | None = None) -> str:
        port = free_port()
        secrets = self.workdir / "secrets"
        secrets.mkdir(exist_ok=True)
        # Written as Kubernetes updates a mounted Secret: whole or not at all. A plain write_text here
        # truncated the file while the other delegates read it (every restart in the fault run wrote
        # it again), and a validation now and then failed on an empty secret.
        staged = secrets / f".load_secret_key.{name}"
        staged.write_text("load-test-secret-key")
        staged.replace(secrets / "load_secret_key")
        env = _clean_env(
            MANAGER_HOST_AND_PORT=cp_url,
            DELEGATE_TOKEN_FILE=str(self.workdir / "control-plane" / "delegate-token"),
            DELEGATE_NAME=name,
            DELEGATE_TAGS=tags,
            DELEGATE_TASK_CAPACITY=str(self.capacity),
            AGENT_HTTP_LISTEN=f"127.0.0.1:{port}",
            AGENT_DATA_DIR=str(self.workdir / name),
            AGENT_SECRETS_DIR=str(secrets),
            AWS_ENDPOINT_URL=aws_url or self.moto_url or "http://127.0.0.1:9",
            AGENT_LOG_FORMAT="json",
            AGENT_LOG_LEVEL="warning",
            AGENT_DRAIN_TIMEOUT_SECONDS="5",
        )
        argv = (
            [sys.executable, "-m", "agent", "run"]
            if self.agent_handlers == "aws"
            else [sys.executable, str(ROOT / "tests" / "agent_process.py")]
        )
        self._spawn(name, argv, env)
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/healthz")
        return url

    def kill(self, name: str) -> None:
        proc = self.processes.pop(name)
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for proc in list(self.processes.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        argv = self.wrap(name, argv) if self.wrap is not None else argv
        # The child keeps its own copy of the log's file descriptor; ours is closed at once.
        with (self.workdir / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


@dataclass
class LoadResult:
    tasks: int
    completed: int
    lost: int
    succeeded: int
    accepted: int
    duplicates: int
    fenced: int
    requeued: int
    p50: float | None
    p99: float | None
    seconds: float
    faults: dict[str, int]
    #: Failed tasks by reason (control plane) or category (handler): see Stats.failures_by_reason.
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing twice, and every failure one that AWS faults explain (faulty runs only)."""
        explained = set(self.failures) <= AWS_FAULT_CATEGORIES if self.faults else not self.failures
        return self.lost == 0 and self.accepted == self.completed and explained

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (
            f"{self.tasks} tasks: {self.completed} completed ({self.succeeded} SUCCESS), {self.lost} lost, "
            f"{self.accepted - self.completed} accepted twice, {self.duplicates} duplicate submissions "
            f"answered as such, {self.fenced} fenced, {self.requeued} re-queued; end-to-end p50 "
            f"{_ms(self.p50)} p99 {_ms(self.p99)}; {self.rate:.0f} validations/s over {self.seconds:.1f}s"
            + (f"; failures {self.failures}" if self.failures else "")
            + (f"; faults {dict(self.faults)}" if self.faults else "")
        )


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def connector() -> dict[str, Any]:
    return {
        "connector": {
            "name": "load",
            "identifier": "load",
            "type": "Aws",
            "spec": {
                "credential": {
                    "type": "ManualConfig",
                    "spec": {"accessKey": "AKIALOADTEST00000000", "secretKeyRef": "account.load_secret_key"},
                },
                "delegateSelectors": ["load"],
            },
        }
    }


#: What AWS faults may turn into when retries run out: the validation fails, and says why.
AWS_FAULT_CATEGORIES = frozenset({"throttled", "network"})


async def run_load(
    tasks: int, *, workdir: Path, faults: bool = False, agents: int = 3, capacity: int = 32, log: Any = print
) -> LoadResult:
    """``tasks`` validations through the control plane and ``agents`` delegates; with ``faults``, the
    fault suite's faults switched on while they run (see :func:`_chaos`)."""
    stack = Stack(workdir, capacity=capacity)
    try:
        stack.start_moto()
        cp_url = stack.start_control_plane()
        proxy = ChaosProxy(cp_url, share=0.2)
        aws_proxy = ChaosProxy(stack.moto_url, share=0.05, aws=True)
        async with proxy.running() as proxy_url, aws_proxy.running() as aws_url:
            target = proxy_url if faults else cp_url
            aws_target = aws_url if faults else None
            for i in range(agents):
                stack.start_agent(f"load-{i}", target, aws_url=aws_target)
            api = stack.api
            await _wait_delegates(api, agents)
            payload = {"connector": connector()}
            log(
                f"queueing {tasks} validations for {agents} delegates (capacity {capacity} each)"
                + (" with faults" if faults else "")
            )
            started = time.monotonic()
            await _create(api, tasks, payload)
            chaos = asyncio.create_task(_chaos(proxy, aws_proxy, stack, target, aws_target, log)) if faults else None
            await _wait_done(api, tasks, deadline=started + max(300, tasks / 5), log=log)
            seconds = time.monotonic() - started
            if chaos is not None:
                chaos.cancel()
                await asyncio.gather(chaos, return_exceptions=True)
            stats = await asyncio.to_thread(stack.api.stats)
        seen = {**proxy.seen, **{f"aws_{k}": v for k, v in aws_proxy.seen.items() if k != "forwarded"}}
        return LoadResult(
            tasks=tasks,
            completed=stats.tasks.get("done", 0),
            lost=tasks - stats.tasks.get("done", 0),
            succeeded=stats.done_by_status.get("SUCCESS", 0),
            accepted=stats.results_accepted,
            duplicates=stats.results_duplicate,
            fenced=stats.results_fenced,
            requeued=stats.tasks_requeued,
            p50=stats.latency.p50,
            p99=stats.latency.p99,
            seconds=seconds,
            faults=seen if faults else {},
            failures=dict(stats.failures_by_reason),
        )
    finally:
        stack.stop()


async def _wait_delegates(api: ApiClient, n: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        views = (await asyncio.to_thread(api.list_delegates)).delegates
        if sum(1 for d in views if d.state == "running") >= n:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("the delegates did not register")


async def _create(api: ApiClient, n: int, payload: dict[str, Any]) -> None:
    request = CreateTaskRequest(type=TASK_TYPE_AWS_VALIDATE, payload=payload, selectors=["load"], max_attempts=10)

    def batch(count: int) -> None:
        for _ in range(count):
            api.create_task(request)

    workers = 8
    await asyncio.gather(
        *(asyncio.to_thread(batch, n // workers + (1 if i < n % workers else 0)) for i in range(workers))
    )


async def _wait_done(api: ApiClient, n: int, *, deadline: float, log: Any) -> None:
    last = -1
    while True:
        try:
            stats = await asyncio.to_thread(api.stats)
        except OSError:
            await asyncio.sleep(0.5)  # the control plane is being restarted
            continue
        except Exception as exc:  # the control plane restarts during the faulty run
            if "cannot reach" in str(exc) or "failed" in str(exc):
                await asyncio.sleep(0.5)
                continue
            raise
        done = stats.tasks.get("done", 0)
        if done != last and (done // max(1, n // 10)) != (last // max(1, n // 10)):
            log(f"  {done}/{n} done")
        last = done
        if done >= n:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done}/{n} tasks finished in time")
        await asyncio.sleep(0.5)


async def _chaos(proxy: ChaosProxy, aws: ChaosProxy, stack: Stack, cp_url: str, aws_url: str | None, log: Any) -> None:
    """The fault suite's faults, in turns, until the run ends.

    Between delegates and control plane: connection resets, 503 bursts, 429 with Retry-After,
    added latency and, once, a black hole longer than the lease. Once each: a delegate killed with
    SIGKILL mid-task (and started again, as Kubernetes would), and the control plane killed and
    restarted on the same port. Between delegates and AWS, all along: Throttling and 503 answers.

    The black hole comes second, two seconds in, while most of the work is still queued: a fast
    machine used to finish the run before its turn came (the sixth, after ten seconds). Nothing
    moves while it lasts, so the turns after it still find work in flight.
    """
    script: list[Mode] = ["reset", "blackhole", "error", "ratelimit", "latency", "pass"]
    cycle: list[Mode] = ["reset", "error", "ratelimit", "latency", "pass"]
    turn = aws_turn = 0
    while True:
        mode = script[turn] if turn < len(script) else cycle[turn % len(cycle)]
        if mode == "blackhole":
            log(f"  black hole for {stack.lease_seconds + 2:g}s (the lease is {stack.lease_seconds:g}s)")
            aws.set("pass")  # AWS's faults take turns with the control plane's, not with the black hole
            proxy.set("blackhole")
            await asyncio.sleep(stack.lease_seconds + 2)
        else:
            aws.set(("throttle", "error", "pass")[aws_turn % 3])
            aws_turn += 1
            proxy.set(mode)
            await asyncio.sleep(2.0)
        if turn == 2:
            log("  SIGKILL to delegate load-0, mid-task")
            stack.kill("load-0")
        if turn == 3:
            log("  SIGKILL to the control plane, then a restart on the same port")
            stack.kill("control-plane")
            await asyncio.sleep(1.0)
            await asyncio.to_thread(stack.start_control_plane)
        if turn == 4:
            log("  delegate load-0 started again (same data dir)")
            await asyncio.to_thread(stack.start_agent, "load-0", cp_url, aws_url=aws_url)
        turn += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--faults", action="store_true")
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--capacity", type=int, default=32)
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="delegate-load-") as tmp:
        result = asyncio.run(
            run_load(args.tasks, workdir=Path(tmp), faults=args.faults, agents=args.agents, capacity=args.capacity)
        )
    print(result.line())
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
