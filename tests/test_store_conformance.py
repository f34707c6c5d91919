"""One suite, every store: what the control plane relies on, run against SQLite and a real Postgres.

The Postgres cluster is started by the fixtures (tests/pgfixtures.py) on loopback; each test gets
an empty database. Tests marked ``postgres`` only make sense with several processes on one
database (notifications, the sweep lock, an outage of the server) and run against Postgres alone.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog

from agent.controlplane.store.base import (
    DelegateRow,
    HistoryRow,
    RowDamaged,
    SchemaTooNew,
    StoreEvent,
    StoreUnavailable,
    TaskDone,
    TaskQueued,
    TaskRow,
)
from agent.controlplane.store.postgres import SCHEMA_VERSION, PostgresStore, redacted_url
from agent.controlplane.store.sqlite import SqliteStore
from agent.protocol.results import Failure, ValidationResult
from tests.helpers import wait_until
from tests.pgserver import PostgresServer, free_port

NOW = 1_800_000_000.0
CANARY = "canary-Pw-7f3a9c"


@dataclass
class Backend:
    """The store under test, and how to reach the data behind it as a second process would."""

    kind: str
    store: Any
    open_another: Callable[[], Any]
    raw: Callable[[str], Any]
    others: list[Any] = field(default_factory=list)
    url: str = ""

    async def another(self) -> Any:
        """A second store on the same data (Postgres: another replica; SQLite: the one process's own)."""
        other = await self.open_another()
        if other is not self.store:
            self.others.append(other)
        return other


def _with_password(url: str, password: str) -> str:
    return url.replace("postgres@", f"postgres:{password}@", 1)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "cp.db"
        store = await SqliteStore.open(path)

        async def same() -> Any:
            return store

        def raw_sqlite(sql: str) -> None:
            with sqlite3.connect(path) as db:
                db.execute(sql)

        b = Backend("sqlite", store, same, raw_sqlite)
    else:
        # Not the pg_url fixture: an async fixture cannot ask for another one by name.
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = await server.create_database()
        store = await PostgresStore.connect(url)

        async def connect() -> PostgresStore:
            return await PostgresStore.connect(url)

        async def raw_pg(sql: str) -> None:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        b = Backend("postgres", store, connect, raw_pg, url=url)
    try:
        yield b
    finally:
        for other in b.others:
            await other.close()
        await b.store.close()
        if b.kind == "postgres":
            await server.drop_database(url)


async def _raw(backend: Backend, sql: str) -> None:
    done = backend.raw(sql)
    if asyncio.iscoroutine(done):
        await done


def delegate(name: str = "d1", *, tags: tuple[str, ...] = ("east",), types: tuple[str, ...] = ("aws",)) -> DelegateRow:
    return DelegateRow(
        id=f"dlg_{name}",
        name=name,
        instance_id=f"inst_{name}",
        hostname="host-1",
        tags=tags,
        version="1.2.3",
        task_types=types,
        capacity=4,
        state="running",
        in_flight=0,
        token_name="default",
        registered_at=NOW,
        last_heartbeat=NOW,
    )


def task(
    n: int, *, type: str = "aws", selectors: tuple[str, ...] = (), deadline: float = NOW + 60, **kw: Any
) -> TaskRow:
    return TaskRow(
        id=f"tsk_{n:05d}",
        type=type,
        payload={"connector": {"identifier": f"c{n}"}, "n": n},
        selectors=selectors,
        connector_id=kw.pop("connector_id", None),
        state=kw.pop("state", "queued"),
        created_at=kw.pop("created_at", NOW + n),
        pickup_timeout=60.0,
        pickup_deadline=deadline,
        timeout_seconds=30.0,
        attempts=0,
        max_attempts=3,
        **kw,
    )


# --- round trips ---------------------------------------------------------------------------------


async def test_delegates_round_trip(backend: Backend) -> None:
    """A delegate reads back as saved, by id and by instance; updates and deletes land."""
    s = backend.store
    one, two = delegate("a", tags=("x", "y")), replace(delegate("b"), registered_at=NOW - 5)
    await s.save_delegate(one)
    await s.save_delegate(two)
    assert await s.get_delegate(one.id) == one
    assert await s.delegate_by_instance("inst_a") == one
    assert [d.id for d in await s.delegates()] == ["dlg_b", "dlg_a"]
    await s.update_delegate(one.id, state="draining", in_flight=2, last_heartbeat=NOW + 1)
    assert await s.get_delegate(one.id) == replace(one, state="draining", in_flight=2, last_heartbeat=NOW + 1)
    await s.save_delegate(replace(one, version="2.0"))  # saving again replaces
    assert (await s.get_delegate(one.id)).version == "2.0"
    assert await s.delete_delegate(one.id)
    assert not await s.delete_delegate(one.id)
    assert await s.get_delegate(one.id) is None


async def test_tasks_round_trip(backend: Backend) -> None:
    """Every column of a task, the typed result and flags included, reads back as written."""
    s = backend.store
    result = ValidationResult(
        status="FAILURE",
        tested_at=datetime.fromtimestamp(NOW, UTC),
        error_summary="denied",
        failure=Failure(step="assume_role", category="permission_denied"),
    )
    row = task(
        1,
        selectors=("east", "prod"),
        connector_id="conn-1",
        state="done",
        lease_id="lse_1",
        delegate_id="dlg_a",
        delegate_name="a",
        lease_expires_at=NOW + 30,
        started_at=NOW + 2,
        cancel_requested=True,
        result=result,
        result_lease_id="lse_1",
        status="FAILURE",
        completed_at=NOW + 3,
        signature="sig",
        lease_seq=4,
    )
    await s.insert_task(row)
    assert await s.get_task(row.id) == row
    assert await s.get_task("tsk_missing") is None
    assert await s.list_tasks(connector_id="conn-1") == [row]
    assert await s.count_failures_by_reason() == {"permission_denied": 1}
    assert await s.count_done_by_status() == {"FAILURE": 1}


async def test_connectors_round_trip(backend: Backend) -> None:
    """put_connector says what it did; a connector's test outcome is kept; delete removes it."""
    s = backend.store
    body = {"type": "Aws", "spec": {"credential": {"type": "InheritFromDelegate"}}}
    assert await s.put_connector("c1", "one", body, NOW) == "created"
    assert await s.put_connector("c1", "one", body, NOW + 1) == "unchanged"
    assert await s.put_connector("c1", "one", {**body, "x": 1}, NOW + 2) == "updated"
    assert await s.put_connector("a0", "zero", body, NOW) == "created"
    row = await s.get_connector("c1")
    assert (row.name, row.body, row.created_at, row.updated_at) == ("one", {**body, "x": 1}, NOW, NOW + 2)
    await s.update_connector("c1", last_task_id="tsk_1", last_status="SUCCESS", last_tested_at=NOW + 3)
    assert (await s.get_connector("c1")).last_status == "SUCCESS"
    assert [c.identifier for c in await s.connectors()] == ["a0", "c1"]
    assert await s.delete_connector("c1")
    assert not await s.delete_connector("c1")
    assert await s.get_connector("c1") is None


async def test_connector_schedule_history_and_health_summary(backend: Backend) -> None:
    """What connector health keeps: due tests (most overdue first), a conditional reschedule (one
    replica wins), a test in progress, the last N results, and the aggregates the alerts watch."""
    s = backend.store
    body = {"type": "Aws", "spec": {"credential": {"type": "InheritFromDelegate"}}}
    for name, due in (("late", NOW - 100), ("later", NOW - 10), ("future", NOW + 100)):
        await s.put_connector(name, name, body, NOW - 1000)
        await s.update_connector(name, next_test_at=due)
    assert [c.identifier for c in await s.due_connectors(NOW, 10)] == ["late", "later"]
    assert await s.reschedule_connector("late", was=NOW - 100, to=NOW + 1800, trigger=None)
    assert not await s.reschedule_connector("late", was=NOW - 100, to=NOW + 5)  # someone was first
    assert [c.identifier for c in await s.due_connectors(NOW, 10)] == ["later"]
    assert not await s.connector_testing("late")
    await s.insert_task(task(1, connector_id="late", trigger="scheduled"))
    assert await s.connector_testing("late")
    assert (await s.get_task("tsk_00001")).trigger == "scheduled"
    for n in range(5):
        failure = {"step": "assume_role", "category": "denied", "awsErrorCode": None, "hint": "fix it"}
        await s.add_history(
            HistoryRow(f"tsk_h{n}", "late", NOW + n, "FAILURE", "scheduled", "d1", "no", failure, 12), keep=3
        )
    history = await s.connector_history("late", 10)
    assert [h.task_id for h in history] == ["tsk_h4", "tsk_h3", "tsk_h2"]  # newest first, the last 3 kept
    assert history[0].failure == failure and history[0].duration_ms == 12
    await s.update_connector("late", health_status="FAILURE", failing_since=NOW - 600, last_tested_at=NOW - 60)
    await s.update_connector("later", health_status="SUCCESS", last_tested_at=NOW - 900, test_interval=300.0)
    summary = await s.health_summary(NOW, 1800.0)
    assert summary.by_status == {"FAILURE": 1, "SUCCESS": 1, "UNKNOWN": 1}
    assert summary.failing_seconds_max == 600
    assert summary.untested_intervals_max == 3.0  # "later": 900 s since its test, interval 300 s


async def test_tokens_round_trip(backend: Backend) -> None:
    """Issued tokens keep their key bytes and scope; revoking twice is one revocation."""
    s = backend.store
    await s.add_issued_token("ci", "kid1", b"\x00\xffkey", NOW, scope=(("ci-*",), ("east",)))
    await s.add_issued_token("any", "kid2", b"k2", NOW + 1)
    assert await s.issued_tokens() == [("ci", "kid1", b"\x00\xffkey", NOW), ("any", "kid2", b"k2", NOW + 1)]
    assert await s.issued_token_scopes() == {"kid1": (("ci-*",), ("east",)), "kid2": (None, None)}
    await s.revoke_token("kid1", "ci", NOW + 2)
    await s.revoke_token("kid1", "ci", NOW + 3)
    assert await s.revoked_tokens() == {"kid1": NOW + 2}


async def test_counters_marks_and_probe(backend: Backend) -> None:
    """Counters add up, marks remember a time, probe writes."""
    s = backend.store
    await s.bump("accepted")
    await s.bump("accepted", 4)
    assert (await s.counters())["accepted"] == 5
    assert await s.get_mark("swept") is None
    await s.set_mark("swept", NOW)
    await s.set_mark("swept", NOW + 1)
    assert await s.get_mark("swept") == NOW + 1
    assert await s.probe()
    assert s.fault is None


async def test_task_views(backend: Backend) -> None:
    """The queries the queue, the sweeps and the metrics read agree with the rows."""
    s = backend.store
    d = delegate()
    await s.save_delegate(d)
    await s.insert_task(task(1, selectors=("east",)))
    await s.insert_task(task(2, selectors=("east",)))
    await s.insert_task(task(3, type="other", deadline=NOW - 1))
    await s.insert_task(task(4, state="done", completed_at=NOW + 10, result_lease_id="lse_x", status="SUCCESS"))
    assert await s.queue_depth() == {("aws", ("east",)): 2, ("other", ()): 1}
    assert [t.id for t in await s.queued_past_deadline(NOW)] == ["tsk_00003"]
    assert [t.id for t in await s.tasks_in_state("queued")] == ["tsk_00001", "tsk_00002", "tsk_00003"]
    assert [t.id for t in await s.list_tasks(limit=2)] == ["tsk_00004", "tsk_00003"]
    [leased] = await s.claim(d, 1, now=NOW, lease_seconds=30)
    assert await s.task_by_lease(leased.lease_id) == leased
    assert await s.running_tasks() == [leased]
    assert await s.running_tasks(d.id) == [leased]
    assert await s.running_tasks("dlg_other") == []
    assert await s.in_flight() == {d.id: 1}
    assert await s.count_tasks() == {"queued": 2, "running": 1, "done": 1}
    assert await s.latencies() == [6.0]
    assert await s.purge_done_tasks(NOW + 11) == 1
    assert await s.get_task("tsk_00004") is None


async def test_overdue_tasks_and_the_allowance_after_downtime(backend: Backend) -> None:
    """A sweep reads only what is overdue; an allowance after downtime pushes deadlines out, never in."""
    s = backend.store
    d = delegate()
    await s.save_delegate(d)
    for n in (1, 2, 3):
        await s.insert_task(task(n))
    await s.insert_task(task(4, deadline=NOW + 500))
    leased = await s.claim(d, 3, now=NOW, lease_seconds=30)  # leases until NOW + 30, timeout 30 s
    assert await s.overdue_tasks(NOW + 29, grace=10) == []
    assert [t.id for t in await s.overdue_tasks(NOW + 31, grace=10)] == [t.id for t in leased]
    long_lease = leased[0]
    assert await s.update_task(long_lease.id, expect=long_lease.expect, lease_expires_at=NOW + 1000)
    # Renewed, but past its timeout (30 s) plus the grace (10 s): overdue all the same.
    assert [t.id for t in await s.overdue_tasks(NOW + 39, grace=10)] == [t.id for t in leased[1:]]
    assert [t.id for t in await s.overdue_tasks(NOW + 41, grace=10)] == [t.id for t in leased]
    await s.grant_allowance(NOW + 100, lease_seconds=30)
    after = {t.id: t for t in await s.running_tasks()}
    assert after[long_lease.id].lease_expires_at == NOW + 1000  # never shortened
    assert all(after[t.id].lease_expires_at == NOW + 130 for t in leased[1:])
    queued = await s.get_task("tsk_00004")
    assert queued is not None and queued.pickup_deadline == NOW + 500  # already later than 100 + 60
    stored = await s.get_delegate(d.id)
    assert stored is not None and stored.last_heartbeat == NOW + 100


# --- claims --------------------------------------------------------------------------------------


async def test_claim_honours_type_selectors_deadline_order_and_limit(backend: Backend) -> None:
    """A delegate gets only tasks it may run, oldest first, at most ``limit``, each under a new lease."""
    s = backend.store
    d = delegate(tags=("east", "prod"), types=("aws", "gcp"))
    rows = [
        task(1, type="azure"),  # a type it does not run
        task(2, selectors=("east", "west")),  # west is not among its tags
        task(3, deadline=NOW - 0.5),  # past its pickup deadline
        task(4, selectors=("prod", "east")),
        task(5, type="gcp"),
        task(6, selectors=("east",)),
        task(0, created_at=NOW + 100),  # the newest
    ]
    for row in rows:
        await s.insert_task(row)
    first = await s.claim(d, 2, now=NOW, lease_seconds=30)
    assert [t.id for t in first] == ["tsk_00004", "tsk_00005"]
    for t in first:
        assert (t.state, t.delegate_id, t.delegate_name) == ("running", d.id, d.name)
        assert (t.lease_expires_at, t.started_at, t.attempts, t.lease_seq) == (NOW + 30, NOW, 1, 1)
        assert t.lease_id and t.lease_id.startswith("lse_")
        assert await s.get_task(t.id) == t
    assert len({t.lease_id for t in first}) == 2
    rest = await s.claim(d, 10, now=NOW, lease_seconds=30)
    assert [t.id for t in rest] == ["tsk_00006", "tsk_00000"]
    assert await s.claim(d, 10, now=NOW, lease_seconds=30) == []
    assert {t.id for t in await s.tasks_in_state("queued")} == {"tsk_00001", "tsk_00002", "tsk_00003"}


async def test_concurrent_claims_lease_each_task_once(backend: Backend) -> None:
    """200 tasks, four claimers at once (on two replicas for Postgres): every task leased exactly once."""
    s, other = backend.store, await backend.another()
    async with s.transaction():
        for n in range(200):
            await s.insert_task(task(n))
    claimers = [replace(delegate(f"d{i}"), id=f"dlg_{i}") for i in range(4)]

    async def drain(store: Any, d: DelegateRow) -> list[TaskRow]:
        got: list[TaskRow] = []
        while batch := await store.claim(d, 7, now=NOW, lease_seconds=30):
            got.extend(batch)
        return got

    results = await asyncio.gather(*(drain(s if i % 2 else other, d) for i, d in enumerate(claimers)))
    ids = [t.id for r in results for t in r]
    assert len(ids) == len(set(ids)) == 200
    assert all(t.delegate_id == d.id for r, d in zip(results, claimers, strict=True) for t in r)
    assert await s.count_tasks() == {"running": 200}


async def test_stale_expect_changes_nothing(backend: Backend) -> None:
    """A transition decided on a stale view (state, lease or lease_seq moved on) returns False."""
    s = backend.store
    await s.insert_task(task(1))
    queued = await s.get_task("tsk_00001")
    [leased] = await s.claim(delegate(), 1, now=NOW, lease_seconds=30)
    assert not await s.update_task(queued.id, expect=queued.expect, state="done")
    assert not await s.update_task(leased.id, expect=("running", leased.lease_id, leased.lease_seq - 1), state="done")
    assert not await s.update_task(leased.id, expect=("running", "lse_other", leased.lease_seq), state="done")
    assert await s.get_task(leased.id) == leased
    assert await s.update_task(leased.id, expect=leased.expect, state="done", status="SUCCESS", completed_at=NOW + 1)
    assert not await s.update_task(leased.id, expect=leased.expect, state="queued")
    assert (await s.get_task(leased.id)).state == "done"
    # A re-queued task's next lease is fenced by a higher lease_seq than the last one.
    assert await s.update_task(leased.id, state="queued", lease_id=None)
    [again] = await s.claim(delegate(), 1, now=NOW, lease_seconds=30)
    assert again.lease_seq == 2
    assert again.attempts == 2


async def test_damaged_row_is_left_out_and_named(backend: Backend) -> None:
    """A hand-edited row is left out of lists and claims; reading it alone raises RowDamaged."""
    s = backend.store
    for n in (1, 2, 3):
        await s.insert_task(task(n))
    await _raw(backend, "UPDATE tasks SET payload = '{not json' WHERE id = 'tsk_00001'")
    assert [t.id for t in await s.tasks_in_state("queued")] == ["tsk_00002", "tsk_00003"]
    assert [t.id for t in await s.list_tasks()] == ["tsk_00003", "tsk_00002"]
    with pytest.raises(RowDamaged, match="tsk_00001"):
        await s.get_task("tsk_00001")
    assert [t.id for t in await s.claim(delegate(), 5, now=NOW, lease_seconds=30)] == ["tsk_00002", "tsk_00003"]


async def test_damaged_rows_do_not_block_claims(backend: Backend) -> None:
    """Damaged selectors fail no claim, and a damaged oldest row does not take a claim's only slot."""
    s = backend.store
    for n in (1, 2, 3):
        await s.insert_task(task(n))
    await _raw(backend, "UPDATE tasks SET payload = '{not json' WHERE id = 'tsk_00001'")
    await _raw(backend, "UPDATE tasks SET selectors = 'oops' WHERE id = 'tsk_00002'")
    assert [t.id for t in await s.claim(delegate(), 1, now=NOW, lease_seconds=30)] == ["tsk_00003"]
    assert await s.claim(delegate(), 1, now=NOW, lease_seconds=30) == []
    assert [t.id for t in await s.tasks_in_state("queued")] == []


# --- transactions and events ---------------------------------------------------------------------


async def test_rollback_leaves_nothing_and_drops_effects(backend: Backend) -> None:
    """A transaction that fails writes nothing, runs no after_commit effect and announces nothing."""
    s = backend.store
    heard: list[StoreEvent] = []
    effects: list[str] = []
    s.subscribe(heard.append)

    async def fail() -> None:
        async with s.transaction():
            await s.insert_task(task(1))
            async with s.transaction():  # a nested use joins the outer one
                await s.bump("accepted")
            s.after_commit(lambda: effects.append("effect"))
            s.announce(TaskQueued("aws", ()))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await fail()
    assert await s.get_task("tsk_00001") is None
    assert "accepted" not in await s.counters()
    assert (effects, heard) == ([], [])


async def test_commit_runs_effects_and_announces_after(backend: Backend) -> None:
    """Effects and this process's listeners run once the transaction commits, not before."""
    s = backend.store
    heard: list[StoreEvent] = []
    effects: list[str] = []
    s.subscribe(heard.append)
    async with s.transaction():
        await s.insert_task(task(1))
        s.after_commit(lambda: effects.append("effect"))
        s.announce(TaskDone("tsk_00001"))
        assert (effects, heard) == ([], [])
    assert (effects, heard) == (["effect"], [TaskDone("tsk_00001")])
    s.after_commit(lambda: effects.append("now"))  # outside a transaction: at once
    assert effects == ["effect", "now"]


async def test_sweep_turn(backend: Backend) -> None:
    """The sweep gets its turn; with Postgres only one replica at a time has it."""
    s = backend.store
    async with s.sweep_turn() as mine:
        assert mine
        await s.set_mark("swept", NOW)
        if backend.kind == "postgres":
            other = await backend.another()
            # Each write of a sweep commits on its own, before the sweep ends: one big transaction
            # locking many tasks and counters in turn deadlocked with results and claims under load.
            assert await other.get_mark("swept") == NOW
            async with other.sweep_turn() as theirs:
                assert not theirs
    if backend.kind == "postgres":
        async with other.sweep_turn() as theirs:
            assert theirs
    assert await s.get_mark("swept") == NOW

    # Two sweeps in one process take turns: the second waits for the first, then sweeps too.
    first_in = asyncio.Event()
    release = asyncio.Event()

    async def first() -> bool:
        async with s.sweep_turn() as mine:
            first_in.set()
            await release.wait()
            return bool(mine)

    async def second() -> bool:
        await first_in.wait()
        async with s.sweep_turn() as mine:
            return bool(mine)

    one, two = asyncio.create_task(first()), asyncio.create_task(second())
    await first_in.wait()
    release.set()
    assert await asyncio.gather(one, two) == [True, True]


@pytest.mark.postgres
async def test_announce_reaches_other_replicas_after_commit_only(pg_url: str) -> None:
    """Another replica hears an event once its transaction commits, never one rolled back."""
    a, b, c = [await PostgresStore.connect(pg_url) for _ in range(3)]
    try:
        # connect() returns once the store hears the others: nothing announced after it can be missed.
        assert a.listening.is_set() and b.listening.is_set()
        heard: list[StoreEvent] = []
        arrived = asyncio.Event()

        def hear(event: StoreEvent) -> None:
            heard.append(event)
            arrived.set()

        b.subscribe(hear)
        a_heard: list[StoreEvent] = []
        a.subscribe(a_heard.append)

        async def rolled_back() -> None:
            async with a.transaction():
                a.announce(TaskDone("rolled-back"))
                raise RuntimeError("no")

        with pytest.raises(RuntimeError):
            await rolled_back()
        async with a.transaction():
            a.announce(TaskQueued("aws", ("east",)))
            # Another replica's event committed meanwhile arrives first: this one is not sent yet.
            async with c.transaction():
                c.announce(TaskDone("from-c"))
            await asyncio.wait_for(arrived.wait(), 10)
            assert heard == [TaskDone("from-c")]
            arrived.clear()
        await asyncio.wait_for(arrived.wait(), 10)
        assert heard == [TaskDone("from-c"), TaskQueued("aws", ("east",))]
        # Its own event reaches it once, locally (not echoed back); other replicas' events too.
        assert a_heard.count(TaskQueued("aws", ("east",))) == 1
        arrived.clear()
        a.announce(TaskDone("outside"))  # outside a transaction: sent at once
        await asyncio.wait_for(arrived.wait(), 10)
        assert heard[-1] == TaskDone("outside")
    finally:
        for s in (a, b, c):
            await s.close()


# --- schema --------------------------------------------------------------------------------------


async def test_reopen_keeps_data_and_schema(backend: Backend, tmp_path: Path) -> None:
    """Opening the same database again migrates nothing twice and finds the data."""
    s = backend.store
    await s.insert_task(task(1))
    if backend.kind == "sqlite":
        await s.close()
        backend.store = s = await SqliteStore.open(tmp_path / "cp.db")
    else:
        url = backend.url
        await s.close()
        backend.store = s = await PostgresStore.connect(url)
        conn = await asyncpg.connect(url)
        try:
            versions = [r[0] for r in await conn.fetch("SELECT version FROM schema_version ORDER BY version")]
        finally:
            await conn.close()
        assert versions == list(range(1, SCHEMA_VERSION + 1))
    assert (await s.get_task("tsk_00001")).id == "tsk_00001"


@pytest.mark.postgres
async def test_replicas_starting_together_migrate_once(pg_url: str) -> None:
    """Three replicas connecting at once to an empty database: one migrates, all start."""
    stores = await asyncio.gather(*(PostgresStore.connect(pg_url) for _ in range(3)))
    try:
        conn = await asyncpg.connect(pg_url)
        try:
            assert await conn.fetchval("SELECT COUNT(*) FROM schema_version") == SCHEMA_VERSION
        finally:
            await conn.close()
    finally:
        for s in stores:
            await s.close()


@pytest.mark.postgres
async def test_newer_schema_is_refused(pg_url: str) -> None:
    """A database migrated by a newer control plane is refused, naming both versions and what to do."""
    await (await PostgresStore.connect(pg_url)).close()
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("INSERT INTO schema_version(version, applied_at) VALUES($1, 0)", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    with pytest.raises(SchemaTooNew) as caught:
        await PostgresStore.connect(pg_url)
    message = str(caught.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert f"up to {SCHEMA_VERSION}" in message
    assert "Upgrade this control plane" in message


# --- outages and secrets -------------------------------------------------------------------------


@pytest.mark.postgres
async def test_unreachable_database_names_no_password() -> None:
    """Nothing listening: connect fails fast with StoreUnavailable, and the password is not in it."""
    url = f"postgresql://postgres:{CANARY}@127.0.0.1:{free_port()}/nothing"
    with pytest.raises(StoreUnavailable) as caught:
        await asyncio.wait_for(PostgresStore.connect(url), 15)
    assert CANARY not in str(caught.value)
    assert "postgres:***@127.0.0.1" in str(caught.value)
    assert redacted_url(url) == url.replace(CANARY, "***")
    in_query = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing?password={CANARY}&sslmode=disable"
    assert redacted_url(in_query).endswith("?password=***&sslmode=disable")
    with pytest.raises(StoreUnavailable) as caught:
        await asyncio.wait_for(PostgresStore.connect(in_query), 15)
    assert CANARY not in str(caught.value)


@pytest.mark.postgres
async def test_outage_and_recovery(pg_url: str, postgres_server: PostgresServer) -> None:
    """Postgres stopped: calls fail fast with StoreUnavailable and a fault; restarted: all recovers by itself."""
    url = _with_password(pg_url, CANARY)  # the fixture's server trusts loopback, so any password is accepted
    a, b = await PostgresStore.connect(url), await PostgresStore.connect(url)
    heard: list[StoreEvent] = []
    b.subscribe(heard.append)
    try:
        await a.insert_task(task(1))
        with postgres_server.stopped():
            async with asyncio.timeout(20):  # bounded: nothing may hang on a dead server
                with pytest.raises(StoreUnavailable) as write:
                    await a.insert_task(task(2))
                with pytest.raises(StoreUnavailable) as read:
                    await a.get_task("tsk_00001")
                with pytest.raises(StoreUnavailable):
                    async with a.transaction():
                        await a.bump("accepted")
                assert not await a.probe()
            for text in (str(write.value), str(read.value), a.fault or ""):
                assert CANARY not in text
                assert "***" in text
            assert a.fault is not None
        await wait_until(a.probe, "the store takes writes again (the pool reconnects on its own)", 20)
        assert a.fault is None
        await a.insert_task(task(2))
        assert [t.id for t in await a.tasks_in_state("queued")] == ["tsk_00001", "tsk_00002"]

        # The listener reconnects by itself: keep announcing until the other replica hears one.
        async def heard_again() -> bool:
            async with a.transaction():
                a.announce(TaskDone("after-restart"))
            return TaskDone("after-restart") in heard

        await wait_until(heard_again, "the other replica hears announcements again", 20, every=0.05)
    finally:
        await a.close()
        await b.close()


@pytest.mark.postgres
async def test_pgbouncer_transaction_mode(pg_url: str) -> None:
    """``?pgbouncer=transaction`` is not sent to the server; LISTEN is off and that is logged once."""
    with structlog.testing.capture_logs() as logs:
        s = await PostgresStore.connect(pg_url + "?pgbouncer=transaction", poll_backstop=0.5)
    try:
        await s.insert_task(task(1))
        assert [t.id for t in await s.claim(delegate(), 1, now=NOW, lease_seconds=5)] == ["tsk_00001"]
        assert [e["event"] for e in logs].count("controlplane.store.listen_off") == 1
        assert not s.listening.is_set()
        assert s.poll_backstop == 0.5
    finally:
        await s.close()
    with pytest.raises(ValueError, match="pgbouncer="):
        await PostgresStore.connect(pg_url + "?pgbouncer=statement")


@pytest.mark.postgres
async def test_listener_outlives_a_longer_outage(pg_url: str, postgres_server: PostgresServer) -> None:
    """A two-second outage: the listener retries with back-off, logs the outage once, and hears again."""
    a, b = await PostgresStore.connect(pg_url), await PostgresStore.connect(pg_url)
    heard: list[StoreEvent] = []
    b.subscribe(heard.append)
    try:
        await asyncio.wait_for(b.listening.wait(), 10)
        with structlog.testing.capture_logs() as logs:
            await postgres_server.outage(2.0)

            async def heard_again() -> bool:
                async with a.transaction():
                    a.announce(TaskDone("after-outage"))
                return TaskDone("after-outage") in heard

            await wait_until(heard_again, "the other replica hears announcements again", 20, every=0.05)
            await asyncio.wait_for(a.listening.wait(), 20)  # the sender's own listener has its own back-off
        lost = [e for e in logs if e["event"] == "controlplane.store.listen_lost"]
        assert len(lost) == 2  # one line per store's listener, not one per attempt
        assert [e["event"] for e in logs].count("controlplane.store.listen_restored") == 2
    finally:
        await a.close()
        await b.close()


@pytest.mark.postgres
async def test_a_connection_killed_inside_a_transaction(pg_url: str) -> None:
    """The server ends a transaction's connection (a failover, an admin): StoreUnavailable, then recovery."""
    s = await PostgresStore.connect(pg_url)
    admin = await asyncpg.connect(pg_url)
    try:

        async def killed_midway() -> None:
            async with s.transaction():
                await s.bump("before")
                # Every store connection goes, this transaction's among them; the call waits until they have.
                await admin.execute(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND application_name = 'delegate-agent-control-plane'"
                )
                await s.bump("after")

        with pytest.raises(StoreUnavailable, match="cannot use the database"):
            await killed_midway()
        assert s.fault is not None
        assert await s.counters() == {}  # nothing of the transaction landed
        await s.bump("again")
        assert s.fault is None
    finally:
        await admin.close()
        await s.close()
