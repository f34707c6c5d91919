"""The control plane's store on PostgreSQL: several replicas behind one Service share it.

Same tables and columns as SQLite (JSON as text, times as seconds since the epoch), so
:func:`~.base.decode_row` reads asyncpg's records as it reads sqlite3's rows. What Postgres adds:

- claims take rows with ``FOR UPDATE SKIP LOCKED``: two replicas never lease one task, and neither
  waits for the other;
- every lease carries ``lease_seq``, the fencing number each later write of that lease names;
- events reach other replicas with ``pg_notify`` issued inside the transaction (delivered only on
  commit), heard on one dedicated connection that reconnects by itself; a long poll also looks
  again every ``poll_backstop`` seconds, so a notification lost in an outage delays, never loses;
- the sweeps run in a transaction holding an advisory lock: one replica sweeps, the others skip;
- migrations are numbered and applied at connect under an advisory lock, so replicas starting
  together do not race, and a schema newer than this code is refused.

Behind PgBouncer in transaction mode (``?pgbouncer=transaction`` on the URL) prepared statements
are not cached and LISTEN is off unless ``listen_url`` names a direct connection; wakeups then come
from the poll backstop. Advisory locks are transaction-scoped, so they work through PgBouncer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]
import structlog

from agent.controlplane.store.base import (
    ConnectorRow,
    DelegateRow,
    Expect,
    HealthSummary,
    HistoryRow,
    QueueKey,
    RowDamaged,
    SchemaTooNew,
    StoredScope,
    StoreEvent,
    StoreUnavailable,
    TaskDone,
    TaskQueued,
    TaskRow,
    connector_change,
    decode_json,
    decode_row,
    decode_scope,
    encode_json,
    encode_scope,
    encode_value,
    new_lease_id,
    readable,
    row_columns,
    url_password,
)

log = structlog.get_logger("controlplane.store")

#: The NOTIFY channel every replica listens on.
CHANNEL = "delegate_agent"
#: Advisory lock keys (arbitrary constants, unlikely to collide with another application's).
MIGRATION_LOCK = 0x64_61_67_6D  # "dagm"
SWEEP_LOCK = 0x64_61_67_73  # "dags"
#: Seconds to wait for a pooled connection, to connect, and for one command.
ACQUIRE_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 15.0
#: The listener checks its connection this often when it hears nothing (a silent network drop).
LISTEN_CHECK_SECONDS = 10.0
#: Back-off between the listener's reconnection attempts.
LISTEN_RETRY_FIRST, LISTEN_RETRY_MAX = 0.1, 5.0
#: NOTIFY payloads must stay under 8000 bytes.
NOTIFY_LIMIT = 7900

#: Failures that mean the database cannot be reached or cannot take writes now (not a bug in a query).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # class 08, ConnectionDoesNotExistError among them
    asyncpg.InterfaceError,  # the connection is closed, or in an unusable state
    asyncpg.InternalClientError,  # a connection caught in a protocol state it cannot leave (server going down)
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now, statement timeout
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full, out of memory
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a standby after a failover
    OSError,  # connection refused, reset, no route
    TimeoutError,  # acquire, connect or command timeout
)

_MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
CREATE TABLE delegates(
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
    registered_at DOUBLE PRECISION NOT NULL,
    last_heartbeat DOUBLE PRECISION NOT NULL
);
CREATE TABLE tasks(
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    selectors TEXT NOT NULL,
    connector_id TEXT,
    state TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    pickup_timeout DOUBLE PRECISION NOT NULL,
    pickup_deadline DOUBLE PRECISION NOT NULL,
    timeout_seconds DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    lease_id TEXT,
    delegate_id TEXT,
    delegate_name TEXT,
    lease_expires_at DOUBLE PRECISION,
    started_at DOUBLE PRECISION,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    result_lease_id TEXT,
    status TEXT,
    failure_reason TEXT,
    completed_at DOUBLE PRECISION,
    signature TEXT,
    lease_seq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX tasks_queued ON tasks(created_at) WHERE state = 'queued';
CREATE INDEX tasks_state ON tasks(state);
CREATE INDEX tasks_lease ON tasks(lease_id);
CREATE INDEX tasks_connector ON tasks(connector_id, created_at);
CREATE TABLE connectors(
    identifier TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    last_task_id TEXT,
    last_status TEXT,
    last_tested_at DOUBLE PRECISION,
    last_delegate_name TEXT,
    last_error_summary TEXT
);
CREATE TABLE counters(name TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE marks(name TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL);
CREATE TABLE revoked_tokens(kid TEXT PRIMARY KEY, name TEXT NOT NULL, revoked_at DOUBLE PRECISION NOT NULL);
CREATE TABLE issued_tokens(
    kid TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, signing_key BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, scope_names TEXT, scope_tags TEXT
);
-- JSON text that may have been damaged (a hand edit) reads as NULL instead of failing the whole query.
CREATE FUNCTION delegate_agent_jsonb(doc TEXT) RETURNS JSONB LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN doc::jsonb;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$;
""",
    ),
    (
        2,
        """
ALTER TABLE connectors ADD COLUMN health_status TEXT NOT NULL DEFAULT 'UNKNOWN';
ALTER TABLE connectors ADD COLUMN last_connected_at DOUBLE PRECISION;
ALTER TABLE connectors ADD COLUMN last_failure TEXT;
ALTER TABLE connectors ADD COLUMN failures_in_row INTEGER NOT NULL DEFAULT 0;
ALTER TABLE connectors ADD COLUMN failing_since DOUBLE PRECISION;
ALTER TABLE connectors ADD COLUMN backoff INTEGER NOT NULL DEFAULT 0;
ALTER TABLE connectors ADD COLUMN test_interval DOUBLE PRECISION;
ALTER TABLE connectors ADD COLUMN next_test_at DOUBLE PRECISION;
ALTER TABLE connectors ADD COLUMN next_trigger TEXT;
ALTER TABLE tasks ADD COLUMN trigger TEXT;
CREATE INDEX IF NOT EXISTS connectors_due ON connectors(next_test_at);
CREATE TABLE IF NOT EXISTS connector_history(
    task_id TEXT PRIMARY KEY,
    connector_id TEXT NOT NULL,
    tested_at DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL,
    trigger TEXT NOT NULL,
    delegate_name TEXT,
    error_summary TEXT,
    failure TEXT,
    duration_ms INTEGER
);
CREATE INDEX IF NOT EXISTS connector_history_by ON connector_history(connector_id, tested_at);
""",
    ),
]

