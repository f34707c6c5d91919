"""Issue 18 attacked: the control plane as an OIDC issuer, tried for leaks, forged or misrouted tokens,
abused issuer routes and operator mistakes, against a real control plane, real delegates and the STS
stand-in (agent/demo/oidc_sts.py), which verifies the token as AWS does.

Each test is one attack; the ones named for a defect failed before the fix that came with them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from agent.cli import main
from agent.controlplane.app import ControlPlaneConfig, ControlPlaneService, CredentialsError
from agent.controlplane.oidc import rotate_key_file
from agent.observability.logging import configure_logging
from agent.protocol.models import AcquireRequest, TestRequest
from tests import test_oidc_e2e
from tests.awsfakes import ACCOUNT
from tests.conftest import API_KEY, ControlPlaneFactory, delegate_client, free_port, register_request
from tests.helpers import wait_until
from tests.test_oidc_e2e import World, connector
from tests.test_oidc_issuer import oidc_connector

pytestmark = pytest.mark.attacks

#: The e2e module's fixtures: the real control plane, delegate and STS stand-in.
world = test_oidc_e2e.world
sts_clock = test_oidc_e2e.sts_clock


def _damage_a_key(path: Path) -> None:
    """Valid JSON, the right shape, but a key that cannot sign (its modulus gone)."""
    body = json.loads(path.read_text())
    body["keys"][-1]["jwk"]["n"] = "AAAA"
    path.write_text(json.dumps(body))


# --- operator mistakes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("issuer", "words"),
    [
        ("https://cp.example.com/oidc{x", "path"),  # was a ValueError traceback from aiohttp's router
        ("https://cp.example.com/{tenant}", "path"),  # was a route pattern matching any first segment
        ("https://cp.example.com/a/../oidc", "path"),  # clients normalise '..': AWS would fetch another URL
        ("https://cp.example.com//oidc", "path"),
        ("https://cp.example.com/o%69dc", "path"),
        ("https://CP.example.com/oidc", "'cp.example.com'"),  # iss is compared as a string
        ("https://bücher.example/oidc", "'xn--bcher-kva.example'"),  # the ASCII form to write in both places
        ("https://cp.example.com:443/oidc", "has a port"),
    ],
)
async def test_an_issuer_url_that_cannot_be_served_or_matched_is_refused_naming_the_flag(
    issuer: str, words: str, tmp_path: Path
) -> None:
    """Defect: these were accepted; the first crashed the start, the others published a URL AWS cannot match."""
    data = tmp_path / "cp"
    data.mkdir(mode=0o700)
    service = ControlPlaneService(ControlPlaneConfig(data_dir=data, oidc_issuer=issuer, port=0))
    try:
        with pytest.raises(CredentialsError) as caught:
            await service.start()
    finally:
        await service.shutdown()
    assert "--oidc-issuer" in str(caught.value) and words in str(caught.value)


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["control-plane", "--data-dir", str(tmp_path / "d"), "--oidc-issuer", "https://cp.example.com/a{b"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and "--oidc-issuer" in err


@pytest.mark.parametrize("argv", [["--oidc-key-file", "k.json"], ["--database", "postgresql://h/db", "--oidc-issuer",
                                  "https://cp.example.com"]])  # fmt: skip
def test_a_key_file_without_issuer_or_a_database_without_key_file_is_one_line(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["control-plane", *argv])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--oidc-key-file" in err


async def test_a_key_file_holding_a_key_that_cannot_sign_stops_the_start(tmp_path: Path) -> None:
    """Defect: only the JSON's shape was checked, so the control plane started and then failed every OIDC
    hand-out (and, with them, the whole acquire batch) with a 500."""
    keys = tmp_path / "oidc-keys.json"
    rotate_key_file(keys, immediately=True)
    _damage_a_key(keys)
    data = tmp_path / "cp"
    data.mkdir(mode=0o700)
    config = ControlPlaneConfig(data_dir=data, oidc_issuer="http://127.0.0.1:9/oidc", oidc_key_file=keys)
    service = ControlPlaneService(config)
    try:
        with pytest.raises(CredentialsError, match=r"oidc-keys\.json: the OIDC key file is damaged \(key .* usable"):
            await service.setup()
    finally:
        await service.shutdown()


async def test_a_key_damaged_or_replaced_by_a_directory_while_running_keeps_tokens_flowing(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, capfd: pytest.CaptureFixture[str]
) -> None:
    """Defect (same fix): a damaged key read while running replaced the good ones, and every hand-out failed."""
    port = free_port()
    issuer = f"http://127.0.0.1:{port}/oidc"
    cp = await control_plane_factory(port=port, oidc_issuer=issuer)
    assert cp.oidc is not None and cp.oidc.key_file is not None
    keys = cp.oidc.key_file
    good = keys.read_text()
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("alpha"))
    logs: list[str] = []

    async def logged(event: str) -> bool:
        await jwks_kids()  # the key file is looked at when the keys are used
        logs.append(capfd.readouterr().err)
        return any(event in text for text in logs)

    async def a_token_now(name: str) -> str:
        await cp.core.apply_connector(oidc_connector(name))
        await cp.core.test_connector(name, TestRequest(wait_seconds=0))
        [task] = (await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=5))).tasks
        assert task.oidc_token is not None
        return task.oidc_token

    async def jwks_kids() -> set[str]:
        async with http.get(issuer + "/.well-known/jwks.json") as resp:
            assert resp.status == 200
            return {k["kid"] for k in (await resp.json())["keys"]}

    before = await jwks_kids()
    for damage in ("damaged", "directory"):
        if damage == "damaged":
            rotate_key_file(keys, immediately=True)
            _damage_a_key(keys)
        else:
            keys.unlink()
            keys.mkdir()
        await wait_until(lambda: logged("controlplane.oidc_keys_unreadable"), "the problem to be logged")
        token = await a_token_now(f"Round_{damage}")
        assert jwt.get_unverified_header(token)["kid"] in before
        assert await jwks_kids() == before
        if damage == "directory":
            keys.rmdir()
        keys.write_text(good)
        logs.clear()
        await wait_until(lambda: logged("controlplane.oidc_keys_reloaded"), "the good file to be re-read")
        logs.clear()


# --- forging, misrouting and replay --------------------------------------------------------------


async def test_a_token_goes_only_with_a_connector_validation(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """Defect: an API key holder queues a ``test.echo`` (or any plugin type) whose payload carries an OIDC
    connector; the hand-out carried a live token to a handler that never exchanges it."""
    port = free_port()
    cp = await control_plane_factory(port=port, oidc_issuer=f"http://127.0.0.1:{port}/oidc")
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("alpha"))
    body = {"type": "test.echo", "payload": {"connector": oidc_connector()}}
    async with http.post(cp.url + "/api/v1/tasks", json=body, headers={"X-API-Key": API_KEY}) as resp:
        assert resp.status in (200, 201), await resp.text()
    [task] = (await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=5))).tasks
    assert task.type == "test.echo"
    assert task.oidc_token is None


async def test_a_scoped_delegate_gets_no_token_for_a_connector_outside_its_tags(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """Held: the token is minted at hand-out, and a hand-out respects selectors and the token's scope."""
    port = free_port()
    token = "team-lab-token-0123456789abcdef"
    cp = await control_plane_factory(
        port=port, oidc_issuer=f"http://127.0.0.1:{port}/oidc", tokens=f"lab:{token} names=lab-* tags=lab"
    )
    doc = oidc_connector("Prod")
    doc["connector"]["spec"]["delegateSelectors"] = ["prod"]
    await cp.core.apply_connector(doc)
    client = delegate_client(http, cp.url, token=token)
    from agent.protocol.errors import AuthError

    with pytest.raises(AuthError):  # the scope refuses the tag that would match
        await client.register(register_request("lab-1", tags=["prod"]))
    d = await client.register(register_request("lab-1", tags=["lab"]))
    await cp.core.test_connector("Prod", TestRequest(wait_seconds=0))
    got = await client.acquire(d.delegate_id, AcquireRequest(max_tasks=5, wait_seconds=0))
    assert got.tasks == []


