"""Results are written here before they are sent, and removed only when the control plane has them.

With a data dir the outbox is a SQLite file (WAL): a result survives a crash (``kill -9``) or a
container restart and is replayed at the next start. WAL with ``synchronous=NORMAL`` loses nothing
on a process crash; only a power loss can drop the last commit, and on Kubernetes that means the
node and its emptyDir are gone anyway. Without a data dir results live in memory, and the delegate
says so at startup.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import msgspec

from agent._files import DataDirUnusable
from agent.protocol.models import TaskResult

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(TaskResult).decode

__all__ = ["DataDirUnusable", "Entry", "MemoryOutbox", "Outbox", "SqliteOutbox", "open_outbox"]


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

    def put(self, entry: Entry) -> None: ...
    def pending(self, limit: int = 100) -> list[Entry]: ...
    def remove(self, key: str) -> None: ...
    def __len__(self) -> int: ...
    def close(self) -> None: ...


class MemoryOutbox:
    durable = False

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

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        pass


class SqliteOutbox:
    durable = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox(lease_id TEXT PRIMARY KEY, task_id TEXT NOT NULL, "
            "body BLOB NOT NULL, created_at REAL NOT NULL)"
        )
        self._count = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self.changed = asyncio.Event()
        if self._count:
            self.changed.set()

    def put(self, entry: Entry) -> None:
        body, now = _encode(entry.result), time.time()
        # One statement in the usual case (a lease's first and only result); a second result for
        # the same lease replaces the first and leaves the count alone.
        if self._db.execute(
            "INSERT OR IGNORE INTO outbox(lease_id, task_id, body, created_at) VALUES(?, ?, ?, ?)",
            (entry.key, entry.task_id, body, now),
        ).rowcount:
            self._count += 1
        else:
            self._db.execute("UPDATE outbox SET body=?, created_at=? WHERE lease_id=?", (body, now, entry.key))
        self.changed.set()

    def pending(self, limit: int = 100) -> list[Entry]:
        rows = self._db.execute("SELECT task_id, body FROM outbox ORDER BY created_at LIMIT ?", (limit,)).fetchall()
        return [Entry(task_id=r[0], result=_decode(r[1])) for r in rows]

    def remove(self, key: str) -> None:
        if self._db.execute("DELETE FROM outbox WHERE lease_id=?", (key,)).rowcount:
            self._count -= 1

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        self._db.close()


def open_outbox(data_dir: Path | None) -> Outbox:
    """The outbox for ``data_dir``, creating the directory: the settings only checked it could be."""
    if data_dir is None:
        return MemoryOutbox()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        return SqliteOutbox(data_dir / "outbox.sqlite3")
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DataDirUnusable(f"cannot use the data dir {data_dir} (AGENT_DATA_DIR): {reason}") from None
