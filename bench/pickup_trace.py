"""Bench-only: timestamps along the pickup path, taken from outside the product code (issue 20).

``python -m bench --only pickup --trace-pickup DIR`` starts the control plane and the delegate
through :data:`BOOTSTRAP` instead of ``python -m agent``: it loads this file, calls
:func:`install`, then runs ``agent`` as usual. :func:`install` wraps a few functions to note the
wall time before and after them (the wrapped function runs unchanged) and registers a
``gc.callbacks`` hook; it records

- ``create``: the control plane's ``TaskQueue.create_task``, entered and returned (committed);
- ``wake``: ``TaskQueue._wake_one`` (after the commit; it sets one waiting long poll's event);
- ``take``: ``TaskQueue.take`` (the claim in the store) and the task ids it leased;
- ``txn``: each SQLite transaction: waiting for the store's lock, then holding it (to its commit);
- ``sql``: a SQLite statement slower than 1 ms (``COMMIT`` included: the autocheckpoint runs there);
- ``poll``: the delegate's ``ControlPlaneClient.acquire``, sent and answered, with the task ids;
- ``start``: ``Executor.start`` (the delegate has the task and creates its asyncio task);
- ``handler``: ``AwsValidator.validate`` entered (``testedAt`` is stamped a few lines later);
- ``outbox``: ``SqliteOutbox.put`` and ``remove``, each with its duration;
- ``gc``: every collection, its generation and duration;
- ``slow``: an event-loop callback (``Handle._run``) that took more than 2 ms, and whose task it was.

Each process writes ``DIR/<role>.jsonl`` when it exits. Nothing is imported from ``bench`` (the
delegate runs from its runtime-only venv, which does not have it). :func:`analyse` joins both
files with the bench's own pickups and prints the slowest pickups stage by stage, with what
else happened in either process during each.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

#: ``python -c BOOTSTRAP HOOK ROLE OUT agent-args...``: install the hooks, then run ``agent``.
BOOTSTRAP = (
    "import runpy, sys; hook, role, out = sys.argv[1:4]; "
    "runpy.run_path(hook)['install'](role, out); "
    "sys.argv = ['agent', *sys.argv[4:]]; runpy.run_module('agent', run_name='__main__', alter_sys=True)"
)
SLOW_CALLBACK = 0.002
SLOW_SQL = 0.001

_events: list[list[Any]] = []


def _note(*fields: Any) -> None:
    _events.append(list(fields))


def install(role: str, out: str) -> None:
    """Hook this process (``role`` is ``cp`` or ``delegate``); the record goes to ``out`` at exit."""
    atexit.register(_dump, Path(out))
    _hook_gc()
    _hook_loop()
    if role == "cp":
        _hook_control_plane()
    else:
        _hook_delegate()


def _dump(path: Path) -> None:
    with path.open("w") as f:
        for e in _events:
            f.write(json.dumps(e) + "\n")


def _hook_gc() -> None:
    started: list[float] = [0.0, 0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0], started[1] = time.time(), time.perf_counter()
        else:
            _note("gc", started[0], time.perf_counter() - started[1], info["generation"], info["collected"])

    gc.callbacks.append(on_gc)


def _hook_loop() -> None:
    import asyncio.events  # noqa: PLC0415 - imported only in the hooked process

    run = asyncio.events.Handle._run

    def timed(self: asyncio.events.Handle) -> None:
        t0 = time.perf_counter()
        run(self)
        spent = time.perf_counter() - t0
        if spent > SLOW_CALLBACK:
            _note("slow", time.time() - spent, spent, _describe(self))

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]


def _describe(handle: Any) -> str:
    cb = handle._callback
    owner = getattr(cb, "__self__", None)
    get_coro = getattr(owner, "get_coro", None)
    if get_coro is not None:
        coro = get_coro()
        where = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        return f"task {owner.get_name()}: {getattr(coro, '__qualname__', '?')} ({where.co_filename if where else ''})"
    # Never repr() the callback: that reprs its object, and aiohttp's ClientResponse.__repr__ reads
    # (and caches) its headers before they are set, which broke the delegate's next request.
    return str(getattr(cb, "__qualname__", type(cb).__qualname__))


def _wrap_async(
    owner: Any, name: str, after: Callable[[float, float, tuple[Any, ...], dict[str, Any], Any], None]
) -> None:
    original = getattr(owner, name)

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        result = await original(*args, **kwargs)
        after(t0, time.time(), args, kwargs, result)
        return result

    setattr(owner, name, wrapped)


def _hook_control_plane() -> None:
    from agent.controlplane import queue  # noqa: PLC0415 - imported only in the hooked process
    from agent.controlplane.store import sqlite  # noqa: PLC0415 - imported only in the hooked process

    _wrap_async(
        queue.TaskQueue, "create_task", lambda t0, t1, a, k, row: _note("create", t0, t1, row.id, row.created_at)
    )
    _wrap_async(queue.TaskQueue, "take", lambda t0, t1, a, k, tasks: _note("take", t0, t1, [t.task_id for t in tasks]))

    wake = queue.TaskQueue._wake_one

    def wake_one(self: Any, e: Any) -> None:
        t0 = time.time()
        wake(self, e)
        _note("wake", t0, len(self._waiters))

    queue.TaskQueue._wake_one = wake_one  # type: ignore[method-assign]

    init = sqlite.SqliteStore.__init__

    def store_init(self: Any, path: Any) -> None:
        init(self, path)
        self._db = _TimedConnection(self._db)
        self._lock = _TimedLock()

    sqlite.SqliteStore.__init__ = store_init  # type: ignore[method-assign]


class _TimedLock(asyncio.Lock):
    """The store's transaction lock, noting how long each holder waited for it and then held it."""

    _since = 0.0
    _waited = 0.0

    async def acquire(self) -> Literal[True]:
        p0 = time.perf_counter()
        await super().acquire()
        self._since = time.perf_counter()
        self._waited = self._since - p0
        return True

    def release(self) -> None:
        held = time.perf_counter() - self._since
        _note("txn", time.time() - held - self._waited, self._waited, held)
        super().release()


