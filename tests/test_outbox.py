"""The outbox: what the delegate promises about results it has not delivered yet."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.protocol.models import TaskResult
from agent.protocol.results import ValidationResult
from agent.protocol.wire import TaskStatus
from agent.runtime.outbox import Entry, MemoryOutbox, Outbox, SqliteOutbox, open_outbox


def _entry(lease: str, status: TaskStatus = "SUCCESS") -> Entry:
    started = datetime(2026, 11, 30, tzinfo=UTC)
    result = TaskResult(
        lease_id=lease,
        status=status,
        output=ValidationResult(status=status, tested_at=started, connector_identifier=lease),
        started_at=started,
        finished_at=started + timedelta(seconds=1),
    )
    return Entry(task_id=f"tsk_{lease}", result=result)


@pytest.mark.parametrize("durable", [False, True])
def test_put_replace_remove_and_count(tmp_path: Path, durable: bool) -> None:
    """One entry per lease (a second result replaces the first), oldest first, counted exactly."""
    box: Outbox = open_outbox(tmp_path if durable else None)
    assert isinstance(box, SqliteOutbox if durable else MemoryOutbox)
    box.put(_entry("a"))
    box.put(_entry("b"))
    box.put(_entry("a", "FAILURE"))
    assert len(box) == 2
    assert {e.key: e.result.status for e in box.pending()} == {"a": "FAILURE", "b": "SUCCESS"}
    box.remove("a")
    box.remove("a")  # removing twice (a duplicate answer) does not miscount
    assert len(box) == 1
    assert [e.task_id for e in box.pending()] == ["tsk_b"]
    box.close()


def test_a_durable_outbox_survives_reopening(tmp_path: Path) -> None:
    box = SqliteOutbox(tmp_path / "outbox.sqlite3")
    for lease in ("a", "b", "c"):
        box.put(_entry(lease))
    box.remove("b")
    box.close()
    again = SqliteOutbox(tmp_path / "outbox.sqlite3")
    assert len(again) == 2
    assert again.changed.is_set()  # the reporter sends them at once
    assert [e.key for e in again.pending()] == ["a", "c"]
    again.close()


def test_results_from_an_earlier_run_and_this_one_are_sent_and_removed_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows left by an earlier run are read from the file; this run's are kept in memory too (up to
    a bound) so sending them reads nothing back. Either way the order, count and removal hold."""
    import agent.runtime.outbox as outbox_module

    monkeypatch.setattr(outbox_module, "MEMORY_ENTRIES", 2)
    box = SqliteOutbox(tmp_path / "outbox.sqlite3")
    box.put(_entry("old"))
    box.close()
    box = SqliteOutbox(tmp_path / "outbox.sqlite3")
    for lease in ("a", "b", "c"):  # "c" is past the memory bound: on disk only
        box.put(_entry(lease))
    box.put(_entry("a", "FAILURE"))
    assert [(e.key, e.result.status) for e in box.pending()] == [
        ("old", "SUCCESS"),
        ("b", "SUCCESS"),
        ("c", "SUCCESS"),
        ("a", "FAILURE"),  # replaced: newest last, as the file orders it
    ]
    box.remove_many(["old", "a", "missing", "a"])
    assert len(box) == 2
    assert [e.key for e in box.pending(limit=1)] == ["b"]
    box.remove_many(["c"])
    assert [e.key for e in box.pending()] == ["b"]  # from memory now: nothing left only on disk
    box.put(_entry("d"))
    assert [e.key for e in box.pending()] == ["b", "d"]
    box.remove_many(["b", "d"])
    assert len(box) == 0 and box.pending() == []
    box.close()
    again = SqliteOutbox(tmp_path / "outbox.sqlite3")
    assert len(again) == 0 and again.pending() == []
    again.close()


def test_a_result_replaced_while_the_disk_is_full_is_counted_and_delivered_once(tmp_path: Path) -> None:
    """The disk refuses the replacement of a written result: the lease still has one result waiting
    (the newest), and once it is delivered nothing of it is left, on disk or in memory."""
    from tests.test_disk_faults import fill, tmpfs

    with tmpfs(tmp_path / "small", "512k") as disk:
        now = [0.0]
        box = SqliteOutbox(disk / "outbox.sqlite3", clock=lambda: now[0])
        box.put(_entry("a"))
        box.put(_entry("b"))
        filler = fill(disk)
        box.put(_entry("a", "FAILURE"))
        assert box.fault is not None
        assert len(box) == 2
        assert sorted((e.key, e.result.status) for e in box.pending()) == [("a", "FAILURE"), ("b", "SUCCESS")]
        box.remove_many(["a"])  # delivered
        assert len(box) == 1
        assert [e.key for e in box.pending()] == ["b"]
        filler.unlink()
        now[0] += 1.0
        assert [e.key for e in box.pending()] == ["b"] and box.fault is None
        box.close()
        again = SqliteOutbox(disk / "outbox.sqlite3")
        assert [e.key for e in again.pending()] == ["b"] and len(again) == 1
        again.close()