#: The newest schema this code knows.
SCHEMA_VERSION = _MIGRATIONS[-1][0]

#: Selectors as msgspec writes them (a flat array of plain strings) cast to jsonb directly; anything
#: else goes through the forgiving function, so one damaged row cannot fail every claim.
_PLAIN_ARRAY = r'^\[("[^"\\]*"(,"[^"\\]*")*)?\]$'
_SELECTORS = f"(CASE WHEN selectors ~ '{_PLAIN_ARRAY}' THEN selectors::jsonb ELSE delegate_agent_jsonb(selectors) END)"

_CLAIM_SELECT = f"""
SELECT * FROM tasks
WHERE state = 'queued' AND type = ANY($1::text[]) AND pickup_deadline >= $2
  AND {_SELECTORS} <@ $3::jsonb AND NOT (id = ANY($5::text[]))
ORDER BY created_at, id
LIMIT $4
FOR UPDATE SKIP LOCKED
"""

_CLAIM_UPDATE = """
UPDATE tasks SET state = 'running', lease_id = leased.lease_id, delegate_id = $3, delegate_name = $4,
    lease_expires_at = $5, started_at = $6, attempts = attempts + 1, lease_seq = lease_seq + 1
FROM unnest($1::text[], $2::text[]) AS leased(id, lease_id)
WHERE tasks.id = leased.id
RETURNING tasks.*
"""

_COLUMNS = {
    "delegates": frozenset(f.name for f in fields(DelegateRow)),
    "tasks": frozenset(f.name for f in fields(TaskRow)),
    "connectors": frozenset(f.name for f in fields(ConnectorRow)),
}


def redacted_url(url: str) -> str:
    """``url`` with its password (in the authority or a ``password=`` parameter) replaced by ``***``."""
    password = url_password(url)
    if password:
        scheme, sep, rest = url.partition("://")
        authority, q, tail = rest.partition("?")
        userinfo, _, host = authority.rpartition("@")
        url = f"{scheme}{sep}{userinfo.partition(':')[0]}:***@{host}{q}{tail}"
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "password" for k, _ in query):
        masked = [(k, "***" if k == "password" else v) for k, v in query]
        parts = parts._replace(query=urlencode(masked, safe="*"))
    return urlunsplit(parts)


