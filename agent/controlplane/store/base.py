"""What the control plane keeps, and the interface every store behind it implements.

Two stores implement :class:`Store`: SQLite (:mod:`.sqlite`, one process, the embedded default)
and Postgres (:mod:`.postgres`, several replicas behind one Service). The control plane's logic
holds no copy of the queue: every decision reads the store, and every change of a task's state is
a *conditional* write (:meth:`Store.update_task` with ``expect``) or an atomic claim
(:meth:`Store.claim`), so two processes acting on the same task cannot both win.

Rows are frozen dataclasses; both stores keep JSON columns as text and times as seconds since the
epoch (float), so :func:`decode_row` reads either driver's rows.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Protocol, TypeVar

import msgspec
import structlog

from agent.protocol.results import ValidationResult

log = structlog.get_logger("controlplane.store")

#: A token's scope as stored: delegate name patterns and tag patterns, None meaning any.
StoredScope = tuple[tuple[str, ...] | None, tuple[str, ...] | None]

#: What a conditional task write expects to find: (state, lease_id, lease_seq).
Expect = tuple[str, str | None, int]


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
    #: Why a connector test was created: scheduled, manual or changed (None for other tasks).
    trigger: str | None = None
    #: Leases handed out for this task so far: the fencing number every later write of a lease names.
    #: Unlike ``attempts`` (a give-back does not count one) it only ever grows.
    lease_seq: int = 0

    @property
    def expect(self) -> Expect:
        """The state this row was read in, for a conditional write that must find it unchanged."""
        return (self.state, self.lease_id, self.lease_seq)


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
    #: Connectivity (SUCCESS, FAILURE, UNKNOWN) and what the schedule needs; see controlplane/health.py.
    health_status: str = "UNKNOWN"
    last_connected_at: float | None = None
    #: The last failure's {step, category, awsErrorCode, hint} while the connector fails.
    last_failure: dict[str, Any] | None = None
    failures_in_row: int = 0
    failing_since: float | None = None
    #: Doublings of the interval while the same failure repeats.
    backoff: int = 0
    #: The connector's own interval (seconds; 0: no scheduled tests); None: the control plane's default.
    test_interval: float | None = None
    next_test_at: float | None = None
    #: Why the next test is due when it is not the schedule ("changed": the connector was applied).
    next_trigger: str | None = None


@dataclass(frozen=True)
class HistoryRow:
    """One finished test of a connector, kept (the last N per connector) after its task is purged."""

    task_id: str
    connector_id: str
    tested_at: float
    status: str
    trigger: str
    delegate_name: str | None = None
    error_summary: str | None = None
    failure: dict[str, Any] | None = None
    duration_ms: int | None = None


@dataclass(frozen=True)
class HealthSummary:
    """What the connector metrics show: counts by status and the two aggregates the alerts watch."""

    by_status: dict[str, int]
    #: How long the connector failing longest has been failing (0 when none fails).
    failing_seconds_max: float
    #: Over connectors with scheduled tests: the largest time since the last test (or creation), in intervals.
    untested_intervals_max: float


@dataclass(frozen=True)
class TaskQueued:
    """A task entered the queue (created or re-queued): long polls that may serve it wake."""

    type: str
    selectors: tuple[str, ...]


@dataclass(frozen=True)
class TaskDone:
    """A task finished: whoever waits for its result wakes."""

    task_id: str


StoreEvent = TaskQueued | TaskDone

#: A queue as the metrics see it: task type and the selectors its tasks carry.
QueueKey = tuple[str, tuple[str, ...]]


class StoreUnavailable(Exception):
    """The store refused a write or cannot be reached; the change was rolled back, nothing half-done."""


class SchemaTooNew(Exception):
    """The database was written by a newer version of this program: refuse it rather than guess."""


class RowDamaged(Exception):
    """A stored row that no longer reads as what was written (a flipped bit, a hand edit)."""

    def __init__(self, table: str, key: str, reason: str) -> None:
        super().__init__(f"the stored {table} {key!r} is damaged ({reason[:200]})")
        self.table, self.key = table, key


def url_password(url: str) -> str:
    """The password in ``url``'s authority as written, read up to the *last* ``@`` before the query.

    A password with ``@`` or ``/`` that was not percent-encoded fools ``urlsplit`` (it stops at the
    first one), which would leave the rest of the password in every message that quotes the URL.
    """
    _, sep, rest = url.partition("://")
    authority = rest.partition("?")[0]
    if not sep or "@" not in authority:
        return ""
    return authority.rpartition("@")[0].partition(":")[2]


def url_problems(url: str, flag: str) -> list[str]:
    """What is wrong with a Postgres URL as given, before anything connects (every problem at once)."""
    if not url.startswith(("postgresql://", "postgres://")):
        return [f"{flag} must be a postgresql:// URL (SQLite lives in --data-dir)"]
    authority = url.partition("://")[2].partition("?")[0]
    userinfo = authority.rpartition("@")[0] if "@" in authority else ""
    if "@" in userinfo or "/" in userinfo or re.search(r"%(?![0-9A-Fa-f]{2})", userinfo):
        return [
            f"{flag}: the user name and password must be percent-encoded (@ as %40, / as %2F, % as %25, "
            ": in the user name as %3A)"
        ]
    return []


def new_lease_id() -> str:
    return "lse_" + secrets.token_hex(12)


class Store(Protocol):
    """Durable state of the control plane, as every backend provides it.

    Calls outside :meth:`transaction` commit on their own. Writes raise :class:`StoreUnavailable`
    when the store refuses them (full disk, lost connection), after rolling back; reads of a
    damaged row raise :class:`RowDamaged`, and lists leave damaged rows out (logged once).
    """

    #: "sqlite" or "postgres".
    kind: str
    #: True when several control-plane processes may share this store (they coordinate through it).
    shared: bool
    #: A waiting long poll looks at the queue again at least this often, whatever it hears; None when
    #: every wakeup is delivered in-process and nothing can be missed.
    poll_backstop: float | None
    #: Why the store refuses writes (disk full, connection lost); None once a write succeeds again.
    fault: str | None

    async def close(self) -> None: ...

    def transaction(self) -> AbstractAsyncContextManager[None]:
        """Group writes atomically; nested uses join the outer one. Failure: rolled back, StoreUnavailable."""
        ...

    def after_commit(self, effect: Callable[[], None]) -> None:
        """Run ``effect`` (in this process) once the current transaction commits, at once outside one."""
        ...

    def announce(self, event: StoreEvent) -> None:
        """Deliver ``event`` after the current transaction commits (never if it rolls back) to every
        listener of every process sharing the store: this process's synchronously, others' soon."""
        ...

    def subscribe(self, listener: Callable[[StoreEvent], None]) -> None:
        """Call ``listener`` for every announced event, this process's and other processes'."""
        ...

    def sweep_turn(self) -> AbstractAsyncContextManager[bool]:
        """Enter to sweep: yields True when this process should sweep now (another replica is not)."""
        ...

    async def probe(self) -> bool:
        """One real write: True when the store takes writes (again)."""
        ...

    # --- counters and marks ------------------------------------------------------------------

    async def bump(self, name: str, by: int = 1) -> None: ...
    async def counters(self) -> dict[str, int]: ...
    async def set_mark(self, name: str, at: float) -> None:
        """Remember a time under ``name`` (for example when the queue was last swept)."""
        ...

    async def get_mark(self, name: str) -> float | None: ...

    # --- delegates ---------------------------------------------------------------------------

    async def save_delegate(self, row: DelegateRow) -> None: ...
    async def get_delegate(self, delegate_id: str) -> DelegateRow | None: ...
    async def delegate_by_instance(self, instance_id: str) -> DelegateRow | None: ...
    async def delegates(self) -> list[DelegateRow]:
        """All delegates, oldest registration first."""
        ...

    async def update_delegate(self, delegate_id: str, **values: Any) -> None: ...
    async def delete_delegate(self, delegate_id: str) -> bool: ...

    # --- tasks -------------------------------------------------------------------------------

    async def insert_task(self, row: TaskRow) -> None: ...
    async def get_task(self, task_id: str) -> TaskRow | None: ...
    async def task_by_lease(self, lease_id: str) -> TaskRow | None:
        """The running task under this lease, if it still holds one."""
        ...

    async def tasks_in_state(self, state: str) -> list[TaskRow]:
        """Every task in ``state``, oldest first."""
        ...

    async def running_tasks(self, delegate_id: str | None = None) -> list[TaskRow]:
        """Running tasks under a lease (of one delegate, or all), oldest first."""
        ...

    async def overdue_tasks(self, now: float, grace: float) -> list[TaskRow]:
        """Running tasks under a lease that expired before ``now``, or that ran longer than their
        timeout plus ``grace``, oldest first (what a sweep acts on, without reading every running task)."""
        ...

    async def grant_allowance(self, now: float, lease_seconds: float) -> None:
        """After downtime: connected delegates heard ``now``, pickup deadlines and leases pushed to at
        least a full allowance from ``now`` (never shortened)."""
        ...

    async def queued_past_deadline(self, now: float, limit: int = 500) -> list[TaskRow]:
        """Queued tasks whose pickup deadline is before ``now``, oldest first."""
        ...

    async def list_tasks(
        self, *, state: str | None = None, connector_id: str | None = None, limit: int = 100
    ) -> list[TaskRow]:
        """Newest first."""
        ...

    async def claim(self, delegate: DelegateRow, limit: int, *, now: float, lease_seconds: float) -> list[TaskRow]:
        """Lease up to ``limit`` queued tasks to ``delegate``, oldest first, and return them as leased.

        Only tasks it may run: type in its task types, every selector among its tags, pickup
        deadline not before ``now``. Each becomes ``running`` with a new lease id
        (:func:`new_lease_id`), the delegate's id and name, ``lease_expires_at = now +
        lease_seconds``, ``started_at = now``, attempts + 1 and lease_seq + 1. Atomic: no two
        calls, in any processes, lease the same task.
        """
        ...

    async def update_task(self, task_id: str, *, expect: Expect | None = None, **values: Any) -> bool:
        """Change a task; with ``expect`` only if it is still in that (state, lease, lease_seq).

        Every state transition passes ``expect``: a transition decided on a stale view (another
        replica got there first) changes nothing and returns False.
        """
        ...

    async def purge_done_tasks(self, older_than: float) -> int: ...
    async def queue_depth(self) -> dict[QueueKey, int]: ...
    async def in_flight(self) -> dict[str, int]:
        """Running tasks per delegate id."""
        ...

    async def latencies(self) -> list[float]:
        """Seconds from creation to completion of every finished task that a delegate ran."""
        ...

    async def count_done_by_status(self) -> dict[str, int]: ...
    async def count_failures_by_reason(self) -> dict[str, int]: ...
    async def count_tasks(self) -> dict[str, int]: ...

    # --- connectors --------------------------------------------------------------------------

    async def put_connector(
        self, identifier: str, name: str, body: dict[str, Any], now: float
    ) -> Literal["created", "updated", "unchanged"]: ...
    async def get_connector(self, identifier: str) -> ConnectorRow | None: ...
    async def connectors(self) -> list[ConnectorRow]:
        """All connectors by identifier."""
        ...

    async def delete_connector(self, identifier: str) -> bool: ...
    async def update_connector(self, identifier: str, **values: Any) -> None: ...
    async def due_connectors(self, now: float, limit: int) -> list[ConnectorRow]:
        """Connectors whose next test is due (``next_test_at`` not after ``now``), the most overdue first."""
        ...

    async def connector_testing(self, identifier: str) -> bool:
        """Whether a test of this connector is queued or running."""
        ...

    async def reschedule_connector(
        self, identifier: str, *, was: float | None, to: float | None, trigger: str | None = None
    ) -> bool:
        """Move the next test from ``was`` to ``to`` (with ``trigger``), only if it is still ``was``:
        of several replicas scheduling at once, one wins."""
        ...

    async def add_history(self, row: HistoryRow, keep: int) -> None:
        """Record a finished test, keeping the newest ``keep`` of its connector."""
        ...

    async def connector_history(self, identifier: str, limit: int) -> list[HistoryRow]:
        """Newest first."""
        ...

    async def health_summary(self, now: float, default_interval: float) -> HealthSummary: ...

    # --- tokens ------------------------------------------------------------------------------

    async def revoked_tokens(self) -> dict[str, float]: ...
    async def issued_tokens(self) -> list[tuple[str, str, bytes, float]]:
        """Tokens this server created: (name, kid, derived signing key, created at). Never the token itself."""
        ...

    async def add_issued_token(
        self, name: str, kid: str, signing_key: bytes, now: float, *, scope: StoredScope = (None, None)
    ) -> None: ...
    async def issued_token_scopes(self) -> dict[str, StoredScope]: ...
    async def revoke_token(self, kid: str, name: str, now: float) -> None: ...


# --- rows as stored ----------------------------------------------------------------------------

_json = msgspec.json.Encoder()
_unjson = msgspec.json.Decoder()
_unjson_result = msgspec.json.Decoder(ValidationResult)

JSON_COLUMNS = frozenset({"tags", "task_types", "payload", "selectors", "result", "body", "last_failure", "failure"})
_TUPLE_COLUMNS = {"tags", "task_types", "selectors"}


def encode_value(name: str, value: Any) -> Any:
    """A row's value as both stores keep it: JSON text for structured columns, 0/1 for flags."""
    if name in JSON_COLUMNS and value is not None:
        return _json.encode(list(value) if isinstance(value, tuple) else value).decode()
    if isinstance(value, bool):
        return int(value)
    return value


