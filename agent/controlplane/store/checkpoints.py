"""Checkpoints of the SQLite store's write-ahead log, done by a thread of their own.

A checkpoint copies the log's pages into the database and fsyncs both files: 5-14 ms on a busy
disk, once 279 ms. Left to ``wal_autocheckpoint=256`` it ran inside the COMMIT that crossed 256
pages, on the event loop, and every task creation and long-poll claim waited behind it. Now
:class:`WalCheckpointer` does it, on a second connection that only its thread opens, uses and
closes, in PASSIVE mode (which never makes a writer wait):

- once the log is past ``trigger_bytes`` (3/4 of the limit): the store calls :meth:`committed` after
  each commit, which reads the log's length from the wal-index header in the ``-shm`` file (its
  layout is part of SQLite's documented file format, walformat.html; one ``pread``, no lock);
- at least every ``every_seconds`` while anything waits, so a quiet store's log is synced and
  folded too (with ``synchronous=NORMAL`` the log is fsynced only at checkpoints, so this bounds
  what a power loss can take in time; before, it waited for 256 pages).

The log is restarted (written again from its start, the file trimmed back to the limit) only by a
write that begins after every frame is copied, so a checkpoint that overlapped a commit leaves
the log growing. The thread then folds again, pass after pass, until one falls in a gap between
commits. Should it still fall behind (writes without a gap as long as a checkpoint's fsyncs, or a
thread not scheduled), the store brakes: past ``brake_bytes`` (a quarter over the limit)
its own connection checkpoints after the COMMIT, in FULL mode (it waits for the thread's pass),
whatever the load. When the log is folded, quiet, and its file over the limit (after a burst),
TRUNCATE gives the space back.

One fsync stays with the writer: the first commit after a restart syncs the log's new header
(SQLite does so under ``synchronous=NORMAL`` against out-of-order writes, its ticket ff5be73dee).
That is one small fsync per fold on the event loop, where a fold in a COMMIT cost three (the log,
the database, then that header).

Durability is SQLite's, unchanged: a process crash loses no commit (the log is in the page
cache), and the checkpoint's fsyncs follow ``synchronous=NORMAL`` as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("controlplane.store")

#: The write-ahead log is kept under this (checkpointed before it, truncated back to it).
WAL_LIMIT_BYTES = 1024 * 1024

#: The wal-index header (two copies of 48 bytes) and the checkpoint info after it: version (u32 at
#: 0), page size (u16 at 14, 1 meaning 65536), frames in the log (mxFrame, u32 at 16), frames
#: copied to the database (nBackfill, u32 at 96). Native byte order.
_INDEX = struct.Struct("=I10xHI76xI")
_INDEX_VERSION = 3007000
_FRAME_HEADER = 24
_WAL_HEADER = 32


@dataclass(frozen=True)
class CheckpointSettings:
    """When the log is folded in. The defaults are the product's; tests stretch them."""

    limit_bytes: int = WAL_LIMIT_BYTES
    #: Fold once the log is this long (below the limit: the writer keeps writing while a checkpoint
    #: runs, and the log is restarted only after one that caught up).
    trigger_bytes: int = WAL_LIMIT_BYTES * 3 // 4
    #: The store's own connection checkpoints (in its COMMIT) once the log is this long: only when
    #: this thread has fallen behind.
    brake_bytes: int = WAL_LIMIT_BYTES * 5 // 4
    #: Fold whatever waits at least this often (it bounds what a power loss can take to about this).
    every_seconds: float = 30.0
    #: How often the thread looks at the log when no commit woke it.
    poll_seconds: float = 0.5
    #: How long a TRUNCATE checkpoint (after a burst) waits for the writer and readers to let go.
    busy_seconds: float = 2.0


@dataclass(frozen=True)
class _LogState:
    frame_bytes: int
    frames: int
    copied: int

    @property
    def log_bytes(self) -> int:
        return _WAL_HEADER + self.frames * self.frame_bytes

    @property
    def waiting_bytes(self) -> int:
        return max(0, self.frames - self.copied) * self.frame_bytes