class _TimedConnection:
    """The store's sqlite3 connection, with slow statements noted (everything else passes through)."""

    def __init__(self, db: Any) -> None:
        self.__dict__["_db"] = db

    def execute(self, sql: str, *args: Any) -> Any:
        p0 = time.perf_counter()
        out = self._db.execute(sql, *args)
        spent = time.perf_counter() - p0
        if spent > SLOW_SQL:
            _note("sql", time.time() - spent, spent, " ".join(sql.split())[:60])
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._db, name, value)


def _hook_delegate() -> None:
    from agent.aws import validator  # noqa: PLC0415 - imported only in the hooked process
    from agent.protocol import client  # noqa: PLC0415 - imported only in the hooked process
    from agent.runtime import executor, outbox  # noqa: PLC0415 - imported only in the hooked process

    _wrap_async(
        client.ControlPlaneClient,
        "acquire",
        lambda t0, t1, a, k, answer: _note("poll", t0, t1, [t.task_id for t in answer.tasks]),
    )
    start = executor.Executor.start

    def timed_start(self: Any, task: Any) -> None:
        _note("start", time.time(), task.task_id)
        start(self, task)

    executor.Executor.start = timed_start  # type: ignore[method-assign]
    validate = validator.AwsValidator.validate

    async def timed_validate(self: Any, connector: Any, **kwargs: Any) -> Any:
        _note("handler", time.time(), kwargs.get("task_id"))
        return await validate(self, connector, **kwargs)

    validator.AwsValidator.validate = timed_validate  # type: ignore[method-assign]
    for name in ("put", "remove"):
        original = getattr(outbox.SqliteOutbox, name)

        def timed(self: Any, arg: Any, _original: Any = original, _name: str = name) -> None:
            p0 = time.perf_counter()
            _original(self, arg)
            spent = time.perf_counter() - p0
            _note("outbox", time.time() - spent, spent, _name)

        setattr(outbox.SqliteOutbox, name, timed)


# --- analysis (runs in the bench's own process) --------------------------------------------------