def encode_json(value: Any) -> str:
    return _json.encode(value).decode()


def decode_json(raw: str | bytes) -> Any:
    return _unjson.decode(raw)


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

Row = TypeVar("Row", DelegateRow, TaskRow, ConnectorRow, HistoryRow)


def decode_row(cls: type[Row], row: Mapping[str, Any]) -> Row:
    """The stored row as ``cls``; :class:`RowDamaged` naming it when a value is not what was written."""
    kwargs: dict[str, Any] = {}
    try:
        for f in fields(cls):
            value = row[f.name]
            if f.name == "result" and value is not None:
                value = _decode_result(value)
            elif f.name in JSON_COLUMNS and value is not None:
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
        names = list(row.keys())
        key = str(next((row[k] for k in ("id", "identifier", "task_id") if k in names), "?"))
        raise RowDamaged(cls.__name__.removesuffix("Row").lower(), key, str(exc)) from None


def readable(cls: type[Row], rows: list[Any]) -> list[Row]:
    """Every row that reads; a damaged one is named in the log (once per process) and left out."""
    out = []
    for r in rows:
        try:
            out.append(decode_row(cls, r))
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


def decode_scope(names: str | None, tags: str | None) -> StoredScope:
    return (
        None if names is None else tuple(_unjson.decode(names)),
        None if tags is None else tuple(_unjson.decode(tags)),
    )


