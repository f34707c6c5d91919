"""The control plane as an OIDC issuer: its URL, its keys and their rotation, the documents AWS reads,
and the token each OidcAuthentication task hand-out carries.

Tokens are signed with joserfc and verified here with PyJWT, so the two libraries check each other.
"""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from agent.cli import main
from agent.controlplane.app import ControlPlaneConfig, ControlPlaneService, CredentialsError
from agent.controlplane.oidc import (
    PUBLISH_AHEAD_SECONDS,
    RETIRED_KEY_SECONDS,
    TOKEN_SECONDS,
    KeyRing,
    OidcConfigError,
    OidcIssuer,
    check_issuer,
    generate_key,
    rotate_key_file,
)
from agent.protocol.models import AcquireRequest, TestRequest
from agent.protocol.signing import TaskSignatureVerifier
from tests.conftest import ControlPlaneFactory, ManualClock, delegate_client, free_port, register_request
from tests.helpers import wait_until

ROLE = "arn:aws:iam::123456789012:role/oidc-deployer"


def oidc_connector(name: str = "Payments prod", **extra: Any) -> dict[str, Any]:
    spec = {"credential": {"type": "OidcAuthentication", "spec": {"iamRoleArn": ROLE}}, "delegateSelectors": []}
    return {"connector": {"name": name, "type": "Aws", **extra, "spec": spec}}


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://cp.example.com/", "https://cp.example.com"),
        ("https://cp.example.com/oidc/account/acme", "https://cp.example.com/oidc/account/acme"),
        ("http://127.0.0.1:8443/oidc", "http://127.0.0.1:8443/oidc"),  # loopback: the tests' and demo's stand-in
        ("http://localhost:9/x", "http://localhost:9/x"),
    ],
)
def test_an_issuer_url_is_kept_as_tokens_carry_it(url: str, expected: str) -> None:
    assert check_issuer(url) == expected


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://cp.example.com", "must use https"),
        ("https://cp.example.com:8443", "has a port"),
        ("https://cp.example.com/?a=1", "query"),
        ("ftp://cp.example.com", "https://"),
        ("https://", "https://"),
    ],
)
def test_an_issuer_aws_would_refuse_is_refused_with_the_reason(url: str, words: str) -> None:
    with pytest.raises(OidcConfigError, match=words):
        check_issuer(url)


def test_a_rotated_key_is_published_before_it_signs_and_the_old_one_after(clock: ManualClock) -> None:
    """No verifier meets a token whose key it cannot find, whichever copy of the keys it holds."""
    t0 = clock()
    old = generate_key(t0)
    ring = KeyRing((old,)).rotated(t0 + 100)
    new = ring.keys[-1]
    assert ring.signing(t0 + 100) is old  # published first ...
    assert [k.kid for k in ring.published(t0 + 100)] == [old.kid, new.kid]
    switch = t0 + 100 + PUBLISH_AHEAD_SECONDS
    assert ring.signing(switch) is new  # ... signs once verifiers have had time to fetch it
    assert old in ring.published(switch + RETIRED_KEY_SECONDS - 1)  # the old key's last tokens still verify
    assert ring.published(switch + RETIRED_KEY_SECONDS) == [new]
    assert RETIRED_KEY_SECONDS > TOKEN_SECONDS
    again = ring.rotated(switch + RETIRED_KEY_SECONDS)
    assert old not in again.keys  # dropped from the file too


def test_the_key_file_is_generated_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "oidc-keys.json"
    first = OidcIssuer("https://cp.example.com", path, writable=True)
    assert first.load() == [path]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = OidcIssuer("https://cp.example.com", path, writable=True)
    assert second.load() == []
    assert first.jwks() == second.jwks()
    [key] = second.jwks()["keys"]
    assert set(key) == {"kty", "n", "e", "kid", "use", "alg"}  # public parts only: no "d", "p", "q"


