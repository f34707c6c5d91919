"""Connector health as a user sees it (issue 17): the history API, and `connector list/get/history`.

Health comes from real tests: the control plane's own validator (``executeOnDelegate: false``)
against moto for SUCCESS and a removed secret for FAILURE, and a delegate speaking the protocol for
a failure with a delegate's name on it. Everything the CLI prints is read as the user reads it.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.aws.clients import AwsClients
from agent.aws.environment import AwsEnvironment
from agent.aws.secrets import SecretStore
from agent.aws.validator import AwsValidator
from agent.cli import EXIT_OK, EXIT_USAGE, build_parser, health_summary, main, print_health
from agent.controlplane.app import ControlPlaneService
from agent.controlplane.platform import PlatformValidation
from agent.protocol.models import AcquireRequest, ConnectorHealth, TaskResult, TestRequest
from agent.protocol.results import Failure, ValidationResult
from tests.awsfakes import Key, MotoIam
from tests.conftest import API_KEY, ControlPlaneFactory, delegate_client, manual_connector, register_request

H = {"X-API-Key": API_KEY}


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI in a thread (it is synchronous; the control plane runs on this loop): (exit, out, err)."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def local_clock(iso: str) -> str:
    """What the STATUS column says for a time today: local HH:MM."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone().strftime("%H:%M")


def status_cell(listing: str, identifier: str) -> str:
    """The STATUS column of ``identifier``'s row (the last column: everything from its header's offset)."""
    header, *rows = listing.splitlines()
    [row] = [r for r in rows if r.split()[0] == identifier]
    return row[header.index("STATUS") :]


@dataclass
class Platform:
    """A control plane that validates ``executeOnDelegate: false`` connectors itself, on moto."""

    cp: ControlPlaneService
    key: Key
    secrets: Path
    common: tuple[str, ...]

    async def test(self, http: aiohttp.ClientSession, identifier: str = "plat") -> dict[str, Any]:
        async with http.post(f"{self.cp.url}/api/v1/connectors/{identifier}/test", headers=H) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()  # type: ignore[no-any-return]


@pytest.fixture
async def platform(moto: str, control_plane_factory: ControlPlaneFactory, tmp_path: Path) -> Platform:
    key = await MotoIam(moto).user("health-user")
    secrets = tmp_path / "cp-secrets"
    secrets.mkdir()
    (secrets / "sk").write_text(key.secret_key)
    env, _ = AwsEnvironment.from_environ({"AWS_ENDPOINT_URL": moto, "AWS_EC2_METADATA_DISABLED": "true"})
    cp = await control_plane_factory(
        platform_validator=PlatformValidation(AwsValidator(env, AwsClients(env), SecretStore(secrets)))
    )
    credential = {
        "type": "ManualConfig",
        "spec": {"accessKey": key.access_key, "secretKeyRef": "account.sk"},
        "region": "us-east-1",
    }
    doc = manual_connector("plat", executeOnDelegate=False)
    doc["connector"]["spec"]["credential"] = credential
    await cp.core.apply_connector(doc)
    return Platform(cp, key, secrets, ("--control-plane", cp.url, "--api-key", API_KEY))


async def history(http: aiohttp.ClientSession, url: str, identifier: str, query: str = "") -> tuple[int, Any]:
    async with http.get(f"{url}/api/v1/connectors/{identifier}/history{query}", headers=H) as resp:
        return resp.status, await resp.json()


# --- through a real control plane ------------------------------------------------------------------


