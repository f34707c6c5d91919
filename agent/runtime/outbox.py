"""Results are written here before they are sent, and removed only when the control plane has them.

With a data dir the outbox is a SQLite file (WAL): a result survives a crash (``kill -9``) or a
container restart and is replayed at the next start. WAL with ``synchronous=NORMAL`` loses nothing
on a process crash; only a power loss can drop the last commit, and on Kubernetes that means the
node and its emptyDir are gone anyway. Without a data dir results live in memory, and the delegate
says so at startup.

The disk may fail under it. A result that cannot be written (disk full, I/O error) is kept in
memory and still delivered; the outbox then reports a *fault*, which makes the delegate unready
and stops it taking new work, and it tries the disk again (at most once a second) until a write
succeeds and the fault clears, without a restart. A removal that fails after the control plane
acknowledged a result is remembered and retried the same way, never raised. A row that no longer
decodes is moved to a ``dead_letter`` table with a log line and a metric, so one damaged row cannot
stop the others. A damaged file is refused at start, in one line that says what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Protocol

import msgspec
import structlog

from agent._files import DataDirLock, DataDirUnusable, DataFileDamaged, lost_state_file, mark_state_file
from agent._sqlite import wal_damage
from agent.protocol.models import TaskResult

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(TaskResult).decode

log = structlog.get_logger("agent.outbox")

__all__ = ["DataDirUnusable", "Entry", "MemoryOutbox", "Outbox", "SqliteOutbox", "open_outbox"]

#: The file's name in the data dir.
OUTBOX_FILE = "outbox.sqlite3"
#: While faulted, the disk is tried again at most this often.
RETRY_DISK_SECONDS = 1.0
#: Results also kept in memory while they wait, so sending them reads nothing back from the file.
MEMORY_ENTRIES = 1024


@dataclass(frozen=True)
class Entry:
    task_id: str
    result: TaskResult

    @property
    def key(self) -> str:
        return self.result.lease_id


class Outbox(Protocol):
    durable: bool
    changed: asyncio.Event

    @property
    def fault(self) -> str | None:
        """Why results cannot be kept on disk right now (the delegate takes no new work), or None."""
        ...

    def put(self, entry: Entry) -> None: ...
    def pending(self, limit: int = 100) -> list[Entry]: ...
    def remove(self, key: str) -> None: ...
    def remove_many(self, keys: Iterable[str]) -> None: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...


class MemoryOutbox:
    durable = False
    fault = None

    def __init__(self) -> None:
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.changed = asyncio.Event()

    def put(self, entry: Entry) -> None:
        self._entries[entry.key] = entry
        self.changed.set()

    def pending(self, limit: int = 100) -> list[Entry]:
        return list(self._entries.values())[:limit]

    def remove(self, key: str) -> None:
        self._entries.pop(key, None)

    def remove_many(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        pass


class SqliteOutbox:
    """The durable outbox; see the module docstring for what happens when the disk fails."""

    durable = True

    def __init__(
        self,
        path: Path,
        *,
        lock: DataDirLock | None = None,
        on_quarantine: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._lock = lock
        self._on_quarantine = on_quarantine
        self._clock = clock
        damage = wal_damage(path.with_name(path.name + "-wal"))
        if damage is not None:
            raise _damaged(path, damage)
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise DataDirUnusable(f"cannot use the data dir {path.parent} (AGENT_DATA_DIR): {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            check = [row[0] for row in self._db.execute("PRAGMA quick_check").fetchall()]
            if check != ["ok"]:
                raise _damaged(path, f"quick_check: {'; '.join(map(str, check[:3]))}")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS outbox(lease_id TEXT PRIMARY KEY, task_id TEXT NOT NULL, "
                "body BLOB NOT NULL, created_at REAL NOT NULL)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS dead_letter(lease_id TEXT, task_id TEXT, body BLOB, "
                "reason TEXT NOT NULL, quarantined_at REAL NOT NULL)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS probe(id INTEGER PRIMARY KEY, at REAL NOT NULL)")
            self._count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        except DataFileDamaged:
            self._db.close()
            raise
        except sqlite3.OperationalError as exc:
            self._db.close()
            raise DataDirUnusable(
                f"cannot use the data dir {path.parent} (AGENT_DATA_DIR): {path.name}: {exc}"
            ) from None
        except sqlite3.DatabaseError as exc:  # not a database, malformed image
            self._db.close()
            raise _damaged(path, str(exc)) from None
        #: Results the disk refused, kept here (and delivered from here) until it takes them.
        self._spill: OrderedDict[str, Entry] = OrderedDict()
        #: Spilled results that replace a row still on disk (its older result): counted once, and
        #: that row is deleted too when the result is delivered.
        self._shadowed: set[str] = set()
        #: Written results, mirrored here (up to MEMORY_ENTRIES) so pending() need not read them back.
        self._mem: OrderedDict[str, Entry] = OrderedDict()
        #: Rows on disk with no copy in memory (an earlier run's, or past MEMORY_ENTRIES): while
        #: there are any, pending() reads the file.
        self._disk_only = self._count
        #: Acknowledged results whose row could not be deleted yet: never sent again, deleted later.
        self._undeleted: set[str] = set()
        #: Rows that neither decode nor could be moved to dead_letter (full disk): skipped.
        self._unreadable: set[str] = set()
        self._fault: str | None = None
        self._next_try = 0.0
        #: Results put in this event-loop tick, not written yet (see put): one per lease, the newest,
        #: in the order they were put (a replacement goes last, as its row does in the file).
        self._queued: dict[str, Entry] = {}
        self._flush_handle: asyncio.Handle | None = None
        self.changed = asyncio.Event()
        if self._count:
            self.changed.set()

    @property
    def fault(self) -> str | None:
        self._flush()
        return self._fault

    def put(self, entry: Entry) -> None:
        """Queue ``entry`` for the end of this event-loop tick: every result that finishes in one tick
        goes to disk in one transaction (one WAL append, not one each). Nothing reads the outbox
        before its queue is written (each reader flushes first), so a result is on disk before it
        can be sent. Outside an event loop it is written at once.
        """
        self._queued.pop(entry.key, None)
        self._queued[entry.key] = entry
        if self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._flush()
                return
            self._flush_handle = loop.call_soon(self._flush)
        self.changed.set()

    def _flush(self) -> None:
        """Write what :meth:`put` queued: one transaction; one by one if that fails (a full disk)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._queued:
            return
        entries, self._queued = list(self._queued.values()), {}
        if len(entries) > 1:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                inserted = [self._insert(entry) for entry in entries]
                self._db.execute("COMMIT")
            except sqlite3.Error:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
            else:
                for entry, new in zip(entries, inserted, strict=True):
                    self._account(entry, new)
                self.changed.set()
                return
        for entry in entries:  # one, or a transaction the disk refused: each on its own, spilled if refused
            self._put_one(entry)
        self.changed.set()

    def _put_one(self, entry: Entry) -> None:
        try:
            self._write(entry)
        except sqlite3.Error as exc:
            self._spill[entry.key] = entry
            if entry.key in self._mem or self._on_disk(entry.key):
                self._shadowed.add(entry.key)
            self._failed("write a result", exc)

    def _write(self, entry: Entry) -> None:
        self._account(entry, self._insert(entry))

    def _insert(self, entry: Entry) -> bool:
        """The row for ``entry``: True if it is new, False if it replaced the lease's earlier result."""
        body, now = _encode(entry.result), time.time()
        # One statement in the usual case (a lease's first and only result); a second result for
        # the same lease replaces the first and leaves the count alone.
        if self._db.execute(
            "INSERT OR IGNORE INTO outbox(lease_id, task_id, body, created_at) VALUES(?, ?, ?, ?)",
            (entry.key, entry.task_id, body, now),
        ).rowcount:
            return True
        self._db.execute("UPDATE outbox SET body=?, created_at=? WHERE lease_id=?", (body, now, entry.key))
        return False

    def _account(self, entry: Entry, new: bool) -> None:
        """The bookkeeping for a row written (``new``) or replaced, once that is committed."""
        if new:
            self._count += 1
            if len(self._mem) < MEMORY_ENTRIES:
                self._mem[entry.key] = entry
            else:
                self._disk_only += 1
        elif entry.key in self._mem:
            self._mem[entry.key] = entry
            self._mem.move_to_end(entry.key)

    def pending(self, limit: int = 100) -> list[Entry]:
        self._flush()
        if self._fault is not None and self._clock() >= self._next_try:
            self._retry_disk()
        skip = self._undeleted | self._unreadable
        if not self._disk_only:  # everything waiting is in memory: nothing to read back or decode
            spilled = self._spill.values()
            mem = (e for k, e in self._mem.items() if k not in skip and k not in self._spill)
            return list(islice((*spilled, *mem), limit))
        rows = self._db.execute(
            "SELECT lease_id, task_id, body FROM outbox ORDER BY created_at LIMIT ?", (limit + len(skip),)
        ).fetchall()
        entries = list(self._spill.values())[:limit]
        for lease_id, task_id, body in rows:
            if len(entries) >= limit:
                break
            if lease_id in skip or lease_id in self._spill:
                continue
            if (entry := self._mem.get(lease_id)) is not None:
                entries.append(entry)
                continue
            try:
                entries.append(Entry(task_id=task_id, result=_decode(body)))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._quarantine(lease_id, task_id, body, str(exc))
        return entries

    def _quarantine(self, lease_id: str, task_id: str, body: bytes, reason: str) -> None:
        """Move a row that no longer decodes out of the way, so the rest still flows."""
        log.error(
            "agent.outbox_row_quarantined",
            task_id=task_id,
            reason=reason[:200],
            path=str(self.path),
            hint="the row was moved to the dead_letter table; its task is re-run by the control plane "
            "when the lease expires",
        )
        self._on_quarantine()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO dead_letter(lease_id, task_id, body, reason, quarantined_at) VALUES(?, ?, ?, ?, ?)",
                (lease_id, task_id, body, reason[:500], time.time()),
            )
            self._db.execute("DELETE FROM outbox WHERE lease_id=?", (lease_id,))
            self._db.execute("COMMIT")
            self._count -= 1
            self._disk_only -= 1
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._unreadable.add(lease_id)
            self._failed("quarantine a damaged result", exc)

    def remove(self, key: str) -> None:
        self.remove_many((key,))

    def remove_many(self, keys: Iterable[str]) -> None:
        """Forget delivered results: one transaction for all of them (one WAL append, not one each)."""
        self._flush()
        rest = []
        for key in keys:
            if self._spill.pop(key, None) is None:
                rest.append(key)
            elif key in self._shadowed:  # its older result's row is still on disk
                self._shadowed.discard(key)
                rest.append(key)
        if not rest:
            return
        try:
            if len(rest) > 1:
                self._db.execute("BEGIN IMMEDIATE")
            deleted = [self._delete_row(key) for key in rest]
            if self._db.in_transaction:
                self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            self._undeleted.update(rest)
            self._failed("remove a delivered result", exc)
            return
        for key, gone in zip(rest, deleted, strict=True):
            self._forget(key, gone)

    def _on_disk(self, key: str) -> bool:
        """Whether ``key`` has a row (a read, which a full disk still serves; if not, say no)."""
        try:
            return self._db.execute("SELECT 1 FROM outbox WHERE lease_id=?", (key,)).fetchone() is not None
        except sqlite3.Error:
            return False

    def _delete_row(self, key: str) -> bool:
        return bool(self._db.execute("DELETE FROM outbox WHERE lease_id=?", (key,)).rowcount)

    def _forget(self, key: str, deleted: bool) -> None:
        """The bookkeeping for a row that was deleted (or was not there), once the deletion is committed."""
        mirrored = self._mem.pop(key, None) is not None
        if deleted:
            self._count -= 1
            if not mirrored:
                self._disk_only -= 1

    def _failed(self, what: str, exc: sqlite3.Error) -> None:
        reason = f"cannot {what} to {self.path}: {exc}"
        if self._fault is None:
            log.error(
                "agent.outbox_fault",
                error=reason,
                hint="taking no new work until the disk accepts writes again; results are kept in memory meanwhile",
            )
        self._fault = reason
        self._next_try = self._clock() + RETRY_DISK_SECONDS

    def _retry_disk(self) -> None:
        """Write what waits in memory, delete what was acknowledged; clear the fault once the disk takes it."""
        try:
            for key, entry in list(self._spill.items()):
                self._write(entry)
                del self._spill[key]
                self._shadowed.discard(key)
            for key in list(self._undeleted):
                self._forget(key, self._delete_row(key))
                self._undeleted.discard(key)
            self._unreadable.clear()  # they are tried (and quarantined) again by the next read
            # A real write, so "the disk takes writes again" is known even with nothing waiting.
            self._db.execute("INSERT OR REPLACE INTO probe(id, at) VALUES(1, ?)", (time.time(),))
        except sqlite3.Error as exc:
            self._fault = f"cannot write to {self.path}: {exc}"
            self._next_try = self._clock() + RETRY_DISK_SECONDS
            return
        log.info("agent.outbox_recovered", path=str(self.path))
        self._fault = None

    def __len__(self) -> int:
        self._flush()
        return self._count + len(self._spill) - len(self._shadowed) - len(self._undeleted)

    def close(self) -> None:
        self._flush()
        self._db.close()
        if self._lock is not None:
            self._lock.release()


