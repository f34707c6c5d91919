"""Delegates and tokens from the CLI: gone vs lost, folded restarts, forget, create, the last token."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from agent.cli import EXIT_OK, EXIT_USAGE, main
from agent.controlplane.tokens import Caller
from agent.protocol.errors import AuthError
from tests.conftest import API_KEY, ControlPlaneFactory, ManualClock, delegate_client, register_request


async def cli(url: str, *argv: str) -> int:
    """Run the CLI in a thread (it is synchronous; the control plane runs on this loop)."""
    return await asyncio.to_thread(main, [*argv, "--control-plane", url, "--api-key", API_KEY])


async def test_delegates_list_tells_deregistered_from_lost_and_folds_restarts(
    control_plane_factory: ControlPlaneFactory, clock: ManualClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three instances of 'web' (stopped cleanly, went silent, running) fold into one row; --all shows them."""
    cp = await control_plane_factory(clock=clock)
    core = cp.core
    first = (await core.register(register_request("web"), caller=Caller("default"))).delegate_id
    await core.deregister(first)
    clock.advance(1)
    await core.register(register_request("web"), caller=Caller("default"))
    clock.advance(16)  # heartbeat 5 s: silent for three intervals is lost
    await core.sweep()
    newest = (await core.register(register_request("web"), caller=Caller("default"))).delegate_id
    await core.register(register_request("db"), caller=Caller("default"))
    states = sorted((v.name, v.state) for v in await core.delegate_views())
    assert states == [("db", "running"), ("web", "deregistered"), ("web", "lost"), ("web", "running")]

    assert await cli(cp.url, "delegates", "list") == EXIT_OK
    out, err = capsys.readouterr()
    header, *rows = out.splitlines()
    assert header.split()[-1] == "OLDER"
    assert [r.split()[0] for r in rows] == ["db", "web"]
    assert newest in rows[1] and rows[1].split()[-1] == "2"
    assert "2 older instance(s)" in err and "--all" in err

    assert await cli(cp.url, "delegates", "list", "--all", "-o", "json") == EXIT_OK
    listed = json.loads(capsys.readouterr().out)
    assert sorted(d["state"] for d in listed if d["name"] == "web") == ["deregistered", "lost", "running"]


async def test_forget_removes_a_gone_delegate_and_a_connected_one_only_with_force(
    control_plane_factory: ControlPlaneFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """`delegates forget` refuses a connected delegate (409) unless --force, in one line."""
    cp = await control_plane_factory()
    gone = (await cp.core.register(register_request("old"), caller=Caller("default"))).delegate_id
    await cp.core.deregister(gone)
    live = (await cp.core.register(register_request("live"), caller=Caller("default"))).delegate_id

    assert await cli(cp.url, "delegates", "forget", gone) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"delegate {gone} forgotten"
    assert await cli(cp.url, "delegates", "forget", live) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "is connected (running)" in err and "--force" in err and "Traceback" not in err
    assert [v.delegate_id for v in await cp.core.delegate_views()] == [live]
    assert await cli(cp.url, "delegates", "forget", live, "--force") == EXIT_OK
    assert await cp.core.delegate_views() == []
    assert await cli(cp.url, "delegates", "forget", live) == EXIT_USAGE
    assert "unknown delegate" in capsys.readouterr().err


async def test_tokens_create_prints_the_token_once_and_it_works_after_a_restart(
    control_plane_factory: ControlPlaneFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The value is on stdout once; the server keeps only its fingerprint, and accepts it after a restart."""
    data_dir = tmp_path / "cp"
    cp = await control_plane_factory(data_dir=data_dir)
    assert await cli(cp.url, "tokens", "create", "ci-runners") == EXIT_OK
    out, err = capsys.readouterr()
    token = out.strip()
    assert len(token) >= 32 and "only time" in err
    await delegate_client(http, cp.url, token=token).register(register_request("ci"))
    assert (await cp.core.delegate_views())[0].token_name == "ci-runners"

    assert await cli(cp.url, "tokens", "create", "ci-runners") == EXIT_USAGE
    assert "already exists (active)" in capsys.readouterr().err
    assert await cli(cp.url, "tokens", "list", "-o", "json") == EXIT_OK
    sources = {t["name"]: t["source"] for t in json.loads(capsys.readouterr().out)}
    assert sources == {"default": "configured", "ci-runners": "created"}

    await cp.shutdown()
    database = (data_dir / "controlplane.sqlite3").read_bytes() + b"".join(
        p.read_bytes() for p in data_dir.glob("controlplane.sqlite3-*")
    )
    assert token.encode() not in database  # the value itself is never stored
    again = await control_plane_factory(data_dir=data_dir)
    assert await delegate_client(http, again.url, token=token).register(register_request("ci"))


async def test_revoking_the_last_active_token_needs_force(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, capsys: pytest.CaptureFixture[str]
) -> None:
    """Revoking the only active token would lock every delegate out: 409 unless --force, saying what to do."""
    cp = await control_plane_factory()
    assert await cli(cp.url, "tokens", "revoke", "default") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "last active delegate token" in err and "--force" in err and "tokens create" in err
    assert await delegate_client(http, cp.url).register(register_request("still-in"))  # not revoked

    assert await cli(cp.url, "tokens", "create", "next") == EXIT_OK
    token = capsys.readouterr().out.strip()
    assert await cli(cp.url, "tokens", "revoke", "default") == EXIT_OK  # another one is active
    assert await cli(cp.url, "tokens", "revoke", "next") == EXIT_USAGE
    assert await cli(cp.url, "tokens", "revoke", "next", "--force") == EXIT_OK
    assert "token next" in capsys.readouterr().out
    with pytest.raises(AuthError) as refused:
        await delegate_client(http, cp.url, token=token).register(register_request("locked-out"))
    assert refused.value.code == "token_revoked"


async def test_an_empty_force_is_refused_not_taken_for_yes(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """``?force=`` is not a boolean: 400 naming it, and the last token stays active (found by the fuzzer)."""
    cp = await control_plane_factory()
    url = cp.url + "/api/v1/delegate-tokens/default/revoke?force="
    async with http.post(url, headers={"X-API-Key": API_KEY}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["message"] == "force must be true or false"
    assert await delegate_client(http, cp.url).register(register_request("still-in"))
