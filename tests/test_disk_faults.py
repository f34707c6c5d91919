"""The delegate's data dir under faults: a full disk, damaged files, a second owner.

The faults are real: a tmpfs of a few hundred KiB mounted by the test and filled to the last byte,
an outbox file overwritten with garbage, a write-ahead log with one flipped bit, a second process
started on the same dir. What a user relies on is asserted: every result delivered exactly once,
readiness says why no work is taken, the delegate recovers without a restart, and damage is one
line with exit 2, never a traceback or a silent loss.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
import structlog

from agent._files import DataDirInUse, DataFileDamaged
from agent._sqlite import wal_damage
from agent.controlplane.app import ControlPlaneService
from agent.protocol.models import TaskResult
from agent.protocol.results import ValidationResult
from agent.runtime.outbox import OUTBOX_FILE, Entry, SqliteOutbox, open_outbox
from tests.conftest import FAST, AgentFactory, ControlPlaneFactory, done
from tests.helpers import wait_for, wait_until

pytestmark = pytest.mark.fault


def _entry(lease: str) -> Entry:
    started = datetime(2026, 12, 3, tzinfo=UTC)
    output = ValidationResult(status="SUCCESS", tested_at=started, connector_identifier=lease)
    result = TaskResult(
        lease_id=lease, status="SUCCESS", output=output, started_at=started, finished_at=started + timedelta(seconds=1)
    )
    return Entry(task_id=f"tsk_{lease}", result=result)


@contextlib.contextmanager
def tmpfs(at: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted by the test itself (root only: mounting needs CAP_SYS_ADMIN)."""
    at.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(at)],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs of the test's own."""
    with tmpfs(tmp_path / "small", "512k") as mount:
        yield mount


