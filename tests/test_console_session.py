"""Console sessions without a browser: what a cookie proves, and what ends it.

The cookie is signed with a key derived from the API key: a real control plane restarted without
that API key refuses it, and accepts it again once the key is back. Over TLS it is marked Secure.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import aiohttp

from agent.controlplane.console.session import SESSION_SECONDS, Sessions
from tests.conftest import ControlPlaneFactory
from tests.tls import make_pki

OLD_KEY = "console-old-api-key-0123456789"
NEW_KEY = "console-new-api-key-0123456789"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def _log_in(http: aiohttp.ClientSession, url: str, key: str) -> aiohttp.ClientResponse:
    async with http.get(f"{url}/console/login") as page:
        html = await page.text()
    token = re.search(r'name="csrf" value="([^"]+)"', html)
    assert token is not None
    async with http.post(
        f"{url}/console/login",
        data={"csrf": token[1], "api_key": key, "next": "/console/delegates"},
        allow_redirects=False,
    ) as answer:
        return answer


async def _opens(http: aiohttp.ClientSession, url: str, cookie: str) -> bool:
    async with http.get(
        f"{url}/console/connectors", headers={"Cookie": f"console_session={cookie}"}, allow_redirects=False
    ) as answer:
        return answer.status == 200


async def test_removing_the_api_key_ends_its_sessions_and_restoring_it_revives_them(
    control_plane_factory: ControlPlaneFactory, tmp_path: Path
) -> None:
    data = tmp_path / "cp"
    keys = tmp_path / "api-keys"
    keys.write_text(OLD_KEY + "\n")
    cp = await control_plane_factory(data_dir=data, api_key_file=keys)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        answer = await _log_in(http, cp.url, OLD_KEY)
        assert answer.status == 303 and answer.headers["Location"] == "/console/delegates"
        cookie = answer.cookies["console_session"].value
        assert OLD_KEY not in cookie
    async with aiohttp.ClientSession() as http:
        assert await _opens(http, cp.url, cookie)
        await cp.stop()
        keys.write_text(NEW_KEY + "\n")  # rotated: the old key is removed
        cp = await control_plane_factory(data_dir=data, api_key_file=keys)
        assert not await _opens(http, cp.url, cookie)
        await cp.stop()
        keys.write_text(NEW_KEY + "\n" + OLD_KEY + "\n")
        cp = await control_plane_factory(data_dir=data, api_key_file=keys)
        assert await _opens(http, cp.url, cookie)


async def test_over_tls_the_session_cookie_is_secure(
    control_plane_factory: ControlPlaneFactory, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    cp = await control_plane_factory(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    trust = ssl.create_default_context(cafile=str(pki.ca))
    connector = aiohttp.TCPConnector(ssl=trust)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        answer = await _log_in(http, cp.url, "test-api-key-0123456789abcdef")
        assert answer.status == 303
        morsel = answer.cookies["console_session"]
        assert morsel["secure"] and morsel["httponly"] and morsel["samesite"] == "Strict"
        assert morsel["path"] == "/console" and int(morsel["max-age"]) == int(SESSION_SECONDS)


# Plain functions after the async tests (a synchronous test first leaves pytest-asyncio's loop behind).


def test_a_cookie_verifies_only_with_its_key_unaltered_and_before_its_expiry() -> None:
    clock = Clock()
    keys = [b"k" * 32]
    sessions = Sessions(lambda: keys, clock)
    session, cookie = sessions.issue(0)
    assert sessions.check(cookie) == session
    payload, _, signature = cookie.partition(".")
    assert sessions.check(payload[:-2] + "AA." + signature) is None  # altered
    assert sessions.check(cookie + "x") is None
    for junk in ("", ".", "a.b", "é.é", "x" * 600, cookie.replace(".", "")):
        assert sessions.check(junk) is None
    keys[:] = [b"o" * 32]  # the key it was signed with is gone
    assert sessions.check(cookie) is None
    keys[:] = [b"o" * 32, b"k" * 32]  # back, as a second key
    assert sessions.check(cookie) == session
    clock.now += SESSION_SECONDS
    assert sessions.check(cookie) is None  # expired


def test_a_session_logged_out_stays_refused_until_it_would_have_expired() -> None:
    clock = Clock()
    sessions = Sessions(lambda: [b"k" * 32], clock)
    first, first_cookie = sessions.issue(0)
    _, second_cookie = sessions.issue(0)
    sessions.end(first)
    assert sessions.check(first_cookie) is None
    assert sessions.check(second_cookie) is not None  # only that one
