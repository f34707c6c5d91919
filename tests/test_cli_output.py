"""What the CLI prints (issue 14, point 9): no Python None, errors once and as JSON with -o json,
colour only on a terminal, shell completion, a documented control-plane --help, and when a test ran."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from agent.cli import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, _print_table, build_parser, main, print_test_result
from agent.protocol.auth import DEFAULT_AUDIENCE
from agent.protocol.models import AcquireRequest, TaskResult, TestRequest
from agent.protocol.results import Identity, Step, ValidationResult
from tests.conftest import API_KEY, ControlPlaneFactory, free_port, manual_connector, register_request


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


# --- no Python None ---------------------------------------------------------------------------------


def test_absent_values_are_a_dash_in_tables_and_results() -> None:
    """None and empty cells print as '-', and so does a result's missing identity parts."""
    out = io.StringIO()
    _print_table([["a", None, ""]], ["name", "tags", "version"], out)
    assert out.getvalue().splitlines()[1].split() == ["a", "-", "-"]
    result = ValidationResult(status="SUCCESS", tested_at=datetime.now(UTC), identity=Identity())
    print_test_result(result, task_id="t", status=None, delegate_name=None, out=out)
    assert "None" not in out.getvalue()


async def test_delegates_list_of_a_delegate_without_tags_has_no_none(
    control_plane_factory: ControlPlaneFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real listing: every cell holds a value or '-'."""
    cp = await control_plane_factory()
    await cp.core.register(register_request("d1", []))
    assert await run_cli("delegates", "list", "--control-plane", cp.url, "--api-key", API_KEY) == EXIT_OK
    out = capsys.readouterr().out
    assert "None" not in out and "d1" in out


# --- errors: once, and as JSON with -o json ---------------------------------------------------------------


async def test_json_errors_are_one_object_on_stderr(
    control_plane_factory: ControlPlaneFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not found, an invalid connector (with its problems), unreachable: each one JSON object, stdout empty."""
    cp = await control_plane_factory()
    common = ("--control-plane", cp.url, "--api-key", API_KEY, "-o", "json")
    assert await run_cli("connector", "get", "Nope", *common) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert json.loads(err) == {"error": {"message": "no connector with identifier 'Nope'", "code": "not_found"}}

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(manual_connector("x", delegateSelectors="eks")))
    assert await run_cli("connector", "apply", "-f", str(bad), *common) == EXIT_USAGE
    error = json.loads(capsys.readouterr().err)["error"]
    assert error["message"].startswith(str(bad))
    [problem] = error["problems"]
    assert problem["field"].startswith(str(bad)) and problem["field"].endswith(": connector.spec.delegateSelectors")

    other = tmp_path / "ok.yaml"
    other.write_text(yaml.safe_dump(manual_connector("y")))
    assert await run_cli("connector", "apply", "-f", str(other), "-f", str(bad), *common) == EXIT_USAGE
    error = json.loads(capsys.readouterr().err)["error"]  # several documents: still one object
    assert error["message"].startswith("nothing applied")

    url = f"http://127.0.0.1:{free_port()}"
    assert await run_cli("connector", "list", "--control-plane", url, "--api-key", "k", "-o", "json") == 3
    assert json.loads(capsys.readouterr().err)["error"]["message"].startswith("cannot reach the control plane")


@pytest.mark.parametrize(
    "argv",
    [
        ["connector", "list", "-o", "json", "--bogus"],
        ["connector", "list", "--output=json", "--control-plane", "127.0.0.1:1"],
        ["connector", "test", "-ojson"],
    ],
)
def test_usage_errors_are_json_too_when_asked(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's own mistakes (unknown flag, missing argument) and ours honour -o json as well."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits
        code = int(exc.code or 0)
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert json.loads(err)["error"]["message"]


def test_errors_are_plain_text_without_json(capsys: pytest.CaptureFixture[str]) -> None:
    """Without -o json nothing changes: 'delegate-agent: ...' once."""
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["connector", "list", "--control-plane", url, "--api-key", "k"]) == EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert err.startswith("delegate-agent: cannot reach") and len(err.splitlines()) == 1


# --- colour ------------------------------------------------------------------------------------------------


def _result(status: str) -> ValidationResult:
    return ValidationResult(
        status="SUCCESS" if status == "SUCCESS" else "FAILURE",
        tested_at=datetime.now(UTC),
        steps=[Step(name="sts", status="SUCCESS", duration_ms=3)],
    )


def test_status_words_are_coloured_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """SUCCESS green and FAILURE red on a TTY; plain in a pipe; plain when NO_COLOR is set."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    tty, pipe = Terminal(), io.StringIO()
    for out in (tty, pipe):
        print_test_result(_result("SUCCESS"), task_id="t", status="SUCCESS", delegate_name="d", out=out)
        _print_table([["c", "FAILURE 10:00:00"]], ["id", "last test"], out)
    assert "\033[32mSUCCESS\033[0m  task t" in tty.getvalue()
    assert "\033[31mFAILURE\033[0m 10:00:00" in tty.getvalue()
    assert "\033[" not in pipe.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    plain = Terminal()
    print_test_result(_result("SUCCESS"), task_id="t", status="SUCCESS", delegate_name="d", out=plain)
    assert "\033[" not in plain.getvalue()


def test_coloured_cells_stay_aligned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Escape codes go around the word, after padding: the columns line up as without colour."""
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    tty, pipe = Terminal(), io.StringIO()
    rows = [["SUCCESS", "x"], ["FAILURE", "y"], ["-", "SUCCESS"]]
    _print_table(rows, ["status", "id"], tty)
    _print_table(rows, ["status", "id"], pipe)
    strip = tty.getvalue().replace("\033[32m", "").replace("\033[31m", "").replace("\033[0m", "")
    assert strip == pipe.getvalue()
    assert tty.getvalue().count("\033[0m") == 2  # a connector named SUCCESS in another column stays plain