def test_a_batch_removal_the_disk_refuses_is_remembered_and_done_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """remove_many on a full disk: none of the delivered results is offered again or counted, the
    others (from memory and from the file) still are, and the deletions happen once it has space."""
    import agent.runtime.outbox as outbox_module
    from tests.test_disk_faults import fill, tmpfs

    monkeypatch.setattr(outbox_module, "MEMORY_ENTRIES", 3)
    with tmpfs(tmp_path / "small", "512k") as disk:
        now = [0.0]
        box = SqliteOutbox(disk / "outbox.sqlite3", clock=lambda: now[0])
        box.put(_entry("old"))
        box.close()
        box = SqliteOutbox(disk / "outbox.sqlite3", clock=lambda: now[0])
        for lease in "abcde":  # d and e are past the memory bound
            box.put(_entry(lease))
        filler = fill(disk)
        box.remove_many(["old", "a", "d"])
        assert box.fault is not None
        assert len(box) == 3
        assert sorted(e.key for e in box.pending()) == ["b", "c", "e"]
        box.put(_entry("f"))  # spilled
        assert len(box) == 4
        assert sorted(e.key for e in box.pending()) == ["b", "c", "e", "f"]
        box.remove_many(["b", "f"])
        assert len(box) == 2
        assert sorted(e.key for e in box.pending()) == ["c", "e"]
        filler.unlink()
        now[0] += 1.0
        assert sorted(e.key for e in box.pending()) == ["c", "e"] and box.fault is None
        assert len(box) == 2
        box.remove_many(["c", "e"])
        assert len(box) == 0 and box.pending() == []
        box.close()
        again = SqliteOutbox(disk / "outbox.sqlite3")
        assert len(again) == 0 and again.pending() == []
        again.close()


def test_more_than_the_memory_bound_after_a_restart_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.runtime.outbox as outbox_module

    monkeypatch.setattr(outbox_module, "MEMORY_ENTRIES", 4)
    box = SqliteOutbox(tmp_path / "outbox.sqlite3")
    for n in range(6):
        box.put(_entry(f"old{n}"))
    box.close()
    box = SqliteOutbox(tmp_path / "outbox.sqlite3")
    for n in range(10):
        box.put(_entry(f"new{n}"))
    seen: list[str] = []
    while batch := box.pending(limit=3):
        keys = [e.key for e in batch]
        assert len(set(keys)) == len(keys) and not set(keys) & set(seen)
        seen += keys
        box.remove_many(keys)
        assert len(box) == 16 - len(seen)
    assert sorted(seen) == sorted([f"old{n}" for n in range(6)] + [f"new{n}" for n in range(10)])
    box.close()


async def test_results_finished_in_one_tick_go_to_disk_in_one_transaction_before_anyone_reads_them(
    tmp_path: Path,
) -> None:
    """Every result put in one event-loop tick is written in one transaction at the end of that tick
    (one WAL append, not one each), and before anything can read, and so send, any of them."""
    import asyncio
    import sqlite3

    box = SqliteOutbox(tmp_path / "outbox.sqlite3")
    statements: list[str] = []
    box._db.set_trace_callback(lambda sql: statements.append(sql.split()[0]))
    for lease in ("a", "b", "c"):
        box.put(_entry(lease))
    box.put(_entry("a", "FAILURE"))  # a second result for a lease in the same tick: the newest wins
    assert statements == [] and box.changed.is_set()  # queued for the end of this tick
    await asyncio.sleep(0)
    assert statements == ["BEGIN", "INSERT", "INSERT", "INSERT", "COMMIT"]
    with sqlite3.connect(tmp_path / "outbox.sqlite3") as other:  # on disk, with no reader asking
        rows = dict(other.execute("SELECT lease_id, task_id FROM outbox").fetchall())
    assert rows == {"a": "tsk_a", "b": "tsk_b", "c": "tsk_c"}
    assert [(e.key, e.result.status) for e in box.pending()] == [("b", "SUCCESS"), ("c", "SUCCESS"), ("a", "FAILURE")]

    statements.clear()
    box.put(_entry("d"))
    assert [e.key for e in box.pending()][-1] == "d"  # a reader in the same tick writes the queue first
    assert statements[:1] == ["INSERT"] and len(box) == 4
    await asyncio.sleep(0)  # the tick's own flush finds nothing left to write
    assert statements.count("INSERT") == 1
    box.close()


async def test_a_tick_whose_transaction_the_disk_refuses_keeps_every_result_in_memory(tmp_path: Path) -> None:
    import asyncio

    from tests.test_disk_faults import fill, tmpfs

    with tmpfs(tmp_path / "small", "512k") as disk:
        now = [0.0]
        box = SqliteOutbox(disk / "outbox.sqlite3", clock=lambda: now[0])
        box.put(_entry("written"))
        await asyncio.sleep(0)
        filler = fill(disk)
        for lease in ("x", "y", "z"):
            box.put(_entry(lease))
        await asyncio.sleep(0)
        assert box.fault is not None  # refused: each result kept in memory, nothing raised
        assert sorted(e.key for e in box.pending()) == ["written", "x", "y", "z"] and len(box) == 4
        filler.unlink()
        now[0] += 1.0
        assert sorted(e.key for e in box.pending()) == ["written", "x", "y", "z"] and box.fault is None
        box.close()
        again = SqliteOutbox(disk / "outbox.sqlite3")
        assert sorted(e.key for e in again.pending()) == ["written", "x", "y", "z"]
        again.close()
