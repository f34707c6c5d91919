"""A user's mistakes, made on purpose through every command: one line on stderr, exit 2, no traceback.

Most run the CLI in-process (``main([...])`` with capsys: a traceback would surface as an exception
and fail the test just the same); a subprocess only where the real stdin or process matters.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from agent.cli import EXIT_OK, EXIT_USAGE, build_parser, main
from agent.protocol.signing import TaskSigningKey
from tests.conftest import API_KEY, TOKEN, ControlPlaneFactory, free_port, manual_connector

UTF16 = "connector:\n  name: x\n".encode("utf-16")  # with its byte-order mark, as Notepad writes it
LATIN1 = "a: caf\xe9\n".encode("latin-1")


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout, stderr of one in-process run; a traceback in stderr fails the test."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse and the settings exit this way
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def client_commands() -> Iterator[list[str]]:
    """Every command that talks to the control plane, found by walking the parser, with dummy arguments."""

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> Iterator[list[str]]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for action in subs:
            for name, child in action.choices.items():
                yield from walk(child, [*path, name])
        if subs or not any("--control-plane" in a.option_strings for a in parser._actions):
            return
        argv = list(path)
        for a in parser._actions:
            if not a.option_strings and a.dest != "help":
                argv.append("x")
            elif a.required:
                argv += [a.option_strings[0], os.devnull]
        yield argv

    return walk(build_parser(), [])


CLIENT_COMMANDS = list(client_commands())


def test_the_walk_finds_the_client_commands() -> None:
    """The walk below is not vacuous: it reaches the connector, delegate and token commands."""
    names = {" ".join(argv[:2]) for argv in CLIENT_COMMANDS}
    assert {"connector apply", "connector list", "connector test", "delegates list", "tokens revoke"} <= names


# --- files that are not UTF-8 ----------------------------------------------------------------------


@pytest.mark.parametrize("data", [UTF16, LATIN1], ids=["utf-16", "latin-1"])
@pytest.mark.parametrize(
    "command", [["connector", "apply", "--api-key", "k", "--control-plane", "http://127.0.0.1:9"], ["validate"]]
)
def test_a_connector_file_that_is_not_utf8_is_one_line(
    command: list[str], data: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-f FILE` in UTF-16 or Latin-1: the file is named, exit 2, nothing is sent."""
    f = tmp_path / "connector.yaml"
    f.write_bytes(data)
    code, _, err = cli([*command, "-f", str(f)], capsys)
    assert code == EXIT_USAGE
    assert one_line(err) == f"delegate-agent: {f} is not UTF-8 text"


