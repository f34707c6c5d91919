"""Start-up: the wall time of ``delegate-agent --help``, ``--version`` and ``connector list``.

A command-line tool is judged by how soon it answers (issue 11: ``--help`` and ``--version`` under
150 ms, ``connector list`` against a running control plane under 300 ms, as ``kubectl version
--client`` answers). Each command runs as a new process, as a user types it, ``runs`` times; the
rounds are interleaved with the same-run baselines, so a noisy moment on the machine costs every
command alike: ``python -c pass`` (the interpreter's own floor, which no Python CLI beats),
``python -c "import aiohttp"`` (what loading the daemon's HTTP stack alone would cost) and, when it
is installed, ``kubectl version --client``. Medians are reported.

    python -m bench --only startup      # this section alone: about 20 s, once its venv is built
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.protocol.api_client import ApiClient
from bench.load import Stack, _clean_env

#: Seconds, median wall time.
TARGETS = {"help": 0.150, "version": 0.150, "connector_list": 0.300}

#: Connectors on the control plane while ``connector list`` runs, so it prints a real table.
CONNECTORS = 20


@dataclass(frozen=True)
class Command:
    key: str
    label: str
    argv: list[str]


def commands(python: Path) -> list[Command]:
    """The measured commands and the baselines, all run with the same interpreter (``python``)."""
    exe, cli = str(python), str(python.parent / "delegate-agent")
    out = [
        Command("python", "python -c pass", [exe, "-c", "pass"]),
        Command("import_aiohttp", 'python -c "import aiohttp"', [exe, "-c", "import aiohttp"]),
        Command("help", "delegate-agent --help", [cli, "--help"]),
        Command("version", "delegate-agent --version", [cli, "--version"]),
        Command("connector_list", "delegate-agent connector list", [cli, "connector", "list"]),
    ]
    kubectl = shutil.which("kubectl")
    if kubectl:
        out.append(Command("kubectl", "kubectl version --client", [kubectl, "version", "--client"]))
    return out


def time_commands(cmds: Sequence[Command], runs: int, env: dict[str, str]) -> dict[str, list[float]]:
    """Wall seconds of each command, ``runs`` times, after one unmeasured round (page cache, .pyc)."""
    times: dict[str, list[float]] = {c.key: [] for c in cmds}
    for round_ in range(runs + 1):
        for c in cmds:
            started = time.perf_counter()
            done = subprocess.run(c.argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"{c.label} exited {done.returncode}: {done.stderr.decode().strip()}")
            if round_:
                times[c.key].append(seconds)
    return times


def connector(i: int) -> dict[str, Any]:
    return {
        "connector": {
            "name": f"startup-{i}",
            "identifier": f"startup_{i}",
            "type": "Aws",
            "spec": {
                "credential": {
                    "type": "ManualConfig",
                    "region": "eu-west-1",
                    "spec": {"accessKey": f"AKIASTARTUP{i:09d}", "secretKeyRef": f"sk{i}"},
                },
                "delegateSelectors": ["startup"],
            },
        }
    }


def measure(python: Path, cp_url: str, api_key: str, *, runs: int, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Apply :data:`CONNECTORS` connectors to the running control plane, then time every command."""
    api = ApiClient(cp_url, api_key, timeout=30)
    for i in range(CONNECTORS):
        api.apply_connector(connector(i))
    cmds = commands(python)
    log(f"measuring start-up: {len(cmds)} commands, median of {runs} runs each, with {python}")
    env = _clean_env(CONTROL_PLANE_URL=cp_url, CONTROL_PLANE_API_KEY=api_key)
    times = time_commands(cmds, runs, env)
    return {
        "runs": runs,
        "python": str(python),
        "labels": {c.key: c.label for c in cmds},
        "median": {k: statistics.median(v) for k, v in times.items()},
        "all": times,
    }


def run(workdir: Path, python: Path, *, runs: int, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """The section on its own: a control plane on 127.0.0.1 (its own process), then :func:`measure`."""
    stack = Stack(workdir)
    try:
        log("starting the control plane")
        stack.start_control_plane()
        return measure(python, stack.cp_url, stack.api_key, runs=runs, log=log)
    finally:
        stack.stop()


def table(s: dict[str, Any]) -> str:
    """Each command's median beside its same-run baseline, with the target and the verdict."""
    m, labels = s["median"], s["labels"]

    def ms(key: str) -> str:
        return f"{m[key] * 1000:.0f} ms"

    def verdict(key: str) -> str:
        return "met" if m[key] <= TARGETS[key] else "MISSED"

    floor = m["python"]
    rows: list[tuple[str, ...]] = []
    for key in ("help", "version"):
        rows.append(
            (
                labels[key],
                ms(key),
                f"{labels['python']}: {ms('python')}",
                f"+{(m[key] - floor) * 1000:.0f} ms over the floor",
                f"<= {TARGETS[key] * 1000:.0f} ms",
                verdict(key),
            )
        )
    rows.append(
        (
            f"{labels['connector_list']} ({CONNECTORS} connectors)",
            ms("connector_list"),
            f"{labels['import_aiohttp']}: {ms('import_aiohttp')}",
            f"{m['connector_list'] / m['import_aiohttp']:.2f}x import aiohttp",
            f"<= {TARGETS['connector_list'] * 1000:.0f} ms",
            verdict("connector_list"),
        )
    )
    if "kubectl" in m:
        rows.append(("  for comparison", "", f"{labels['kubectl']}: {ms('kubectl')}", "", "", ""))
    return markdown(
        (f"start-up, median of {s['runs']} runs", "delegate-agent", "baseline (same run)", "ratio", "target", ""),
        rows,
    )


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with padded columns (readable as plain text too)."""
    widths = [max(len(str(x[i])) for x in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    return "\n".join(lines)
