"""`make demo` end to end: the exit code, the expected outcomes, and --keep-running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from agent.aws.connector import parse_connector

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AGENT_", "DELEGATE_", "CONTROL_PLANE"))}


@pytest.mark.slow
def test_the_demo_runs_every_case_and_exits_0() -> None:
    """From a clean environment, the demo ends with exit 0 and the table of expected outcomes."""
    out = subprocess.run(
        [sys.executable, "-m", "agent", "demo"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "all 8 outcomes as expected" in text
    for line in ("aws_access_key ", "aws_irsa ", "aws_node_role ", "aws_cross_account ", "aws_govcloud "):
        row = next(r for r in text.splitlines() if r.startswith(line))
        assert row.endswith("as expected: SUCCESS"), row
    assert "arn:aws-us-gov:iam::123456789012:user/gov-deployer" in text
    assert "failed at describe_regions (permission_denied, AWS AccessDenied)" in text
    assert "failed at assume_role (assume_role_denied, AWS AccessDenied)" in text
    assert "no connected delegate has all of the tags [gov, prod]" in text
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_keep_running_prints_urls_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    """--keep-running leaves a working stack with URLs to try, and Ctrl-C stops it cleanly."""
    errors_path = tmp_path / "stderr"
    lines: list[str] = []
    with (
        errors_path.open("w") as errors,
        subprocess.Popen(
            [sys.executable, "-m", "agent", "demo", "--keep-running"],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=_env(),
            cwd=ROOT,
        ) as proc,
    ):
        try:
            deadline = time.monotonic() + 120
            assert proc.stdout is not None
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                lines.append(line)
                if "Ctrl-C stops everything cleanly" in line or not line:
                    break
            status_url = next(
                w for line in lines if "eks-prod-0" in line for w in line.split() if w.endswith("/status")
            )
            with urllib.request.urlopen(status_url, timeout=10) as resp:
                assert json.loads(resp.read())["state"] == "running"
            connector_file = next(
                w for line in lines if "connector apply -f" in line for w in line.split() if w.endswith(".yaml")
            )
            parse_connector(yaml.safe_load(Path(connector_file).read_text()))
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0, errors_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize("path", sorted((ROOT / "config" / "connectors").glob("*.yaml")), ids=lambda p: p.name)
def test_the_example_connectors_are_valid(path: Path) -> None:
    """Every example connector in config/connectors parses without a problem."""
    parse_connector(yaml.safe_load(path.read_text()))