def fill(directory: Path) -> Path:
    """Write a file until the file system has not one byte left; remove it to free the space."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        for chunk in (65536, 4096, 1):
            while True:
                try:
                    f.write(b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    return filler


def test_a_full_disk_keeps_results_in_memory_and_recovers_without_a_restart(small_disk: Path) -> None:
    now = [0.0]
    box = SqliteOutbox(small_disk / OUTBOX_FILE, clock=lambda: now[0])
    box.put(_entry("written"))
    filler = fill(small_disk)

    box.put(_entry("spilled"))  # the disk refuses it: kept in memory, never raised
    assert box.fault is not None and "full" in box.fault
    assert {e.key for e in box.pending()} == {"written", "spilled"}
    box.remove("written")  # acknowledged: the DELETE may fail on a full disk, and is remembered, not raised
    assert len(box) == 1
    assert [e.key for e in box.pending()] == ["spilled"]

    filler.unlink()
    box.pending()  # within the retry interval: the disk is not tried again yet
    assert box.fault is not None
    now[0] += 1.0
    assert [e.key for e in box.pending()] == ["spilled"]
    assert box.fault is None  # the spilled result is on disk now and the removal is done
    box.close()
    again = SqliteOutbox(small_disk / OUTBOX_FILE)
    assert [e.key for e in again.pending()] == ["spilled"]
    again.close()


async def test_a_delegate_on_a_full_disk_delivers_takes_no_new_work_and_recovers(
    small_disk: Path, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp: ControlPlaneService = await control_plane_factory(settings=FAST)
    delegate = await agent_factory(cp, data_dir=small_disk / "data", capacity=2)
    await delegate.registered()
    ready_url = f"{delegate.agent.http_url}/readyz"
    filler = fill(small_disk)

    first = await cp.core.create_task(type="test.echo", payload={"message": "one"})
    finished = await done(cp, first.id)
    assert finished.status == "SUCCESS"  # kept in memory and delivered all the same

    async with aiohttp.ClientSession() as http:

        async def readiness() -> tuple[int, str]:
            async with http.get(ready_url) as r:
                return r.status, await r.text()

        status, body = await readiness()
        assert status == 503 and "taking no new work" in body and "full" in body, body
        metrics = await (await http.get(f"{delegate.agent.http_url}/metrics")).text()
        assert "delegate_outbox_fault 1.0" in metrics

        # A task queued now stays queued: the delegate asks for nothing (or gives back what a
        # long poll already in flight brought) until the disk takes writes again.
        second = await cp.core.create_task(type="test.echo", payload={"message": "two"})
        seen = delegate.agent.state.last_heartbeat
        await wait_for(lambda: delegate.agent.state.last_heartbeat != seen, "a heartbeat")
        seen = delegate.agent.state.last_heartbeat
        await wait_for(lambda: delegate.agent.state.last_heartbeat != seen, "another heartbeat")
        assert (await cp.core.get_task(second.id)).state == "queued"

        filler.unlink()

        async def ready() -> bool:
            return (await readiness())[0] == 200

        await wait_until(ready, "readiness once the disk has space again")
        assert (await done(cp, second.id)).status == "SUCCESS"
    assert (await cp.core.get_task(first.id)).attempts == 1  # exactly one result, on the first attempt


def test_an_undecodable_row_is_quarantined_not_a_crash_loop(tmp_path: Path) -> None:
    box = SqliteOutbox(tmp_path / OUTBOX_FILE)
    box.put(_entry("good"))
    box.close()
    with sqlite3.connect(tmp_path / OUTBOX_FILE) as db:
        db.execute(
            "INSERT INTO outbox(lease_id, task_id, body, created_at) VALUES('flipped', 'tsk_x', ?, 0)",
            (b'{"leaseId": "flipped", "status": "SUC\xc3ESS"',),
        )
    counted: list[int] = []
    box = SqliteOutbox(tmp_path / OUTBOX_FILE, on_quarantine=lambda: counted.append(1))
    assert len(box) == 2
    with structlog.testing.capture_logs() as logs:
        assert [e.key for e in box.pending()] == ["good"]
    assert [e.key for e in box.pending()] == ["good"]  # read again: not quarantined twice, nothing raised
    assert counted == [1] and len(box) == 1
    assert [entry["event"] for entry in logs] == ["agent.outbox_row_quarantined"]
    dead = box._db.execute("SELECT lease_id, task_id FROM dead_letter").fetchall()
    assert dead == [("flipped", "tsk_x")]
    box.close()


def _run_delegate(data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AGENT_", "DELEGATE_", "MANAGER_"))}
    env.update(
        {
            "MANAGER_HOST_AND_PORT": "http://127.0.0.1:9",
            "DELEGATE_TOKEN": "t" * 32,
            "AGENT_DATA_DIR": str(data_dir),
            "AGENT_HTTP_LISTEN": "127.0.0.1:0",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "agent", "run"], capture_output=True, text=True, env=env, check=False, timeout=60
    )


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_outbox_is_one_line_and_exit_2(tmp_path: Path, damage: str) -> None:
    data = tmp_path / "data"
    box = open_outbox(data)
    for n in range(50):
        box.put(_entry(f"lease-{n}"))
    box.close()
    path = data / OUTBOX_FILE
    raw = path.read_bytes()
    path.write_bytes(b"this is not a database" * 300 if damage == "garbage" else raw[: len(raw) // 2 + 100])
    out = _run_delegate(data)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert f"the outbox {path} is damaged" in out.stderr
    assert "move outbox.sqlite3 and its -wal and -shm files aside" in out.stderr


def _wal_copy(tmp_path: Path, transactions: int) -> Path:
    """An outbox whose WAL still holds ``transactions`` commits, as a crash leaves it (copied while open)."""
    live = tmp_path / "live"
    live.mkdir()
    db = sqlite3.connect(live / OUTBOX_FILE, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE outbox(lease_id TEXT PRIMARY KEY, task_id TEXT, body BLOB, created_at REAL)")
    for n in range(transactions):
        db.execute("INSERT INTO outbox VALUES(?, ?, ?, 0)", (f"l{n}", f"t{n}", b"x" * 3000))
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in (OUTBOX_FILE, OUTBOX_FILE + "-wal"):
        shutil.copy(live / name, crashed / name)
    db.close()
    return crashed / (OUTBOX_FILE + "-wal")


def test_a_bit_flip_in_the_wal_is_refused_not_silently_dropped(tmp_path: Path) -> None:
    wal = _wal_copy(tmp_path, transactions=11)
    assert wal_damage(wal) is None
    data = bytearray(wal.read_bytes())
    page_size = int.from_bytes(data[8:12], "big")
    data[32 + 2 * (24 + page_size) + 24 + 100] ^= 0x01  # one bit in the third frame's page
    wal.write_bytes(bytes(data))
    damage = wal_damage(wal)
    assert damage is not None and "fails its checksum" in damage and "committed transaction(s)" in damage
    with pytest.raises(DataFileDamaged, match="is damaged"):
        SqliteOutbox(wal.with_name(OUTBOX_FILE))


def test_a_torn_last_frame_is_normal_after_a_crash(tmp_path: Path) -> None:
    wal = _wal_copy(tmp_path, transactions=5)
    wal.write_bytes(wal.read_bytes()[:-1000])
    assert wal_damage(wal) is None
    SqliteOutbox(wal.with_name(OUTBOX_FILE)).close()


def test_a_second_delegate_on_the_same_data_dir_exits_2_naming_the_first(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = open_outbox(data)
    try:
        with pytest.raises(DataDirInUse, match=f"is in use by PID {os.getpid()}"):
            open_outbox(data)
        out = _run_delegate(data)
        assert out.returncode == 2, out.stderr
        assert f"the data dir {data} (AGENT_DATA_DIR) is in use by PID {os.getpid()}" in out.stderr
        assert "Traceback" not in out.stderr
        (data / ".lock").unlink()  # a lock file taken for stale and removed lets nobody in: the dir is locked
        with pytest.raises(DataDirInUse, match="is in use by another process"):
            open_outbox(data)
    finally:
        first.close()
    open_outbox(data).close()  # released: the next owner gets it


def test_an_outbox_lost_from_a_used_data_dir_is_a_warning(tmp_path: Path) -> None:
    data = tmp_path / "data"
    open_outbox(data).close()
    (data / OUTBOX_FILE).write_bytes(b"")
    with structlog.testing.capture_logs() as logs:
        open_outbox(data).close()
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["agent.outbox_missing"]
    with structlog.testing.capture_logs() as logs:
        open_outbox(tmp_path / "fresh").close()  # a new dir: nothing was lost, nothing to say
    assert not [e for e in logs if e["log_level"] == "warning"]