def _load(path: Path) -> list[list[Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def analyse(trace_dir: Path, pickups: dict[str, dict[str, float]], *, worst: int = 8) -> str:
    """Stage by stage for the ``worst`` slowest pickups, and what overlapped each; plus totals.

    ``pickups`` maps task id to ``{"phase", "created", "tested"}`` (wall seconds) from the bench.
    """
    cp, dg = _load(trace_dir / "cp.jsonl"), _load(trace_dir / "delegate.jsonl")
    stages: dict[str, dict[str, float]] = {
        tid: {"created": p["created"], "tested": p["tested"]} for tid, p in pickups.items()
    }
    for e in cp:
        if e[0] == "create" and e[3] in stages:
            stages[e[3]]["create_returned"] = e[2]
        elif e[0] == "take":
            for tid in e[3]:
                if tid in stages:
                    stages[tid]["claimed"] = e[2]
    for e in dg:
        if e[0] == "poll":
            for tid in e[3]:
                if tid in stages:
                    stages[tid]["poll_answered"] = e[2]
                    stages[tid]["poll_sent"] = e[1]
        elif e[0] == "start" and e[2] in stages:
            stages[e[2]]["executor_start"] = e[1]
        elif e[0] == "handler" and e[2] in stages:
            stages[e[2]]["handler"] = e[1]
    order = ["created", "create_returned", "claimed", "poll_answered", "executor_start", "handler", "tested"]
    labels = ["commit+wake", "claim", "answer->delegate", "->executor", "->handler", "->testedAt"]

    def intervals(evts: list[list[Any]], who: str) -> list[tuple[float, float, str]]:
        out = []
        for e in evts:
            if e[0] == "gc":
                out.append((e[1], e[1] + e[2], f"{who} gc gen{e[3]} {e[2] * 1000:.1f} ms"))
            elif e[0] == "slow":
                out.append((e[1], e[1] + e[2], f"{who} slow callback {e[2] * 1000:.1f} ms: {e[3]}"))
            elif e[0] == "sql":
                out.append((e[1], e[1] + e[2], f"{who} sql {e[2] * 1000:.1f} ms: {e[3]}"))
            elif e[0] == "txn" and (e[2] > 0.002 or e[3] > 0.002):
                out.append(
                    (e[1], e[1] + e[2] + e[3], f"{who} txn lock wait {e[2] * 1000:.1f} ms, held {e[3] * 1000:.1f} ms")
                )
            elif e[0] == "outbox" and e[2] > 0.002:
                out.append((e[1], e[1] + e[2], f"{who} outbox {e[3]} {e[2] * 1000:.1f} ms"))
        return out

    busy = intervals(cp, "cp") + intervals(dg, "delegate")
    lines = []
    for phase in sorted({p["phase"] for p in pickups.values()}):
        ids = sorted(
            (t for t in stages if pickups[t]["phase"] == phase),
            key=lambda t: stages[t]["created"] - stages[t]["tested"],
        )
        lines.append(f"\n{phase}: the {min(worst, len(ids))} slowest of {len(ids)} pickups, ms per stage")
        lines.append("| total | " + " | ".join(labels) + " | overlapping (either process) |")
        lines.append("|---" * (len(labels) + 2) + "|")
        for tid in ids[:worst]:
            s = stages[tid]
            cells = []
            for a, b in itertools.pairwise(order):
                cells.append(f"{(s[b] - s[a]) * 1000:.1f}" if a in s and b in s else "?")
            overlap = [text for lo, hi, text in busy if hi >= s["created"] and lo <= s["tested"]]
            total = (s["tested"] - s["created"]) * 1000
            lines.append(f"| {total:.1f} | " + " | ".join(cells) + " | " + ("; ".join(overlap) or "-") + " |")
    for who, evts in (("cp", cp), ("delegate", dg)):
        gcs = [e for e in evts if e[0] == "gc"]
        slow = [e for e in evts if e[0] == "slow"]
        sql = [e for e in evts if e[0] == "sql"]
        txn_wait = [e[2] for e in evts if e[0] == "txn"]
        lines.append(
            f"{who}: {len(gcs)} collections (max {max((e[2] for e in gcs), default=0) * 1000:.1f} ms, "
            f"gen2 {sum(1 for e in gcs if e[3] == 2)}), {len(slow)} callbacks over {SLOW_CALLBACK * 1000:.0f} ms "
            f"(max {max((e[2] for e in slow), default=0) * 1000:.1f} ms), {len(sql)} statements over "
            f"{SLOW_SQL * 1000:.0f} ms (max {max((e[2] for e in sql), default=0) * 1000:.1f} ms), "
            f"transaction lock wait max {max(txn_wait, default=0) * 1000:.1f} ms"
        )
    return "\n".join(lines)
