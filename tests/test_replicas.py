"""Several control-plane replicas on one Postgres: the work is shared, nothing is lost, nobody waits.

Each replica is a real ``delegate-agent control-plane --database`` process; the delegates are real
agents (in this process, with the test handlers) spread over the replicas, and Postgres is a real
server (tests/pgserver.py). The faults are real too: SIGKILL, a graceful restart, Postgres stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.protocol.signing import TaskSigningKey
from tests.conftest import API_KEY, TOKEN, AgentFactory, free_port
from tests.helpers import wait_until
from tests.pgserver import PostgresServer
from tests.test_controlplane_faults import _env

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

HEADERS = {"X-API-Key": API_KEY}


class Replica:
    """One control-plane process on the shared database; stopped, killed and started again on its port."""

    def __init__(self, name: str, database: str, creds: Path, logs: Path, *extra: str) -> None:
        self.name, self.database, self.creds, self.extra = name, database, creds, extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logs / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "agent", "control-plane",
            "--listen", f"127.0.0.1:{self.port}",
            "--database", self.database,
            "--delegate-token-file", str(self.creds / "tokens"),
            "--api-key-file", str(self.creds / "api-keys"),
            "--task-signing-key-file", str(self.creds / "signing-key"),
            "--heartbeat-seconds", "1", "--poll-wait-seconds", "2", "--lease-seconds", "3",
            "--log-format", "json", "--log-level", "warning",
            *self.extra,
        ]  # fmt: skip

    async def start(self, http: aiohttp.ClientSession) -> None:
        self.starts += 1
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv(), env=_env(), stdout=log, stderr=subprocess.STDOUT)
        await wait_until(lambda: self.ready(http), f"replica {self.name} to be ready (log: {self.log})", 30)

    async def ready(self, http: aiohttp.ClientSession) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"replica {self.name} exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        try:
            async with http.get(self.url + "/readyz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    async def stop(self) -> int:
        """SIGTERM, as a rolling update does; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, 30)

    def assert_no_traceback(self) -> None:
        assert "Traceback" not in self.log.read_text(), self.log.read_text()[-5000:]


def credentials(tmp_path: Path) -> Path:
    """What every replica must share: delegate tokens, API keys and the task signing key."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "tokens").write_text(f"default:{TOKEN}\n")
    (creds / "api-keys").write_text(API_KEY + "\n")
    (creds / "signing-key").write_text(TaskSigningKey.generate().seed_b64 + "\n")
    for f in creds.iterdir():
        f.chmod(0o600)
    return creds


@contextlib.asynccontextmanager
async def replicas(tmp_path: Path, database: str, n: int, *extra: str) -> AsyncIterator[list[Replica]]:
    creds = credentials(tmp_path)
    started = [Replica(chr(ord("a") + i), database, creds, tmp_path, *extra) for i in range(n)]
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        try:
            await asyncio.gather(*(r.start(http) for r in started))
            yield started
        finally:
            for r in started:
                if r.proc is not None and r.proc.poll() is None:
                    r.proc.kill()
                    r.proc.wait(10)


async def create_tasks(http: aiohttp.ClientSession, urls: list[str], n: int, **fields: Any) -> list[str]:
    """``n`` echo tasks, created round-robin on the given replicas, 32 requests at a time."""
    ids: list[str] = []
    gate = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        body = {"type": "test.echo", "payload": {"message": str(i)}, "pickupTimeoutSeconds": 300, **fields}
        async with gate, http.post(urls[i % len(urls)] + "/api/v1/tasks", json=body) as r:
            assert r.status == 201, await r.text()
            ids.append((await r.json())["taskId"])

    await asyncio.gather(*(one(i) for i in range(n)))
    return ids


async def stats(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/api/v1/stats") as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


@pytest.mark.timeout(360)  # several processes on a busy 2-core machine: about 40 s alone
async def test_three_replicas_share_the_work_and_lose_nothing_through_a_kill_and_a_restart(
    tmp_path: Path, pg_url: str, agent_factory: AgentFactory
) -> None:
    """Three replicas, delegates spread over them, 2,000 tasks; one replica SIGKILLed mid-run (and
    started again), another restarted gracefully: every task ends SUCCESS with exactly one accepted
    result, and none is lost."""
    total = 2000
    # Heartbeats and leases more forgiving than the other tests': this test's own process runs six
    # delegates and thousands of requests, and on a busy machine a heartbeat can be seconds late.
    tolerant = ("--heartbeat-seconds", "2", "--lease-seconds", "10")
    async with (
        replicas(tmp_path, pg_url, 3, *tolerant) as (a, b, c),
        aiohttp.ClientSession(headers=HEADERS) as http,
    ):
        delegates = [
            await agent_factory(r.url, name=f"d-{r.name}{i}", capacity=16, drain_timeout=10)
            for r in (a, b, c)
            for i in range(2)
        ]
        for d in delegates:
            await d.registered()
        # Delegates here are pinned to one replica (no Service in front), so a task whose delegate's
        # replica is down loses a lease or two: enough attempts that none ends delegate_lost.
        ids = await create_tasks(http, [a.url, b.url, c.url], total, maxAttempts=10)
        assert len(set(ids)) == total

        async def finished() -> int:
            s = await stats(http, a.url)
            return int(s["tasks"].get("done", 0))

        await wait_until(lambda: _at_least(finished, total // 4), "a quarter of the tasks to finish", 120)
        b.kill()  # mid-run: its delegates lose their long polls and their results cannot land there
        await wait_until(lambda: _at_least(finished, total // 2), "half of the tasks to finish", 120)
        assert await c.stop() == 0  # a rolling update: SIGTERM, then the new process on the same port
        await c.start(http)
        await b.start(http)
        await wait_until(lambda: _at_least(finished, total), "every task to finish", 240)

        s = await stats(http, b.url)
        assert s["tasks"] == {"done": total}, s
        assert s["doneByStatus"] == {"SUCCESS": total}, s
        assert s["failuresByReason"] == {}, s
        assert s["resultsAccepted"] == total, s  # exactly one accepted result per task
        runs = sum(len(d.handlers["test.echo"].seen) for d in delegates)
        assert runs >= total  # a task whose result was stranded on the killed replica may run twice
        served = {d.agent.settings.name for d in delegates if d.handlers["test.echo"].seen}
        assert len(served) == len(delegates), served  # every replica's delegates took work
        for r in (a, b, c):
            r.assert_no_traceback()


async def _at_least(count: Any, n: int) -> bool:
    return bool(await count() >= n)


async def test_a_task_created_on_one_replica_wakes_a_long_poll_waiting_on_another(
    tmp_path: Path, pg_url: str, agent_factory: AgentFactory
) -> None:
    """The delegate long-polls replica B; tasks are created on replica A. B's backstop poll is set to a
    minute and the long poll is held 30 s, so only the NOTIFY from A's commit can wake B in time."""
    slow = ("--database-poll-seconds", "60", "--poll-wait-seconds", "30")
    async with replicas(tmp_path, pg_url, 2, *slow) as (a, b), aiohttp.ClientSession(headers=HEADERS) as http:
        d = await agent_factory(b.url, name="on-b", capacity=1)
        await d.registered()
        loop = asyncio.get_running_loop()
        waits = []
        for i in range(10):
            [task_id] = await create_tasks(http, [a.url], 1)
            created = loop.time()
            async with http.get(f"{a.url}/api/v1/tasks/{task_id}", params={"wait": "20"}) as r:
                task = await r.json()
            assert (task["state"], task["status"], task["delegateName"]) == ("done", "SUCCESS", "on-b"), (i, task)
            waits.append(loop.time() - created)
        # Far below the 30 s long poll and the 60 s backstop: woken by the notification every time.
        assert max(waits) < 10, waits