def open_outbox(data_dir: Path | None, *, on_quarantine: Callable[[], None] = lambda: None) -> Outbox:
    """The outbox for ``data_dir``: the directory created, locked for this process, the file checked."""
    if data_dir is None:
        return MemoryOutbox()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataDirUnusable(f"cannot use the data dir {data_dir} (AGENT_DATA_DIR): {exc.strerror}") from None
    lock = DataDirLock.acquire(data_dir, "AGENT_DATA_DIR")
    path = data_dir / OUTBOX_FILE
    try:
        if lost_state_file(path):
            log.warning(
                "agent.outbox_missing",
                path=str(path),
                hint="this data dir was used before, but its outbox is missing or empty: results not yet "
                "delivered when it was lost are gone (the control plane re-runs their tasks)",
            )
        outbox = SqliteOutbox(path, lock=lock, on_quarantine=on_quarantine)
        mark_state_file(path)
        return outbox
    except BaseException:
        lock.release()
        raise


def _damaged(path: Path, detail: str) -> DataFileDamaged:
    return DataFileDamaged(
        f"the outbox {path} is damaged ({detail}): stop the delegate, move {path.name} and its -wal and -shm "
        f"files aside (e.g. into {path.parent}/damaged/), and start again; results in it that were not "
        "delivered are lost, and the control plane re-runs their tasks when their leases expire"
    )