class WalIndex:
    """The wal-index header in the ``-shm`` file, read without a lock (``pread``: no mapping that a
    truncation could turn into SIGBUS)."""

    def __init__(self, shm: Path) -> None:
        self._fd: int | None = None
        with contextlib.suppress(OSError):  # no index to read: the thread folds on its timer alone
            self._fd = os.open(shm, os.O_RDONLY | os.O_CLOEXEC)

    def state(self) -> _LogState | None:
        if self._fd is None:
            return None
        try:
            raw = os.pread(self._fd, _INDEX.size, 0)
        except OSError:
            return None
        if len(raw) < _INDEX.size:
            return None
        version, page, frames, copied = _INDEX.unpack(raw)
        if version != _INDEX_VERSION:
            return None
        return _LogState((65536 if page == 1 else page) + _FRAME_HEADER, frames, copied)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class WalCheckpointer:
    """Folds the write-ahead log of ``path`` into the database from its own thread (see the module).

    :meth:`committed` is the store's to call after each commit, on its own thread: it reads the log's
    length (one ``pread``, no lock) and wakes the checkpoint thread while the log is past the trigger.
    """

    def __init__(self, path: Path, settings: CheckpointSettings | None = None) -> None:
        self.path = path
        self.settings = settings or CheckpointSettings()
        self._index = WalIndex(path.with_name(path.name + "-shm"))
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._db: sqlite3.Connection | None = None  # the thread's alone
        self._failing = False
        self._pass = threading.Lock()  # held by every checkpoint of the thread, and by the brake
        self._thread = threading.Thread(target=self._run, name=f"wal-checkpoints:{path.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def committed(self) -> bool:
        """Wake the thread while the log is past the trigger (the store calls this after each commit).

        True when the log is past the brake with frames still to copy: the thread has fallen behind,
        and the caller must checkpoint on its own connection now, inside :meth:`paused`.
        """
        if self._stop.is_set():
            return False
        state = self._index.state()
        if state is None or not state.waiting_bytes:
            return False
        if state.log_bytes >= self.settings.brake_bytes:
            return True
        if not self._wake.is_set() and self._ours(state):
            self._wake.set()
        return False

    def _ours(self, state: _LogState) -> bool:
        """Past the trigger, short of the brake: past it the store's COMMIT folds the log, and a pass
        here would only take the checkpoint lock from it."""
        return self.settings.trigger_bytes <= state.log_bytes < self.settings.brake_bytes

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the thread's passes back (waiting for one under way to end): the brake's checkpoint
        must not find the checkpoint lock taken, or it does nothing and the log grows on."""
        with self._pass:
            yield

    def stop_soon(self) -> None:
        """Ask the thread to fold the log a last time, close its connection and end."""
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float) -> bool:
        """Wait for the thread to end; False when it is still running (a disk that does not answer)."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    async def stop(self, timeout: float = 30.0) -> None:
        """:meth:`stop_soon`, then wait for the thread without holding up the event loop."""
        self.stop_soon()
        if not await asyncio.to_thread(self.join, timeout):
            log.warning(
                "controlplane.checkpoint_stop_timeout",
                path=str(self.path),
                hint="the last checkpoint did not finish; SQLite folds the log in at the next start",
            )

    # --- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        last = time.monotonic()  # the last fold, or the last look that found nothing to copy
        try:
            while not self._stop.is_set():
                self._wake.wait(self.settings.poll_seconds)
                self._wake.clear()
                if self._stop.is_set():
                    break
                state = self._index.state()
                now = time.monotonic()
                if state is not None and state.waiting_bytes == 0:
                    last = now
                    if state.log_bytes <= self.settings.limit_bytes or self._failing:
                        continue
                    # Folded, quiet, and still over the limit after a burst: give the space back.
                    self._guarded(lambda: self._checkpoint("TRUNCATE"))
                    continue
                timer = now - last >= self.settings.every_seconds
                if timer or (
                    not self._failing and state is not None and self._ours(state)
                ):  # after a failure only the timer: no retry at every wake against a full disk
                    self._guarded(self._fold)
                    last = time.monotonic()
            self._guarded(self._fold)  # the last one; closing the last connection finishes it
        finally:
            self._close_db()
            self._index.close()

    def _fold(self) -> None:
        self._checkpoint("PASSIVE")  # busy: another checkpoint runs (the brake, the store's probe)
        if self._failing:
            self._failing = False
            log.info("controlplane.checkpoint_recovered", path=str(self.path))

    def _checkpoint(self, mode: str) -> tuple[int, int, int]:
        db = self._connection()
        with self._pass:  # fetchall: a statement left open would hold a read lock, and no write could restart the log
            [(busy, frames, copied)] = db.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
        return int(busy), int(frames), int(copied)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=self.settings.busy_seconds)
            try:
                # The checkpoint's fsyncs follow this connection's setting: the store's, as before.
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA wal_autocheckpoint=0")
                db.execute(f"PRAGMA journal_size_limit={self.settings.limit_bytes}")
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _guarded(self, step: Callable[[], object]) -> None:
        """Run ``step``; a failure (full disk, I/O error) is logged once per episode, never raised."""
        try:
            step()
        except Exception as exc:  # the thread must outlive any one failure
            if not self._failing:
                self._failing = True
                log.warning(
                    "controlplane.checkpoint_failed",
                    path=str(self.path),
                    error=str(exc) or type(exc).__name__,
                    hint="the log is folded in again once the disk takes writes; until then it grows",
                )
            self._close_db()

    def _close_db(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            try:
                db.close()
            except sqlite3.Error as exc:
                log.warning("controlplane.checkpoint_close_failed", path=str(self.path), error=str(exc))