# --- leaks ---------------------------------------------------------------------------------------


async def test_at_debug_level_no_token_or_private_key_reaches_logs_files_or_any_endpoint(
    world: World, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Held. Success, a denied exchange and platform mode at ``debug``; then every place looked at,
    including the delegate's JSON state files and the control plane's fd-level log output (the e2e
    canary reads capsys, which the JSON logs on sys.__stderr__ bypass)."""
    configure_logging(fmt="json", level="debug", stream=sys.__stderr__)
    arn = f"arn:aws:iam::{ACCOUNT}:role/oidc-prod"
    await world.cp.core.apply_connector(connector("Prod", arn))
    await world.cp.core.apply_connector(connector("Staging", arn))  # denied: its sub is not trusted
    await world.cp.core.apply_connector(connector("Plat", arn, executeOnDelegate=False))
    views = [await world.test(name) for name in ("Prod", "Staging", "Plat")]
    assert [v["status"] for v in views] == ["SUCCESS", "FAILURE", "FAILURE"]
    assert len(world.minted) >= 2
    assert world.cp.oidc is not None and world.cp.oidc.key_file is not None
    private = [k["jwk"][p] for k in json.loads(world.cp.oidc.key_file.read_text())["keys"] for p in ("d", "p", "q")]
    seen = {
        "logs": capfd.readouterr().err,
        "results": json.dumps(views),
        "tasks list": json.dumps(await _get(world, "/api/v1/tasks")),
        "delegates": json.dumps(await _get(world, "/api/v1/delegates")),
        "metrics": await _text(world.cp.url + "/metrics"),
        "info": await _text(world.cp.url + "/v1/info"),
        "openapi": await _text(world.cp.url + "/openapi.json"),
        "jwks": await _text(world.cloud.issuer + "/.well-known/jwks.json"),
        "discovery": await _text(world.cloud.issuer + "/.well-known/openid-configuration"),
        "files": b"".join(
            p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p != world.cp.oidc.key_file
        ).decode("latin-1"),
    }
    assert "task.finished" in seen["logs"]  # the logs were captured: the check below can fail
    for where, text in seen.items():
        for token in world.minted:
            assert token.rsplit(".", 1)[1] not in text, f"a token leaked into the {where}"
        for secret in private:
            assert secret not in text, f"the private key leaked into the {where}"


async def _text(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url, headers={"X-API-Key": API_KEY}) as resp:
        assert resp.status == 200, url
        return await resp.text()


async def _get(w: World, path: str) -> Any:
    return json.loads(await _text(w.cp.url + path))
