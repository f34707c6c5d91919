"""`make demo` end to end: the exit code, the expected outcomes, and --keep-running."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.aws.connector import parse_connector
from agent.protocol.api_client import ApiClient
from agent.protocol.models import TestRequest

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
    assert "all 9 outcomes as expected" in text
    for line in ("aws_access_key ", "aws_irsa ", "aws_oidc ", "aws_node_role ", "aws_cross_account ", "aws_govcloud "):
        row = next(r for r in text.splitlines() if r.startswith(line))
        assert row.endswith("as expected: SUCCESS"), row
    assert "arn:aws-us-gov:iam::123456789012:user/gov-deployer" in text
    assert "assumed-role/oidc-connectors/" in text  # the OIDC token, verified by the STS stand-in
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
            console_url = next(w for line in lines if "web console" in line for w in line.split() if "/console/" in w)
            with urllib.request.urlopen(console_url, timeout=10) as resp:  # to the login page
                page = resp.read().decode()
                assert resp.status == 200 and "/console/login" in resp.url and "API key" in page
            connector_file = next(
                w for line in lines if "connector apply -f" in line for w in line.split() if w.endswith(".yaml")
            )
            parse_connector(yaml.safe_load(Path(connector_file).read_text()))
            _the_printed_hints_work(lines)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0, errors_path.read_text()
            # No warning about the demo's own set-up among what a newcomer reads first.
            assert "data_dir_tightened" not in errors_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()


def _the_printed_hints_work(lines: list[str]) -> None:
    """What the demo suggests for the console's wizard succeeds, with every connectivity it names.

    Through the platform (the wizard's first choice) with the access key and with OIDC, and OIDC
    on ec2-gov-0 too ("any connectivity mode"): a newcomer must not meet a failure the demo set up.
    """
    text = "".join(lines)
    url = re.search(r"^  control plane\s+(http://\S+)", text, re.M)
    key_file = re.search(r"log in with the API key: cat (\S+)\)", text)
    access_key = re.search(r"access key (AKIA\w+), secret key reference (\S+);", text)
    role = re.search(r"IAM role ARN (arn:aws:iam::\d+:role/\S+)", text)
    assert url and key_file and access_key and role, text
    client = ApiClient(url[1], Path(key_file[1]).read_text().strip(), timeout=60)
    manual = {"type": "ManualConfig", "spec": {"accessKey": access_key[1], "secretKeyRef": access_key[2]}}
    oidc = {"type": "OidcAuthentication", "spec": {"iamRoleArn": role[1]}}
    tried = {
        "hint_platform_key": ({**manual, "region": "us-east-1"}, [], False, "platform"),
        "hint_platform_oidc": (oidc, [], False, "platform"),
        "hint_oidc_on_ec2": (oidc, ["ec2"], True, "ec2-gov-0"),
    }
    for identifier, (credential, selectors, on_delegate, runs_on) in tried.items():
        spec = {"credential": credential, "delegateSelectors": selectors, "executeOnDelegate": on_delegate}
        client.apply_connector(
            {"connector": {"name": identifier, "identifier": identifier, "type": "Aws", "spec": spec}}
        )
        _, view = client.test_connector(identifier, TestRequest(wait_seconds=60))
        assert (view.status, view.delegate_name) == ("SUCCESS", runs_on), (identifier, view)


def _start_demo(*args: str, stderr: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=_env(),
        cwd=ROOT,
    )


def _read_until(proc: subprocess.Popen[str], marker: str) -> list[str]:
    """The demo's lines up to and including the first with ``marker`` (the demo's own steps bound it)."""
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"the demo ended before {marker!r}:\n{''.join(lines)}")


def _delegate_pids(lines: list[str]) -> list[int]:
    return [int(m[1]) for line in lines if (m := re.search(r"started delegate \S+ .* as process (\d+)", line))]


def _exits_within(pidfds: dict[int, int], seconds: float) -> list[int]:
    """Wait on the processes' pidfds (readable once a process has exited); the PIDs still running."""
    deadline = time.monotonic() + seconds
    waiting = dict(pidfds)
    while waiting:
        ready, _, _ = select.select(list(waiting.values()), [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        waiting = {pid: fd for pid, fd in waiting.items() if fd not in ready}
    return sorted(waiting)


needs_pidfd = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="pidfd_open is Linux-only")


@pytest.mark.slow
@needs_pidfd
def test_the_delegates_die_with_the_demo_even_when_it_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves the demo no time to clean up; its delegates still end (PR_SET_PDEATHSIG)."""
    pidfds: dict[int, int] = {}
    with (
        (tmp_path / "stderr").open("w") as errors,
        _start_demo("--keep-running", "--workdir", str(tmp_path / "w"), stderr=errors) as proc,
    ):
        try:
            lines = _read_until(proc, "Ctrl-C stops everything cleanly")
            pidfds = {pid: os.pidfd_open(pid) for pid in _delegate_pids(lines)}  # opened while they run
            assert len(pidfds) == 2, lines
            tried = [
                t.strip()
                for t in lines
                if re.search(r"(delegates list|connector (list|test|apply|history)|validate -f)", t)
            ]
            program = re.compile(r"(^|\s)delegate-agent (delegates|connector|validate) ")
            assert len(tried) == 6 and all(program.search(t) for t in tried), tried
            proc.kill()
            proc.wait(timeout=30)
            assert _exits_within(pidfds, 30) == [], "delegates outlived the killed demo"
        finally:
            if proc.poll() is None:
                proc.kill()
            for fd in pidfds.values():  # a failing run leaves no delegate behind (pidfds: never a reused PID)
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                os.close(fd)


@pytest.mark.slow
@needs_pidfd
def test_ctrl_c_while_starting_exits_0_and_stops_the_delegates(tmp_path: Path) -> None:
    """A Ctrl-C before the results are in (no handler race): the started delegates stop, exit code 0."""
    errors_path = tmp_path / "stderr"
    with errors_path.open("w") as errors, _start_demo(stderr=errors) as proc:
        try:
            lines = _read_until(proc, "started delegate ec2-gov-0")
            pidfds = {pid: os.pidfd_open(pid) for pid in _delegate_pids(lines)}
            assert len(pidfds) == 2, lines
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0, errors_path.read_text()
            try:
                assert _exits_within(pidfds, 0) == [], "the demo exited before its delegates"
            finally:
                for fd in pidfds.values():
                    os.close(fd)
            assert "Traceback" not in errors_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize("path", sorted((ROOT / "config" / "connectors").glob("*.yaml")), ids=lambda p: p.name)
def test_the_example_connectors_are_valid(path: Path) -> None:
    """Every example connector in config/connectors parses without a problem."""
    parse_connector(yaml.safe_load(path.read_text()))
