"""The control plane under disk, clock and operator faults, each made by the test itself.

A second process on the same data dir, a tmpfs filled to the last byte under the database, a
damaged database file, a control plane frozen with SIGSTOP. What a user relies on is asserted:
every task ends with exactly one result and the right reason, nothing announces a change the disk
refused, readiness says why, and recovery needs no restart; a damaged file is one line and exit 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import structlog

from agent._files import DataDirInUse
from agent.controlplane.app import DATABASE_FILE, ControlPlaneConfig, ControlPlaneService
from agent.controlplane.core import ControlPlane, ControlPlaneSettings
from agent.controlplane.store import SqliteStore
from agent.protocol.models import TaskResult
from agent.protocol.results import ValidationResult
from tests.conftest import API_KEY, FAST, TOKEN, AgentFactory, ControlPlaneFactory, ManualClock, done, free_port
from tests.helpers import wait_for, wait_until
from tests.test_disk_faults import fill, small_disk  # noqa: F401 - the fixture is used by name

pytestmark = pytest.mark.fault


def _control_plane(data_dir: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "agent",
        "control-plane",
        "--listen",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(data_dir),
        "--log-format",
        "json",
        *extra,
    ]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AGENT_", "DELEGATE_", "CONTROL_PLANE_"))}
    env.update({"CONTROL_PLANE_DELEGATE_TOKENS": f"default:{TOKEN}", "CONTROL_PLANE_API_KEY": API_KEY})
    return env


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=_env(), check=False, timeout=60)


# --- one owner per data dir ---------------------------------------------------------------------


async def test_a_second_control_plane_on_the_same_data_dir_is_refused(
    tmp_path: Path, control_plane_factory: ControlPlaneFactory
) -> None:
    first = await control_plane_factory(data_dir=tmp_path / "shared")
    second = ControlPlaneService(ControlPlaneConfig(data_dir=tmp_path / "shared", api_key=API_KEY))
    with pytest.raises(DataDirInUse, match=f"is in use by PID {os.getpid()}"):
        await second.setup()
    await second.shutdown()
    out = await asyncio.to_thread(_run, _control_plane(tmp_path / "shared", free_port()))
    assert out.returncode == 2, out.stderr
    assert f"the data dir {tmp_path / 'shared'} (--data-dir) is in use by PID {os.getpid()}" in out.stderr
    assert "Traceback" not in out.stderr
    assert (await first.core.create_task(type="test.echo", payload={"message": "still mine"})).state == "queued"


def _finished(lease_id: str) -> TaskResult:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    return TaskResult(
        lease_id=lease_id,
        status="SUCCESS",
        output=ValidationResult(status="SUCCESS", tested_at=now),
        started_at=now,
        finished_at=now,
    )


@pytest.mark.parametrize("stale_view", ["queued", "running"])
async def test_a_transition_decided_on_a_stale_view_changes_nothing(tmp_path: Path, stale_view: str) -> None:
    """Every transition is conditional on the state, lease and lease number it was decided on: a view
    of the task that is out of date (a second core on the same file, as two control planes were
    before the lock, or another replica) changes nothing, and says so."""
    from agent.controlplane.store import DelegateRow

    clock = ManualClock()
    settings = ControlPlaneSettings(pickup_timeout_seconds=30, lease_seconds=30)
    live = ControlPlane(SqliteStore(tmp_path / DATABASE_FILE), settings, clock=clock)
    stale = ControlPlane(SqliteStore(tmp_path / DATABASE_FILE), settings, clock=clock)
    task = await live.create_task(type="test.echo", payload={"message": "x"})
    await live.store.save_delegate(
        DelegateRow("dlg_1", "d1", "i1", None, ("d1",), "1", ("test.echo",), 1, "running", 0, None, 0.0, clock())
    )
    seen_queued = await stale.store.get_task(task.id)
    [leased] = await live.queue.take(await live.store.get_delegate("dlg_1"), 1)  # type: ignore[arg-type]
    seen_running = await stale.store.get_task(task.id)
    assert seen_queued is not None and seen_running is not None
    assert await live.submit_result(task.id, _finished(leased.lease_id)) == "accepted"
    with structlog.testing.capture_logs() as logs:
        if stale_view == "queued":  # it would fail the task as never picked up
            await stale.queue.fail_unpicked(seen_queued, [])
        else:  # it would re-queue the task as if its lease had expired
            await stale.queue.requeue(seen_running, reason="lease expired")
    row = await live.store.get_task(task.id)
    assert row is not None and (row.state, row.status, row.failure_reason) == ("done", "SUCCESS", None)
    assert "controlplane.stale_transition" in {e["event"] for e in logs}
    assert (await live.stats()).tasks_requeued == 0 and (await live.stats()).tasks_failed_unpicked == 0
    await live.store.close()
    await stale.store.close()


# --- a full disk --------------------------------------------------------------------------------


async def test_a_full_disk_refuses_changes_cleanly_and_recovers_without_a_restart(
    small_disk: Path,  # noqa: F811 - the fixture
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
) -> None:
    cp = await control_plane_factory(data_dir=small_disk / "cp", settings=FAST)
    delegate = await agent_factory(cp, capacity=2)
    await delegate.registered()
    before = [await cp.core.create_task(type="test.echo", payload={"message": f"{n}"}) for n in range(3)]
    for t in before:
        await done(cp, t.id)
    headers = {"X-API-Key": API_KEY}
    filler = fill(small_disk)
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as http:
            # A creation the disk cannot hold: 503 with Retry-After and the reason, and nothing half-done.
            async with http.post(
                cp.url + "/api/v1/tasks", json={"type": "test.echo", "payload": {"message": "late"}}, headers=headers
            ) as r:
                body = await r.json()
                assert r.status == 503, body
                assert r.headers["Retry-After"] == "5"
                assert body["error"]["code"] == "unavailable" and "full" in body["error"]["message"]
            async with http.get(cp.url + "/readyz") as r:
                ready = await r.json()
                assert r.status == 503 and "disk full" in ready["problems"][0], ready

            filler.unlink()

            async def ready_again() -> bool:
                async with http.get(cp.url + "/readyz") as r:
                    return r.status == 200

            await wait_until(ready_again, "readiness once the disk has space again")
            async with http.post(
                cp.url + "/api/v1/tasks", json={"type": "test.echo", "payload": {"message": "later"}}, headers=headers
            ) as r:
                assert r.status == 201
                later = (await r.json())["taskId"]
        assert (await done(cp, later)).status == "SUCCESS"
    announced = [e["task_id"] for e in logs if e["event"] == "controlplane.task_done"]
    assert announced == [later]  # nothing was announced that the disk refused
    assert await cp.core.store.count_tasks() == {"done": 4}


async def test_a_result_refused_by_a_full_disk_is_retried_and_counted_once(
    small_disk: Path,  # noqa: F811 - the fixture
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
) -> None:
    cp = await control_plane_factory(data_dir=small_disk / "cp", settings=FAST)
    delegate = await agent_factory(cp, capacity=4)
    await delegate.registered()
    gated = [await cp.core.create_task(type="test.gate", payload={}) for _ in range(3)]
    await wait_for(lambda: len(delegate.agent.state.running) == 3, "three tasks running")
    filler = fill(small_disk)
    delegate.gate.open_all()  # results arrive while the disk is full: 503, kept in the delegate's outbox
    await wait_for(lambda: cp.core.store.fault is not None, "the control plane to notice the full disk")
    await wait_for(lambda: delegate.agent.state.running == {}, "the handlers to finish")
    filler.unlink()
    for t in gated:
        finished = await done(cp, t.id, timeout=30)
        assert (finished.status, finished.attempts) == ("SUCCESS", 1)
    assert (await cp.core.store.counters()).get("accepted") == 3


async def test_starting_on_a_full_disk_is_one_line_and_exit_2(small_disk: Path) -> None:  # noqa: F811
    data = small_disk / "cp"
    first = ControlPlaneService(ControlPlaneConfig(data_dir=data, api_key=API_KEY, delegate_tokens=f"default:{TOKEN}"))
    await first.setup()
    await first.core.create_task(type="test.echo", payload={"message": "queued"})  # recover() rewrites its deadline
    await first.shutdown()
    fill(small_disk)
    out = await asyncio.to_thread(_run, _control_plane(data, free_port()))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    [line] = [x for x in out.stderr.splitlines() if x.startswith("delegate-agent")]
    assert f"the data dir {data} (--data-dir)" in line and "full" in line, line


# --- corruption ---------------------------------------------------------------------------------


def test_a_damaged_database_is_one_line_and_exit_2(tmp_path: Path) -> None:
    data = tmp_path / "cp"
    data.mkdir()
    (data / DATABASE_FILE).write_bytes(b"SQLite format 3\0" + os.urandom(8000))
    out = _run(_control_plane(data, free_port()))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert f"the control plane's database {data / DATABASE_FILE} is damaged" in out.stderr
    assert "move controlplane.sqlite3 and its -wal and -shm files aside" in out.stderr


async def test_a_database_lost_from_a_used_data_dir_is_a_warning(
    tmp_path: Path, control_plane_factory: ControlPlaneFactory
) -> None:
    data = tmp_path / "cp"
    cp = await control_plane_factory(data_dir=data)
    await cp.shutdown()
    (data / DATABASE_FILE).unlink()
    with structlog.testing.capture_logs() as logs:
        await control_plane_factory(data_dir=data)
    assert "controlplane.database_missing" in [e["event"] for e in logs if e["log_level"] == "warning"]


# --- a stall and a wall-clock step -------------------------------------------------------------------

STALL_SECONDS = 7.0


@contextlib.asynccontextmanager
async def control_plane_process(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, aiohttp.ClientSession]]:
    """A real control plane as a process of its own (so a signal or a preloaded clock hits only it)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "cp.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *_control_plane(tmp_path / "cp", port, "--heartbeat-seconds", "1", "--poll-wait-seconds", "1", *args),
            env={**_env(), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        async with aiohttp.ClientSession(headers={"X-API-Key": API_KEY}) as http:

            async def up() -> bool:
                try:
                    async with http.get(url + "/readyz") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(up, f"the control plane to start (log: {log_path})", 30)
            yield proc, url, http
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            await proc.wait()


async def _queue(http: aiohttp.ClientSession, url: str, n: int, pickup: float) -> list[str]:
    ids = []
    for i in range(n):
        async with http.post(
            url + "/api/v1/tasks",
            json={"type": "test.echo", "payload": {"message": f"{i}"}, "pickupTimeoutSeconds": pickup},
        ) as r:
            assert r.status == 201, await r.text()
            ids.append((await r.json())["taskId"])
    return ids


async def _all_succeed(http: aiohttp.ClientSession, url: str, ids: list[str]) -> None:
    for task_id in ids:
        async with http.get(f"{url}/api/v1/tasks/{task_id}", params={"wait": "20"}) as r:
            task = await r.json()
        assert (task["state"], task["status"]) == ("done", "SUCCESS"), task


async def test_queued_tasks_get_their_allowance_back_after_a_stall(tmp_path: Path, agent_factory: AgentFactory) -> None:
    """SIGSTOP the control plane longer than the tasks' pickup timeout: once it runs again the time it
    stood still does not count, as after a restart, so nothing fails no_eligible_delegate."""
    async with control_plane_process(tmp_path) as (proc, url, http):
        ids = await _queue(http, url, 20, pickup=5)
        proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(STALL_SECONDS)  # the fault itself: the control plane stands still this long
        proc.send_signal(signal.SIGCONT)
        await agent_factory(url)
        await _all_succeed(http, url, ids)
    assert '"event":"controlplane.stalled"' in (tmp_path / "cp.log").read_text()


def _libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        pytest.fail("libfaketime is missing: run tools/install-test-tools.sh (make test does)")
    return found[0]


async def test_a_wall_clock_step_fails_no_queued_task(tmp_path: Path, agent_factory: AgentFactory) -> None:
    """The control plane's wall clock jumps 45 s ahead (libfaketime, monotonic time untouched, as NTP
    stepping a clock does): tasks with a 20 s pickup allowance are still picked up and succeed."""
    offset = tmp_path / "faketime"
    offset.write_text("+0s\n")
    env = {
        "LD_PRELOAD": _libfaketime(),
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    async with control_plane_process(tmp_path, env=env) as (_proc, url, http):
        ids = await _queue(http, url, 10, pickup=20)
        async with http.get(url + "/v1/info") as r:
            before = r.headers["Date"]
        offset.write_text("+45s\n")
        async with http.get(url + "/v1/info") as r:
            after = r.headers["Date"]
        assert before != after  # the step took: the server's own Date header moved (by ~45 s)
        await agent_factory(url)
        await _all_succeed(http, url, ids)


@pytest.mark.parametrize("leeway", [None, "300"])
async def test_clocks_that_disagree_are_named_on_both_sides(
    tmp_path: Path, agent_factory: AgentFactory, leeway: str | None
) -> None:
    """The control plane's clock runs 120 s behind (libfaketime): delegate tokens look issued in the
    future. The refusal names both clocks and which way they disagree, the delegate's readiness says
    so; a wider --clock-leeway-seconds lets it in meanwhile."""
    offset = tmp_path / "faketime"
    offset.write_text("-120s\n")
    env = {
        "LD_PRELOAD": _libfaketime(),
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    args = ("--clock-leeway-seconds", leeway) if leeway else ()
    async with control_plane_process(tmp_path, *args, env=env) as (_proc, url, http):
        delegate = await agent_factory(url)
        if leeway:
            await delegate.registered()
            return
        await wait_for(lambda: delegate.agent.state.auth_error, "the delegate to be refused")
        async with http.get(delegate.agent.http_url + "/readyz") as r:
            assert r.status == 503
            reason = " ".join((await r.json())["problems"])
    assert (
        "the control plane refuses our token: HTTP 401 unauthenticated: the request token was issued in the future"
        in reason
    )
    assert "the control plane's clock reads" in reason
    assert re.search(r"\b1[12]\ds ahead \(leeway 60s\)", reason), reason  # 120 s, give or take the run
    assert "the delegate's clock runs ahead, or the control plane's behind" in reason
    assert "check NTP on the delegate's node and on the control plane's host" in reason


def test_a_damaged_wal_under_the_database_is_refused(tmp_path: Path) -> None:
    """A WAL with a flipped bit under the control plane's database is refused, as the outbox's is."""
    from agent._files import DataFileDamaged

    db = sqlite3.connect(tmp_path / "live.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t(x BLOB)")
    for _ in range(6):
        db.execute("INSERT INTO t VALUES(?)", (b"x" * 3000,))
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for suffix in ("", "-wal"):
        (crashed / (DATABASE_FILE + suffix)).write_bytes((tmp_path / ("live.sqlite3" + suffix)).read_bytes())
    db.close()
    wal = crashed / (DATABASE_FILE + "-wal")
    data = bytearray(wal.read_bytes())
    page = int.from_bytes(data[8:12], "big")
    data[32 + (24 + page) + 24 + 7] ^= 0x10
    wal.write_bytes(bytes(data))
    with pytest.raises(DataFileDamaged, match=r"control plane's database .* is damaged"):
        SqliteStore(crashed / DATABASE_FILE)


# --- review findings --------------------------------------------------------------------------------


async def test_damaged_rows_are_named_and_left_out_never_a_crash(
    tmp_path: Path, control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """A bit flipped inside a row gets past quick_check (it checks structure, not values): the control
    plane still starts, lists what reads, names each damaged row once, and answers for one clearly."""
    data = tmp_path / "cp"
    cp = await control_plane_factory(data_dir=data)
    for name in ("good", "bad"):
        await _apply(http, cp.url, name)
    tasks = [await cp.core.create_task(type="test.echo", payload={"message": f"{n}"}) for n in range(4)]
    await cp.shutdown()
    with sqlite3.connect(data / DATABASE_FILE) as db:
        db.execute("UPDATE connectors SET body='{\"connector\": [' WHERE identifier='bad'")
        db.execute("UPDATE tasks SET payload='{not json' WHERE id=?", (tasks[0].id,))
        db.execute("UPDATE tasks SET created_at='abc' WHERE id=?", (tasks[1].id,))
        db.execute("UPDATE tasks SET state='bogus' WHERE id=?", (tasks[2].id,))
    with structlog.testing.capture_logs() as logs:
        cp = await control_plane_factory(data_dir=data)
        headers = {"X-API-Key": API_KEY}
        async with http.get(cp.url + "/api/v1/connectors", headers=headers) as r:
            assert r.status == 200
            assert [c["identifier"] for c in (await r.json())["connectors"]] == ["good"]
        async with http.get(cp.url + "/api/v1/connectors/bad", headers=headers) as r:
            body = await r.json()
            assert r.status == 500
            assert body["error"]["message"].startswith("the stored connector 'bad' is damaged (")
        async with http.get(cp.url + "/api/v1/tasks", headers=headers) as r:
            assert r.status == 200
            assert [t["taskId"] for t in (await r.json())["tasks"]] == [tasks[3].id]
    damaged = sorted(e["error"].split(" is damaged")[0] for e in logs if e["event"] == "controlplane.row_damaged")
    assert damaged == sorted([f"the stored task {tasks[i].id!r}" for i in range(3)] + ["the stored connector 'bad'"]), (
        damaged
    )
    assert not [e for e in logs if e.get("exc_info") or e["log_level"] == "critical"]


async def _apply(http: aiohttp.ClientSession, url: str, identifier: str) -> None:
    from tests.conftest import manual_connector

    async with http.post(
        url + "/api/v1/connectors", json=manual_connector(identifier), headers={"X-API-Key": API_KEY}
    ) as r:
        assert r.status == 201, await r.text()


async def test_a_full_disk_costs_queued_tasks_nothing_and_the_log_stays_short(
    small_disk: Path,  # noqa: F811 - the fixture
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
) -> None:
    """While the disk refuses writes nobody can lease, heartbeat or report: that is the control plane's
    fault, so a connected delegate is not declared lost and queued tasks get their allowance back."""
    cp = await control_plane_factory(data_dir=small_disk / "cp", settings=FAST)  # 3 s of silence = lost
    delegate = await agent_factory(cp, capacity=1)
    await delegate.registered()
    busy = await cp.core.create_task(type="test.gate", payload={})
    await wait_for(lambda: delegate.agent.state.running, "the gate task to start")
    waiting = [
        await cp.core.create_task(type="test.echo", payload={"message": f"{n}"}, pickup_timeout=4) for n in range(3)
    ]
    with structlog.testing.capture_logs() as logs:
        filler = fill(small_disk)
        await wait_for(lambda: cp.core.store.fault is not None, "the control plane to hit the full disk")
        # The fault lasts until, on the control plane's own clock, the waiting tasks' pickup allowance
        # and the delegate's silence limit have both run out.
        past = max(t.pickup_deadline for t in waiting) + FAST.disconnect_after
        await wait_for(lambda: cp.core.now() > past, "the pickup allowance and the silence limit to pass", 30)
        filler.unlink()
        delegate.gate.open_all()
        for t in [busy, *waiting]:
            finished = await done(cp, t.id, timeout=30)
            assert (finished.status, finished.failure_reason) == ("SUCCESS", None)
    events = [e["event"] for e in logs]
    assert "controlplane.delegate_disconnected" not in events
    assert events.count("controlplane.reindexed") <= 2, events.count("controlplane.reindexed")
    assert events.count("controlplane.sweep_not_recorded") <= 1
    assert "controlplane.store_recovered" in events


async def test_the_write_ahead_log_cannot_fill_a_small_volume_by_itself(tmp_path: Path) -> None:
    """SQLite's default lets the log grow to 4 MiB before folding it back: on a 2 MiB volume the
    control plane filled its disk with its own log. Now the log is folded back from 768 KiB by the
    checkpoint thread (the store's own COMMIT from 1.25 MiB should the thread fall behind), never past
    1.5 MiB however starved the thread (CI's load once took a brake at 1.5 MiB to 1.6 MiB), and
    brought back under 1 MiB once the burst is over."""
    from tests.test_disk_faults import tmpfs

    with tmpfs(tmp_path / "vol", "2m") as vol:
        core = ControlPlane(SqliteStore(vol / DATABASE_FILE), ControlPlaneSettings(keep_done_tasks_seconds=0))
        wal = vol / (DATABASE_FILE + "-wal")
        biggest = 0
        for n in range(1500):  # tasks come and go: the data stays small, the log is what grows
            t = await core.create_task(type="test.echo", payload={"message": "x" * 200})
            await core.cancel_task(t.id)
            if n % 100 == 0:
                await core.sweep()
            biggest = max(biggest, wal.stat().st_size)
        assert biggest <= 1536 * 1024 + 64 * 1024, biggest
        await wait_for(lambda: wal.stat().st_size <= 1024 * 1024, "the log back under 1 MiB")
        await core.store.close()