async def test_list_get_and_history_follow_a_connector_from_unknown_to_success_to_failure(
    platform: Platform, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    """UNKNOWN never tested, then SUCCESS just tested, then FAILURE 2x since HH:MM: the category."""
    code, out, _ = await cli(capsys, "connector", "list", *platform.common)
    assert code == EXIT_OK
    assert out.splitlines()[0].split()[-2:] == ["TEST", "STATUS"]  # a new column; the others stay
    assert status_cell(out, "plat") == "UNKNOWN never tested"

    assert (await platform.test(http))["status"] == "SUCCESS"
    _, out, _ = await cli(capsys, "connector", "list", *platform.common)
    assert re.fullmatch(r"SUCCESS (just now|\d+s ago)", status_cell(out, "plat"))

    (platform.secrets / "sk").unlink()  # the secret is gone: every test from now on fails the same way
    first = await platform.test(http)
    assert (first["status"], first["result"]["failure"]["category"]) == ("FAILURE", "secret_not_found")
    await platform.test(http)
    _, out, _ = await cli(capsys, "connector", "list", *platform.common)
    health = (await platform.cp.core.connector_record(await platform.cp.core.get_connector("plat"))).health
    assert health.failing_since is not None
    since = local_clock(health.failing_since.isoformat())
    assert status_cell(out, "plat") == f"FAILURE 2x since {since}: secret_not_found"

    code, out, _ = await cli(capsys, "connector", "get", "plat", *platform.common)
    assert code == EXIT_OK
    block = out[out.index("# health:") :].splitlines()
    fields = {k.strip("# "): v.strip() for k, _, v in (line.partition(":") for line in block[1:] if ": " in line)}
    assert fields["status"] == "FAILURE"
    assert fields["failed at"].endswith("(secret_not_found)")
    assert "sk" in fields["hint"] and fields["delegate"] == "platform"
    assert fields["failures in a row"].startswith("2, since ")
    assert fields["last connected"] != "never"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ \((just now|\d+s ago)\)", fields["tested at"])
    assert fields["error"] and fields["test interval"] == "off (no scheduled tests)"
    assert fields["next test"] == "not scheduled"
    assert all(line.startswith("#") for line in block)  # comments: the output still applies as it is

    code, out, err = await cli(capsys, "connector", "history", "plat", *platform.common)
    assert (code, err) == (EXIT_OK, "")
    header, *rows = out.splitlines()
    assert header.split() == ["TESTED", "AT", "STATUS", "TRIGGER", "DELEGATE", "DURATION", "ERROR"]
    assert [r.split()[2:5] for r in rows] == [
        ["FAILURE", "manual", "platform"],
        ["FAILURE", "manual", "platform"],
        ["SUCCESS", "manual", "platform"],
    ]
    assert re.search(r"  (\d+ ms|\d+\.\d s)  +-$", rows[2])  # a success has a duration and no error
    assert "secret" in rows[0] and len(rows[0]) <= len(header) + 200


async def test_history_limit_and_json_output(
    platform: Platform, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    """--limit N shows the newest N; -o json is the API's ConnectorHistory; the API honours limit too."""
    for _ in range(3):
        await platform.test(http)
    code, out, _ = await cli(capsys, "connector", "history", "plat", "--limit", "2", *platform.common)
    assert code == EXIT_OK and len(out.splitlines()) == 3  # header and two rows

    code, out, _ = await cli(capsys, "connector", "history", "plat", "-o", "json", *platform.common)
    doc = json.loads(out)
    assert doc["identifier"] == "plat" and len(doc["entries"]) == 3
    entry = doc["entries"][0]
    assert {"taskId", "status", "testedAt", "trigger", "delegateName", "errorSummary", "failure", "durationMs"} <= set(
        entry
    )
    assert (entry["status"], entry["trigger"], entry["delegateName"]) == ("SUCCESS", "manual", "platform")
    tested = [e["testedAt"] for e in doc["entries"]]
    assert tested == sorted(tested, reverse=True)  # newest first

    status, body = await history(http, platform.cp.url, "plat", "?limit=1")
    assert status == 200 and [e["taskId"] for e in body["entries"]] == [entry["taskId"]]
    status, body = await history(http, platform.cp.url, "plat")
    assert status == 200 and len(body["entries"]) == 3


async def test_list_json_carries_health_as_the_api_gives_it(
    platform: Platform, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    """`connector list -o json` holds each record's health, equal to GET /api/v1/connectors."""
    await platform.test(http)
    code, out, _ = await cli(capsys, "connector", "list", "-o", "json", *platform.common)
    [listed] = json.loads(out)
    async with http.get(platform.cp.url + "/api/v1/connectors", headers=H) as resp:
        [api] = (await resp.json())["connectors"]
    assert code == EXIT_OK and listed["health"] == api["health"]
    assert listed["health"]["status"] == "SUCCESS" and listed["health"]["failuresInRow"] == 0
    assert listed["health"]["lastConnectedAt"] == listed["health"]["testedAt"]


async def test_a_delegates_failure_shows_its_category_and_the_delegate(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    """A test queued for a delegate shows (testing); its failure shows the category and who ran it."""
    cp = await control_plane_factory()
    common = ("--control-plane", cp.url, "--api-key", API_KEY)
    await cp.core.apply_connector(manual_connector("Prod"))
    client = delegate_client(http, cp.url)
    d = (await client.register(register_request("eks-1"))).delegate_id
    task = await cp.core.test_connector("Prod", TestRequest(wait_seconds=0))
    _, out, _ = await cli(capsys, "connector", "list", *common)
    assert status_cell(out, "Prod") == "UNKNOWN (testing)"

    [leased] = (await client.acquire(d, AcquireRequest(max_tasks=1, wait_seconds=1))).tasks
    assert leased.task_id == task.id
    now = datetime.now(UTC)
    summary = "AccessDenied on sts:AssumeRole:\n" + "the role's trust policy does not allow the caller " * 4
    output = ValidationResult(status="FAILURE", tested_at=now, error_summary=summary)
    output.failure = Failure(step="assume_role", category="assume_role_denied", aws_error_code="AccessDenied")
    result = TaskResult(lease_id=leased.lease_id, status="FAILURE", output=output, started_at=now, finished_at=now)
    assert (await client.submit_result(task.id, result)).outcome == "accepted"

    _, out, _ = await cli(capsys, "connector", "list", *common)
    assert status_cell(out, "Prod") == f"FAILURE 1x since {now.astimezone():%H:%M}: assume_role_denied"
    _, out, _ = await cli(capsys, "connector", "get", "Prod", *common)
    assert "#   failed at:         assume_role (assume_role_denied, AWS AccessDenied)" in out
    assert "#   delegate:          eks-1" in out and "#   last connected:    never" in out
    _, out, _ = await cli(capsys, "connector", "history", "Prod", *common)
    [row] = out.splitlines()[1:]
    assert row.split()[2:5] == ["FAILURE", "manual", "eks-1"]
    error = row[out.splitlines()[0].index("ERROR") :]  # one line, cut to 80 characters; -o json has all of it
    assert error.startswith("AccessDenied on sts:AssumeRole: the role's") and error.endswith("\u2026")
    assert len(error) == 80
    _, out, _ = await cli(capsys, "connector", "history", "Prod", "-o", "json", *common)
    assert json.loads(out)["entries"][0]["errorSummary"] == summary


async def test_the_history_api_refuses_a_bad_limit_and_an_unknown_connector(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """limit outside 1-500 or not a number: 400 naming the field; an unknown connector: 404; no key: 401."""
    cp = await control_plane_factory()
    await cp.core.apply_connector(manual_connector("Prod"))
    for bad in ("0", "501", "ten", "1.5", ""):
        status, body = await history(http, cp.url, "Prod", f"?limit={bad}")
        assert status == 400, bad
        assert body["error"]["code"] == "invalid_request"
        assert [p["field"] for p in body["error"]["problems"]] == ["limit"]
    assert await history(http, cp.url, "Prod", "?limit=500") == (200, {"identifier": "Prod", "entries": []})
    status, body = await history(http, cp.url, "Nope")
    assert (status, body["error"]["code"]) == (404, "not_found")
    async with http.get(cp.url + "/api/v1/connectors/Prod/history") as resp:
        assert resp.status == 401
    async with http.get(cp.url + "/openapi.json") as resp:
        op = (await resp.json())["paths"]["/api/v1/connectors/{identifier}/history"]["get"]
    [limit] = [p for p in op["parameters"] if p["name"] == "limit"]
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"], limit["schema"]["default"]) == (1, 500, 50)
    assert {"200", "400", "401", "404"} <= set(op["responses"])


async def test_history_of_an_unknown_connector_is_one_line_and_exit_2(
    control_plane_factory: ControlPlaneFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """As `connector get`: one line on stderr (one JSON object with -o json), nothing on stdout, exit 2."""
    cp = await control_plane_factory()
    common = ("--control-plane", cp.url, "--api-key", API_KEY)
    code, out, err = await cli(capsys, "connector", "history", "Nope", *common)
    assert (code, out, err) == (EXIT_USAGE, "", "delegate-agent: no connector with identifier 'Nope'\n")
    code, out, err = await cli(capsys, "connector", "history", "Nope", "-o", "json", *common)
    assert (code, out) == (EXIT_USAGE, "")
    assert json.loads(err) == {"error": {"message": "no connector with identifier 'Nope'", "code": "not_found"}}

    await cp.core.apply_connector(manual_connector("Fresh"))
    code, out, err = await cli(capsys, "connector", "history", "Fresh", *common)
    assert code == EXIT_OK and out.split() == ["TESTED", "AT", "STATUS", "TRIGGER", "DELEGATE", "DURATION", "ERROR"]
    assert err == "(connector Fresh has no finished tests yet)\n"


@pytest.mark.parametrize("limit", ["0", "501", "x"])
def test_history_limit_is_checked_before_asking(limit: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--limit outside 1-500 is a usage error (exit 2) without a request."""
    with pytest.raises(SystemExit) as exited:
        main(["connector", "history", "Prod", "--limit", limit, "--api-key", "k"])
    assert exited.value.code == EXIT_USAGE
    assert "--limit" in capsys.readouterr().err


# --- the wording, case by case ----------------------------------------------------------------------

NOW = datetime(2026, 5, 4, 12, 0, tzinfo=UTC)


def test_the_status_cell_says_how_long_ago_how_often_since_when_and_why() -> None:
    """Minutes and hours ago; failures since a time today, or a date before today; the reason's fallback."""
    assert health_summary(ConnectorHealth(), NOW) == "UNKNOWN never tested"
    ok = ConnectorHealth(status="SUCCESS", tested_at=NOW - timedelta(minutes=4, seconds=20))
    assert health_summary(ok, NOW) == "SUCCESS 4m ago"
    assert (
        health_summary(ConnectorHealth(status="SUCCESS", tested_at=NOW - timedelta(hours=3)), NOW) == "SUCCESS 3h ago"
    )
    since = NOW - timedelta(minutes=5)
    failing = ConnectorHealth(
        status="FAILURE",
        tested_at=NOW,
        failures_in_row=3,
        failing_since=since,
        failure=Failure(step="assume_role", category="assume_role_denied"),
        testing=True,
    )
    assert health_summary(failing, NOW) == f"FAILURE 3x since {since.astimezone():%H:%M}: assume_role_denied (testing)"
    failing.failing_since = NOW - timedelta(days=3)
    failing.testing = False
    assert (
        health_summary(failing, NOW)
        == f"FAILURE 3x since {failing.failing_since.astimezone():%Y-%m-%d}: assume_role_denied"
    )
    failing.failure = None
    failing.error_summary = "no connected delegate\nhas the tags [gov]"
    assert health_summary(failing, NOW).endswith(": no connected delegate has the tags [gov]")


def test_the_health_block_shows_the_back_off_and_colours_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interval with its back-off when longer; the status word red on a terminal, plain with NO_COLOR."""
    health = ConnectorHealth(
        status="FAILURE",
        tested_at=NOW - timedelta(minutes=1),
        failures_in_row=4,
        failing_since=NOW - timedelta(hours=2),
        test_interval_seconds=1800,
        backoff_seconds=4 * 3600,
        next_test_at=NOW + timedelta(hours=4),
        failure=Failure(step="get_caller_identity", category="credentials_invalid", hint="rotate the key"),
        error_summary="The security token included in the request is invalid",
    )
    out = Terminal()
    print_health(health, NOW, out)
    text = out.getvalue()
    assert "#   status:            \033[31mFAILURE\033[0m\n" in text
    assert "#   test interval:     every 30m; backing off to 4h while the same failure repeats\n" in text
    assert "#   next test:         2026-05-04 16:00:00Z (in 4h)\n" in text
    assert "#   failures in a row: 4, since 2026-05-04 10:00:00Z (2h ago)\n" in text
    assert "#   hint:              rotate the key\n" in text
    monkeypatch.setenv("NO_COLOR", "1")
    plain = Terminal()
    print_health(health, NOW, plain)
    assert "\033[" not in plain.getvalue()
    piped = io.StringIO()
    monkeypatch.delenv("NO_COLOR")
    print_health(ConnectorHealth(test_interval_seconds=1800, testing=True), NOW, piped)
    assert "\033[" not in piped.getvalue()
    assert "#   status:         UNKNOWN (a test is queued or running)\n" in piped.getvalue()
    assert "#   tested at:      never\n" in piped.getvalue()


def test_history_is_in_the_parser_and_so_in_completion() -> None:
    """`connector history` is a subcommand with --limit and -o, which the completion table is built from."""
    from agent._completion import command_table

    table = command_table(build_parser())
    assert "history" in table["connector"].subcommands
    assert {"--limit", "-o", "--output"} <= set(table["connector history"].options)
    assert table["connector history"].values["-o"] == "table json"
