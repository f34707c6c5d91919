"""The load run in CI: 1,000 validations through the control plane and 3 delegates, with and without faults.

`make load` runs the same with 10,000 (bench/load.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.load import run_load

TASKS = int(os.environ.get("LOAD_TASKS", "1000"))


@pytest.mark.load
@pytest.mark.timeout(900)
@pytest.mark.parametrize("faults", [False, True], ids=["clean", "faults"])
async def test_load_run_loses_nothing_and_counts_nothing_twice(tmp_path: Path, faults: bool) -> None:
    """Every validation completes, once; with faults, every failure is one AWS's faults explain (the
    retries ran out on Throttling or 503) and says so. The numbers are printed for the record."""
    lines: list[str] = []
    result = await run_load(TASKS, workdir=tmp_path, faults=faults, log=lines.append)
    print(result.line())
    assert result.completed == TASKS
    assert result.lost == 0
    assert result.accepted == result.completed  # no task has two accepted results
    assert result.ok, result.failures
    if not faults:
        assert result.succeeded == TASKS
        return
    assert set(result.failures) <= {"throttled", "network"}
    assert result.succeeded >= TASKS * 0.98  # botocore's retries absorb nearly all of AWS's faults
    seen = result.faults
    assert seen.get("reset", 0) and seen.get("503", 0) and seen.get("429", 0), seen
    assert seen.get("aws_throttling", 0) and seen.get("aws_503", 0), seen
    assert any("SIGKILL to delegate" in line for line in lines)
    assert seen.get("blackhole", 0), "the run ended before the black hole (longer than a lease) came"
