"""The SQLite store's write-ahead log is folded in by a thread, not by the COMMITs on the event loop.

Every test runs the real store on a real file; the log's length is read from the -wal file's size
and, where it must be exact, from a second sqlite3 connection.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import structlog

from agent.controlplane.store import TaskRow
from agent.controlplane.store.checkpoints import WAL_LIMIT_BYTES, CheckpointSettings, WalIndex
from agent.controlplane.store.sqlite import SqliteStore
from tests.helpers import wait_for

#: What one commit may add past a bound (a task row and its indexes, a few pages).
_ONE_COMMIT = 64 * 1024

#: A thread that never folds on its own: only the store's brake is left.
_NO_THREAD = CheckpointSettings(trigger_bytes=1 << 40, every_seconds=3600)

#: The thread folds on its timer only, and the store never (a test fills the disk first).
_HELD = {"trigger_bytes": 1 << 40, "brake_bytes": 1 << 40}


def _task(n: int) -> TaskRow:
    return TaskRow(
        id=f"tsk_{n:06d}",
        type="test.echo",
        payload={"message": "x" * 200, "n": n},
        selectors=(),
        connector_id=None,
        state="queued",
        created_at=1000.0 + n,
        pickup_timeout=60.0,
        pickup_deadline=2000.0 + n,
        timeout_seconds=30.0,
        attempts=0,
        max_attempts=3,
    )


def _wal(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def test_commits_do_not_checkpoint_at_256_pages_and_the_brake_still_bounds_the_log(tmp_path: Path) -> None:
    """With the thread held back, the log grows past the 256 pages where every COMMIT used to fold it
    in (so no COMMIT below the brake pays for a checkpoint), and the store's own brake still stops it
    a quarter over the limit."""
    path = tmp_path / "cp.sqlite3"
    store = SqliteStore(path, checkpoints=_NO_THREAD)
    try:
        biggest, n = 0, 0
        while _size(_wal(path)) <= WAL_LIMIT_BYTES + _ONE_COMMIT:
            await store.insert_task(_task(n))
            n += 1
            assert n < 5000, "the log never grew past the old 256-page checkpoint"
        for m in range(n, n + 2000):  # then on, far past the brake
            await store.insert_task(_task(m))
            biggest = max(biggest, _size(_wal(path)))
        assert biggest <= _NO_THREAD.brake_bytes + _ONE_COMMIT, biggest
    finally:
        await store.close()


async def test_a_burst_of_commits_is_folded_back_under_the_limit_by_the_thread(tmp_path: Path) -> None:
    """Thousands of small commits as fast as the loop can make them: the log stays bounded while they
    run, the thread brings it back under the limit after, and every commit is in the database."""
    path = tmp_path / "cp.sqlite3"
    store = SqliteStore(path)
    try:
        biggest = 0
        for n in range(3000):
            await store.insert_task(_task(n))
            await store.bump("burst")
            if n % 2:
                await store.update_task(_task(n).id, state="done", status="SUCCESS", completed_at=3000.0)
            biggest = max(biggest, _size(_wal(path)))
        assert biggest <= 4 * WAL_LIMIT_BYTES, biggest
        await wait_for(lambda: _size(_wal(path)) <= WAL_LIMIT_BYTES, "the log back under the limit")
        assert (await store.counters())["burst"] == 3000
        assert (await store.count_tasks()) == {"queued": 1500, "done": 1500}
    finally:
        await store.close()


async def test_a_quiet_store_is_folded_in_on_the_timer(tmp_path: Path) -> None:
    """A few commits, far below the trigger, still reach the database (and its fsync) on the timer."""
    path = tmp_path / "cp.sqlite3"
    store = SqliteStore(path, checkpoints=CheckpointSettings(every_seconds=0.2, poll_seconds=0.05))
    index = WalIndex(path.with_name(path.name + "-shm"))
    try:
        for n in range(3):
            await store.insert_task(_task(n))
        state = index.state()
        assert state is not None and state.waiting_bytes > 0

        def folded() -> bool:
            now = index.state()
            return now is not None and now.frames >= state.frames and now.waiting_bytes == 0

        await wait_for(folded, "the thread to fold the three commits in", 10)
    finally:
        index.close()
        await store.close()


async def test_closing_folds_the_log_in_and_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "cp.sqlite3"
    store = SqliteStore(path, checkpoints=_NO_THREAD)
    for n in range(100):
        await store.insert_task(_task(n))
    assert _size(_wal(path)) > 0
    await store.close()
    assert not _wal(path).exists()
    db = sqlite3.connect(f"file:{path}?immutable=1", uri=True)  # the database file alone, no log
    try:
        assert db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 100
    finally:
        db.close()


def test_a_killed_process_loses_no_commit(tmp_path: Path) -> None:
    """WAL with synchronous=NORMAL, as before: every commit acknowledged before a kill -9 is there after."""
    path = tmp_path / "cp.sqlite3"
    script = textwrap.dedent(
        f"""
        import asyncio, os, signal
        from pathlib import Path
        from agent.controlplane.store.sqlite import SqliteStore
        from tests.test_controlplane_store_checkpoints import _task

        async def main():
            store = SqliteStore(Path({str(path)!r}))
            for n in range(2000):
                await store.insert_task(_task(n))
            print("committed", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False, cwd=os.getcwd()
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout.strip() == "committed"
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 2000
    finally:
        db.close()


def test_an_in_memory_store_has_no_checkpoint_thread() -> None:
    before = {t.name for t in threading.enumerate()}
    store = SqliteStore(None)
    try:
        after = {t.name for t in threading.enumerate()}
        assert not [name for name in after - before if name.startswith("wal-checkpoints")]
    finally:
        store.close_now()


async def test_a_failing_checkpoint_is_logged_once_and_its_recovery_too(tmp_path: Path) -> None:
    """A full disk fails every checkpoint: one warning for the episode (no traceback, no repeat at
    every tick), one line when the disk takes writes again and the log is folded in."""
    from tests.test_disk_faults import fill, tmpfs

    with tmpfs(tmp_path / "vol", "4m") as vol:
        path = vol / "cp.sqlite3"
        store = SqliteStore(path, checkpoints=CheckpointSettings(every_seconds=0.05, poll_seconds=0.02, **_HELD))
        try:
            for n in range(100):  # the database grows in the log only: folding it in must grow the file
                await store.insert_task(_task(n))
            with structlog.testing.capture_logs() as logs:
                filler = fill(vol)
                events = lambda: [e["event"] for e in logs]  # noqa: E731
                await wait_for(lambda: "controlplane.checkpoint_failed" in events(), "a failed checkpoint")
                loop = asyncio.get_running_loop()
                later = loop.time() + 0.5  # ten ticks of the timer, every one failing
                await wait_for(lambda: loop.time() > later, "ten ticks")
                filler.unlink()
                await wait_for(lambda: "controlplane.checkpoint_recovered" in events(), "the recovery")
            assert events().count("controlplane.checkpoint_failed") == 1
            assert not [e for e in logs if e.get("exc_info")]
            [failed] = [e for e in logs if e["event"] == "controlplane.checkpoint_failed"]
            assert "full" in failed["error"], failed
        finally:
            await store.close()


@pytest.mark.parametrize("mode", ["PASSIVE"])
def test_the_wal_index_layout_read_matches_sqlite(tmp_path: Path, mode: str) -> None:
    """The log's length read from the -shm header is SQLite's own count (walformat.html)."""
    path = tmp_path / "t.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t(x BLOB)")
    for _ in range(20):
        db.execute("INSERT INTO t VALUES(?)", (b"x" * 5000,))
    index = WalIndex(path.with_name(path.name + "-shm"))
    try:
        state = index.state()
        assert state is not None
        assert state.log_bytes == _size(_wal(path))
        other = sqlite3.connect(path, isolation_level=None)
        _, frames, copied = other.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()[0]
        other.close()
        after = index.state()
        assert after is not None and (after.frames, after.copied) == (frames, copied) == (state.frames, frames)
        assert after.waiting_bytes == 0
    finally:
        index.close()
        db.close()