def _pgbouncer_mode(url: str) -> tuple[str, bool]:
    """The URL asyncpg gets (without ``pgbouncer=``, which it would send as a server setting) and
    whether it points at PgBouncer in transaction mode."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    modes = [v for k, v in query if k == "pgbouncer"]
    if any(m not in ("transaction", "session") for m in modes):
        raise ValueError(f"pgbouncer= takes 'transaction' or 'session', not {modes[0]!r} ({redacted_url(url)})")
    rest = urlencode([(k, v) for k, v in query if k != "pgbouncer"])
    return urlunsplit(parts._replace(query=rest)), "transaction" in modes


@dataclass
class _Transaction:
    """The connection a transaction runs on and what waits for its commit."""

    conn: Any
    effects: list[Callable[[], None]] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


class PostgresStore:
    """The :class:`~.base.Store` on PostgreSQL; :meth:`connect` makes one."""

    kind = "postgres"
    shared = True

    def __init__(self, pool: Any, *, url: str, listen_url: str | None, poll_backstop: float, bouncer: bool) -> None:
        self._pool = pool
        self._url = url
        self._secrets = _secrets_of(url) | (_secrets_of(listen_url) if listen_url else set())
        self._listen_url = listen_url
        self._bouncer = bouncer
        self.poll_backstop: float | None = poll_backstop
        self.fault: str | None = None
        #: Tells this store's notifications from other processes' (and other stores' in one process).
        self._origin = uuid.uuid4().hex
        self._tx: ContextVar[_Transaction | None] = ContextVar(f"pg_transaction_{self._origin}", default=None)
        self._listeners: list[Callable[[StoreEvent], None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._listen_task: asyncio.Task[None] | None = None
        self._sweeping = asyncio.Lock()
        #: Set while the dedicated LISTEN connection is up (tests and readiness may look).
        self.listening = asyncio.Event()

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        min_size: int = 0,
        max_size: int = 10,
        listen_url: str | None = None,
        poll_backstop: float = 1.0,
    ) -> PostgresStore:
        """Open a pool on ``url``, bring the schema up to date and start listening for other replicas.

        The pool keeps no floor of idle connections by default: asyncpg would log a traceback for
        every failed attempt to restore one while Postgres is down, and the next call connects anyway.

        Raises :class:`StoreUnavailable` when the database cannot be reached and :class:`SchemaTooNew`
        when a newer version of this program has migrated it.
        """
        dsn, bouncer = _pgbouncer_mode(url)
        settings = {"application_name": "delegate-agent-control-plane"}
        if not bouncer:  # PgBouncer refuses startup parameters it does not know
            settings["statement_timeout"] = str(int(COMMAND_TIMEOUT * 1000))
        secrets = _secrets_of(url)
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                statement_cache_size=0 if bouncer else 100,
                server_settings=settings,
            )
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:  # refused, unknown database, bad password
            raise StoreUnavailable(
                _masked(f"cannot connect to {redacted_url(url)}: {_describe(exc)}", secrets)
            ) from None
        except ValueError as exc:  # a malformed URL; asyncpg's message may quote it
            raise ValueError(_masked(f"{redacted_url(url)}: {exc}", secrets)) from None
        store = cls(pool, url=url, listen_url=listen_url, poll_backstop=poll_backstop, bouncer=bouncer)
        try:
            await store._migrate()
        except (asyncpg.PostgresError, OverflowError, ValueError) as exc:
            # The pool connects on first use, so this is where a wrong password, an unknown database
            # or a port out of range shows: one line, the password masked, never a traceback.
            await pool.close()
            raise StoreUnavailable(
                _masked(f"cannot connect to {redacted_url(url)}: {_describe(exc)}", secrets)
            ) from None
        except BaseException:
            await pool.close()
            raise
        if bouncer and listen_url is None:
            log.warning(
                "controlplane.store.listen_off",
                url=redacted_url(url),
                reason="PgBouncer in transaction mode cannot LISTEN",
                hint=f"long polls see other replicas' tasks within {poll_backstop}s; give a direct listen URL "
                "for immediate wakeups",
            )
        else:
            store._listen_task = asyncio.create_task(store._listen(), name="controlplane.store.listen")
            # Ready means hearing the other replicas: a task announced before LISTEN would wait for the
            # backstop. If the listener cannot connect now it keeps trying (and says so) on its own.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(store.listening.wait(), CONNECT_TIMEOUT)
        return store

    async def close(self) -> None:
        if self._listen_task is not None:
            self._listen_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listen_task
        if self._background:
            await asyncio.wait(self._background, timeout=ACQUIRE_TIMEOUT)
        try:
            await asyncio.wait_for(self._pool.close(), timeout=ACQUIRE_TIMEOUT)
        except CONNECTION_ERRORS:  # TimeoutError among them
            self._pool.terminate()

    # --- schema -------------------------------------------------------------------------------

    async def _migrate(self) -> None:
        async with self._connection() as conn, conn.transaction():
            # Replicas starting together take turns; the lock ends with the transaction.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version("
                "version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            current = int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
            if current > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"the database {redacted_url(self._url)} has schema version {current}, and this control plane "
                    f"knows versions up to {SCHEMA_VERSION}: a newer version of the control plane migrated it. "
                    "Upgrade this control plane to that version (never run an older one against a newer schema)"
                )
            for version, sql in _MIGRATIONS:
                if version > current:
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_version(version, applied_at) VALUES($1, $2)", version, time.time()
                    )
                    log.info("controlplane.store.migrated", version=version)

    # --- transactions and events --------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Group writes on one connection; nested uses (and every store call inside) join it.

        The connection is held in a context variable, so tasks started inside the transaction would
        share it: don't (asyncpg runs one command per connection at a time).
        """
        if self._tx.get() is not None:
            yield
            return
        async with self._connection() as conn:
            tx = _Transaction(conn)
            token = self._tx.set(tx)
            try:
                try:
                    await conn.execute("BEGIN")
                except CONNECTION_ERRORS as exc:
                    raise self._unavailable(exc) from None
                try:
                    yield
                    if tx.notices:
                        await conn.execute(
                            "SELECT pg_notify($1, notice) FROM unnest($2::text[]) AS notice", CHANNEL, tx.notices
                        )
                    await conn.execute("COMMIT")
                except BaseException as exc:
                    await self._rollback(conn)
                    if isinstance(exc, CONNECTION_ERRORS):
                        raise self._unavailable(exc) from None
                    if isinstance(exc, asyncpg.PostgresError):  # COMMIT refused (a serialization failure)
                        raise self._refused(exc) from None
                    raise
            finally:
                self._tx.reset(token)
        self.fault = None
        for effect in tx.effects:
            effect()

    async def _rollback(self, conn: Any) -> None:
        try:
            await asyncio.shield(conn.execute("ROLLBACK"))
        except (asyncio.CancelledError, *CONNECTION_ERRORS, asyncpg.PostgresError):
            # The pool replaces it; nothing half-done survives on it. A connection the server closed
            # is already back in the pool (detached): there is nothing left to end.
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()

    def after_commit(self, effect: Callable[[], None]) -> None:
        tx = self._tx.get()
        if tx is None:
            effect()
        else:
            tx.effects.append(effect)

    def announce(self, event: StoreEvent) -> None:
        notice = self._notice(event)
        tx = self._tx.get()
        if tx is not None:
            tx.notices.append(notice)
            tx.effects.append(lambda: self._deliver(event))
            return
        self._deliver(event)
        task = asyncio.get_running_loop().create_task(self._notify(notice), name="controlplane.store.notify")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def subscribe(self, listener: Callable[[StoreEvent], None]) -> None:
        self._listeners.append(listener)

    def _notice(self, event: StoreEvent) -> str:
        if isinstance(event, TaskQueued):
            doc: dict[str, Any] = {"o": self._origin, "e": "queued", "type": event.type, "selectors": event.selectors}
            notice = encode_json(doc)
            if len(notice.encode()) > NOTIFY_LIMIT:  # too long to send: every long poll of the type looks
                notice = encode_json({**doc, "selectors": None})
            return notice
        return encode_json({"o": self._origin, "e": "done", "task_id": event.task_id})

    async def _notify(self, notice: str) -> None:
        try:
            await self._execute("SELECT pg_notify($1, $2)", CHANNEL, notice)
        except StoreUnavailable as exc:
            log.warning("controlplane.store.notify_failed", error=str(exc))

    def _deliver(self, event: StoreEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("controlplane.store.listener_failed", event=repr(event))

    def _heard(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            doc = json.loads(payload)
            if doc.get("o") == self._origin:
                return
            if doc["e"] == "queued":
                selectors = doc["selectors"]
                event: StoreEvent = TaskQueued(str(doc["type"]), tuple(selectors) if selectors is not None else ())
            else:
                event = TaskDone(str(doc["task_id"]))
        except (ValueError, KeyError, TypeError):
            log.warning("controlplane.store.notice_unreadable", payload=payload[:200])
            return
        self._deliver(event)

    async def _listen(self) -> None:
        """Hold one LISTEN connection for as long as the store is open, reconnecting after an outage."""
        url = _pgbouncer_mode(self._listen_url or self._url)[0]
        delay, outage = LISTEN_RETRY_FIRST, False
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(
                    url,
                    timeout=CONNECT_TIMEOUT,
                    command_timeout=CONNECT_TIMEOUT,
                    server_settings={"application_name": "delegate-agent-control-plane-listen"},
                )
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._heard)
                self.listening.set()
                if outage:
                    log.info("controlplane.store.listen_restored", url=redacted_url(url))
                    # Whatever was announced during the outage was not heard: every waiting poll looks.
                    outage = False
                delay = LISTEN_RETRY_FIRST
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), LISTEN_CHECK_SECONDS)
                    if not lost.is_set():
                        await conn.fetchval("SELECT 1")  # a silent drop shows here
                raise ConnectionResetError("the LISTEN connection closed")
            except Exception as exc:  # whatever broke, the listener must come back: this loop never ends by itself
                self.listening.clear()
                if not outage:
                    outage = True
                    log.warning(
                        "controlplane.store.listen_lost",
                        url=redacted_url(url),
                        error=self._mask(_describe(exc)),
                        hint=f"reconnecting by itself; long polls look every {self.poll_backstop}s meanwhile",
                    )
            finally:
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY_MAX)

    @asynccontextmanager
    async def sweep_turn(self) -> AsyncIterator[bool]:
        """One replica sweeps per round: the others skip it. Sweeps in this process take turns instead
        (as on SQLite), so a sweep asked for while the background one runs is not silently skipped."""
        # The lock lives in a transaction of its own, on a connection of its own, for the sweep's
        # length; the sweep's writes are not part of it. Each transition commits alone, locking one task
        # and then a counter, in the order results and claims lock them: one big sweep transaction,
        # locking many tasks and counters in turn, deadlocked with them under load.
        async with self._sweeping:
            try:
                conn = await self._pool.acquire(timeout=ACQUIRE_TIMEOUT)
            except CONNECTION_ERRORS as exc:
                raise self._unavailable(exc) from None
            try:
                try:
                    await conn.execute("BEGIN")
                    mine = bool(await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", SWEEP_LOCK))
                except CONNECTION_ERRORS as exc:
                    raise self._unavailable(exc) from None
                try:
                    yield mine
                finally:
                    await self._rollback(conn)  # ends the lock's transaction (nothing was written in it)
            finally:
                with contextlib.suppress(*CONNECTION_ERRORS):
                    await self._pool.release(conn)

    async def probe(self) -> bool:
        try:
            await self._execute(
                "INSERT INTO counters(name, value) VALUES('probe', 0) ON CONFLICT(name) DO UPDATE SET value = 0"
            )
        except StoreUnavailable:
            return False
        return True

    # --- counters and marks ------------------------------------------------------------------

    async def bump(self, name: str, by: int = 1) -> None:
        await self._execute(
            "INSERT INTO counters(name, value) VALUES($1, $2) ON CONFLICT(name) DO UPDATE SET "
            "value = counters.value + excluded.value",
            name,
            by,
        )

    async def counters(self) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in await self._fetch("SELECT name, value FROM counters")}

    async def set_mark(self, name: str, at: float) -> None:
        await self._execute(
            "INSERT INTO marks(name, at) VALUES($1, $2) ON CONFLICT(name) DO UPDATE SET at = excluded.at", name, at
        )

    async def get_mark(self, name: str) -> float | None:
        value = await self._fetchval("SELECT at FROM marks WHERE name = $1", name)
        return None if value is None else float(value)

    # --- delegates ---------------------------------------------------------------------------

    async def save_delegate(self, row: DelegateRow) -> None:
        await self._upsert("delegates", row, "id")

    async def get_delegate(self, delegate_id: str) -> DelegateRow | None:
        row = await self._fetchrow("SELECT * FROM delegates WHERE id = $1", delegate_id)
        return None if row is None else decode_row(DelegateRow, row)

    async def delegate_by_instance(self, instance_id: str) -> DelegateRow | None:
        row = await self._fetchrow("SELECT * FROM delegates WHERE instance_id = $1", instance_id)
        return None if row is None else decode_row(DelegateRow, row)

    async def delegates(self) -> list[DelegateRow]:
        return readable(DelegateRow, await self._fetch("SELECT * FROM delegates ORDER BY registered_at, id"))

    async def update_delegate(self, delegate_id: str, **values: Any) -> None:
        await self._update("delegates", "id", delegate_id, values)

    async def delete_delegate(self, delegate_id: str) -> bool:
        return _count(await self._execute("DELETE FROM delegates WHERE id = $1", delegate_id)) > 0

    # --- tasks -------------------------------------------------------------------------------

    async def insert_task(self, row: TaskRow) -> None:
        await self._upsert("tasks", row, "id")

    async def get_task(self, task_id: str) -> TaskRow | None:
        row = await self._fetchrow("SELECT * FROM tasks WHERE id = $1", task_id)
        return None if row is None else decode_row(TaskRow, row)

    async def task_by_lease(self, lease_id: str) -> TaskRow | None:
        row = await self._fetchrow("SELECT * FROM tasks WHERE lease_id = $1 AND state = 'running'", lease_id)
        return None if row is None else decode_row(TaskRow, row)

    async def tasks_in_state(self, state: str) -> list[TaskRow]:
        rows = await self._fetch("SELECT * FROM tasks WHERE state = $1 ORDER BY created_at, id", state)
        return readable(TaskRow, rows)

    async def running_tasks(self, delegate_id: str | None = None) -> list[TaskRow]:
        rows = await self._fetch(
            "SELECT * FROM tasks WHERE state = 'running' AND lease_id IS NOT NULL "
            "AND ($1::text IS NULL OR delegate_id = $1) ORDER BY created_at, id",
            delegate_id,
        )
        return readable(TaskRow, rows)

    async def overdue_tasks(self, now: float, grace: float) -> list[TaskRow]:
        rows = await self._fetch(
            "SELECT * FROM tasks WHERE state = 'running' AND lease_id IS NOT NULL AND (lease_expires_at < $1 "
            "OR (started_at IS NOT NULL AND started_at + timeout_seconds + $2 < $1)) ORDER BY created_at, id",
            now,
            grace,
        )
        return readable(TaskRow, rows)

    async def grant_allowance(self, now: float, lease_seconds: float) -> None:
        async with self.transaction():
            await self._execute("UPDATE delegates SET last_heartbeat = $1 WHERE state IN ('running', 'draining')", now)
            await self._execute(
                "UPDATE tasks SET pickup_deadline = GREATEST(pickup_deadline, $1 + pickup_timeout) "
                "WHERE state = 'queued'",
                now,
            )
            await self._execute(
                "UPDATE tasks SET lease_expires_at = GREATEST(COALESCE(lease_expires_at, 0), $1) "
                "WHERE state = 'running' AND lease_id IS NOT NULL",
                now + lease_seconds,
            )

    async def queued_past_deadline(self, now: float, limit: int = 500) -> list[TaskRow]:
        rows = await self._fetch(
            "SELECT * FROM tasks WHERE state = 'queued' AND pickup_deadline < $1 ORDER BY created_at, id LIMIT $2",
            now,
            limit,
        )
        return readable(TaskRow, rows)

    async def list_tasks(
        self, *, state: str | None = None, connector_id: str | None = None, limit: int = 100
    ) -> list[TaskRow]:
        rows = await self._fetch(
            "SELECT * FROM tasks WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR connector_id = $2) "
            "ORDER BY created_at DESC, id DESC LIMIT $3",
            state,
            connector_id,
            limit,
        )
        return readable(TaskRow, rows)

    async def claim(self, delegate: DelegateRow, limit: int, *, now: float, lease_seconds: float) -> list[TaskRow]:
        if limit <= 0 or not delegate.task_types:
            return []
        tags = encode_json(list(delegate.tags))
        async with self.transaction():
            # Rows that do not read are locked with the rest but not leased; look past them.
            picked: list[str] = []
            passed: list[str] = []
            while len(picked) < limit:
                want = limit - len(picked)
                rows = await self._fetch(
                    _CLAIM_SELECT, list(delegate.task_types), now, tags, want, [*picked, *passed]
                )  # fmt: skip
                good = {t.id for t in readable(TaskRow, rows)}
                for r in rows:
                    (picked if r["id"] in good else passed).append(r["id"])
                if len(rows) < want:
                    break
            if not picked:
                return []
            leases = [new_lease_id() for _ in picked]
            updated = await self._fetch(
                _CLAIM_UPDATE, picked, leases, delegate.id, delegate.name, now + lease_seconds, now
            )  # fmt: skip
        order = {task_id: i for i, task_id in enumerate(picked)}
        return sorted((decode_row(TaskRow, r) for r in updated), key=lambda t: order[t.id])

    async def update_task(self, task_id: str, *, expect: Expect | None = None, **values: Any) -> bool:
        if expect is None:
            return await self._update("tasks", "id", task_id, values)
        state, lease_id, lease_seq = expect
        return await self._update(
            "tasks",
            "id",
            task_id,
            values,
            where=(
                "state = {} AND lease_id IS NOT DISTINCT FROM {}::text AND lease_seq = {}",
                (state, lease_id, lease_seq),
            ),
        )

    async def purge_done_tasks(self, older_than: float) -> int:
        return _count(await self._execute("DELETE FROM tasks WHERE state = 'done' AND completed_at < $1", older_than))

    async def queue_depth(self) -> dict[QueueKey, int]:
        rows = await self._fetch("SELECT type, selectors, COUNT(*) FROM tasks WHERE state = 'queued' GROUP BY 1, 2")
        depth: dict[QueueKey, int] = {}
        for r in rows:
            try:
                key = (str(r[0]), tuple(decode_json(r[1])))
            except ValueError:
                continue  # a damaged row: left out of the queue, named by the lists
            depth[key] = depth.get(key, 0) + int(r[2])
        return depth

    async def in_flight(self) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT delegate_id, COUNT(*) FROM tasks WHERE state = 'running' AND delegate_id IS NOT NULL GROUP BY 1"
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def latencies(self) -> list[float]:
        rows = await self._fetch(
            "SELECT completed_at - created_at FROM tasks WHERE state = 'done' AND result_lease_id IS NOT NULL"
        )
        return [float(r[0]) for r in rows]

    async def count_done_by_status(self) -> dict[str, int]:
        rows = await self._fetch("SELECT status, COUNT(*) FROM tasks WHERE state = 'done' GROUP BY status")
        return {str(r[0]): int(r[1]) for r in rows}

    async def count_failures_by_reason(self) -> dict[str, int]:
        rows = await self._fetch(
            "SELECT COALESCE(failure_reason, delegate_agent_jsonb(result) #>> '{failure,category}', 'unknown'), "
            "COUNT(*) FROM tasks WHERE state = 'done' AND status = 'FAILURE' GROUP BY 1"
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def count_tasks(self) -> dict[str, int]:
        return {str(r[0]): int(r[1]) for r in await self._fetch("SELECT state, COUNT(*) FROM tasks GROUP BY state")}

    # --- connectors --------------------------------------------------------------------------

    async def put_connector(
        self, identifier: str, name: str, body: dict[str, Any], now: float
    ) -> Literal["created", "updated", "unchanged"]:
        async with self.transaction():
            row = await self._fetchrow("SELECT * FROM connectors WHERE identifier = $1 FOR UPDATE", identifier)
            existing = None if row is None else decode_row(ConnectorRow, row)
            outcome = connector_change(existing, name, body)
            if outcome == "created":
                await self._upsert("connectors", ConnectorRow(identifier, name, body, now, now), "identifier")
            elif outcome == "updated":
                await self._update(
                    "connectors", "identifier", identifier, {"name": name, "body": body, "updated_at": now}
                )
        return outcome

    async def get_connector(self, identifier: str) -> ConnectorRow | None:
        row = await self._fetchrow("SELECT * FROM connectors WHERE identifier = $1", identifier)
        return None if row is None else decode_row(ConnectorRow, row)

    async def connectors(self) -> list[ConnectorRow]:
        return readable(ConnectorRow, await self._fetch("SELECT * FROM connectors ORDER BY identifier"))

    async def delete_connector(self, identifier: str) -> bool:
        return _count(await self._execute("DELETE FROM connectors WHERE identifier = $1", identifier)) > 0

    async def update_connector(self, identifier: str, **values: Any) -> None:
        await self._update("connectors", "identifier", identifier, values)

    async def due_connectors(self, now: float, limit: int) -> list[ConnectorRow]:
        rows = await self._fetch(
            "SELECT * FROM connectors WHERE next_test_at IS NOT NULL AND next_test_at <= $1 "
            "ORDER BY next_test_at, identifier LIMIT $2",
            now,
            limit,
        )
        return readable(ConnectorRow, rows)

    async def connector_testing(self, identifier: str) -> bool:
        found = await self._fetchval(
            "SELECT 1 FROM tasks WHERE connector_id = $1 AND state IN ('queued', 'running') LIMIT 1", identifier
        )
        return found is not None

    async def reschedule_connector(
        self, identifier: str, *, was: float | None, to: float | None, trigger: str | None = None
    ) -> bool:
        values = {"next_test_at": to, "next_trigger": trigger}
        return await self._update(
            "connectors", "identifier", identifier, values, where=("next_test_at IS NOT DISTINCT FROM {}", (was,))
        )

    async def add_history(self, row: HistoryRow, keep: int) -> None:
        names, values = row_columns(row)
        params = ", ".join(f"${i}" for i in range(1, len(names) + 1))
        updates = ", ".join(f"{n} = EXCLUDED.{n}" for n in names if n != "task_id")
        async with self.transaction():
            await self._execute(
                f"INSERT INTO connector_history({', '.join(names)}) VALUES({params}) "
                f"ON CONFLICT(task_id) DO UPDATE SET {updates}",
                *values,
            )
            await self._execute(
                "DELETE FROM connector_history WHERE connector_id = $1 AND task_id NOT IN (SELECT task_id FROM "
                "connector_history WHERE connector_id = $1 ORDER BY tested_at DESC, task_id DESC LIMIT $2)",
                row.connector_id,
                keep,
            )

    async def connector_history(self, identifier: str, limit: int) -> list[HistoryRow]:
        rows = await self._fetch(
            "SELECT * FROM connector_history WHERE connector_id = $1 ORDER BY tested_at DESC, task_id DESC LIMIT $2",
            identifier,
            limit,
        )
        return readable(HistoryRow, rows)

    async def health_summary(self, now: float, default_interval: float) -> HealthSummary:
        rows = await self._fetch("SELECT health_status, COUNT(*) FROM connectors GROUP BY health_status")
        by_status = {str(r[0]): int(r[1]) for r in rows}
        failing = await self._fetchval(
            "SELECT MAX($1 - failing_since) FROM connectors WHERE health_status = 'FAILURE' "
            "AND failing_since IS NOT NULL",
            now,
        )
        untested = await self._fetchval(
            "SELECT MAX(($1 - COALESCE(last_tested_at, created_at)) / COALESCE(test_interval, $2)) FROM connectors "
            "WHERE COALESCE(test_interval, $2) > 0",
            now,
            default_interval,
        )
        return HealthSummary(by_status, max(0.0, float(failing or 0)), max(0.0, float(untested or 0)))

    # --- tokens ------------------------------------------------------------------------------

    async def revoked_tokens(self) -> dict[str, float]:
        return {str(r[0]): float(r[1]) for r in await self._fetch("SELECT kid, revoked_at FROM revoked_tokens")}

    async def issued_tokens(self) -> list[tuple[str, str, bytes, float]]:
        rows = await self._fetch(
            "SELECT name, kid, signing_key, created_at FROM issued_tokens ORDER BY created_at, kid"
        )
        return [(str(r[0]), str(r[1]), bytes(r[2]), float(r[3])) for r in rows]

    async def add_issued_token(
        self, name: str, kid: str, signing_key: bytes, now: float, *, scope: StoredScope = (None, None)
    ) -> None:
        names, tags = encode_scope(scope)
        await self._execute(
            "INSERT INTO issued_tokens(kid, name, signing_key, created_at, scope_names, scope_tags) "
            "VALUES($1, $2, $3, $4, $5, $6)",
            kid,
            name,
            signing_key,
            now,
            names,
            tags,
        )

    async def issued_token_scopes(self) -> dict[str, StoredScope]:
        rows = await self._fetch("SELECT kid, scope_names, scope_tags FROM issued_tokens")
        return {str(r[0]): decode_scope(r[1], r[2]) for r in rows}

    async def revoke_token(self, kid: str, name: str, now: float) -> None:
        await self._execute(
            "INSERT INTO revoked_tokens(kid, name, revoked_at) VALUES($1, $2, $3) ON CONFLICT(kid) DO NOTHING",
            kid,
            name,
            now,
        )

    # --- helpers -----------------------------------------------------------------------------

    async def _upsert(self, table: str, row: DelegateRow | TaskRow | ConnectorRow, key: str) -> None:
        names, values = row_columns(row)
        updates = ", ".join(f"{n} = excluded.{n}" for n in names if n != key)
        marks = ", ".join(f"${i}" for i in range(1, len(names) + 1))
        await self._execute(
            f"INSERT INTO {table}({', '.join(names)}) VALUES({marks}) ON CONFLICT({key}) DO UPDATE SET {updates}",
            *values,
        )

    async def _update(
        self,
        table: str,
        key: str,
        key_value: str,
        values: dict[str, Any],
        *,
        where: tuple[str, Sequence[Any]] = ("TRUE", ()),
    ) -> bool:
        """``UPDATE table SET values WHERE key = key_value AND where``; True when a row changed.

        ``where`` is SQL with ``{}`` for each of its parameters.
        """
        unknown = set(values) - _COLUMNS[table]
        if unknown:
            raise ValueError(f"{table} has no column {sorted(unknown)}")
        cols = list(values)
        args = [*(encode_value(c, values[c]) for c in cols), key_value, *where[1]]
        sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(cols, start=1))
        n = len(cols) + 1
        condition = where[0].format(*(f"${i}" for i in range(n + 1, n + 1 + len(where[1]))))
        if not cols:  # nothing to change: whether the row is there (and in the expected state)
            found = await self._fetchval(f"SELECT 1 FROM {table} WHERE {key} = ${n} AND {condition}", *args)
            return found is not None
        status = await self._execute(f"UPDATE {table} SET {sets} WHERE {key} = ${n} AND {condition}", *args)
        return _count(status) > 0

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """The current transaction's connection, or one from the pool; connection failures become
        :class:`StoreUnavailable`."""
        tx = self._tx.get()
        if tx is not None:
            yield tx.conn
            return
        try:
            conn = await self._pool.acquire(timeout=ACQUIRE_TIMEOUT)
        except CONNECTION_ERRORS as exc:
            raise self._unavailable(exc) from None
        try:
            yield conn
        finally:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self._pool.release(conn)

    async def _call(self, method: str, sql: str, args: Sequence[Any], *, write: bool) -> Any:
        in_tx = self._tx.get() is not None
        try:
            async with self._connection() as conn:
                result = await getattr(conn, method)(sql, *args)
        except CONNECTION_ERRORS as exc:
            raise self._unavailable(exc) from None
        except asyncpg.PostgresError as exc:
            raise self._refused(exc) from None
        if write and not in_tx:
            self.fault = None
        return result

    async def _execute(self, sql: str, *args: Any) -> str:
        return str(await self._call("execute", sql, args, write=True))

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        return list(await self._call("fetch", sql, args, write=False))

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        return await self._call("fetchrow", sql, args, write=False)

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        return await self._call("fetchval", sql, args, write=False)

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        if isinstance(exc, StoreUnavailable):
            return exc
        self.fault = self._mask(f"cannot use the database {redacted_url(self._url)}: {_describe(exc)}")
        return StoreUnavailable(self.fault)

    def _refused(self, exc: BaseException) -> StoreUnavailable:
        """A statement the database refused (a constraint, a conflict): the store itself is fine."""
        return StoreUnavailable(self._mask(f"the database refused a write: {_describe(exc)}"))

    def _mask(self, text: str) -> str:
        return _masked(text, self._secrets)


def _describe(exc: BaseException) -> str:
    """One line: the error's class and first line (asyncpg's messages can run over several)."""
    if isinstance(exc, asyncpg.InterfaceError) and "released back to the pool" in str(exc):
        return "the connection was lost (closed by the server or the network)"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _secrets_of(url: str) -> set[str]:
    """The password ``url`` carries, as written and decoded, to mask wherever it might be quoted."""
    parts = urlsplit(url)
    found = {v for k, v in parse_qsl(parts.query) if k == "password"}
    raw = url_password(url)
    found |= {raw, unquote(raw)}
    with contextlib.suppress(ValueError):  # urlsplit's reading too, whatever it made of the URL
        if parts.password:
            found |= {parts.password, unquote(parts.password)}
    return found - {""}


def _masked(text: str, secrets: set[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _count(status: str) -> int:
    """The row count of a command status such as ``UPDATE 3`` or ``INSERT 0 1``."""
    try:
        return int(status.rsplit(" ", 1)[1])
    except (IndexError, ValueError):
        return 0


__all__ = ["SCHEMA_VERSION", "PostgresStore", "RowDamaged", "redacted_url"]
