"""Authentication: delegate tokens (valid, wrong, expired, rotated, revoked) and API keys."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import jwt
import pytest

from agent.controlplane.app import ControlPlaneConfig, ControlPlaneService
from agent.protocol.auth import RequestSigner, TokenKey, TokenSource, TokenVerifier, token_id
from agent.protocol.errors import AuthError, Code
from agent.protocol.models import HeartbeatRequest
from tests.conftest import API_KEY, TOKEN, ControlPlaneFactory, delegate_client, register_request

NEW_TOKEN = "rotated-delegate-token-fedcba9876543210"
THIRD_TOKEN = "another-teams-delegate-token-00112233"


async def test_a_valid_token_is_accepted_and_never_sent_in_clear(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """The request carries a short-lived JWT, not the delegate token itself."""
    cp = await control_plane_factory()
    signer = RequestSigner(TokenSource(value=TOKEN), issuer="d")
    header = signer.header()
    assert TOKEN not in header
    claims = jwt.decode(header.split()[1], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] <= 300
    assert claims["aud"] == cp.core.settings.audience
    assert jwt.get_unverified_header(header.split()[1])["kid"] == token_id(TOKEN)
    await delegate_client(http, cp.url).register(register_request())


@pytest.mark.parametrize(
    ("make_client", "status", "code"),
    [
        (lambda http, url: delegate_client(http, url, token="not-the-right-token-at-all"), 401, Code.UNAUTHENTICATED),
        (lambda http, url: delegate_client(http, url, clock=lambda: time.time() - 3600), 401, Code.TOKEN_EXPIRED),
        (lambda http, url: delegate_client(http, url, audience="someone-else"), 401, Code.UNAUTHENTICATED),
    ],
    ids=["wrong-token", "expired", "wrong-audience"],
)
async def test_bad_tokens_get_401_with_a_distinct_code(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, make_client, status, code
) -> None:  # type: ignore[no-untyped-def]
    """401 means "your credentials are not accepted": it is never confused with a transient error."""
    cp = await control_plane_factory()
    with pytest.raises(AuthError) as err:
        await make_client(http, cp.url).register(register_request())
    assert (err.value.status, err.value.code) == (status, code)
    assert not err.value.transient


async def test_missing_and_malformed_authorization(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """No header, a non-bearer header and garbage all get 401 with a JSON error body."""
    cp = await control_plane_factory()
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer not-a-jwt"}):
        async with http.post(cp.url + "/v1/delegates/register", json={}, headers=headers) as resp:
            assert resp.status == 401
            body = await resp.json()
            assert body["error"]["code"] == Code.UNAUTHENTICATED
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_a_token_lifetime_over_an_hour_is_refused() -> None:
    """A stolen signing key cannot mint a token that lives for days."""
    verifier = TokenVerifier([TokenKey("t", TOKEN)])
    signer = RequestSigner(TokenSource(value=TOKEN), issuer="d", lifetime=86400)
    with pytest.raises(AuthError, match="too long"):
        verifier.verify(signer.header())


async def test_rotation_accepts_old_and_new_then_only_new(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """Rotating is editing the token file: both tokens work during the overlap, then the old one stops."""
    cp = await control_plane_factory()
    token_file = cp.config.delegate_token_file
    assert token_file is not None
    token_file.write_text(f"old:{TOKEN}\nnew:{NEW_TOKEN}\n")
    assert cp.reload_tokens()
    await delegate_client(http, cp.url, token=TOKEN).register(register_request("a"))
    await delegate_client(http, cp.url, token=NEW_TOKEN).register(register_request("b"))
    token_file.write_text(f"new:{NEW_TOKEN}\n")
    assert cp.reload_tokens()
    with pytest.raises(AuthError) as err:
        await delegate_client(http, cp.url, token=TOKEN).register(register_request("a"))
    assert err.value.status == 401
    await delegate_client(http, cp.url, token=NEW_TOKEN).register(register_request("b"))


async def test_rotating_under_the_same_name_keeps_the_delegates_a_new_name_does_not(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """A delegate is bound to its token's name: a new value under that name acts for it, another name cannot."""
    cp = await control_plane_factory(tokens=f"team:{TOKEN}")
    token_file = cp.config.delegate_token_file
    assert token_file is not None
    delegate_id = (await delegate_client(http, cp.url).register(register_request("a"))).delegate_id
    token_file.write_text(f"team:{TOKEN}\nteam:{NEW_TOKEN}\nother:{THIRD_TOKEN}\n")
    assert cp.reload_tokens()
    beat = HeartbeatRequest(state="running")
    await delegate_client(http, cp.url, token=NEW_TOKEN).heartbeat(delegate_id, beat)
    token_file.write_text(f"team:{NEW_TOKEN}\nother:{THIRD_TOKEN}\n")
    assert cp.reload_tokens()
    await delegate_client(http, cp.url, token=NEW_TOKEN).heartbeat(delegate_id, beat)
    with pytest.raises(AuthError) as err:
        await delegate_client(http, cp.url, token=THIRD_TOKEN).heartbeat(delegate_id, beat)
    assert (err.value.status, err.value.code) == (403, Code.DELEGATE_TOKEN_MISMATCH)


