"""The benchmark's own logic: the verdicts it prints and how profile samples are bucketed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench import startup
from bench.__main__ import table
from bench.profile import aggregate


def _results(**over: object) -> dict[str, object]:
    r: dict[str, object] = {
        "idle_rss": 63.0,
        "rss_curve": {1: 78.0, 8: 78.0, 64: 160.0, 256: 170.0},
        "start": 1.0,
        "pickup_idle": {"p50": 0.003, "p99": 0.006, "n": 50},
        "pickup_load": {"p50": 0.004, "p99": 0.060, "n": 200},
        "per_second": 60.0,
        "cpu": 8.0,
        "cpu_close": 8.6,
        "cli": {"cpu_ms": 2000.0, "per_second": 0.5},
        "boto3": {"cpu_ms": 70.0, "per_second": 14.0},
        "aiobotocore": {"cpu_ms": 180.0, "per_second": 9.0},
        "floor": {"cpu_ms": 5.5, "per_second": 77.0},
        "no-sdk": {"cpu_ms": 3.2, "per_second": 70.0},
    }
    r.update(over)
    return r


def test_each_target_gets_a_verdict_from_its_own_figure() -> None:
    rows = {line.split("|")[1].strip(): line for line in table(_results()).splitlines()[2:]}
    assert rows["idle RSS after registration"].rstrip(" |").endswith("met")
    assert "MISSED" in rows["peak RSS, 64 concurrent validations"]  # 160 > 150
    assert "MISSED" in rows["pickup latency at 50% load, p50 / p99"]  # 60 ms > 50
    assert "MISSED" in rows["CPU per validation (delegate's own)"]  # 8 ms > 5
    assert "0.11x boto3" in rows["CPU per validation (delegate's own)"]
    assert "250x cheaper" in rows["vs the AWS CLI"] and rows["vs the AWS CLI"].rstrip(" |").endswith("met")
    assert "ours: +2.5 ms" in rows["the SDK's floor: the two calls alone"]
    assert "the SDK: +2.3 ms" in rows["the same two calls with no SDK at all"]


def test_profile_samples_fall_in_one_bucket_each_and_idle_is_left_out() -> None:
    raw = "\n".join(
        [
            "run (asyncio);Handle._run;AwsValidationHandler.__call__;_make_api_call (aiobotocore/client.py:1) 7",
            "run;AwsValidationHandler.__call__;CredentialResolver.base;SecretStore.resolve;x (botocore/a.py:2) 2",
            "run;Handle._run;Executor._run;SqliteOutbox.put 3",
            "run;Handle._run;Reporter._send_all.<locals>.send;ControlPlaneClient._call 1",
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
        "results: one PUT per result, outbox delete": 1,
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