def encode_scope(scope: StoredScope) -> tuple[str | None, str | None]:
    names, tags = (None if v is None else _json.encode(list(v)).decode() for v in scope)
    return names, tags


def row_columns(row: DelegateRow | TaskRow | ConnectorRow | HistoryRow) -> tuple[list[str], list[Any]]:
    """A row's column names and stored values, in field order."""
    names = [f.name for f in fields(row)]
    return names, [encode_value(n, getattr(row, n)) for n in names]


def connector_change(
    existing: ConnectorRow | None, name: str, body: dict[str, Any]
) -> Literal["created", "updated", "unchanged"]:
    """What storing ``name`` and ``body`` over ``existing`` does (shared by apply and its dry run)."""
    if existing is None:
        return "created"
    return "unchanged" if existing.body == body and existing.name == name else "updated"


R = TypeVar("R")


def with_updates(row: R, **values: Any) -> R:
    """A copy of a frozen row with some fields changed (the in-memory mirror of an UPDATE)."""
    return replace(row, **values)  # type: ignore[type-var]


def eligible(task_type: str, selectors: tuple[str, ...], delegate: DelegateRow) -> bool:
    """Whether ``delegate`` may run a task of this type with these selectors (Harness: all selectors)."""
    return task_type in delegate.task_types and set(selectors) <= set(delegate.tags)