async def test_a_broken_token_file_keeps_the_previous_tokens(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """A typo while rotating does not lock every delegate out."""
    cp = await control_plane_factory()
    assert cp.config.delegate_token_file is not None
    cp.config.delegate_token_file.write_text("bad name:short\n")
    assert not cp.reload_tokens()
    await delegate_client(http, cp.url).register(register_request())


async def test_a_revoked_token_gets_403(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """Revocation is distinct (403 token_revoked) and survives a restart of the control plane."""
    cp = await control_plane_factory(tokens=f"default:{TOKEN}\nother:{NEW_TOKEN}")
    async with http.post(cp.url + "/api/v1/delegate-tokens/default/revoke", headers={"X-API-Key": API_KEY}) as resp:
        assert resp.status == 200
        assert (await resp.json())["revoked"] is True
    with pytest.raises(AuthError) as err:
        await delegate_client(http, cp.url).register(register_request())
    assert (err.value.status, err.value.code) == (403, Code.TOKEN_REVOKED)
    await delegate_client(http, cp.url, token=NEW_TOKEN).register(register_request())
    data_dir = cp.config.data_dir
    await cp.stop()
    again = await control_plane_factory(data_dir=data_dir)
    with pytest.raises(AuthError) as err2:
        await delegate_client(http, again.url).register(register_request())
    assert err2.value.status == 403


async def test_the_token_list_shows_fingerprints_never_values(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """Operators can see which tokens exist without the server ever echoing a secret."""
    cp = await control_plane_factory()
    async with http.get(cp.url + "/api/v1/delegate-tokens", headers={"X-API-Key": API_KEY}) as resp:
        text = await resp.text()
    assert TOKEN not in text
    assert token_id(TOKEN) in text


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"X-API-Key": "wrong"}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"X-API-Key": API_KEY}, 200),
        ({"Authorization": f"Bearer {API_KEY}"}, 200),
    ],
    ids=["missing", "wrong-header", "wrong-bearer", "header", "bearer"],
)
async def test_the_user_api_needs_the_api_key(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, headers: dict[str, str], status: int
) -> None:
    """The connector API accepts the API key as X-API-Key or a bearer token, and nothing else."""
    cp = await control_plane_factory()
    async with http.get(cp.url + "/api/v1/connectors", headers=headers) as resp:
        assert resp.status == status


async def test_a_delegate_token_is_not_an_api_key(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """Delegate credentials open the delegate protocol only."""
    cp = await control_plane_factory()
    header = RequestSigner(TokenSource(value=TOKEN), issuer="d").header()
    async with http.get(cp.url + "/api/v1/connectors", headers={"Authorization": header}) as resp:
        assert resp.status == 401


async def test_generated_credentials_when_none_are_given(tmp_path: Path) -> None:
    """With neither tokens nor an API key configured, both are generated into the data dir (mode 0600)."""
    service = ControlPlaneService(ControlPlaneConfig(data_dir=tmp_path, port=0))
    assert not (tmp_path / "api-key").exists()  # constructing does no I/O: setup() does
    await service.setup()
    try:
        for name in ("delegate-token", "api-key"):
            path = tmp_path / name
            assert path.stat().st_mode & 0o777 == 0o600
            assert len(path.read_text().strip()) >= 32
        assert service.credentials.generated == [
            tmp_path / "delegate-token",
            tmp_path / "api-key",
            tmp_path / "task-signing-key",
        ]
        assert (tmp_path / "task-signing-key.pub").read_text().strip() == service.signing_key.public_key_b64
    finally:
        await service.shutdown()
    again = ControlPlaneService(ControlPlaneConfig(data_dir=tmp_path, port=0))
    await again.setup()  # the next owner of the data dir (one at a time)
    assert again.api_key == service.api_key  # generated once, then reused
    await again.shutdown()