# --- shell completion ----------------------------------------------------------------------------------------


def _bash_complete(script: str, *words: str) -> list[str]:
    call = 'COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _delegate_agent'
    driver = f'{script}\n{call}; printf "%s\\n" "${{COMPREPLY[@]}}"'
    out = subprocess.run(["bash", "-c", driver, "bash", *words], capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.fixture(scope="module")
def bash_script() -> str:
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out):
        assert main(["completion", "bash"]) == EXIT_OK
    return out.getvalue()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["delegate-agent", "conn"], ["connector"]),
        (["delegate-agent", "connector", ""], ["apply", "get", "list", "history", "delete", "test"]),
        (["delegate-agent", "connector", "apply", "--con"], ["--control-plane"]),
        (["delegate-agent", "connector", "list", "-o", ""], ["table", "json"]),
        (["delegate-agent", "--version", "tokens", "-o", "json", "r"], ["revoke"]),
        (["delegate-agent", "control-plane", "--log-level", "w"], ["warning"]),
        (["delegate-agent", "completion", ""], ["bash", "zsh"]),
    ],
)
def test_bash_completes_commands_flags_and_choices(bash_script: str, words: list[str], expected: list[str]) -> None:
    """The generated script, run by a real bash, completes what the parser knows."""
    assert _bash_complete(bash_script, *words) == expected


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completes_files_and_directories_where_a_flag_wants_them(bash_script: str, tmp_path: Path) -> None:
    """-f FILE offers files, --data-dir DIR only directories."""
    (tmp_path / "conn.yaml").write_text("")
    (tmp_path / "cdir").mkdir()
    prefix = str(tmp_path / "c")
    assert sorted(_bash_complete(bash_script, "delegate-agent", "connector", "apply", "-f", prefix)) == [
        str(tmp_path / "cdir"),
        str(tmp_path / "conn.yaml"),
    ]
    assert _bash_complete(bash_script, "delegate-agent", "control-plane", "--data-dir", prefix) == [
        str(tmp_path / "cdir")
    ]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="needs zsh (tools/install-test-tools.sh installs it)")
def test_zsh_script_offers_commands_with_descriptions() -> None:
    """The zsh script parses, and (with zsh's completion builtins stubbed) describes subcommands and values."""
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out):
        main(["completion", "zsh"])
    stubs = (
        "compdef() { :; }\n"
        '_describe() { local -a a; a=("${(@P)4}"); print -rl -- "${a[@]}"; }\n'
        'compadd() { shift; print -rl -- "$@"; }\n'
        '_files() { print -r -- "files $*"; }\n'
    )
    driver = stubs + out.getvalue() + '\nwords=("$@"); CURRENT=${#words}; _delegate_agent'

    def complete(*words: str) -> list[str]:
        done = subprocess.run(["zsh", "-f", "-c", driver, "zsh", *words], capture_output=True, text=True, check=True)
        return done.stdout.splitlines()

    assert any(line.startswith("apply:create or replace") for line in complete("delegate-agent", "connector", ""))
    assert complete("delegate-agent", "connector", "list", "-o", "") == ["table", "json"]
    assert complete("delegate-agent", "control-plane", "--data-dir", "") == ["files -/"]


# --- control-plane --help ------------------------------------------------------------------------------------


def _control_plane_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["control-plane"]


def test_every_control_plane_flag_has_a_description_and_its_default() -> None:
    """Each flag says what it does, and what happens without it; no 'None' anywhere."""
    parser = _control_plane_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.option_strings
        assert "(required)" in action.help if action.required else "(default: " in action.help, action.help
    text = parser.format_help()
    assert "None" not in text
    assert "(default: 127.0.0.1:8080)" in text and "(default: 120)" in text
    assert f"(default: {DEFAULT_AUDIENCE})" in text  # written out in cli.py; this keeps it true


# --- lastTest.testedAt ---------------------------------------------------------------------------------------------


async def test_last_test_time_is_when_the_test_ran_not_when_the_result_arrived(
    control_plane_factory: ControlPlaneFactory,
) -> None:
    """A result delivered late (an outbox replay) keeps the time its test ran."""
    cp = await control_plane_factory()
    await cp.core.apply_connector(manual_connector("Late"))
    reg = await cp.core.register(register_request("d1"))
    testing = asyncio.create_task(cp.core.test_connector("Late", TestRequest(wait_seconds=0)))
    [task] = (await cp.core.acquire(reg.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=5))).tasks
    ran = datetime.now(UTC) - timedelta(minutes=5)
    output = ValidationResult(status="SUCCESS", tested_at=ran)
    await cp.core.submit_result(
        task.task_id,
        TaskResult(lease_id=task.lease_id, status="SUCCESS", output=output, started_at=ran, finished_at=ran),
    )
    await testing
    record = await cp.core.connector_record(await cp.core.get_connector("Late"))
    assert record.last_test is not None
    assert record.last_test.tested_at == ran
