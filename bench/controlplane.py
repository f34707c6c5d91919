"""``make bench-cp``: the control plane alone, on SQLite and on Postgres with one and three replicas.

    python -m bench.controlplane                  # 3,000 tasks per setup, 12 delegates
    python -m bench.controlplane --tasks 500      # quicker

The delegates are no-op: real protocol clients (signed requests, long polls, results) that answer
every task at once, so what is measured is the control plane and its store. Everything runs on
127.0.0.1: the replicas as processes of their own, Postgres as a real server started here (as the
tests start it). For each setup it reports tasks per second from the first creation to the last
accepted result with the queue saturated (and the wait in the queue, p50/p99), then the pickup
time with idle delegates, one task at a time (created on the server to received by a delegate,
p50/p99; with three replicas the task is created on one and the delegates wait on the others, so
the wakeup crosses replicas through LISTEN/NOTIFY), then how many idle long polls one replica
holds and what they cost it in memory. Ratios are
against SQLite measured in the same run, since this machine's speed varies from run to run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from agent.protocol.auth import RequestSigner, TokenSource
from agent.protocol.client import ControlPlaneClient
from agent.protocol.models import AcquireRequest, RegisterRequest, TaskResult
from agent.protocol.results import ValidationResult
from agent.protocol.signing import TaskSigningKey
from bench.load import _clean_env, free_port
from tests.pgserver import PostgresServer, pg_bindir

TOKEN = "bench-delegate-token-" + secrets.token_hex(8)
API_KEY = "bench-api-key-" + secrets.token_hex(8)
TASK_TYPE = "bench.noop"


@dataclass
class Throughput:
    setup: str
    replicas: int
    tasks: int
    seconds: float
    tasks_per_second: float
    #: Created to received while the queue is saturated: mostly time spent waiting in the queue.
    wait_p50_ms: float
    wait_p99_ms: float
    #: Created to received with delegates idle and waiting, one task at a time: the wakeup path.
    #: With several replicas the task is created on one and the delegates wait on the others.
    pickup_p50_ms: float = 0.0
    pickup_p99_ms: float = 0.0


@dataclass
class LongPolls:
    setup: str
    long_polls: int
    rss_before_mb: float
    rss_after_mb: float
    kb_per_long_poll: float


class Replica:
    def __init__(self, root: Path, name: str, database: str | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        creds = root / "creds"
        if not creds.exists():
            creds.mkdir()
            (creds / "tokens").write_text(f"bench:{TOKEN}\n")
            (creds / "api-keys").write_text(API_KEY + "\n")
            (creds / "signing-key").write_text(TaskSigningKey.generate().seed_b64 + "\n")
            for f in creds.iterdir():
                f.chmod(0o600)
        store = ["--database", database] if database else ["--data-dir", str(root / f"data-{name}")]
        self.argv = [
            sys.executable, "-m", "agent", "control-plane", "--listen", f"127.0.0.1:{self.port}", *store,
            "--delegate-token-file", str(creds / "tokens"), "--api-key-file", str(creds / "api-keys"),
            "--task-signing-key-file", str(creds / "signing-key"), "--max-connections", "8192",
            "--pickup-timeout-seconds", "600", "--log-level", "warning",
        ]  # fmt: skip
        self.log = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, env=_clean_env(), stdout=log, stderr=subprocess.STDOUT)

    async def ready(self, http: aiohttp.ClientSession, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(self.url + "/readyz") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the control plane did not start: {self.log.read_text()[-3000:]}")

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@contextlib.asynccontextmanager
async def running(root: Path, n: int, database: str | None) -> AsyncIterator[list[Replica]]:
    replicas = [Replica(root, f"r{i}", database) for i in range(n)]
    try:
        for r in replicas:
            r.start()
        async with aiohttp.ClientSession() as http:
            for r in replicas:
                await r.ready(http)
        yield replicas
    finally:
        for r in replicas:
            r.stop()


def client(http: aiohttp.ClientSession, url: str) -> ControlPlaneClient:
    return ControlPlaneClient(http, url, RequestSigner(TokenSource(value=TOKEN), issuer="bench"), request_timeout=30)


async def register(c: ControlPlaneClient, name: str, capacity: int) -> str:
    req = RegisterRequest(
        name=name,
        instance_id=f"{name}-{secrets.token_hex(4)}",
        tags=[],
        version="bench",
        task_types=[TASK_TYPE],
        capacity=capacity,
    )
    return (await c.register(req)).delegate_id


async def throughput(setup: str, replicas: list[Replica], tasks: int, delegates: int) -> Throughput:
    """``tasks`` no-op tasks through the replicas, created as fast as the API takes them."""
    pickups: list[float] = []
    answered = 0
    finished = asyncio.Event()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:
        clients = [client(http, replicas[i % len(replicas)].url) for i in range(delegates)]
        ids = [await register(c, f"noop-{i}", 16) for i, c in enumerate(clients)]

        async def delegate(c: ControlPlaneClient, delegate_id: str) -> None:
            nonlocal answered
            while not finished.is_set():
                got = await c.acquire(delegate_id, AcquireRequest(max_tasks=16, wait_seconds=2))
                now = datetime.now(UTC)
                for t in got.tasks:
                    pickups.append((now - t.created_at).total_seconds())
                results = [
                    TaskResult(
                        lease_id=t.lease_id,
                        status="SUCCESS",
                        output=ValidationResult(status="SUCCESS", tested_at=now),
                        started_at=now,
                        finished_at=now,
                    )
                    for t in got.tasks
                ]
                await asyncio.gather(*(c.submit_result(t.task_id, r) for t, r in zip(got.tasks, results, strict=True)))
                answered += len(got.tasks)
                if answered >= tasks:
                    finished.set()

        workers = [asyncio.create_task(delegate(c, i)) for c, i in zip(clients, ids, strict=True)]
        gate = asyncio.Semaphore(32)
        headers = {"X-API-Key": API_KEY}

        async def create(i: int) -> None:
            body = {"type": TASK_TYPE, "payload": {"n": i}}
            async with (
                gate,
                http.post(replicas[i % len(replicas)].url + "/api/v1/tasks", json=body, headers=headers) as r,
            ):
                assert r.status == 201, await r.text()

        started = time.perf_counter()
        await asyncio.gather(*(create(i) for i in range(tasks)))
        await asyncio.wait_for(finished.wait(), 600)
        seconds = time.perf_counter() - started
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    pickups.sort()
    return Throughput(
        setup=setup,
        replicas=len(replicas),
        tasks=tasks,
        seconds=round(seconds, 2),
        tasks_per_second=round(tasks / seconds, 1),
        wait_p50_ms=_ms(pickups, 0.5),
        wait_p99_ms=_ms(pickups, 0.99),
    )


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


async def pickup(replicas: list[Replica], n: int, delegates: int) -> tuple[float, float]:
    """``n`` tasks one after the other, each created on the first replica while idle delegates
    long-poll the others (all of them when there is one): p50 and p99 of created-to-received."""
    waiting_on = replicas[1:] or replicas
    got: asyncio.Queue[float] = asyncio.Queue()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        clients = [client(http, waiting_on[i % len(waiting_on)].url) for i in range(delegates)]
        ids = [await register(c, f"idle-{i}", 1) for i, c in enumerate(clients)]

        async def delegate(c: ControlPlaneClient, delegate_id: str) -> None:
            while True:
                answer = await c.acquire(delegate_id, AcquireRequest(max_tasks=1, wait_seconds=20))
                now = datetime.now(UTC)
                for t in answer.tasks:
                    got.put_nowait((now - t.created_at).total_seconds())
                    done = TaskResult(
                        lease_id=t.lease_id,
                        status="SUCCESS",
                        output=ValidationResult(status="SUCCESS", tested_at=now),
                        started_at=now,
                        finished_at=now,
                    )
                    await c.submit_result(t.task_id, done)

        workers = [asyncio.create_task(delegate(c, i)) for c, i in zip(clients, ids, strict=True)]
        await asyncio.sleep(1)  # the setup itself: every delegate is in its long poll
        seen = []
        for i in range(n):
            body = {"type": TASK_TYPE, "payload": {"n": i}}
            async with http.post(replicas[0].url + "/api/v1/tasks", json=body, headers={"X-API-Key": API_KEY}) as r:
                assert r.status == 201, await r.text()
            seen.append(await asyncio.wait_for(got.get(), 30))
            await asyncio.sleep(0.01)  # the delegate is back in its long poll before the next task
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return _ms(seen, 0.5), _ms(seen, 0.99)


async def long_polls(setup: str, replica: Replica, n: int) -> LongPolls:
    """``n`` delegates long-polling one replica at once, idle: what holding them costs it."""
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as http:
        c = client(http, replica.url)
        ids = await asyncio.gather(*(register(c, f"idle-{i}", 1) for i in range(n)))
        before = replica.rss_mb()
        polls = [asyncio.create_task(c.acquire(i, AcquireRequest(max_tasks=1, wait_seconds=20))) for i in ids]
        await asyncio.sleep(5)  # the measurement itself: every poll is open and held
        after = replica.rss_mb()
        open_polls = sum(1 for p in polls if not p.done())
        for p in polls:
            p.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
    return LongPolls(setup, open_polls, round(before, 1), round(after, 1), round(1024 * (after - before) / n, 1))


async def main(args: argparse.Namespace) -> dict[str, object]:
    bindir = pg_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL is not installed: run tools/install-test-tools.sh")
    server = PostgresServer(bindir)
    server.start()
    rows: list[Throughput] = []
    polls: list[LongPolls] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-cp-") as tmp:
            root = Path(tmp)
            setups: list[tuple[str, int, str | None]] = [
                ("sqlite", 1, None),
                ("postgres", 1, await server.create_database()),
                ("postgres", 3, await server.create_database()),
            ]
            for setup, n, database in setups:
                (root / f"{setup}-{n}").mkdir()
                async with running(root / f"{setup}-{n}", n, database) as replicas:
                    row = await throughput(setup, replicas, args.tasks, args.delegates)
                    row.pickup_p50_ms, row.pickup_p99_ms = await pickup(replicas, args.pickups, args.delegates)
                    rows.append(row)
                    print(json.dumps(asdict(rows[-1])), file=sys.stderr, flush=True)
                    if n == 1:
                        polls.append(await long_polls(setup, replicas[0], args.long_polls))
                        print(json.dumps(asdict(polls[-1])), file=sys.stderr, flush=True)
    finally:
        server.destroy()
    base = rows[0].tasks_per_second
    return {
        "throughput": [{**asdict(r), "vs_sqlite": round(r.tasks_per_second / base, 2)} for r in rows],
        "long_polls": [asdict(p) for p in polls],
        "cpus": os.cpu_count(),
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3000, help="tasks per setup (default: %(default)s)")
    parser.add_argument("--delegates", type=int, default=12, help="no-op delegates (default: %(default)s)")
    parser.add_argument("--pickups", type=int, default=200, help="one-at-a-time pickups (default: %(default)s)")
    parser.add_argument("--long-polls", type=int, default=1000, help="idle long polls held (default: %(default)s)")
    report = asyncio.run(main(parser.parse_args()))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    cli()
