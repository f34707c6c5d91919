"""The control plane's durable state: one interface (:class:`Store`), SQLite and Postgres behind it."""

from __future__ import annotations

from pathlib import Path

from agent.controlplane.store.base import (
    ConnectorRow,
    DelegateRow,
    HealthSummary,
    HistoryRow,
    QueueKey,
    RowDamaged,
    SchemaTooNew,
    Store,
    StoredScope,
    StoreEvent,
    StoreUnavailable,
    TaskDone,
    TaskQueued,
    TaskRow,
    connector_change,
    eligible,
    with_updates,
)
from agent.controlplane.store.sqlite import SqliteStore

__all__ = [
    "ConnectorRow",
    "DelegateRow",
    "HealthSummary",
    "HistoryRow",
    "QueueKey",
    "RowDamaged",
    "SchemaTooNew",
    "SqliteStore",
    "Store",
    "StoreEvent",
    "StoreUnavailable",
    "StoredScope",
    "TaskDone",
    "TaskQueued",
    "TaskRow",
    "connector_change",
    "eligible",
    "is_postgres_url",
    "open_store",
    "with_updates",
]


def is_postgres_url(database: str) -> bool:
    return database.startswith(("postgresql://", "postgres://"))


async def open_store(
    database: str | Path | None, *, listen_url: str | None = None, poll_backstop: float = 1.0
) -> Store:
    """The store ``database`` names: a Postgres URL, a SQLite file, or None for SQLite in memory."""
    if isinstance(database, str) and is_postgres_url(database):
        from agent.controlplane.store.postgres import PostgresStore  # noqa: PLC0415 - asyncpg only when asked for

        store: Store = await PostgresStore.connect(database, listen_url=listen_url, poll_backstop=poll_backstop)
        return store

    return await SqliteStore.open(None if database is None else Path(database))
