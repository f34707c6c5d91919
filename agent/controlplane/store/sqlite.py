"""SQLite store: the embedded default, one control-plane process per data dir.

The database under the data dir is the truth: delegates, tasks (with their leases and results),
connectors and tokens all survive a restart. Calls are short (a few hundred microseconds in WAL
mode), so they run on the event loop without a thread; the methods are ``async`` only to share
the :class:`~.base.Store` interface with Postgres, and none of them suspends. A transaction holds
an :class:`asyncio.Lock`, so a second coroutine's transaction waits for the first to commit.

The one slow thing SQLite does, the checkpoint (its fsyncs), is not done by this connection: a
:class:`~.checkpoints.WalCheckpointer` thread does it, started with the store and stopped by
:meth:`SqliteStore.close` after the store's own connection is closed (so its connection is the
last, and closing it folds the log in and removes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import sqlite3
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from agent._files import DataFileDamaged
from agent._sqlite import wal_damage
from agent.controlplane.store.base import (
    ConnectorRow,
    DelegateRow,
    Expect,
    HealthSummary,
    HistoryRow,
    QueueKey,
    SchemaTooNew,
    StoredScope,
    StoreEvent,
    StoreUnavailable,
    TaskRow,
    connector_change,
    decode_json,
    decode_row,
    decode_scope,
    encode_scope,
    encode_value,
    new_lease_id,
    readable,
    row_columns,
    with_updates,
)
from agent.controlplane.store.checkpoints import CheckpointSettings, WalCheckpointer

#: Version 1 is the schema as first shipped (its later columns added in place when missing).
_V1 = """
CREATE TABLE IF NOT EXISTS delegates(
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    instance_id TEXT NOT NULL UNIQUE,
    hostname TEXT,
    tags TEXT NOT NULL,
    version TEXT NOT NULL,
    task_types TEXT NOT NULL,
    capacity INTEGER NOT NULL,
    state TEXT NOT NULL,
    in_flight INTEGER NOT NULL DEFAULT 0,
    token_name TEXT,
    registered_at REAL NOT NULL,
    last_heartbeat REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks(
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    selectors TEXT NOT NULL,
    connector_id TEXT,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    pickup_timeout REAL NOT NULL,
    pickup_deadline REAL NOT NULL,
    timeout_seconds REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    lease_id TEXT,
    delegate_id TEXT,
    delegate_name TEXT,
    lease_expires_at REAL,
    started_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    result_lease_id TEXT,
    status TEXT,
    failure_reason TEXT,
    completed_at REAL,
    signature TEXT
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);
CREATE INDEX IF NOT EXISTS tasks_lease ON tasks(lease_id);
CREATE INDEX IF NOT EXISTS tasks_connector ON tasks(connector_id, created_at);
CREATE TABLE IF NOT EXISTS connectors(
    identifier TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_task_id TEXT,
    last_status TEXT,
    last_tested_at REAL,
    last_delegate_name TEXT,
    last_error_summary TEXT
);
CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS revoked_tokens(kid TEXT PRIMARY KEY, name TEXT NOT NULL, revoked_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS issued_tokens(
    kid TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, signing_key BLOB NOT NULL, created_at REAL NOT NULL,
    scope_names TEXT, scope_tags TEXT
);
"""

#: Columns version 1 gained while it shipped: (table, column, type), added to older databases at open.
_V1_ADDED_COLUMNS = (
    ("issued_tokens", "scope_names", "TEXT"),
    ("issued_tokens", "scope_tags", "TEXT"),
)

#: Version 2: the queue lives in the database (claims read it in order), leases carry a fencing number.
_V2 = """
ALTER TABLE tasks ADD COLUMN lease_seq INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS tasks_queued ON tasks(created_at) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS tasks_running ON tasks(delegate_id) WHERE state = 'running';
CREATE TABLE IF NOT EXISTS marks(name TEXT PRIMARY KEY, at REAL NOT NULL);
"""

#: Version 3: connector health (status, schedule, back-off), test triggers, and each connector's history.
_V3 = """
ALTER TABLE connectors ADD COLUMN health_status TEXT NOT NULL DEFAULT 'UNKNOWN';
ALTER TABLE connectors ADD COLUMN last_connected_at REAL;
ALTER TABLE connectors ADD COLUMN last_failure TEXT;
ALTER TABLE connectors ADD COLUMN failures_in_row INTEGER NOT NULL DEFAULT 0;
ALTER TABLE connectors ADD COLUMN failing_since REAL;
ALTER TABLE connectors ADD COLUMN backoff INTEGER NOT NULL DEFAULT 0;
ALTER TABLE connectors ADD COLUMN test_interval REAL;
ALTER TABLE connectors ADD COLUMN next_test_at REAL;
ALTER TABLE connectors ADD COLUMN next_trigger TEXT;
ALTER TABLE tasks ADD COLUMN trigger TEXT;
CREATE INDEX IF NOT EXISTS connectors_due ON connectors(next_test_at);
CREATE TABLE IF NOT EXISTS connector_history(
    task_id TEXT PRIMARY KEY,
    connector_id TEXT NOT NULL,
    tested_at REAL NOT NULL,
    status TEXT NOT NULL,
    trigger TEXT NOT NULL,
    delegate_name TEXT,
    error_summary TEXT,
    failure TEXT,
    duration_ms INTEGER
);
CREATE INDEX IF NOT EXISTS connector_history_by ON connector_history(connector_id, tested_at);
"""

SCHEMA_VERSION = 3

#: The database holds task payloads (role ARNs, External IDs) and token hashes: its owner's alone.
DB_MODE = 0o600

#: How long closing the store waits for the last checkpoint.
_STOP_SECONDS = 30.0

_depth: contextvars.ContextVar[int] = contextvars.ContextVar("sqlite_transaction_depth", default=0)


def _private_file(path: Path) -> None:
    """Create ``path`` mode 0600, or narrow an existing one to it, before SQLite opens it.

    SQLite gives its -wal and -shm files the database file's mode, so this covers them too.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, DB_MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != DB_MODE:
            os.fchmod(fd, DB_MODE)
    finally:
        os.close(fd)


class SqliteStore:
    """All durable state in one SQLite file. ``path=None`` keeps everything in memory (tests, throwaway runs)."""

    kind = "sqlite"
    shared = False
    poll_backstop: float | None = None

    def __init__(self, path: Path | None, *, checkpoints: CheckpointSettings | None = None) -> None:
        self.path = path
        checkpoints = checkpoints or CheckpointSettings()
        if path is not None:
            damage = wal_damage(path.with_name(path.name + "-wal"))
            if damage is not None:
                raise _damaged(path, damage)
            _private_file(path)
        self._db = sqlite3.connect(str(path) if path else ":memory:", isolation_level=None, check_same_thread=False)
        try:
            self._db.row_factory = sqlite3.Row
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode survives a process crash (kill -9, OOM) whole; a power loss can drop
                # the last commits, and then the tasks they touched are re-run from their previous state
                # (a creation acknowledged in that window is lost). FULL would fsync every commit: on
                # this project's machines that is ~50 ms each, forty times the cost of a lease.
                self._db.execute("PRAGMA synchronous=NORMAL")
                # A checkpoint's fsyncs in a COMMIT held up the event loop for 5-14 ms (once 279 ms): the
                # checkpointer thread keeps the log small instead (folded from 768 KiB, truncated back to
                # 1 MiB; left at SQLite's 4 MiB it filled a small volume by itself). This connection
                # checkpoints only as a brake (_committed), should the thread fall behind.
                self._db.execute("PRAGMA wal_autocheckpoint=0")
                self._db.execute(f"PRAGMA journal_size_limit={checkpoints.limit_bytes}")
                check = [str(r[0]) for r in self._db.execute("PRAGMA quick_check").fetchall()]
                if check != ["ok"]:
                    raise _damaged(path, "quick_check: " + "; ".join(check[:3]))
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
        except sqlite3.OperationalError as exc:
            self._db.close()
            raise StoreUnavailable(f"cannot use the database {path}: {exc}") from None
        except sqlite3.DatabaseError as exc:  # not a database, or a malformed image
            self._db.close()
            raise _damaged(path, str(exc)) from None
        except BaseException:
            self._db.close()
            raise
        self._lock = asyncio.Lock()
        self._after_commit: list[Callable[[], None]] = []
        self._listeners: list[Callable[[StoreEvent], None]] = []
        self.fault: str | None = None
        self._checkpointer: WalCheckpointer | None = None
        if path is not None:
            self._checkpointer = WalCheckpointer(path, checkpoints)
            # A store dropped without close() must not leave its thread behind (the thread holds no
            # reference to the store, so it can be collected).
            weakref.finalize(self, self._checkpointer.stop_soon)
            self._checkpointer.start()

    @classmethod
    async def open(cls, path: Path | None) -> SqliteStore:
        return cls(path)

    def _migrate(self) -> None:
        """Apply the versions this database lacks, in order, each in its own transaction."""
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the database {self.path} has schema version {version}, newer than this control plane knows "
                f"({SCHEMA_VERSION}): it was written by a newer release. Run that release (or newer); do not "
                "downgrade against it"
            )
        if version < 1:
            self._db.executescript(_V1)
            for table, column, kind in _V1_ADDED_COLUMNS:
                have = {str(r[1]) for r in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            self._db.execute("PRAGMA user_version=1")
        if version < 2:
            self._db.executescript(f"BEGIN; {_V2} PRAGMA user_version=2; COMMIT;")
        if version < 3:
            self._db.executescript(f"BEGIN; {_V3} PRAGMA user_version=3; COMMIT;")

    async def close(self) -> None:
        self._db.close()
        if self._checkpointer is not None:
            await self._checkpointer.stop(_STOP_SECONDS)

    def close_now(self) -> None:
        """Close without the event loop: the last checkpoint is asked for, not waited for."""
        self._db.close()
        if self._checkpointer is not None:
            self._checkpointer.stop_soon()

    # --- transactions and events -------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Group writes; nested uses join the outer transaction. Failure: rolled back, :class:`StoreUnavailable`."""
        depth = _depth.get()
        if depth:
            token = _depth.set(depth + 1)
            try:
                yield
            finally:
                _depth.reset(token)
            return
        async with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._failed(exc) from None
            token = _depth.set(1)
            try:
                yield
                self._db.execute("COMMIT")
                self._committed()
            except BaseException as exc:
                self._after_commit.clear()
                if self._db.in_transaction:  # SQLite may already have rolled back (SQLITE_FULL)
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._failed(exc) from None
                raise
            finally:
                _depth.reset(token)
            self.fault = None
            effects, self._after_commit = self._after_commit, []
        for effect in effects:
            effect()

    def after_commit(self, effect: Callable[[], None]) -> None:
        if _depth.get():
            self._after_commit.append(effect)
        else:
            effect()

    def announce(self, event: StoreEvent) -> None:
        self.after_commit(lambda: self._deliver(event))

    def _deliver(self, event: StoreEvent) -> None:
        for listener in self._listeners:
            listener(event)

    def subscribe(self, listener: Callable[[StoreEvent], None]) -> None:
        self._listeners.append(listener)

    @asynccontextmanager
    async def sweep_turn(self) -> AsyncIterator[bool]:
        async with self.transaction():
            yield True  # one process per data dir: always its turn

    def _write(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            cursor = self._db.execute(sql, params)
        except sqlite3.Error as exc:
            if _depth.get():  # the transaction rolls back, then reports
                self.fault = _reason(self.path, exc)
                raise StoreUnavailable(self.fault) from None
            raise self._failed(exc) from None
        if not _depth.get():
            self.fault = None
            self._committed()
        return cursor

    def _committed(self) -> None:
        """After each commit: wake the checkpointer, or brake when it has fallen a whole limit behind."""
        if self._checkpointer is not None and self._checkpointer.committed():
            # A full disk is the next write's to report.
            with self._checkpointer.paused(), contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(FULL)").fetchall()

    def _failed(self, exc: sqlite3.Error) -> StoreUnavailable:
        self.fault = _reason(self.path, exc)
        return StoreUnavailable(self.fault)

    async def probe(self) -> bool:
        with contextlib.suppress(sqlite3.Error):
            # Fold the log into the database first: it frees the log's space when the pages fit.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            self._write("INSERT INTO counters(name, value) VALUES('probe', 0) ON CONFLICT(name) DO UPDATE SET value=0")
        except StoreUnavailable:
            return False
        return True

    # --- counters and marks ------------------------------------------------------------------

    async def bump(self, name: str, by: int = 1) -> None:
        self._write(
            "INSERT INTO counters(name, value) VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET "
            "value = value + excluded.value",
            (name, by),
        )

    async def counters(self) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in self._db.execute("SELECT name, value FROM counters")}

    async def set_mark(self, name: str, at: float) -> None:
        self._write(
            "INSERT INTO marks(name, at) VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET at=excluded.at", (name, at)
        )

    async def get_mark(self, name: str) -> float | None:
        row = self._db.execute("SELECT at FROM marks WHERE name=?", (name,)).fetchone()
        return None if row is None else float(row[0])

    # --- delegates ---------------------------------------------------------------------------

    async def save_delegate(self, row: DelegateRow) -> None:
        self._upsert("delegates", row, "id")

    async def get_delegate(self, delegate_id: str) -> DelegateRow | None:
        row = self._db.execute("SELECT * FROM delegates WHERE id=?", (delegate_id,)).fetchone()
        return None if row is None else decode_row(DelegateRow, row)

    async def delegate_by_instance(self, instance_id: str) -> DelegateRow | None:
        row = self._db.execute("SELECT * FROM delegates WHERE instance_id=?", (instance_id,)).fetchone()
        return None if row is None else decode_row(DelegateRow, row)

    async def delegates(self) -> list[DelegateRow]:
        rows = self._db.execute("SELECT * FROM delegates ORDER BY registered_at").fetchall()
        return readable(DelegateRow, rows)

    async def update_delegate(self, delegate_id: str, **values: Any) -> None:
        self._update("delegates", "id", delegate_id, values)

    async def delete_delegate(self, delegate_id: str) -> bool:
        return self._write("DELETE FROM delegates WHERE id=?", (delegate_id,)).rowcount > 0

    # --- tasks -------------------------------------------------------------------------------

    async def insert_task(self, row: TaskRow) -> None:
        self._upsert("tasks", row, "id")

    async def get_task(self, task_id: str) -> TaskRow | None:
        row = self._db.execute("SELECT * FROM tasks WHERE id=?", (task_id,)).fetchone()
        return None if row is None else decode_row(TaskRow, row)

    async def task_by_lease(self, lease_id: str) -> TaskRow | None:
        row = self._db.execute("SELECT * FROM tasks WHERE lease_id=? AND state='running'", (lease_id,)).fetchone()
        return None if row is None else decode_row(TaskRow, row)

    async def tasks_in_state(self, state: str) -> list[TaskRow]:
        rows = self._db.execute("SELECT * FROM tasks WHERE state=? ORDER BY created_at", (state,)).fetchall()
        return readable(TaskRow, rows)

    async def running_tasks(self, delegate_id: str | None = None) -> list[TaskRow]:
        mine, args = ("AND delegate_id=?", (delegate_id,)) if delegate_id is not None else ("", ())
        rows = self._db.execute(
            f"SELECT * FROM tasks WHERE state='running' {mine} AND lease_id IS NOT NULL ORDER BY created_at", args
        ).fetchall()
        return readable(TaskRow, rows)

    async def overdue_tasks(self, now: float, grace: float) -> list[TaskRow]:
        rows = self._db.execute(
            "SELECT * FROM tasks WHERE state='running' AND lease_id IS NOT NULL AND (lease_expires_at < ? "
            "OR (started_at IS NOT NULL AND started_at + timeout_seconds + ? < ?)) ORDER BY created_at",
            (now, grace, now),
        ).fetchall()
        return readable(TaskRow, rows)

    async def grant_allowance(self, now: float, lease_seconds: float) -> None:
        async with self.transaction():
            self._write("UPDATE delegates SET last_heartbeat=? WHERE state IN ('running', 'draining')", (now,))
            self._write(
                "UPDATE tasks SET pickup_deadline=MAX(pickup_deadline, ? + pickup_timeout) WHERE state='queued'",
                (now,),
            )
            self._write(
                "UPDATE tasks SET lease_expires_at=MAX(COALESCE(lease_expires_at, 0), ?) "
                "WHERE state='running' AND lease_id IS NOT NULL",
                (now + lease_seconds,),
            )

    async def queued_past_deadline(self, now: float, limit: int = 500) -> list[TaskRow]:
        rows = self._db.execute(
            "SELECT * FROM tasks WHERE state='queued' AND pickup_deadline < ? ORDER BY created_at LIMIT ?", (now, limit)
        ).fetchall()
        return readable(TaskRow, rows)

    async def list_tasks(
        self, *, state: str | None = None, connector_id: str | None = None, limit: int = 100
    ) -> list[TaskRow]:
        clauses, args = [], []
        if state:
            clauses.append("state=?")
            args.append(state)
        if connector_id:
            clauses.append("connector_id=?")
            args.append(connector_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._db.execute(
            f"SELECT * FROM tasks {where} ORDER BY created_at DESC LIMIT ?", (*args, limit)
        ).fetchall()
        return readable(TaskRow, rows)

    async def claim(self, delegate: DelegateRow, limit: int, *, now: float, lease_seconds: float) -> list[TaskRow]:
        if limit <= 0 or not delegate.task_types:
            return []
        types = encode_value("task_types", delegate.task_types)
        tags = encode_value("tags", delegate.tags)
        async with self.transaction():
            # A damaged row is skipped, never an error for everyone: json_valid() guards json_each() (CASE
            # decides in order, AND need not), and a few rows more than asked for are read, so one that
            # does not decode does not take a slot.
            rows = self._db.execute(
                "SELECT * FROM tasks WHERE state='queued' AND pickup_deadline >= ? "
                "AND type IN (SELECT value FROM json_each(?)) "
                "AND CASE WHEN json_valid(tasks.selectors) THEN NOT EXISTS (SELECT 1 FROM json_each(tasks.selectors) s "
                "WHERE s.value NOT IN (SELECT value FROM json_each(?))) ELSE 0 END "
                "ORDER BY created_at LIMIT ?",
                (now, types, tags, limit + 16),
            ).fetchall()
            claimed = []
            for t in readable(TaskRow, rows)[:limit]:
                values = {
                    "state": "running",
                    "lease_id": new_lease_id(),
                    "delegate_id": delegate.id,
                    "delegate_name": delegate.name,
                    "lease_expires_at": now + lease_seconds,
                    "started_at": now,
                    "attempts": t.attempts + 1,
                    "lease_seq": t.lease_seq + 1,
                }
                if self._update("tasks", "id", t.id, values, where=("state='queued'", ())):
                    claimed.append(with_updates(t, **values))
        return claimed

    async def update_task(self, task_id: str, *, expect: Expect | None = None, **values: Any) -> bool:
        if expect is None:
            return self._update("tasks", "id", task_id, values)
        state, lease_id, lease_seq = expect
        return self._update(
            "tasks",
            "id",
            task_id,
            values,
            where=("state=? AND lease_id IS ? AND lease_seq=?", (state, lease_id, lease_seq)),
        )

    async def purge_done_tasks(self, older_than: float) -> int:
        return self._write("DELETE FROM tasks WHERE state='done' AND completed_at < ?", (older_than,)).rowcount

    async def queue_depth(self) -> dict[QueueKey, int]:
        rows = self._db.execute("SELECT type, selectors, COUNT(*) FROM tasks WHERE state='queued' GROUP BY 1, 2")
        depth: dict[QueueKey, int] = {}
        for r in rows:
            with contextlib.suppress(ValueError, TypeError):
                key = (str(r[0]), tuple(decode_json(r[1])))
                depth[key] = depth.get(key, 0) + int(r[2])
        return depth

    async def in_flight(self) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT delegate_id, COUNT(*) FROM tasks WHERE state='running' AND lease_id IS NOT NULL GROUP BY 1"
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def latencies(self) -> list[float]:
        return [
            float(r[0])
            for r in self._db.execute(
                "SELECT completed_at - created_at FROM tasks WHERE state='done' AND result_lease_id IS NOT NULL"
            )
        ]

    async def count_done_by_status(self) -> dict[str, int]:
        return {
            str(r[0]): int(r[1])
            for r in self._db.execute("SELECT status, COUNT(*) FROM tasks WHERE state='done' GROUP BY status")
        }

    async def count_failures_by_reason(self) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT COALESCE(failure_reason, json_extract(result, '$.failure.category'), 'unknown'), COUNT(*) "
            "FROM tasks WHERE state='done' AND status='FAILURE' GROUP BY 1"
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def count_tasks(self) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in self._db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state")}

    # --- connectors --------------------------------------------------------------------------

    async def put_connector(
        self, identifier: str, name: str, body: dict[str, Any], now: float
    ) -> Literal["created", "updated", "unchanged"]:
        async with self.transaction():
            outcome = connector_change(await self.get_connector(identifier), name, body)
            if outcome == "created":
                self._upsert("connectors", ConnectorRow(identifier, name, body, now, now), "identifier")
            elif outcome == "updated":
                self._update("connectors", "identifier", identifier, {"name": name, "body": body, "updated_at": now})
        return outcome

    async def get_connector(self, identifier: str) -> ConnectorRow | None:
        row = self._db.execute("SELECT * FROM connectors WHERE identifier=?", (identifier,)).fetchone()
        return None if row is None else decode_row(ConnectorRow, row)

    async def connectors(self) -> list[ConnectorRow]:
        rows = self._db.execute("SELECT * FROM connectors ORDER BY identifier").fetchall()
        return readable(ConnectorRow, rows)

    async def delete_connector(self, identifier: str) -> bool:
        return self._write("DELETE FROM connectors WHERE identifier=?", (identifier,)).rowcount > 0

    async def update_connector(self, identifier: str, **values: Any) -> None:
        self._update("connectors", "identifier", identifier, values)

    async def due_connectors(self, now: float, limit: int) -> list[ConnectorRow]:
        rows = self._db.execute(
            "SELECT * FROM connectors WHERE next_test_at IS NOT NULL AND next_test_at <= ? "
            "ORDER BY next_test_at LIMIT ?",
            (now, limit),
        ).fetchall()
        return readable(ConnectorRow, rows)

    async def connector_testing(self, identifier: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM tasks WHERE connector_id=? AND state IN ('queued', 'running') LIMIT 1", (identifier,)
        ).fetchone()
        return row is not None

    async def reschedule_connector(
        self, identifier: str, *, was: float | None, to: float | None, trigger: str | None = None
    ) -> bool:
        values = {"next_test_at": to, "next_trigger": trigger}
        return self._update("connectors", "identifier", identifier, values, where=("next_test_at IS ?", (was,)))

    async def add_history(self, row: HistoryRow, keep: int) -> None:
        names, values = row_columns(row)
        async with self.transaction():
            self._write(
                f"INSERT OR REPLACE INTO connector_history({', '.join(names)}) VALUES({', '.join('?' * len(names))})",
                values,
            )
            self._write(
                "DELETE FROM connector_history WHERE connector_id=? AND task_id NOT IN (SELECT task_id FROM "
                "connector_history WHERE connector_id=? ORDER BY tested_at DESC, task_id DESC LIMIT ?)",
                (row.connector_id, row.connector_id, keep),
            )

    async def connector_history(self, identifier: str, limit: int) -> list[HistoryRow]:
        rows = self._db.execute(
            "SELECT * FROM connector_history WHERE connector_id=? ORDER BY tested_at DESC, task_id DESC LIMIT ?",
            (identifier, limit),
        ).fetchall()
        return readable(HistoryRow, rows)

    async def health_summary(self, now: float, default_interval: float) -> HealthSummary:
        by_status = {
            str(r[0]): int(r[1])
            for r in self._db.execute("SELECT health_status, COUNT(*) FROM connectors GROUP BY health_status")
        }
        failing = self._db.execute(
            "SELECT MAX(? - failing_since) FROM connectors WHERE health_status='FAILURE' AND failing_since IS NOT NULL",
            (now,),
        ).fetchone()[0]
        untested = self._db.execute(
            "SELECT MAX((? - COALESCE(last_tested_at, created_at)) / COALESCE(test_interval, ?)) FROM connectors "
            "WHERE COALESCE(test_interval, ?) > 0",
            (now, default_interval, default_interval),
        ).fetchone()[0]
        return HealthSummary(by_status, max(0.0, float(failing or 0)), max(0.0, float(untested or 0)))

    # --- tokens ------------------------------------------------------------------------------

    async def revoked_tokens(self) -> dict[str, float]:
        return {str(r[0]): float(r[1]) for r in self._db.execute("SELECT kid, revoked_at FROM revoked_tokens")}

    async def issued_tokens(self) -> list[tuple[str, str, bytes, float]]:
        rows = self._db.execute("SELECT name, kid, signing_key, created_at FROM issued_tokens ORDER BY created_at")
        return [(str(r[0]), str(r[1]), bytes(r[2]), float(r[3])) for r in rows]

    async def add_issued_token(
        self, name: str, kid: str, signing_key: bytes, now: float, *, scope: StoredScope = (None, None)
    ) -> None:
        names, tags = encode_scope(scope)
        self._write(
            "INSERT INTO issued_tokens(kid, name, signing_key, created_at, scope_names, scope_tags) "
            "VALUES(?, ?, ?, ?, ?, ?)",
            (kid, name, signing_key, now, names, tags),
        )

    async def issued_token_scopes(self) -> dict[str, StoredScope]:
        rows = self._db.execute("SELECT kid, scope_names, scope_tags FROM issued_tokens")
        return {str(r[0]): decode_scope(r[1], r[2]) for r in rows}

    async def revoke_token(self, kid: str, name: str, now: float) -> None:
        self._write("INSERT OR IGNORE INTO revoked_tokens(kid, name, revoked_at) VALUES(?, ?, ?)", (kid, name, now))

    # --- helpers -----------------------------------------------------------------------------

    def _upsert(self, table: str, row: DelegateRow | TaskRow | ConnectorRow, key: str) -> None:
        names, values = row_columns(row)
        updates = ", ".join(f"{n}=excluded.{n}" for n in names if n != key)
        self._write(
            f"INSERT INTO {table}({', '.join(names)}) VALUES({', '.join('?' * len(names))}) "
            f"ON CONFLICT({key}) DO UPDATE SET {updates}",
            values,
        )

    def _update(
        self,
        table: str,
        key: str,
        key_value: str,
        values: dict[str, Any],
        *,
        where: tuple[str, Sequence[Any]] = ("1", ()),
    ) -> bool:
        if not values:
            return True
        cols: Sequence[str] = list(values)
        sets = ", ".join(f"{c}=?" for c in cols)
        cursor = self._write(
            f"UPDATE {table} SET {sets} WHERE {key}=? AND {where[0]}",
            [*(encode_value(c, values[c]) for c in cols), key_value, *where[1]],
        )
        return cursor.rowcount > 0


def _reason(path: Path | None, exc: sqlite3.Error) -> str:
    return f"cannot write to the database {path or ':memory:'}: {exc}"


def _damaged(path: Path | None, detail: str) -> DataFileDamaged:
    return DataFileDamaged(
        f"the control plane's database {path} is damaged ({detail}): stop the control plane, move "
        f"{path.name if path else 'it'} and its -wal and -shm files aside (e.g. into a damaged/ folder) and start "
        "again with an empty database (then apply the connectors again), or restore a backup"
    )
