"""Connector health on a fake clock: a thousand connectors over simulated hours, back-off, restarts.

The control plane is the real one (its store, queue, sweeper logic and scheduler), driven by a
ManualClock: each step advances the clock, runs one sweep (which schedules what is due) and lets a
delegate (registered through the core) take every task and report at once. What a connector's
test says is decided by the test: SUCCESS, or a FAILURE with a category, as the validator would.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import structlog

from agent.controlplane.core import ControlPlane, ControlPlaneSettings
from agent.controlplane.store import SqliteStore
from agent.protocol.models import AcquireRequest, TaskResult, TestRequest
from agent.protocol.results import ValidationResult, failure_result
from tests.conftest import ManualClock, manual_connector, register_request

INTERVAL = 1800.0
SETTINGS = ControlPlaneSettings(
    connector_test_interval_seconds=INTERVAL, heartbeat_seconds=60, pickup_timeout_seconds=120
)

#: connector identifier -> None for SUCCESS, or the failure category its tests report.
Outcome = Callable[[str], str | None]


class Fleet:
    """A control plane on a fake clock with one delegate that answers every task at once."""

    def __init__(self, core: ControlPlane, clock: ManualClock) -> None:
        self.core, self.clock = core, clock
        self.created: list[tuple[float, str, str]] = []  # (time, connector, trigger)
        self.delegate_id = ""

    @classmethod
    async def start(cls, clock: ManualClock, path: Path | None = None, **settings: object) -> Fleet:
        core = ControlPlane(await SqliteStore.open(path), _settings(**settings), clock=clock)
        core.health._rng = random.Random(7)
        fleet = cls(core, clock)
        await core.recover()
        fleet.delegate_id = (await core.register(register_request("d1", ["eks"], capacity=1000))).delegate_id
        return fleet

    async def apply(self, n: int, **spec: object) -> list[str]:
        names = []
        for i in range(n):
            doc = manual_connector(f"Conn {i:04d}", delegateSelectors=["eks"], **spec)
            names.append((await self.core.apply_connector(doc)).identifier)
        return names

    async def step(self, seconds: float, outcome: Outcome = lambda _: None) -> int:
        """Advance the clock, sweep once, and answer every task; returns how many were answered."""
        self.clock.advance(seconds)
        await self.core.sweep()
        answered = 0
        while True:
            got = await self.core.acquire(self.delegate_id, AcquireRequest(max_tasks=500, wait_seconds=0))
            if not got.tasks:
                return answered
            for t in got.tasks:
                row = await self.core.get_task(t.task_id)
                assert row.connector_id is not None
                self.created.append((self.clock(), row.connector_id, row.trigger or "?"))
                category = outcome(row.connector_id)
                now = datetime.fromtimestamp(self.clock(), UTC)
                result = (
                    ValidationResult(status="SUCCESS", tested_at=now)
                    if category is None
                    else msgspec.structs.replace(
                        failure_result(category, f"it failed: {category}", step="assume_role"), tested_at=now
                    )
                )
                report = TaskResult(
                    lease_id=t.lease_id, status=result.status, output=result, started_at=now, finished_at=now
                )
                assert await self.core.submit_result(t.task_id, report) == "accepted"
                answered += 1

    async def run(self, seconds: float, every: float = 60.0, outcome: Outcome = lambda _: None) -> None:
        for _ in range(int(seconds // every)):
            await self.step(every, outcome)


def _settings(**overrides: object) -> ControlPlaneSettings:
    import dataclasses

    return dataclasses.replace(SETTINGS, **overrides)  # type: ignore[arg-type]


async def test_a_thousand_connectors_are_tested_once_per_interval_spread_evenly(clock: ManualClock) -> None:
    """Applied together, tested together once (they changed); then each about once per interval,
    never more than one at a time, and spread over the interval instead of in a burst."""
    fleet = await Fleet.start(clock)
    names = await fleet.apply(1000)
    for _ in range(5):  # 200 a sweep (a sweep is every half second)
        await fleet.step(0.5)
    assert Counter(trigger for _, _, trigger in fleet.created) == {"changed": 1000}
    start = clock()
    await fleet.run(6 * 3600)
    scheduled = [(t, c) for t, c, trigger in fleet.created if trigger == "scheduled"]
    per_connector = Counter(c for _, c in scheduled)
    assert set(per_connector) == set(names)
    # Six hours at 30 minutes: 12 tests each, give or take the first one (half to one and a half intervals).
    assert all(11 <= n <= 13 for n in per_connector.values()), Counter(per_connector.values())
    # Spread: after the first interval, no minute holds much more than its share (1,000 / 30 = 33).
    per_minute = Counter(int((t - start) // 60) for t, _ in scheduled if t - start > INTERVAL)
    assert max(per_minute.values()) <= 3 * 1000 / 30, per_minute.most_common(3)
    assert (await fleet.core.store.health_summary(clock(), INTERVAL)).by_status == {"SUCCESS": 1000}


async def test_the_same_failure_backs_off_to_six_hours_and_a_success_or_change_ends_it(clock: ManualClock) -> None:
    """Failing the same way again: the interval doubles (1 h, 2 h, 4 h) up to 6 h. A success brings
    it back to 30 minutes; so does a change, which is also tested at once. One status line per change."""
    fleet = await Fleet.start(clock)
    [name] = await fleet.apply(1)
    broken = {name}
    with structlog.testing.capture_logs() as logs:
        await fleet.run(40 * 3600, outcome=lambda c: "assume_role_denied" if c in broken else None)
    times = [t for t, c, _ in fleet.created if c == name]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # The first failure is news (UNKNOWN to FAILURE); each repeat of it doubles the interval, from
    # 30 min up to the 6 h cap; each gap is within half to one and a half of the interval in force.
    expected = [min(INTERVAL * 2**k, 6 * 3600) for k in range(len(gaps))]
    assert all(0.5 * e <= g <= 1.5 * e + 60 for g, e in zip(gaps, expected, strict=True)), (gaps, expected)
    assert gaps[-1] >= 3 * 3600  # backed off to hours, not every 30 minutes
    assert len(times) <= 12  # 40 hours: a flood would be 80 tests
    changes = [e for e in logs if e["event"] == "controlplane.connector_status_changed"]
    assert [(e["old"], e["new"]) for e in changes] == [("UNKNOWN", "FAILURE")]  # one line, not one per test
    record = await fleet.core.connector_record(await fleet.core.get_connector(name))
    assert record.health.status == "FAILURE" and record.health.failures_in_row == len(times)
    assert record.health.failure is not None and record.health.failure.category == "assume_role_denied"
    assert record.health.backoff_seconds == 6 * 3600

    broken.clear()  # fixed: the next (backed-off) test succeeds, and the schedule is 30 minutes again
    before = len(fleet.created)
    await fleet.run(12 * 3600)
    after = [t for t, c, _ in fleet.created[before:] if c == name]
    assert len(after) >= 18  # 6 h wait at most for the first, then every ~30 min
    record = await fleet.core.connector_record(await fleet.core.get_connector(name))
    assert record.health.status == "SUCCESS" and record.health.backoff_seconds == 0
    assert record.health.last_connected_at is not None

    # A change is tested at once, whatever the schedule says.
    moved = {
        "type": "ManualConfig",
        "spec": {"accessKey": "AKIAIOSFODNN7EXAMPLE", "secretKeyRef": "account.aws_secret_key"},
        "region": "eu-west-1",
    }
    await fleet.core.apply_connector(manual_connector("Conn 0000", delegateSelectors=["eks"], credential=moved))
    await fleet.step(1)
    assert fleet.created[-1][1:] == (name, "changed")


async def test_a_restart_after_downtime_spreads_the_overdue_tests(clock: ManualClock, tmp_path: Path) -> None:
    """Down for two hours: every connector is overdue. They are tested within ten minutes of the
    restart, spread over them, not in one burst; nothing is tested twice for it."""
    path = tmp_path / "cp.sqlite3"
    fleet = await Fleet.start(clock, path)
    await fleet.apply(600)
    await fleet.run(3600)
    await fleet.core.store.close()  # the control plane stops ...
    clock.advance(2 * 3600)  # ... and stays down for two hours
    fleet = await Fleet.start(clock, path)
    restarted = clock()
    await fleet.run(15 * 60, every=30)
    per_half_minute = Counter(int((t - restarted) // 30) for t, _, trigger in fleet.created if trigger == "scheduled")
    assert sum(per_half_minute.values()) == 600  # each overdue connector once
    assert max(per_half_minute) <= 20  # within ten minutes
    assert max(per_half_minute.values()) <= 3 * 600 / 20, per_half_minute.most_common(3)


async def test_no_eligible_delegate_is_a_status_without_a_pile_of_tasks(clock: ManualClock) -> None:
    """Nobody has the connector's tags: its tests fail as no_eligible_delegate (the status says so),
    one at a time, backing off; the queue never holds more than one of its tests."""
    fleet = await Fleet.start(clock)
    await fleet.core.apply_connector(manual_connector("Orphan", delegateSelectors=["gpu"]))
    most_queued = 0
    for _ in range(8 * 60):
        await fleet.step(60)
        most_queued = max(most_queued, (await fleet.core.store.count_tasks()).get("queued", 0))
    assert most_queued == 1
    record = await fleet.core.connector_record(await fleet.core.get_connector("Orphan"))
    assert record.health.status == "FAILURE"
    assert record.health.failure is not None and record.health.failure.category == "no_eligible_delegate"
    history = await fleet.core.connector_history("Orphan", 50)
    assert 3 <= len(history.entries) <= 8  # backed off: not 16 tests in 8 hours
    assert {e.trigger for e in history.entries} <= {"changed", "scheduled"}


async def test_a_manual_test_right_after_a_change_answers_it(clock: ManualClock) -> None:
    """Applied, then tested by hand at once (as the demo and a careful user do): one test, not two,
    and the schedule carries on from it."""
    fleet = await Fleet.start(clock)
    await fleet.core.apply_connector(manual_connector("Fresh", delegateSelectors=["eks"]))
    await fleet.core.test_connector("Fresh", TestRequest(wait_seconds=0))
    for _ in range(20):
        await fleet.step(1)
    assert [trigger for _, _, trigger in fleet.created] == ["manual"]
    record = await fleet.core.connector_record(await fleet.core.get_connector("Fresh"))
    assert record.health.status == "SUCCESS" and record.health.next_test_at is not None


async def test_a_result_dated_in_the_future_cannot_freeze_the_status(clock: ManualClock) -> None:
    """A delegate whose clock is years ahead (or a forged date): its test counts as now, so the
    next real tests still decide the status (review finding)."""
    fleet = await Fleet.start(clock)
    [name] = await fleet.apply(1)
    real_now = datetime.fromtimestamp

    async def answer(status: str, years_ahead: float = 0) -> None:
        got = await fleet.core.acquire(fleet.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))
        [t] = got.tasks
        when = real_now(clock() + years_ahead * 365 * 86400, UTC)
        result = (
            ValidationResult(status="SUCCESS", tested_at=when)
            if status == "SUCCESS"
            else msgspec.structs.replace(failure_result("denied", "no", step="assume_role"), tested_at=when)
        )
        report = TaskResult(lease_id=t.lease_id, status=status, output=result, started_at=when, finished_at=when)
        assert await fleet.core.submit_result(t.task_id, report) == "accepted"

    clock.advance(1)
    await fleet.core.sweep()  # the change's test
    await answer("FAILURE", years_ahead=10)
    for _ in range(3):
        await fleet.core.test_connector(name, TestRequest(wait_seconds=0))
        clock.advance(60)
        await answer("SUCCESS")
    record = await fleet.core.connector_record(await fleet.core.get_connector(name))
    assert record.health.status == "SUCCESS"


async def test_the_result_of_a_connector_as_it_was_does_not_set_its_status(clock: ManualClock) -> None:
    """Changed while its test runs: the old version's result goes to history only (no status
    change, no webhook), and the new version is tested after it (review finding)."""
    fleet = await Fleet.start(clock)
    await fleet.core.apply_connector(manual_connector("Moving", delegateSelectors=["eks"]))
    clock.advance(1)
    await fleet.core.sweep()
    got = await fleet.core.acquire(fleet.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))
    [old] = got.tasks
    moved = {
        "type": "ManualConfig",
        "spec": {"accessKey": "AKIAIOSFODNN7EXAMPLE", "secretKeyRef": "account.aws_secret_key"},
        "region": "eu-west-1",
    }
    clock.advance(1)
    await fleet.core.apply_connector(manual_connector("Moving", delegateSelectors=["eks"], credential=moved))
    when = datetime.fromtimestamp(clock(), UTC)
    failed = msgspec.structs.replace(failure_result("denied", "no", step="assume_role"), tested_at=when)
    with structlog.testing.capture_logs() as logs:
        report = TaskResult(lease_id=old.lease_id, status="FAILURE", output=failed, started_at=when, finished_at=when)
        assert await fleet.core.submit_result(old.task_id, report) == "accepted"
    assert not [e for e in logs if e["event"] == "controlplane.connector_status_changed"]
    record = await fleet.core.connector_record(await fleet.core.get_connector("Moving"))
    assert record.health.status == "UNKNOWN"
    assert [e.status for e in (await fleet.core.connector_history("Moving", 5)).entries] == ["FAILURE"]
    for _ in range(12):  # the change's own test follows (it waited for the old one)
        await fleet.step(1)
    assert fleet.created[-1][1:] == ("Moving", "changed")
    record = await fleet.core.connector_record(await fleet.core.get_connector("Moving"))
    assert record.health.status == "SUCCESS"


def test_intervals_are_ascii_durations_with_units_in_range() -> None:
    """Superscript or Arabic-Indic digits and 1h60m are refused, naming the value (review finding)."""
    from agent.aws.connector import parse_interval

    assert [parse_interval(v) for v in ("30m", "1h30m", "90m", "7200", "0")] == [1800, 5400, 5400, 7200, 0]
    for bad in ("\u00b2", "1\u00b2", "\u0663\u0660m", "1h60m", "1m60s", "abc", ""):
        try:
            parse_interval(bad)
        except ValueError as exc:
            assert repr(bad.strip()) in str(exc) or "is not a duration" in str(exc)
        else:
            raise AssertionError(f"{bad!r} was accepted")