def test_stdin_that_is_not_utf8_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-f -` reads bytes from stdin and judges them as a file would be."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(UTF16)))
    code, _, err = cli(["validate", "-f", "-"], capsys)
    assert (code, one_line(err)) == (EXIT_USAGE, "delegate-agent: stdin is not UTF-8 text")


def test_stdin_through_a_real_pipe() -> None:
    """The same through a real process and pipe (the interpreter's own stdin decoding is bypassed)."""
    out = subprocess.run(
        [sys.executable, "-m", "agent", "connector", "apply", "-f", "-", "--api-key", "k"],
        input=UTF16,
        capture_output=True,
        check=False,
        timeout=60,
    )
    err = out.stderr.decode()
    assert out.returncode == EXIT_USAGE, err
    assert one_line(err) == "delegate-agent: stdin is not UTF-8 text"


def test_a_utf8_byte_order_mark_is_fine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """UTF-8 with a BOM is UTF-8: it gets as far as the connector's own checks."""
    f = tmp_path / "bom.yaml"
    f.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump({"connector": {"name": "x"}}).encode())
    code, _, err = cli(["validate", "-f", str(f)], capsys)
    assert code == EXIT_USAGE
    assert "is not a valid connector" in err and "UTF-8" not in err


@pytest.fixture
def delegate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The least a delegate needs, so the one mistake under test is the only problem."""
    monkeypatch.setenv("MANAGER_HOST_AND_PORT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("DELEGATE_TOKEN", TOKEN)
    monkeypatch.setenv("DELEGATE_NAME", "d1")


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.usefixtures("delegate_env")
def test_a_config_file_that_is_not_utf8_is_one_line(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--config in UTF-16: named in one line; no 'X is required' noise for what the file might hold."""
    f = tmp_path / "agent.yaml"
    f.write_bytes(UTF16)
    code, _, err = cli([command, "--config", str(f)], capsys)
    assert (code, one_line(err)) == (EXIT_USAGE, f"delegate-agent: {f}: is not UTF-8 text")


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.usefixtures("delegate_env")
def test_a_delegate_token_file_that_is_not_utf8_is_one_line(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """DELEGATE_TOKEN_FILE in UTF-16: the variable and the file, one line, exit 2."""
    f = tmp_path / "token"
    f.write_bytes(TOKEN.encode("utf-16"))
    monkeypatch.delenv("DELEGATE_TOKEN")
    monkeypatch.setenv("DELEGATE_TOKEN_FILE", str(f))
    code, _, err = cli([command], capsys)
    assert (code, one_line(err)) == (EXIT_USAGE, f"delegate-agent: DELEGATE_TOKEN_FILE: {f} is not UTF-8 text")


# --- the control plane's own files and data dir ---------------------------------------------------
# `control-plane` runs asyncio.run() with signal handlers, which wants the main thread of a process
# without pytest's event loop; one interpreter runs all of a test's cases (one start-up, not seven).

_DRIVER = """
import contextlib, io, json, sys, traceback
from agent.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            traceback.print_exc()
            code = None
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def cli_processes(*argvs: list[str]) -> list[tuple[int, str]]:
    """Exit code and stderr of each ``main(argv)``, run one after the other in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(argvs)], capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 0, out.stderr
    results = [(code, err) for code, err in json.loads(out.stdout)]
    for _, err in results:
        assert "Traceback" not in err, err
    return results


def control_plane(data_dir: Path, *flags: str) -> list[str]:
    return ["control-plane", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", *flags]


def _unusable_data_dirs(tmp_path: Path) -> list[tuple[Path, str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    opens_badly = tmp_path / "db-is-a-directory"  # what cannot be judged beforehand: the store will not open
    (opens_badly / "controlplane.sqlite3").mkdir(parents=True)
    cases = [
        (a_file, f"{a_file} is not a directory"),
        (a_file / "data", f"cannot create {a_file / 'data'}: {a_file} is not a directory"),
        (Path("/proc/delegate-agent-test/data"), "No such file or directory"),
        (opens_badly, ""),
    ]
    if os.geteuid() != 0:  # root may write anywhere
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o500)
        cases.append((read_only / "data", f"cannot create {read_only / 'data'}: {read_only} is not writable"))
    elif Path("/sys").is_dir():  # sysfs refuses even root a new directory
        cases.append((Path("/sys/delegate-agent-test"), "Operation not permitted"))
    return cases


@dataclass
class ControlPlaneRuns:
    """Every control-plane mistake below, run in one interpreter: (exit code, stderr) by case name."""

    root: Path
    port: int
    data_dirs: list[tuple[Path, str]]
    results: dict[str, tuple[int, str]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> ControlPlaneRuns:
    root = tmp_path_factory.mktemp("control-plane")
    (root / "secrets.txt").write_bytes(f"{TOKEN}\n".encode("utf-16"))
    (root / "cert.pem").write_text("not a certificate\n")
    data_dirs = _unusable_data_dirs(root)
    argvs = {
        "api-key-file": control_plane(root / "data", "--api-key-file", str(root / "secrets.txt")),
        "delegate-token-file": control_plane(root / "data", "--delegate-token-file", str(root / "secrets.txt")),
        "tls-missing": control_plane(root / "a", "--tls-cert", str(root / "missing.pem")),
        "tls-not-pem": control_plane(root / "b", "--tls-cert", str(root / "cert.pem")),
        **{f"data-dir-{i}": control_plane(d) for i, (d, _) in enumerate(data_dirs)},
        "no-store": ["control-plane", "--listen", "127.0.0.1:0"],
        "not-postgres": [
            "control-plane",
            "--database",
            f"sqlite:///{root}/x.db",
            "--database-listen-url",
            "mysql://h/db",
        ],
        "shared-credentials": ["control-plane", "--database", DATABASE, "--listen", "127.0.0.1:0"],
        "both-stores": ["control-plane", "--database", DATABASE, "--data-dir", str(root / "d")],
        "not-encoded": ["control-plane", "--database", NOT_ENCODED, "--listen", "127.0.0.1:0"],
        "port-out-of-range": [
            "control-plane",
            "--database",
            DATABASE.replace(":9/", ":99999/"),
            "--listen",
            "127.0.0.1:0",
            "--delegate-token-file",
            str(root / "tokens"),
            "--api-key-file",
            str(root / "keys"),
            "--task-signing-key-file",
            str(root / "signing-key"),
        ],
        "unreachable": [
            "control-plane",
            "--database",
            DATABASE,
            "--listen",
            "127.0.0.1:0",
            "--delegate-token-file",
            str(root / "tokens"),
            "--api-key-file",
            str(root / "keys"),
            "--task-signing-key-file",
            str(root / "signing-key"),
        ],
    }
    (root / "tokens").write_text(f"default:{TOKEN}\n")
    (root / "keys").write_text("an-api-key-of-enough-length\n")
    (root / "signing-key").write_text(TaskSigningKey.generate().seed_b64 + "\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argvs["busy"] = ["control-plane", "--data-dir", str(root / "c"), "--listen", f"127.0.0.1:{port}"]
        results = cli_processes(*argvs.values())
    return ControlPlaneRuns(root, port, data_dirs, dict(zip(argvs, results, strict=True)))


@pytest.mark.parametrize("case", ["api-key-file", "delegate-token-file"])
def test_control_plane_credential_files_that_are_not_utf8_are_one_line(case: str, runs: ControlPlaneRuns) -> None:
    """The control plane's API key and delegate token files in UTF-16: one line naming the file, exit 2."""
    code, err = runs.results[case]
    assert (code, one_line(err)) == (EXIT_USAGE, f"delegate-agent: {runs.root / 'secrets.txt'} is not UTF-8 text")


def test_an_unusable_control_plane_data_dir_is_one_line(runs: ControlPlaneRuns) -> None:
    """A file, under a file, under /proc, read-only, a store that will not open: one line naming it, exit 2."""
    for i, (data_dir, reason) in enumerate(runs.data_dirs):
        code, err = runs.results[f"data-dir-{i}"]
        line = one_line(err)
        assert code == EXIT_USAGE, line
        assert line.startswith(f"delegate-agent: cannot use the data dir {data_dir} (--data-dir): "), line
        assert reason in line


#: A Postgres URL nothing listens on, with a password that must never be shown.
DB_PASSWORD = "canary-db-password-3141"
DATABASE = f"postgresql://cp:{DB_PASSWORD}@127.0.0.1:9/controlplane"
#: A password with @ and / as typed, not percent-encoded: URL parsers stop at the first of them.
NOT_ENCODED_PASSWORD = "Zq8-canary@pass/w0rd"
NOT_ENCODED = f"postgresql://cp:{NOT_ENCODED_PASSWORD}@127.0.0.1:9/controlplane"


def test_the_store_options_are_checked_before_anything_starts(runs: ControlPlaneRuns) -> None:
    """No store at all, or URLs that are not Postgres: every problem at once, exit 2, nothing started."""
    code, err = runs.results["no-store"]
    assert (code, one_line(err)) == (
        EXIT_USAGE,
        "delegate-agent: control-plane: give --data-dir (SQLite, one process) or --database (Postgres)",
    )
    code, err = runs.results["not-postgres"]
    assert code == EXIT_USAGE
    assert "--database must be a postgresql:// URL (SQLite lives in --data-dir)" in err
    assert "--database-listen-url must be a postgresql:// URL" in err
    code, err = runs.results["both-stores"]
    assert code == EXIT_USAGE
    assert "give --data-dir (SQLite, one process) or --database (Postgres), not both" in err
    assert not (runs.root / "d").exists()  # refused before anything was made


def test_a_password_that_is_not_percent_encoded_is_refused_and_never_shown(runs: ControlPlaneRuns) -> None:
    """A password typed with @ and / as they are: said to need encoding, and no fragment of it shown
    (a URL parser reads up to the first @, so masking what it calls the password left the rest)."""
    code, err = runs.results["not-encoded"]
    assert code == EXIT_USAGE, err
    assert "must be percent-encoded (@ as %40, / as %2F, % as %25" in one_line(err)
    for start in range(len(NOT_ENCODED_PASSWORD) - 5):
        assert NOT_ENCODED_PASSWORD[start : start + 6] not in err


def test_replicas_must_be_given_their_credentials_and_the_password_is_never_shown(runs: ControlPlaneRuns) -> None:
    """With --database nothing is generated (each replica would make its own): all three missing ones
    are named in one line; a database nobody answers on is one line too. The password appears nowhere."""
    code, err = runs.results["shared-credentials"]
    line = one_line(err)
    assert code == EXIT_USAGE, line
    for missing in ("delegate tokens", "API keys", "the task signing key (--task-signing-key-file)"):
        assert missing in line
    for case in ("unreachable", "port-out-of-range"):  # nothing listens; a port asyncpg cannot use
        code, err = runs.results[case]
        assert code == EXIT_USAGE, err
        assert err.splitlines()[-1].startswith("delegate-agent: cannot use the database (--database): "), err
    for _, output in runs.results.values():
        assert DB_PASSWORD not in output and DB_PASSWORD[:8] not in output


def test_tls_files_and_a_busy_port_are_one_line_each(runs: ControlPlaneRuns) -> None:
    """A missing or non-PEM certificate names the file (it said 'cannot listen on'); a busy port says so once."""
    assert all(runs.results[c][0] == EXIT_USAGE for c in ("tls-missing", "tls-not-pem", "busy"))
    missing = one_line(runs.results["tls-missing"][1])
    assert missing.endswith("missing.pem with the key in the same file: No such file or directory")
    not_pem = one_line(runs.results["tls-not-pem"][1])
    assert not_pem.startswith(f"delegate-agent: cannot use the TLS certificate {runs.root / 'cert.pem'} ")
    # The port is found busy after start-up logged (JSON lines): the error is the last line, once.
    busy = runs.results["busy"][1]
    assert busy.splitlines()[-1] == f"delegate-agent: cannot listen on 127.0.0.1:{runs.port}: Address already in use"
    assert busy.count("in use") == 1


@pytest.mark.usefixtures("delegate_env")
@pytest.mark.parametrize(("content", "message"), [("- a list\n", "must be a mapping of settings"), ("a: [", "is not")])
def test_a_config_file_that_is_no_mapping_is_its_only_problem(
    content: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config file that does not parse into settings is the one line; no 'X is required' after it."""
    f = tmp_path / "agent.yaml"
    f.write_text(content)
    code, _, err = cli(["check-config", "--config", str(f)], capsys)
    assert code == EXIT_USAGE
    assert one_line(err).startswith(f"delegate-agent: {f}: {message}")


# --- control-plane URLs and API keys -----------------------------------------------------------------


@pytest.mark.parametrize("url", ["127.0.0.1:8080", "http://", "http://[::1", "ftp://127.0.0.1", "http://h:port"])
def test_a_control_plane_url_without_scheme_or_host_is_one_line(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every client command checks the URL as the delegate does, from the flag or the environment."""
    for argv in CLIENT_COMMANDS:
        code, _, err = cli([*argv, "--control-plane", url, "--api-key", "k"], capsys)
        assert (code, one_line(err)) == (
            EXIT_USAGE,
            f"delegate-agent: --control-plane must be an http(s) URL with a host, not {url!r}",
        ), argv
    monkeypatch.setenv("CONTROL_PLANE_URL", url)
    code, _, err = cli(["connector", "list", "--api-key", "k"], capsys)
    assert "CONTROL_PLANE_URL must be an http(s) URL with a host" in one_line(err)


async def test_an_api_key_with_a_trailing_newline_works(
    control_plane_factory: ControlPlaneFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--api-key "$(cat api-key)"` of a CRLF file, or the variable with its newline: the key is stripped."""
    cp = await control_plane_factory()
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(manual_connector("One")))
    argv = ["connector", "apply", "-f", str(f), "--control-plane", cp.url]
    assert await asyncio.to_thread(main, [*argv, "--api-key", API_KEY + "\r\n"]) == EXIT_OK
    monkeypatch.setenv("CONTROL_PLANE_API_KEY", API_KEY + "\n")
    assert await asyncio.to_thread(main, ["connector", "list", "--control-plane", cp.url]) == EXIT_OK
    out, err = capsys.readouterr()
    assert "One" in out
    assert "delegate-agent: warning:" in err and "API key" not in err  # apply's no-delegate warning only


@pytest.mark.parametrize("source", ["flag", "env"])
def test_an_api_key_that_cannot_be_a_header_is_refused_and_never_shown(
    source: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two lines pasted into one key: refused in one line that does not echo either part."""
    key = "first-secret-half\nsecond-secret-half"
    argv = ["connector", "list", "--control-plane", f"http://127.0.0.1:{free_port()}"]
    if source == "flag":
        argv += ["--api-key", key]
    else:
        monkeypatch.setenv("CONTROL_PLANE_API_KEY", key)
    code, out, err = cli(argv, capsys)
    assert code == EXIT_USAGE
    assert "the API key from" in one_line(err)
    assert "secret-half" not in out + err