async def test_replicas_reconnect_by_themselves_when_postgres_restarts(
    tmp_path: Path, pg_url: str, postgres_server: PostgresServer, agent_factory: AgentFactory
) -> None:
    """Postgres goes away mid-run: the replicas say they are not ready (503) instead of crashing, and
    once it is back they reconnect, wakeups included, without a restart; nothing is lost."""
    async with replicas(tmp_path, pg_url, 2) as (a, b), aiohttp.ClientSession(headers=HEADERS) as http:
        for r in (a, b):
            await (await agent_factory(r.url, name=f"d-{r.name}", capacity=8)).registered()
        before = await create_tasks(http, [a.url, b.url], 200)
        await asyncio.to_thread(postgres_server.stop)
        try:
            for r in (a, b):
                await wait_until(lambda r=r: _not_ready(http, r), f"replica {r.name} to report the outage", 30)
            assert await _store_available(http, a) == 0  # what an alert can watch, besides readiness
        finally:
            await asyncio.to_thread(postgres_server.start)
        for r in (a, b):
            await wait_until(lambda r=r: r.ready(http), f"replica {r.name} to be ready again", 60)
        assert await _store_available(http, a) == 1
        after = await create_tasks(http, [b.url], 200)
        for task_id in before + after:
            async with http.get(f"{a.url}/api/v1/tasks/{task_id}", params={"wait": "30"}) as r:
                task = await r.json()
            assert (task["state"], task["status"]) == ("done", "SUCCESS"), task
        s = await stats(http, a.url)
        assert s["resultsAccepted"] == 400, s
        for r in (a, b):
            assert r.proc is not None and r.proc.poll() is None, f"replica {r.name} exited"
            r.assert_no_traceback()


async def _store_available(http: aiohttp.ClientSession, r: Replica) -> float:
    async with http.get(r.url + "/metrics") as resp:
        text = await resp.text()
    [line] = [x for x in text.splitlines() if x.startswith("controlplane_store_available ")]
    return float(line.split()[1])


def test_a_database_that_cannot_be_used_is_one_line_and_exit_2(tmp_path: Path, postgres_server: PostgresServer) -> None:
    """An unknown database (or user, or a wrong password: the same path) is one line, exit 2, no
    traceback: the pool connects on first use, so this was a traceback from the migration step."""
    creds = credentials(tmp_path)
    missing = postgres_server.url("no_such_database")
    argv = Replica("x", missing, creds, tmp_path).argv()
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("delegate-agent: cannot use the database (--database): cannot connect to "), last
    assert 'database "no_such_database" does not exist' in last
    assert "Traceback" not in done.stderr


async def _not_ready(http: aiohttp.ClientSession, r: Replica) -> bool:
    async with http.get(r.url + "/readyz") as resp:
        if resp.status != 503:
            return False
        body = await resp.json()
        # Unauthenticated: it says the database is unavailable, not where it is or who logs in.
        assert body["problems"] == ["database unavailable: the control plane's log says why"], body
        return True
