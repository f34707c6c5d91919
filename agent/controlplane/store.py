"""SQLite persistence for the reference control plane.

The database under the data dir is the truth: delegates, tasks (with their leases and results),
connectors and revoked tokens all survive a restart. Calls are synchronous and short (a few
hundred microseconds in WAL mode), so the event loop calls them directly.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
import structlog

from agent._files import DataFileDamaged
from agent._sqlite import wal_damage
from agent.protocol.results import ValidationResult

_SCHEMA = """
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

#: Columns added after a table was first shipped: (table, column, type), added to older databases at open.
_ADDED_COLUMNS = (
    ("issued_tokens", "scope_names", "TEXT"),
    ("issued_tokens", "scope_tags", "TEXT"),
)

#: A token's scope as stored: delegate name patterns and tag patterns, None meaning any.
StoredScope = tuple[tuple[str, ...] | None, tuple[str, ...] | None]

log = structlog.get_logger("controlplane.store")

_json = msgspec.json.Encoder()
_unjson = msgspec.json.Decoder()
_unjson_result = msgspec.json.Decoder(ValidationResult)


@dataclass(frozen=True)
class DelegateRow:
    id: str
    name: str
    instance_id: str
    hostname: str | None
    tags: tuple[str, ...]
    version: str
    task_types: tuple[str, ...]
    capacity: int
    state: str  # running | draining | deregistered | lost (older rows: disconnected, read as lost)
    in_flight: int
    token_name: str | None
    registered_at: float
    last_heartbeat: float


@dataclass(frozen=True)
class TaskRow:
    id: str
    type: str
    payload: dict[str, Any]
    selectors: tuple[str, ...]
    connector_id: str | None
    state: str  # queued | running | done
    created_at: float
    pickup_timeout: float
    pickup_deadline: float
    timeout_seconds: float
    attempts: int
    max_attempts: int
    lease_id: str | None = None
    delegate_id: str | None = None
    delegate_name: str | None = None
    lease_expires_at: float | None = None
    started_at: float | None = None
    cancel_requested: bool = False
    result: ValidationResult | None = None
    result_lease_id: str | None = None
    status: str | None = None
    failure_reason: str | None = None
    completed_at: float | None = None
    signature: str | None = None


@dataclass(frozen=True)
class ConnectorRow:
    identifier: str
    name: str
    body: dict[str, Any]
    created_at: float
    updated_at: float
    last_task_id: str | None = None
    last_status: str | None = None
    last_tested_at: float | None = None
    last_delegate_name: str | None = None
    last_error_summary: str | None = None


_JSON_COLUMNS = {"tags", "task_types", "payload", "selectors", "result", "body"}
_TUPLE_COLUMNS = {"tags", "task_types", "selectors"}


def _encode(name: str, value: Any) -> Any:
    if name in _JSON_COLUMNS and value is not None:
        return _json.encode(list(value) if isinstance(value, tuple) else value).decode()
    if isinstance(value, bool):
        return int(value)
    return value


class RowDamaged(Exception):
    """A stored row that no longer reads as what was written (a flipped bit, a hand edit)."""

    def __init__(self, table: str, key: str, reason: str) -> None:
        super().__init__(f"the stored {table} {key!r} is damaged ({reason[:200]})")
        self.table, self.key = table, key


#: Stored states a row may be in (anything else is damage, not a state).
_STATES = {"TaskRow": {"queued", "running", "done"}}
_NUMBER = (int, float)
_KINDS: dict[str, tuple[type, ...]] = {
    "float": _NUMBER,
    "float | None": (*_NUMBER, type(None)),
    "int": (int,),
    "str": (str,),
    "str | None": (str, type(None)),
}


def _decode_row(cls: type[Any], row: sqlite3.Row) -> Any:
    """The row as ``cls``; :class:`RowDamaged` naming it when a value is not what was written."""
    kwargs: dict[str, Any] = {}
    try:
        for f in fields(cls):
            value = row[f.name]
            if f.name == "result" and value is not None:
                value = _decode_result(value)
            elif f.name in _JSON_COLUMNS and value is not None:
                value = _unjson.decode(value)
                if f.name in _TUPLE_COLUMNS:
                    value = tuple(value)
            elif f.name == "cancel_requested":
                value = bool(value)
            elif isinstance(f.type, str) and f.type in _KINDS and not isinstance(value, _KINDS[f.type]):
                raise ValueError(f"{f.name} is {value!r:.40}, not {f.type}")
            kwargs[f.name] = value
        if kwargs.get("state") not in _STATES.get(cls.__name__, {kwargs.get("state")}):
            raise ValueError(f"state {kwargs.get('state')!r:.40} is not a state")
        return cls(**kwargs)
    except (msgspec.MsgspecError, ValueError, TypeError, KeyError) as exc:
        key = str(row["id"] if "id" in row.keys() else row["identifier"])  # noqa: SIM118 - Row's "in" reads values
        raise RowDamaged(cls.__name__.removesuffix("Row").lower(), key, str(exc)) from None


