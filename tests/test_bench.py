"""The benchmark's own logic: the verdicts it prints and how profile samples are bucketed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from bench import startup
from bench.__main__ import canned_table, moto_table, pickup_table, table
from bench.profile import aggregate


def _pickup(idle_p99: float = 0.006, load_p99: float = 0.012) -> dict[str, Any]:
    return {
        "idle": {"p50": 0.003, "p99": idle_p99, "n": 50, "worst": [idle_p99, 0.005, 0.004]},
        "load": {"p50": 0.004, "p99": load_p99, "n": 200, "worst": [load_p99, 0.010, 0.009]},
    }


def _rounds(
    ratios: list[float], *, cpu_ms: float, floor_ms: float, few_ms: float, few_ratio: float, aws_ms: float, cp_ms: float
) -> dict[str, object]:
    """What ``Bench._rounds`` returns: the median ratio (of three rounds here) and its floors."""
    return {
        "validations": 1000,
        "pinned": True,
        "rounds": [{"ratio": x} for x in ratios],
        "ratio": sorted(ratios)[1],
        "per_second": 250.0,
        "cpu_ms": cpu_ms,
        "per_cpu_second": 1000 / cpu_ms,
        "aws_cpu_ms": aws_ms,
        "control_plane_cpu_ms": cp_ms,
        "capacity": 256,
        "floor": {"cpu_ms": floor_ms, "per_second": 800.0, "per_cpu_second": 1000 / floor_ms, "concurrency": 256},
        "floor_few": {"cpu_ms": few_ms, "concurrency": 16},
        "ratio_few": few_ratio,
    }


def _results(**over: object) -> dict[str, object]:
    r: dict[str, object] = {
        "idle_rss": 54.0,
        "rss_curve": {1: 60.0, 8: 62.0, 64: 70.0, 256: 81.0},
        "start": 1.0,
        "pickup": [_pickup(), _pickup(load_p99=0.025), _pickup(idle_p99=0.0099)],
        "per_second": 60.0,
        "cpu": 8.0,
        "cpu_close": 8.6,
        "cli": {"cpu_ms": 2000.0, "per_second": 0.5},
        "boto3": {"cpu_ms": 70.0, "per_second": 14.0},
        "aiobotocore": {"cpu_ms": 180.0, "per_second": 9.0},
        "floor": {"cpu_ms": 6.4, "per_second": 77.0},
        "no-sdk": {"cpu_ms": 3.2, "per_second": 70.0},
        "moto_rounds": _rounds(
            [1.2, 1.25, 1.4], cpu_ms=2.0, floor_ms=1.6, few_ms=1.5, few_ratio=1.33, aws_ms=4.0, cp_ms=1.1
        ),
        "canned": {
            **_rounds([1.5, 1.6, 1.9], cpu_ms=2.0, floor_ms=1.25, few_ms=1.1, few_ratio=1.8, aws_ms=0.06, cp_ms=3.1),
            "no-sdk": {"cpu_ms": 0.7, "per_second": 1400.0, "per_cpu_second": 1428.6},
        },
    }
    r.update(over)
    return r


def _rows(text: str) -> dict[str, str]:
    return {line.split("|")[1].strip(): line.rstrip(" |") for line in text.splitlines()[2:] if line.startswith("|")}


def test_each_target_gets_a_verdict_from_its_own_figure() -> None:
    rows = _rows(table(_results()))
    assert rows["idle RSS after registration"].endswith("met")  # 54 <= 55
    assert rows["peak RSS, 256 concurrent validations"].endswith("MISSED")  # 81 > 80
    assert rows["peak RSS, 64 concurrent validations"].endswith("70 MiB")  # no target at 64 any more
    assert rows["CPU per validation (delegate's own)"].endswith("met")  # 0.11x boto3 <= 0.8x
    assert "0.11x boto3" in rows["CPU per validation (delegate's own)"]
    # Over moto, the floor row is the pinned rounds' (the median round's ratio), not the burst's CPU.
    floor = rows["the SDK's floor: the two calls alone (pinned rounds)"]
    assert floor.split("|")[2].strip() == "2.00 ms" and "floor 1.60 ms (256 at a time; 1.50 ms at 16)" in floor
    assert "1.25x floor (median of rounds 1.20 / 1.25 / 1.40; ours +0.40 ms; 1.33x the floor at 16)" in floor
    assert floor.endswith("met")
    slower = {**_results()["moto_rounds"], "ratio": 1.31}  # type: ignore[dict-item]
    assert _rows(table(_results(moto_rounds=slower)))["the SDK's floor: the two calls alone (pinned rounds)"].endswith(
        "MISSED"
    )
    assert "250x cheaper" in rows["vs the AWS CLI"] and rows["vs the AWS CLI"].endswith("met")
    assert "the SDK: +3.2 ms" in rows["the same two calls with no SDK at all"]


def test_the_moto_section_alone_prints_the_row_the_full_table_has() -> None:
    only = _rows(moto_table(_results()))["CPU per validation over moto (pinned rounds)"]
    full = _rows(table(_results()))["the SDK's floor: the two calls alone (pinned rounds)"]
    cells = lambda line: [c.strip() for c in line.split("|")[2:]]  # noqa: E731 - padding differs by table
    assert cells(only) == cells(full) and only.endswith("met")
    assert "over moto: 3 rounds of 1000 validations at once" in moto_table(_results())


def test_pickup_targets_are_judged_per_run_and_stable_only_if_every_run_meets_them() -> None:
    rows = _rows(table(_results()))
    assert rows["pickup latency idle, p50 / p99, run 1"].endswith("met")
    assert rows["pickup latency at 50% load, p50 / p99, run 2"].endswith("MISSED")  # 25 ms, not under 20
    assert rows["pickup latency idle, p50 / p99, run 3"].endswith("met")  # 9.9 ms, under 10
    stable = rows["pickup targets, stable over 3 runs"]
    assert "2 of 3 runs met both" in stable and stable.endswith("MISSED")
    three = _rows(table(_results(pickup=[_pickup()] * 3)))["pickup targets, stable over 3 runs"]
    assert three.endswith("met")
    assert _rows(table(_results(pickup=[_pickup(idle_p99=0.010)] * 3)))[
        "pickup latency idle, p50 / p99, run 1"
    ].endswith("MISSED")  # the limit is strict: 10 ms is not under 10 ms
    only = _rows(pickup_table({**_results(), "pickup": [_pickup()] * 3}))
    assert only["pickup latency at 50% load, run 2"].endswith("met") and only["stable over 3 runs"].endswith("met")


def test_canned_rows_compare_the_delegate_with_the_floor_against_the_same_stand_in() -> None:
    rows = _rows(canned_table(_results()))
    throughput = rows["against a canned AWS, one delegate: validations per CPU-second"]
    assert "500 (wall 250/s)" in throughput and "floor 800" in throughput and "0.62x floor" in throughput
    cpu = rows["CPU per validation against the canned AWS"]
    # The verdict is the median round's ratio, and every round's ratio is shown.
    assert "1.60x floor (median of rounds 1.50 / 1.60 / 1.90; ours +0.75 ms; 1.80x the floor at 16)" in cpu
    assert cpu.endswith("MISSED") and "floor 1.25 ms (256 at a time; 1.10 ms at 16)" in cpu
    three = [{"ratio": 1.2}, {"ratio": 1.25}, {"ratio": 1.9}]
    canned = {**_results()["canned"], "rounds": three, "ratio": 1.25}  # type: ignore[dict-item]
    assert _rows(canned_table(_results(canned=canned)))["CPU per validation against the canned AWS"].endswith("met")
    assert "3 rounds of 1000 validations" in canned_table(_results()) and "core of its own" in canned_table(_results())
    assert "capacity 256, and as many by the floor, 256 at a time as the delegate runs them" in canned_table(_results())
    assert "canned AWS 0.06 ms, control plane 3.10 ms" in rows["CPU of the others in the same run, per validation"]
    full = _rows(table(_results()))
    cells = lambda line: [c.strip() for c in line.split("|")]  # noqa: E731 - padding differs by table
    assert cells(full["CPU per validation against the canned AWS"]) == cells(cpu)  # the full table has them too


def test_profile_samples_fall_in_one_bucket_each_and_idle_is_left_out() -> None:
    raw = "\n".join(
        [
            "run (asyncio);Handle._run;AwsValidationHandler.__call__;_make_api_call (aiobotocore/client.py:1) 7",
            "run;AwsValidationHandler.__call__;CredentialResolver.base;SecretStore.resolve;x (botocore/a.py:2) 2",
            "run;Handle._run;Executor._run;SqliteOutbox.put 3",
            "run;Handle._run;Reporter._send_all.<locals>.send_batch;ControlPlaneClient._call 1",
            "run;AwsValidationHandler.__call__;_make_api_call (aiobotocore/c.py:1);_connect_sock;sock_connect 4",
            "run;BaseEventLoop._run_once;EpollSelector.select (selectors.py:451) 50",
            "run;BaseEventLoop._run_once 1",
        ]
    )
    buckets = aggregate(raw)
    assert buckets == {
        "AWS: the two SDK calls (serialise, sign, send, parse)": 7,
        "AWS: reading the secret, building credentials": 2,
        "task: executor bookkeeping, redaction, outbox, metrics, log line": 3,
        "results: batches of up to 64 per request, outbox delete": 1,
        "HTTP: opening connections (pools grow with the burst)": 4,
        "event loop and the rest": 1,
    }


def _startup(**median: float) -> dict[str, object]:
    m = {"python": 0.020, "import_aiohttp": 0.200, "help": 0.060, "version": 0.055, "connector_list": 0.120}
    m.update(median)
    cmds = startup.commands(Path("/venv/bin/python"))
    return {"runs": 20, "median": m, "labels": {c.key: c.label for c in cmds}}


def test_startup_verdicts_come_from_each_commands_own_median() -> None:
    rows = {line.split("|")[1].strip(): line for line in startup.table(_startup(version=0.151)).splitlines()[2:]}
    assert rows["delegate-agent --help"].rstrip(" |").endswith("met")
    assert "+40 ms over the floor" in rows["delegate-agent --help"]
    assert "python -c pass: 20 ms" in rows["delegate-agent --help"]
    assert "MISSED" in rows["delegate-agent --version"]  # 151 ms > 150
    listing = rows[f"delegate-agent connector list ({startup.CONNECTORS} connectors)"]
    assert "0.60x import aiohttp" in listing and listing.rstrip(" |").endswith("met")
    assert "MISSED" in startup.table(_startup(connector_list=0.301))


def test_startup_commands_run_with_one_interpreter_and_time_each_run() -> None:
    cmds = startup.commands(Path(sys.executable))
    assert {c.key for c in cmds} >= {"python", "import_aiohttp", "help", "version", "connector_list"}
    assert all(c.argv[0].startswith(str(Path(sys.executable).parent)) for c in cmds if c.key != "kubectl")
    times = startup.time_commands(cmds[:1], runs=2, env={})
    assert len(times["python"]) == 2 and all(t > 0 for t in times["python"])
    with pytest.raises(RuntimeError, match="exited 3"):
        startup.time_commands([startup.Command("x", "x", [sys.executable, "-c", "raise SystemExit(3)"])], 1, {})


def test_the_measured_process_gets_a_core_of_its_own_and_everything_is_put_back() -> None:
    import os
    import subprocess

    from bench import cores

    if len(os.sched_getaffinity(0)) < 2:
        with cores.split() as pins:
            assert not pins.active  # says so instead of pretending
        return
    everything = os.sched_getaffinity(0)
    measured = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    aside = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        with cores.split(measured=[measured.pid], aside=[aside.pid]) as pins:
            assert pins.active
            assert os.sched_getaffinity(measured.pid) == pins.measured and len(pins.measured) == 1
            assert os.sched_getaffinity(aside.pid) == pins.rest == os.sched_getaffinity(0)  # the bench too
            assert not pins.measured & pins.rest
        assert os.sched_getaffinity(measured.pid) == os.sched_getaffinity(aside.pid) == everything
        assert os.sched_getaffinity(0) == everything
    finally:
        for p in (measured, aside):
            p.communicate(b"")


def test_decompose_rows_show_what_each_layer_adds_over_the_one_above() -> None:
    from bench.decompose import rows

    out = rows({"floor": 1.0, "sdk": 1.01, "handler": 1.25, "boundary": 1.27})
    assert [r[2] for r in out] == ["", "+0.010 ms", "+0.240 ms", "+0.020 ms"]
    assert [r[3] for r in out] == ["1.00x floor", "1.01x floor", "1.25x floor", "1.27x floor"]


def test_instruction_rows_show_what_each_layer_adds_over_the_sdk() -> None:
    from bench.instructions import rows

    out = rows({"sdk": 5_000_000.0, "handler": 5_500_000.0, "executor": 5_800_000.0})
    assert [r[1:] for r in out] == [
        ("5.000 M", "", "1.000x sdk"),
        ("5.500 M", "+0.500 M", "1.100x sdk"),
        ("5.800 M", "+0.300 M", "1.160x sdk"),
    ]