def test_an_old_key_is_rotated_in_the_data_dir(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "oidc-keys.json"
    OidcIssuer("https://cp.example.com", path, writable=True, wall=clock).load()
    clock.advance(31 * 86400)
    issuer = OidcIssuer("https://cp.example.com", path, writable=True, key_days=30, wall=clock)
    issuer.load()
    assert len(issuer.jwks()["keys"]) == 2  # the new key is published; the old one still signs for now
    assert len(json.loads(path.read_text())["keys"]) == 2


def test_a_damaged_key_file_is_one_clear_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "oidc-keys.json"
    path.write_text('{"version": 1, "keys": [{"jwk": {"kty": "RSA"}, "activeFrom": 1}]}')
    with pytest.raises(OidcConfigError, match=f"{path}: the OIDC key file is damaged"):
        OidcIssuer("https://cp.example.com", path, writable=True).load()
    assert "kty" in path.read_text()  # left as it was, for the operator to restore


def test_a_shared_key_file_must_exist_and_is_not_generated(tmp_path: Path) -> None:
    path = tmp_path / "missing.json"
    with pytest.raises(OidcConfigError, match="rotate-key"):
        OidcIssuer("https://cp.example.com", path, writable=False).load()
    assert not path.exists()


def test_the_issuer_follows_a_key_file_rotated_by_the_cli(tmp_path: Path, clock: ManualClock) -> None:
    path = tmp_path / "oidc-keys.json"
    assert main(["oidc", "rotate-key", "--key-file", str(path)]) == 0
    issuer = OidcIssuer("https://cp.example.com", path, writable=False, wall=clock)
    issuer.load()
    [first] = issuer.jwks()["keys"]
    rotate_key_file(path, immediately=True, wall=clock)
    clock.advance(2)
    kids = [k["kid"] for k in issuer.jwks()["keys"]]
    assert kids[0] == first["kid"] and len(kids) == 2
    header = jwt.get_unverified_header(issuer.mint({"sub": "x", "aud": "a"}))
    assert header["kid"] == kids[1]


def test_rotate_key_refuses_a_damaged_file_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.json"
    path.write_text("not json")
    assert main(["oidc", "rotate-key", "--key-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "Traceback" not in err
    assert path.read_text() == "not json"


async def test_the_control_plane_refuses_to_start_on_a_damaged_key_file(tmp_path: Path) -> None:
    data = tmp_path / "cp"
    data.mkdir(mode=0o700)
    (data / "oidc-keys.json").write_text("{}")
    service = ControlPlaneService(ControlPlaneConfig(data_dir=data, oidc_issuer="http://127.0.0.1:9/oidc"))
    try:
        with pytest.raises(CredentialsError, match=r"oidc-keys\.json: the OIDC key file is damaged"):
            await service.setup()
    finally:
        await service.shutdown()


def _verify(token: str, jwks: dict[str, Any], issuer: str, audience: str = "sts.amazonaws.com") -> dict[str, Any]:
    """PyJWT, not joserfc: the other library checks what the issuer signed."""
    kid = jwt.get_unverified_header(token)["kid"]
    [key] = [jwt.PyJWK(k) for k in jwks["keys"] if k["kid"] == kid]
    return dict(jwt.decode(token, key.key, algorithms=["RS256"], audience=audience, issuer=issuer))


async def test_each_oidc_hand_out_carries_a_token_aws_can_verify(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """Discovery and JWKS are public under the issuer; the token names the connector; the signature covers it."""
    port = free_port()
    issuer = f"http://127.0.0.1:{port}/oidc"
    cp = await control_plane_factory(port=port, oidc_issuer=issuer)
    async with http.get(issuer + "/.well-known/openid-configuration") as resp:
        assert resp.status == 200
        assert "max-age" in resp.headers["Cache-Control"]
        discovery = await resp.json()
    assert discovery["issuer"] == issuer
    assert discovery["id_token_signing_alg_values_supported"] == ["RS256"]
    async with http.get(discovery["jwks_uri"]) as resp:
        jwks = await resp.json()

    doc = oidc_connector(orgIdentifier="platform", projectIdentifier="payments")
    await cp.core.apply_connector(doc)
    await cp.core.apply_connector(
        {"connector": {"name": "Keys", "type": "Aws", "spec": {"credential": {"type": "ManualConfig", "spec": {
            "accessKey": "AKIAIOSFODNN7EXAMPLE", "secretKeyRef": "account.k"}}}}}
    )  # fmt: skip
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("alpha"))
    tests = [
        asyncio.create_task(cp.core.test_connector(ident, TestRequest(wait_seconds=0)))
        for ident in ("Payments_prod", "Keys")
    ]
    await asyncio.gather(*tests)
    got = await client.acquire(d.delegate_id, AcquireRequest(max_tasks=5, wait_seconds=0))
    by_connector = {t.payload["connector"]["connector"]["name"]: t for t in got.tasks}
    assert by_connector["Keys"].oidc_token is None  # only OIDC connectors get one
    task = by_connector["Payments prod"]
    assert task.oidc_token is not None
    claims = _verify(task.oidc_token, jwks, issuer)
    assert claims["sub"] == "connector:platform/payments/Payments_prod"
    assert (claims["org_id"], claims["project_id"], claims["connector_id"]) == ("platform", "payments", "Payments_prod")
    assert claims["context"] == "CONNECTOR_VALIDATION"
    assert (claims["task_id"], claims["delegate_id"]) == (task.task_id, d.delegate_id)
    assert claims["exp"] - claims["iat"] == TOKEN_SECONDS and claims["jti"]

    # The task signature covers the token: a swapped token makes the hand-out refused.
    verifier = TaskSignatureVerifier(cp.task_public_key or "")
    assert verifier(task) is None
    import msgspec

    assert verifier(msgspec.structs.replace(task, oidc_token=task.oidc_token + "x")) is not None


async def test_the_token_is_never_stored(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Minted per hand-out, in memory: the database (and its WAL) never holds a byte of it."""
    port = free_port()
    cp = await control_plane_factory(port=port, oidc_issuer=f"http://127.0.0.1:{port}")
    await cp.core.apply_connector(oidc_connector())
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("alpha"))
    await cp.core.test_connector("Payments_prod", TestRequest(wait_seconds=0))
    [task] = (await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))).tasks
    assert task.oidc_token
    signature = task.oidc_token.rsplit(".", 1)[1]
    stored = b"".join(p.read_bytes() for p in (tmp_path / "cp-0").iterdir() if p.name.startswith("controlplane"))
    assert signature.encode() not in stored
    assert base64.urlsafe_b64decode(signature + "==")[:16] not in stored


async def test_without_an_issuer_the_discovery_document_is_not_served(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    cp = await control_plane_factory()
    async with http.get(cp.url + "/.well-known/openid-configuration") as resp:
        assert resp.status == 404
    await cp.core.apply_connector(oidc_connector())
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("alpha"))
    await cp.core.test_connector("Payments_prod", TestRequest(wait_seconds=0))
    [task] = (await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))).tasks
    assert task.oidc_token is None  # the delegate's result then says to set --oidc-issuer


async def test_scheduled_tests_say_so_in_the_token(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    cp = await control_plane_factory(port=port, oidc_issuer=issuer)
    await cp.core.apply_connector(oidc_connector())  # a new connector is tested by the schedule, trigger "changed"
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("alpha"))
    row = await cp.core.store.get_connector("Payments_prod")
    assert row is not None
    await cp.core.connectors.start_test(row, trigger="scheduled", timeout=60)
    tasks: list[Any] = []

    async def handed_out() -> bool:
        tasks.extend((await client.acquire(d.delegate_id, AcquireRequest(max_tasks=5, wait_seconds=0))).tasks)
        return any(t.oidc_token for t in tasks)

    await wait_until(handed_out, "the scheduled test handed out")
    contexts = {jwt.decode(t.oidc_token, options={"verify_signature": False})["context"] for t in tasks}
    assert "SCHEDULED_TEST" in contexts


@pytest.mark.parametrize("field", ["orgIdentifier", "projectIdentifier"])
def test_a_sub_cannot_be_forged_through_an_org_or_project_with_a_slash(field: str) -> None:
    """connector:<org>/<project>/<id>: an org "platform/payments" would match "connector:platform/payments/*"."""
    from agent.aws.connector import ConnectorInvalid, parse_connector

    with pytest.raises(ConnectorInvalid) as caught:
        parse_connector(oidc_connector(**{field: "platform/payments"}))
    assert [p.field for p in caught.value.problems] == [f"connector.{field}"]


def test_a_key_file_that_cannot_be_written_names_itself_not_the_data_dir(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    issuer = OidcIssuer("https://cp.example.com", tmp_path / "not-a-dir" / "keys.json", writable=True)
    with pytest.raises(OidcConfigError, match=r"not-a-dir/keys\.json: cannot write the OIDC key file"):
        issuer.load()


def test_a_key_file_others_may_read_is_warned_about(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.json"
    rotate_key_file(path, immediately=True)
    path.chmod(0o644)
    OidcIssuer("https://cp.example.com", path, writable=False).load()
    err = capfd.readouterr().err
    assert "oidc_key_file_readable_by_others" in err and "chmod 600" in err


def test_a_rotation_the_disk_refuses_keeps_signing_and_says_so_once(
    tmp_path: Path, clock: ManualClock, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at rotation time: the current key signs on, one error line, no retry storm."""
    import agent.controlplane.oidc as oidc

    path = tmp_path / "keys.json"
    issuer = OidcIssuer("https://cp.example.com", path, writable=True, key_days=1, wall=clock)
    issuer.load()
    capfd.readouterr()

    def full(path: Path, text: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(oidc, "_write_private", full)
    clock.advance(2 * 86400)
    for _ in range(5):
        assert issuer.mint({"sub": "s", "aud": "a"})
        clock.advance(2)
    err = capfd.readouterr().err
    assert err.count("oidc_key_rotation_failed") == 1 and "No space left on device" in err
    assert "oidc_keys_reloaded" not in err


def test_rotations_at_the_same_moment_keep_every_new_key(tmp_path: Path) -> None:
    """Eight `oidc rotate-key --immediately` at once (real processes): without a lock each would write the
    file it read plus its own key, dropping the others' (a key already signing whose tokens then fail)."""
    import subprocess
    import sys

    path = tmp_path / "keys.json"
    rotate_key_file(path, immediately=True)
    argv = [sys.executable, "-m", "agent", "oidc", "rotate-key", "--key-file", str(path), "--immediately"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(8)]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert len(json.loads(path.read_text())["keys"]) == 9