def _readable(cls: type[Any], rows: list[sqlite3.Row]) -> list[Any]:
    """Every row that reads; a damaged one is named in the log (once per process) and left out."""
    out = []
    for r in rows:
        try:
            out.append(_decode_row(cls, r))
        except RowDamaged as exc:
            if (exc.table, exc.key) not in _reported:
                _reported.add((exc.table, exc.key))
                log.error(
                    "controlplane.row_damaged",
                    error=str(exc),
                    hint="left out of every list and of the queue; delete or repair the row, or restore a backup",
                )
    return out


_reported: set[tuple[str, str]] = set()


def _decode_result(raw: str) -> ValidationResult:
    try:
        return _unjson_result.decode(raw)
    except msgspec.ValidationError:
        # Written before results were typed: control-plane failures carried Harness's numeric code.
        doc = _unjson.decode(raw)
        for error in doc.get("errors") or []:
            error["code"] = str(error.get("code", ""))
        return msgspec.convert(doc, ValidationResult)


#: The database holds task payloads (role ARNs, External IDs) and token hashes: its owner's alone.
DB_MODE = 0o600


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


#: The write-ahead log is truncated back to this after a checkpoint.
WAL_LIMIT_BYTES = 1024 * 1024


class Store:
    """All durable state. ``path=None`` keeps everything in memory (tests, throwaway runs)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
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
                # Keep the write-ahead log small (checkpoint at 1 MiB, truncate back to 1 MiB): left at
                # SQLite's 4 MiB it filled a small volume by itself, with nothing an operator could free.
                self._db.execute("PRAGMA wal_autocheckpoint=256")
                self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
                check = [str(r[0]) for r in self._db.execute("PRAGMA quick_check").fetchall()]
                if check != ["ok"]:
                    raise _damaged(path, "quick_check: " + "; ".join(check[:3]))
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
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
        self._depth = 0
        self._after_commit: list[Callable[[], None]] = []
        #: Why the last write failed (disk full, I/O error); None once a write succeeds again.
        self.fault: str | None = None
        #: Called after a write failed and was rolled back: the owner rebuilds what it keeps in memory.
        self.on_write_failure: Callable[[], None] = lambda: None

    def _migrate(self) -> None:
        """Bring a database written by an older version up to the schema (additive changes only)."""
        for table, column, kind in _ADDED_COLUMNS:
            have = {str(r[1]) for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes; nested uses join the outer transaction. Failure: rolled back, :class:`StoreUnavailable`."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._failed(exc) from None
        self._depth = 1
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException as exc:
            self._after_commit.clear()
            if self._db.in_transaction:  # SQLite may already have rolled back (SQLITE_FULL)
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            self._depth = 0
            if isinstance(exc, sqlite3.Error):
                raise self._failed(exc) from None
            if isinstance(exc, StoreUnavailable):
                self._failed(None)
            raise
        self._depth = 0
        self.fault = None
        self._run_after_commit()

    def after_commit(self, effect: Callable[[], None]) -> None:
        """Run ``effect`` once the current transaction commits (at once outside one); never if it rolls back.

        Logs, metrics and wakeups that announce a change go here, so nothing announces a change the
        disk refused.
        """
        if self._depth:
            self._after_commit.append(effect)
        else:
            effect()

    def _run_after_commit(self) -> None:
        effects, self._after_commit = self._after_commit, []
        for effect in effects:
            effect()

    def _write(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            cursor = self._db.execute(sql, params)
        except sqlite3.Error as exc:
            if self._depth:  # the transaction rolls back, then reports
                self.fault = _reason(self.path, exc)
                raise StoreUnavailable(self.fault) from None
            raise self._failed(exc) from None
        if not self._depth:
            self.fault = None
        return cursor

    def _failed(self, exc: sqlite3.Error | None) -> StoreUnavailable:
        if exc is not None:
            self.fault = _reason(self.path, exc)
        self.on_write_failure()
        return StoreUnavailable(self.fault or "the database refused a write")

    def probe(self) -> bool:
        """One real write: True when the database takes writes (again)."""
        with contextlib.suppress(sqlite3.Error):
            # Fold the log into the database first: it frees the log's space when the pages fit.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            self._write("INSERT INTO counters(name, value) VALUES('probe', 0) ON CONFLICT(name) DO UPDATE SET value=0")
        except StoreUnavailable:
            return False
        return True

    def bump(self, name: str, by: int = 1) -> None:
        self._write(
            "INSERT INTO counters(name, value) VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET "
            "value = value + excluded.value",
            (name, by),
        )

    def counters(self) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in self._db.execute("SELECT name, value FROM counters")}

    # --- delegates ---------------------------------------------------------------------------

    def save_delegate(self, row: DelegateRow) -> None:
        self._upsert("delegates", row, "id")

    def get_delegate(self, delegate_id: str) -> DelegateRow | None:
        row = self._db.execute("SELECT * FROM delegates WHERE id=?", (delegate_id,)).fetchone()
        return None if row is None else _decode_row(DelegateRow, row)

    def delegate_by_instance(self, instance_id: str) -> DelegateRow | None:
        row = self._db.execute("SELECT * FROM delegates WHERE instance_id=?", (instance_id,)).fetchone()
        return None if row is None else _decode_row(DelegateRow, row)

    def delegates(self) -> list[DelegateRow]:
        rows = self._db.execute("SELECT * FROM delegates ORDER BY registered_at").fetchall()
        return _readable(DelegateRow, rows)

    def update_delegate(self, delegate_id: str, **values: Any) -> None:
        self._update("delegates", "id", delegate_id, values)

    def delete_delegate(self, delegate_id: str) -> bool:
        return self._write("DELETE FROM delegates WHERE id=?", (delegate_id,)).rowcount > 0

    # --- tasks -------------------------------------------------------------------------------

    def insert_task(self, row: TaskRow) -> None:
        self._upsert("tasks", row, "id")

    def get_task(self, task_id: str) -> TaskRow | None:
        row = self._db.execute("SELECT * FROM tasks WHERE id=?", (task_id,)).fetchone()
        return None if row is None else _decode_row(TaskRow, row)

    def tasks_in_state(self, state: str) -> list[TaskRow]:
        rows = self._db.execute("SELECT * FROM tasks WHERE state=? ORDER BY created_at", (state,)).fetchall()
        return _readable(TaskRow, rows)

    def list_tasks(
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
        return _readable(TaskRow, rows)

    def latencies(self) -> list[float]:
        """Seconds from creation to completion of every finished task that a delegate ran."""
        return [
            float(r[0])
            for r in self._db.execute(
                "SELECT completed_at - created_at FROM tasks WHERE state='done' AND result_lease_id IS NOT NULL"
            )
        ]

    def count_done_by_status(self) -> dict[str, int]:
        return {
            str(r[0]): int(r[1])
            for r in self._db.execute("SELECT status, COUNT(*) FROM tasks WHERE state='done' GROUP BY status")
        }

    def count_failures_by_reason(self) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT COALESCE(failure_reason, json_extract(result, '$.failure.category'), 'unknown'), COUNT(*) "
            "FROM tasks WHERE state='done' AND status='FAILURE' GROUP BY 1"
        )
        return {str(r[0]): int(r[1]) for r in rows}

    def count_tasks(self) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in self._db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state")}

    def count_leased(self) -> int:
        """Tasks running under a lease (the index over them must hold as many)."""
        return int(
            self._db.execute("SELECT COUNT(*) FROM tasks WHERE state='running' AND lease_id IS NOT NULL").fetchone()[0]
        )

    def update_task(self, task_id: str, *, expect: tuple[str, str | None] | None = None, **values: Any) -> bool:
        """Change a task; with ``expect=(state, lease_id)`` only if it is still in that state under that lease.

        Every state transition passes ``expect``: a transition decided on a stale view (a second
        process, a lost update) changes nothing and returns False instead of overwriting a result.
        """
        if expect is None:
            return self._update("tasks", "id", task_id, values)
        state, lease_id = expect
        return self._update("tasks", "id", task_id, values, where=("state=? AND lease_id IS ?", (state, lease_id)))

    def purge_done_tasks(self, older_than: float) -> int:
        return self._write("DELETE FROM tasks WHERE state='done' AND completed_at < ?", (older_than,)).rowcount

    # --- connectors --------------------------------------------------------------------------

    def put_connector(
        self, identifier: str, name: str, body: dict[str, Any], now: float
    ) -> Literal["created", "updated", "unchanged"]:
        existing = self.get_connector(identifier)
        outcome = connector_change(existing, name, body)
        if outcome == "created":
            self._upsert("connectors", ConnectorRow(identifier, name, body, now, now), "identifier")
        elif outcome == "updated":
            self._update("connectors", "identifier", identifier, {"name": name, "body": body, "updated_at": now})
        return outcome

    def get_connector(self, identifier: str) -> ConnectorRow | None:
        row = self._db.execute("SELECT * FROM connectors WHERE identifier=?", (identifier,)).fetchone()
        return None if row is None else _decode_row(ConnectorRow, row)

    def connectors(self) -> list[ConnectorRow]:
        rows = self._db.execute("SELECT * FROM connectors ORDER BY identifier").fetchall()
        return _readable(ConnectorRow, rows)

    def delete_connector(self, identifier: str) -> bool:
        return self._write("DELETE FROM connectors WHERE identifier=?", (identifier,)).rowcount > 0

    def update_connector(self, identifier: str, **values: Any) -> None:
        self._update("connectors", "identifier", identifier, values)

    # --- tokens ------------------------------------------------------------------------------

    def revoked_tokens(self) -> dict[str, float]:
        return {str(r[0]): float(r[1]) for r in self._db.execute("SELECT kid, revoked_at FROM revoked_tokens")}

    def issued_tokens(self) -> list[tuple[str, str, bytes, float]]:
        """Tokens this server created: (name, kid, derived signing key, created at). Never the token itself."""
        rows = self._db.execute("SELECT name, kid, signing_key, created_at FROM issued_tokens ORDER BY created_at")
        return [(str(r[0]), str(r[1]), bytes(r[2]), float(r[3])) for r in rows]

    def add_issued_token(
        self, name: str, kid: str, signing_key: bytes, now: float, *, scope: StoredScope = (None, None)
    ) -> None:
        names, tags = (None if v is None else _json.encode(list(v)).decode() for v in scope)
        self._write(
            "INSERT INTO issued_tokens(kid, name, signing_key, created_at, scope_names, scope_tags) "
            "VALUES(?, ?, ?, ?, ?, ?)",
            (kid, name, signing_key, now, names, tags),
        )

    def issued_token_scopes(self) -> dict[str, StoredScope]:
        """The scope of each token this server created, by kid (tokens made before scopes: any)."""
        rows = self._db.execute("SELECT kid, scope_names, scope_tags FROM issued_tokens")
        return {
            str(r[0]): (
                None if r[1] is None else tuple(_unjson.decode(r[1])),
                None if r[2] is None else tuple(_unjson.decode(r[2])),
            )
            for r in rows
        }

    def revoke_token(self, kid: str, name: str, now: float) -> None:
        self._write("INSERT OR IGNORE INTO revoked_tokens(kid, name, revoked_at) VALUES(?, ?, ?)", (kid, name, now))

    # --- helpers -----------------------------------------------------------------------------

    def _upsert(self, table: str, row: Any, key: str) -> None:
        names = [f.name for f in fields(row)]
        values = [_encode(n, getattr(row, n)) for n in names]
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
            [*(_encode(c, values[c]) for c in cols), key_value, *where[1]],
        )
        return cursor.rowcount > 0


R = TypeVar("R")


class StoreUnavailable(Exception):
    """The database refused a write (disk full, I/O error); the change was rolled back, nothing half-done."""


def _reason(path: Path | None, exc: sqlite3.Error) -> str:
    return f"cannot write to the database {path or ':memory:'}: {exc}"


def _damaged(path: Path | None, detail: str) -> DataFileDamaged:
    return DataFileDamaged(
        f"the control plane's database {path} is damaged ({detail}): stop the control plane, move "
        f"{path.name if path else 'it'} and its -wal and -shm files aside (e.g. into a damaged/ folder) and start "
        "again with an empty database (then apply the connectors again), or restore a backup"
    )


def connector_change(
    existing: ConnectorRow | None, name: str, body: dict[str, Any]
) -> Literal["created", "updated", "unchanged"]:
    """What storing ``name`` and ``body`` over ``existing`` does (shared by apply and its dry run)."""
    if existing is None:
        return "created"
    return "unchanged" if existing.body == body and existing.name == name else "updated"


def with_updates(row: R, **values: Any) -> R:
    """A copy of a frozen row with some fields changed (the in-memory mirror of an UPDATE)."""
    return replace(row, **values)  # type: ignore[type-var]
