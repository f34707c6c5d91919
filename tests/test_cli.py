"""The command line against a real control plane: output, exit codes, one-line errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.cli import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, main
from agent.controlplane.core import ControlPlaneSettings
from tests.conftest import API_KEY, ControlPlaneFactory, free_port, manual_connector


async def run_cli(*argv: str) -> int:
    """Run the CLI in a thread: it is synchronous, and the control plane runs on this loop."""
    return await asyncio.to_thread(main, list(argv))


async def test_apply_list_get_delete(
    control_plane_factory: ControlPlaneFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The connector commands, with several documents in one YAML file."""
    cp = await control_plane_factory()
    f = tmp_path / "connectors.yaml"
    f.write_text(yaml.safe_dump_all([manual_connector("One"), manual_connector("Two", delegateSelectors=["eks"])]))
    common = ("--control-plane", cp.url, "--api-key", API_KEY)
    assert await run_cli("connector", "apply", "-f", str(f), *common) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == ["connector/One created", "connector/Two created"]
    assert await run_cli("connector", "list", *common) == EXIT_OK
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["IDENTIFIER", "CREDENTIAL", "REGION"]
    assert "Two" in out and "eks" in out
    assert await run_cli("connector", "get", "Two", *common, "-o", "json") == EXIT_OK
    assert json.loads(capsys.readouterr().out)["identifier"] == "Two"
    assert await run_cli("connector", "delete", "Two", *common) == EXIT_OK
    assert await run_cli("connector", "get", "Two", *common) == EXIT_USAGE
    assert "no connector with identifier 'Two'" in capsys.readouterr().err


async def test_an_invalid_connector_file_lists_problems_and_exits_2(
    control_plane_factory: ControlPlaneFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Input errors exit 2 with every problem on its own line, and no traceback."""
    cp = await control_plane_factory()
    f = tmp_path / "bad.yaml"
    f.write_text(
        yaml.safe_dump(
            {"connector": {"name": "x", "type": "Aws", "spec": {"credential": {"type": "Irsa", "region": "us-est-1"}}}}
        )
    )
    code = await run_cli("connector", "apply", "-f", str(f), "--control-plane", cp.url, "--api-key", API_KEY)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "  connector.spec.credential.region: unknown region 'us-est-1'" in err
    assert "  connector.spec.delegateSelectors:" in err
    assert "Traceback" not in err
    f.write_text("connector: [")
    assert await run_cli("connector", "apply", "-f", str(f), "--control-plane", cp.url, "--api-key", API_KEY) == 2
    assert "is not valid YAML or JSON" in capsys.readouterr().err


async def test_connector_test_exits_1_on_failure(
    control_plane_factory: ControlPlaneFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed connection test prints why and exits 1."""
    cp = await control_plane_factory(
        settings=ControlPlaneSettings(pickup_timeout_seconds=0.3, sweep_interval_seconds=0.05)
    )
    await cp.core.apply_connector(manual_connector("Gov", delegateSelectors=["gov", "prod"]))
    code = await run_cli("connector", "test", "Gov", "--timeout", "20", "--control-plane", cp.url, "--api-key", API_KEY)
    out = capsys.readouterr().out
    assert code == EXIT_FAILED
    assert out.startswith("FAILURE")
    assert "No delegate is connected" in out


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [
        (["connector", "list", "--api-key", "k"], EXIT_UNREACHABLE, "cannot reach the control plane"),
        (["connector", "list"], EXIT_USAGE, "no API key"),
        (["connector", "apply", "-f", "/does/not/exist", "--api-key", "k"], EXIT_USAGE, "cannot read"),
    ],
)
async def test_errors_are_one_line(argv: list[str], code: int, words: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Unreachable control plane -> 3; missing input -> 2; one line each."""
    url = f"http://127.0.0.1:{free_port()}"
    assert await run_cli(*argv, "--control-plane", url) == code
    err = capsys.readouterr().err
    assert words in err
    assert len(err.strip().splitlines()) == 1


async def test_a_wrong_api_key_exits_3(
    control_plane_factory: ControlPlaneFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """Authentication refused is exit 3, like unreachable: the setup is wrong, not the input."""
    cp = await control_plane_factory()
    assert await run_cli("delegates", "list", "--control-plane", cp.url, "--api-key", "wrong") == EXIT_UNREACHABLE
    assert "refused our credentials" in capsys.readouterr().err


def test_python_dash_m_agent_works() -> None:
    """`python -m agent` is the same program as `delegate-agent`."""
    out = subprocess.run([sys.executable, "-m", "agent", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("delegate-agent ")


def test_usage_errors_exit_2() -> None:
    """argparse mistakes exit 2."""
    out = subprocess.run(
        [sys.executable, "-m", "agent", "connector", "frobnicate"], capture_output=True, text=True, check=False
    )
    assert out.returncode == EXIT_USAGE
