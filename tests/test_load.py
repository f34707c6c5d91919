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
    """Every validation completes, once; the numbers are printed for the record."""
    lines: list[str] = []
    result = await run_load(TASKS, workdir=tmp_path, faults=faults, log=lines.append)
    print(result.line())
    assert result.completed == TASKS
    assert result.lost == 0
    assert result.accepted == result.completed  # no task has two accepted results
    assert result.succeeded == TASKS
    if faults:
        assert sum(result.faults.get(k, 0) for k in ("reset", "503", "429")) > 0
