"""Attacks on the web console, each performed for real against a real control plane (and real or
hostile delegates), in Debian's chromium where the browser is what matters.

What an attacker controls and the console renders: a connector's name, description and tags (anyone
who may apply one), a delegate's hostname and version (anyone holding a delegate token), a test's
result (a compromised delegate reports what it likes: error text, hint, AWS code, identity), and
every query parameter of a link a person is sent (``deleted``, ``q``, ``status``, ``next``). None of
it may run as script, become a link, an htmx attribute or a style, and the CSP must not even be
asked to block anything. Then CSRF and the session, secrets, framing and headers, and abuse of the
wizard and the Test button.
"""

from __future__ import annotations

import asyncio
import io
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import expect
from yarl import URL as yarl_url

from agent.controlplane.console.security import HEADERS, safe_next
from agent.protocol.auth import RequestSigner, TokenSource
from agent.protocol.models import TASK_TYPE_AWS_VALIDATE, TestRequest
from agent.protocol.results import Failure, Identity, Step, ValidationResult
from agent.taskapi import TaskContext
from tests.browser import ConsoleWorld, log_in, screenshot
from tests.conftest import API_KEY, TOKEN

pytestmark = pytest.mark.attacks

SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

# --- hostile text -------------------------------------------------------------------------------------
# Each payload would, if it were parsed as HTML, leave an element whose id starts with "pwn", set
# window.__pwned, add an htmx attribute, a javascript: link or a style. Marked so the DOM check finds it.

NAME = '"><img src=x id=pwn1 onerror="window.__pwned=1"><script>window.__pwned=2</script>'
DESCRIPTION = (
    '</textarea></pre><a id=pwn2 href="javascript:window.__pwned=3">x</a>'
    '<div id=pwn3 hx-get="/console/connectors" hx-trigger="load" hx-on::load="window.__pwned=4"></div>'
    "<style id=pwn4>*{display:none}</style>{{ 7*7 }}"
)
TAGS = {
    "<svg id=pwn5 onload=window.__pwned=5>": "' onmouseover='window.__pwned=6' x='",
    'x" hx-post="/console/logout" hx-trigger="load': "</script><script>window.__pwned=7</script>",
}
HOSTNAME = "<img src=x id=pwn6 onerror=window.__pwned=8>"
VERSION = '"><script id=pwn7>window.__pwned=9</script>'
RESULT_TEXT = '<img src=x id=pwn8 onerror="window.__pwned=10">'
QUERY = '"><svg id=pwn9 onload=window.__pwned=11>'

#: Whatever the page would hold had any payload been parsed as HTML (and not shown as text).
DOM_CHECK = """() => {
  const found = [];
  if (window.__pwned !== undefined) found.push("window.__pwned = " + window.__pwned);
  for (const el of document.querySelectorAll("*")) {
    const tag = el.tagName.toLowerCase();
    if (el.id.startsWith("pwn")) found.push("element " + tag + "#" + el.id);
    if (["img", "svg", "iframe", "object", "embed", "base", "style", "math"].includes(tag))
      found.push("element " + tag);
    if (tag === "script" && el.getAttribute("src") !== "/console/static/htmx.min.js")
      found.push("script " + el.outerHTML.slice(0, 80));
    if (tag === "link" && !/^\\/console\\/static\\/\\w+\\.css$/.test(el.getAttribute("href") || ""))
      found.push("link " + el.outerHTML);
    for (const a of el.attributes) {
      const v = a.value.toLowerCase();
      if (a.name.startsWith("on")) found.push("handler " + a.name + " on " + tag);
      if (["href", "src", "action", "formaction"].includes(a.name) && !v.startsWith("/") && !v.startsWith("#"))
        found.push(a.name + "=" + a.value + " on " + tag);
      if (a.name.startsWith("hx-") && /pwn|__pwned|logout|load/.test(v)) found.push(a.name + "=" + a.value);
      if (a.name.startsWith("hx-on") || a.name === "style") found.push("attribute " + a.name + " on " + tag);
    }
  }
  return found;
}"""

#: Registered before any page script: every CSP violation, which must stay empty (nothing even tried).
WATCH_CSP = """window.__violations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__violations.push(e.violatedDirective + " " + e.blockedURI));"""


class Watched:
    """A page with what it reported: console errors, dialogs (alert), CSP violations."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("dialog", self._dialog)

    async def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    async def check(self, where: str, *, expect_text: str | None = None) -> None:
        page = self.page
        found = await page.evaluate(DOM_CHECK)
        assert found == [], f"{where}: hostile text became markup: {found}"
        violations = await page.evaluate("window.__violations || []")
        assert violations == [], f"{where}: the CSP had to block something: {violations}"
        assert self.dialogs == [], f"{where}: a dialog opened: {self.dialogs}"
        csp = [e for e in self.errors if "Content Security Policy" in e or "Refused to" in e]
        assert csp == [], f"{where}: {csp}"
        if expect_text is not None:  # the attack did reach the page: as text
            assert expect_text in await page.locator("body").inner_text(), f"{where}: {expect_text!r} not shown"


async def watched_page(browser: Any, url: str, *, logged_in: bool = True, **options: Any) -> Watched:
    context = await browser.new_context(**options)
    await context.add_init_script(WATCH_CSP)
    page = await context.new_page()
    if logged_in:
        await log_in(page, url)
    return Watched(page)


class HostileValidation:
    """A compromised delegate's handler: reports a failure whose every text field is markup
    (a stand-in for an AWS error message that echoes attacker text, and worse: any text at all)."""

    task_type = TASK_TYPE_AWS_VALIDATE

    async def warm(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def __call__(self, ctx: TaskContext) -> ValidationResult:
        return ValidationResult(
            status="FAILURE",
            tested_at=datetime.now(UTC),
            delegate_name=ctx.delegate_name,
            identity=Identity(account=RESULT_TEXT, arn=RESULT_TEXT),
            error_summary="summary " + RESULT_TEXT,
            steps=[Step(name="step " + RESULT_TEXT, status="FAILURE")],
            failure=Failure(
                step="assume " + RESULT_TEXT,
                category="cat " + RESULT_TEXT,
                aws_error_code="Code" + RESULT_TEXT,
                hint="hint " + RESULT_TEXT,
            ),
        )


def hostile_document(world: ConsoleWorld) -> dict[str, Any]:
    document = world.document(NAME, selectors=("hostile",))
    body = document["connector"]
    body.update(identifier="hostile", description=DESCRIPTION, tags=TAGS)
    return document


async def register_hostile_delegate(url: str) -> None:
    """A delegate token holder registers a delegate whose hostname and version are markup."""
    signer = RequestSigner(TokenSource(value=TOKEN), issuer="hostile-host")
    body = {
        "name": "hostile-host",
        "instanceId": "inst-hostile",
        "tags": ["hostile-tag"],
        "version": VERSION,
        "taskTypes": ["other"],
        "capacity": 1,
        "hostname": HOSTNAME,
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/v1/delegates/register", json=body, headers={"Authorization": signer.header()}) as answer,
    ):
        assert answer.status == 200, await answer.text()


@pytest.mark.browser
async def test_hostile_text_everywhere_it_is_rendered_stays_text(console_world: ConsoleWorld, browser: Any) -> None:
    world = console_world
    url = world.url
    await world.agent_factory(world.cp, name="hostile-1", tags=("hostile",), extra_handlers=(HostileValidation(),))
    await register_hostile_delegate(url)
    applied = await world.cp.core.apply_connector(hostile_document(world))
    ident = applied.identifier
    task = await world.cp.core.test_connector(ident, TestRequest(wait_seconds=30))
    assert task.state == "done" and task.status == "FAILURE"

    w = await watched_page(browser, url)
    page = w.page
    await w.check("connectors", expect_text=NAME)
    title = await page.locator(f"#row-{ident} .status").get_attribute("title")
    assert title is not None and RESULT_TEXT in title  # the hint, as an attribute's text
    await page.goto(f"{url}/console/connectors/{ident}")
    await w.check("connector page", expect_text="hint " + RESULT_TEXT)
    yaml_text = await page.locator("pre code").inner_text()
    assert "</textarea></pre>" in yaml_text and "<svg id=pwn5" in yaml_text  # description and tags, as text
    await page.goto(f"{url}/console/connectors/{ident}/delete")
    await w.check("delete page", expect_text=NAME)
    await page.goto(f"{url}/console/delegates")
    await w.check("delegates", expect_text=HOSTNAME)
    assert VERSION in await page.locator("body").inner_text()
    await page.goto(f"{url}/console/connectors/new/test/{task.id}")
    await w.check("wizard test step", expect_text="hint " + RESULT_TEXT)
    assert await page.locator("#aws-error-code").inner_text() == "Code" + RESULT_TEXT
    await page.goto(f"{url}/console/connectors/{ident}/edit")
    await w.check("edit overview", expect_text=None)
    assert await page.get_by_label("Name", exact=True).input_value() == NAME
    assert await page.locator("#f-description").input_value() == DESCRIPTION
    await page.get_by_role("button", name="View YAML").click()
    await page.locator("#yaml").wait_for()
    await w.check("edit View YAML")
    assert "{{ 7*7 }}" in await page.locator("#yaml").inner_text()  # not evaluated as a template either
    await page.get_by_role("button", name="Continue").click()
    await page.locator('.wizard-steps [aria-current="step"]', has_text="Credentials").wait_for()
    await w.check("edit credentials")
    hidden = await page.locator("input[type=hidden][name=tags]").input_value()
    assert "<svg id=pwn5 onload=window.__pwned=5>" in hidden  # carried intact as a value, not markup

    # Query parameters of a link someone is sent.
    await page.goto(f"{url}/console/connectors?q={quote(QUERY)}&deleted={quote(QUERY)}")
    await w.check("list with q and deleted")
    assert await page.get_by_label("Name").input_value() == QUERY
    await page.goto(f"{url}/console/connectors?status={quote(QUERY)}")
    await w.check("status filter refused", expect_text="status must be one of")
    await page.goto(f"{url}/console/nowhere{quote(QUERY)}")
    await w.check("404 page")
    # The wizard's live identifier (htmx swaps a fragment built from the typed name).
    await page.goto(f"{url}/console/connectors/new")
    await page.get_by_label("Name", exact=True).fill(NAME)
    await expect(page.locator("#f-identifier-hint")).to_contain_text("Generated from the name: _")
    await w.check("wizard identifier fragment")
    await page.get_by_role("button", name="Continue").click()
    await page.locator('.wizard-steps [aria-current="step"]', has_text="Credentials").wait_for()
    await w.check("wizard credentials after a hostile name")
    await screenshot(page, "attack-hostile-wizard")

    anonymous = await watched_page(browser, url, logged_in=False)
    await anonymous.page.goto(f"{url}/console/login?next={quote(QUERY)}")
    await anonymous.check("login with a hostile next")
    assert await anonymous.page.locator("input[name=next]").input_value() == "/console/connectors"
    # The check itself finds markup when there is some (the same payloads parsed as HTML, no CSP).
    blank = await browser.new_page()
    await blank.set_content(NAME + DESCRIPTION + HOSTNAME)
    assert len(await blank.evaluate(DOM_CHECK)) >= 4


# --- htmx and identifiers -----------------------------------------------------------------------------


@pytest.mark.browser
async def test_a_dollar_in_the_identifier_does_not_break_the_rows_test_button(
    console_world: ConsoleWorld, browser: Any
) -> None:
    """Harness identifiers may hold '$' (a name "Cost $ report" gives Cost_$_report); the row's htmx
    target must still find the row, or Test does nothing in place."""
    await console_world.delegate("eks-1")
    ident = await console_world.apply("Cost $ report")
    assert "$" in ident
    w = await watched_page(browser, console_world.url)
    page = w.page
    await page.evaluate("window.marker = 'same page'")
    row = page.locator("tbody tr", has_text="Cost $ report")
    await row.get_by_role("button", name="Test Cost $ report").click()
    await expect(row.locator(".status-text")).to_have_text(re.compile(r"^Success, "), timeout=20_000)
    assert await page.evaluate("window.marker") == "same page"
    assert not [e for e in w.errors if "querySelector" in e or "not a valid selector" in e], w.errors


# --- malformed requests and error pages ---------------------------------------------------------------


async def _logged_in(http: aiohttp.ClientSession, url: str, key: str = API_KEY) -> str:
    """Log in with aiohttp (no browser needed to speak HTTP); the session's CSRF token."""
    async with http.get(f"{url}/console/login") as page:
        token = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert token is not None
    form = {"csrf": token[1], "api_key": key}
    async with http.post(f"{url}/console/login", data=form, allow_redirects=False) as answer:
        assert answer.status == 303, await answer.text()
    async with http.get(f"{url}/console/connectors") as page:
        token = re.search(r'name="csrf" value="([^"]+)"', await page.text())
    assert token is not None
    return token[1]


def _console_headers(answer: aiohttp.ClientResponse, where: str) -> None:
    for name, value in HEADERS.items():
        assert answer.headers.get(name) == value, (where, name, answer.headers.get(name))


async def test_a_malformed_form_is_a_400_page_with_the_headers_not_a_json_500(console_world: ConsoleWorld) -> None:
    url = console_world.url
    ident = await console_world.apply("Prod account")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        csrf = await _logged_in(http, url)
        token = csrf.encode()
        bodies = [
            ("application/x-www-form-urlencoded; charset=no-such-charset", b"csrf=" + token),
            ("application/x-www-form-urlencoded", b"csrf=" + token + b"&name=\xff\xfe"),
            ("multipart/form-data", b"no boundary"),
        ]
        targets = [
            "/console/login",
            "/console/logout",
            "/console/connectors/new",
            f"/console/connectors/{ident}/edit",
            f"/console/connectors/{ident}/delete",
            f"/console/connectors/{ident}/test",
        ]
        for path in targets:
            for content_type, body in bodies:
                where = f"{path} {content_type} {body[-12:]!r}"
                headers = {"Content-Type": content_type}
                async with http.post(url + path, data=body, headers=headers, allow_redirects=False) as answer:
                    text = await answer.text()
                    assert answer.status in (400, 403), (where, answer.status, text[:200])
                    assert answer.headers["Content-Type"].startswith("text/html"), where
                    _console_headers(answer, where)
                    assert "Traceback" not in text
    assert await console_world.cp.store.get_connector(ident) is not None
    assert not await console_world.cp.store.connector_testing(ident)


async def test_every_error_status_carries_the_console_headers(
    console_world: ConsoleWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = console_world.url
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await _logged_in(http, url)
        async with http.put(f"{url}/console/connectors") as answer:
            assert answer.status == 405
            _console_headers(answer, "405")
        big = io.BytesIO(b"csrf=x&name=" + b"a" * (3 * 1024 * 1024))
        async with http.post(
            f"{url}/console/login", data=big, headers={"Content-Type": "application/x-www-form-urlencoded"}
        ) as answer:
            assert answer.status == 413
            _console_headers(answer, "413")
        async with http.get(f"{url}/console/static/nope.js") as answer:
            assert answer.status == 404
            _console_headers(answer, "static 404")

        async def broken() -> list[Any]:
            raise RuntimeError("a bug with /etc/secret-path in its message")

        # A stand-in for a bug in a page (nothing real fails on demand): the console's own 500 page.
        monkeypatch.setattr(console_world.cp.core, "connector_records", broken)
        async with http.get(f"{url}/console/connectors") as answer:
            text = await answer.text()
            assert answer.status == 500
            assert answer.headers["Content-Type"].startswith("text/html")
            _console_headers(answer, "500")
            assert "secret-path" not in text and "Traceback" not in text


# --- secrets ------------------------------------------------------------------------------------------


def _wizard_form(csrf: str, **fields: str) -> dict[str, str]:
    base = {
        "csrf": csrf,
        "step": "credentials",
        "action": "next",
        "name": "Leaky",
        "credential_type": "ManualConfig",
        "access_key_kind": "text",
        "access_key": "AKIAIOSFODNN7EXAMPLE",
        "secret_key_ref": "account.aws_secret",
        "region": "us-east-1",
        "connectivity": "any",
    }
    return {**base, **fields}


@pytest.mark.parametrize(
    "fields",
    [
        {"access_key_kind": "secret", "access_key": SECRET_KEY},  # the secret key as the access key's reference
        {"access_key": SECRET_KEY},  # as the access key ID itself
        {"secret_key_ref": SECRET_KEY},
        {"session_token_ref": SECRET_KEY + "FwoGZXIvYXdzEBYaDHhB3sdf9834hfsdkJHSDF8sd7f"},
        {"secret_key_ref": "sk/" + SECRET_KEY[:20]},  # shorter than the secret-looking rule, still refused
    ],
    ids=["access-key-reference", "access-key-id", "secret-key-reference", "session-token-reference", "short"],
)
async def test_a_secret_pasted_into_the_wizard_is_never_sent_back(
    console_world: ConsoleWorld, fields: dict[str, str]
) -> None:
    pasted = max(fields.values(), key=len)
    url = console_world.url
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        csrf = await _logged_in(http, url)
        for action in ("next", "yaml", "back"):
            form = _wizard_form(csrf, action=action, **fields)
            async with http.post(f"{url}/console/connectors/new", data=form, allow_redirects=False) as answer:
                html = await answer.text()
            assert answer.status == 200, (action, html[:300])
            assert pasted not in html, f"the pasted value is in the page after {action}"
            assert pasted[:24] not in html, f"part of the pasted value is in the page after {action}"
    assert await console_world.cp.store.get_connector("Leaky") is None


# --- where a login sends the browser ------------------------------------------------------------------

OFF_CONSOLE_NEXTS = [
    "//evil.example/console/",
    "/\\evil.example/console/",
    "/console/../api/v1/connectors",
    "/console/%2e%2e/api/v1/connectors",
    "/console/.%2E/api/v1/connectors",
    "/console/%2E%2e/%2e%2e/api/v1/connectors",
    "https:/console/",
    "/console/\r\nSet-Cookie: a=b",
    "/console/\t/evil.example",
    "\\\\evil.example\\console",
]


@pytest.mark.parametrize("given", OFF_CONSOLE_NEXTS)
def test_next_never_leaves_the_console(given: str) -> None:
    assert safe_next(given) == "/console/connectors"


@pytest.mark.browser
async def test_after_login_the_browser_lands_inside_the_console_whatever_next_says(
    console_world: ConsoleWorld, browser: Any
) -> None:
    """What the browser does with the Location matters: it resolves %2e%2e as '..' (WHATWG URL)."""
    url = console_world.url
    for given in ["/console/%2e%2e/api/v1/connectors", "//evil.example/console/", "/\\evil.example/"]:
        context = await browser.new_context()
        page = await context.new_page()
        await page.goto(f"{url}/console/login?next={quote(given)}")
        await page.get_by_label("API key").fill(API_KEY)
        await page.get_by_role("button", name="Log in").click()
        await page.wait_for_load_state()
        assert page.url.startswith(f"{url}/console/"), (given, page.url)
        await context.close()


# --- CSRF and the session -----------------------------------------------------------------------------


async def test_every_console_post_refuses_a_missing_or_foreign_token(console_world: ConsoleWorld) -> None:
    """Each POST route the console mounts (found from the router: a new one cannot be forgotten)."""
    url = console_world.url
    ident = await console_world.apply("Prod account")
    posts = sorted(
        {
            r.resource.canonical.replace("{identifier}", ident)
            for r in console_world.cp.app.router.routes()
            if r.method == "POST" and r.resource is not None and r.resource.canonical.startswith("/console/")
        }
    )
    assert len(posts) >= 6, posts
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as victim, aiohttp.ClientSession() as attacker:
        await _logged_in(victim, url)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
            foreign = await _logged_in(other, url)  # a real token, of another session
        for path in posts:
            if path == "/console/login":
                continue
            for given in ({}, {"csrf": foreign}, {"csrf": ""}, {"csrf": foreign + "x"}):
                form = {**_wizard_form("", step="connectivity", action="save", name="Forged"), **given}
                if "csrf" not in given:
                    del form["csrf"]
                async with victim.post(url + path, data=form, allow_redirects=False) as answer:
                    assert answer.status == 403, (path, given, answer.status)
                    _console_headers(answer, path)
            headers = {"X-CSRF-Token": foreign, "HX-Request": "true"}
            async with victim.post(url + path, data={}, headers=headers, allow_redirects=False) as answer:
                assert answer.status == 403, (path, "foreign header")
            # Without a session cookie at all (a cross-site form whose SameSite=Strict cookie stayed home).
            async with attacker.post(url + path, data={"csrf": foreign}, allow_redirects=False) as answer:
                assert answer.status == 303 and answer.headers["Location"].startswith("/console/login"), path
    assert await console_world.cp.store.get_connector(ident) is not None
    assert await console_world.cp.store.get_connector("Forged") is None
    assert not await console_world.cp.store.connector_testing(ident)
    assert (await console_world.cp.core.connector_history(ident, 5)).entries == []


async def test_login_issues_a_new_session_and_logout_ends_it_for_good(console_world: ConsoleWorld) -> None:
    url = console_world.url
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as attacker:
        await _logged_in(attacker, url)
        planted = next(c.value for c in jar if c.key == "console_session")
    # Fixation: the attacker's own valid session planted in the victim's browser before they log in.
    victim_jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=victim_jar) as victim:
        victim_jar.update_cookies({"console_session": planted}, response_url=yarl_url(url + "/console/"))
        async with victim.get(f"{url}/console/logout", allow_redirects=False) as answer:
            assert answer.status == 405  # logging out is a POST with the token, never a link
        # The login page with a session already open goes on; with a fresh login, a fresh cookie.
        victim_jar.clear()
        victim_jar.update_cookies({"console_session": "forged.cookie"}, response_url=yarl_url(url + "/console/"))
        csrf = await _logged_in(victim, url)
        mine = next(c.value for c in victim_jar if c.key == "console_session")
        assert mine not in (planted, "forged.cookie")
        async with victim.post(f"{url}/console/logout", data={"csrf": csrf}, allow_redirects=False) as answer:
            assert answer.status == 303
    # Replayed after logout on the same control plane: refused, for GET and POST alike.
    async with aiohttp.ClientSession() as thief:
        cookie = {"Cookie": f"console_session={mine}"}
        async with thief.get(f"{url}/console/connectors", headers=cookie, allow_redirects=False) as answer:
            assert answer.status == 303 and answer.headers["Location"].startswith("/console/login")
        form = {"csrf": csrf}
        async with thief.post(
            f"{url}/console/connectors/new", data=form, headers=cookie, allow_redirects=False
        ) as answer:
            assert answer.status == 303
    # The attacker's own session is theirs alone: still open (logging the victim out did not end it).
    async with aiohttp.ClientSession() as attacker:
        headers = {"Cookie": f"console_session={planted}"}
        async with attacker.get(f"{url}/console/connectors", headers=headers, allow_redirects=False) as answer:
            assert answer.status == 200


# --- framing ------------------------------------------------------------------------------------------


@pytest.mark.browser
async def test_no_console_page_loads_in_a_frame(console_world: ConsoleWorld, browser: Any) -> None:
    """A page on another origin frames the console (clickjacking): the browser refuses to show it."""
    url = console_world.url
    context = await browser.new_context()
    page = await context.new_page()
    await log_in(page, url)
    evil = web.Application()
    frames = "".join(
        f'<iframe src="{url}{path}" width="400" height="300"></iframe>'
        for path in ("/console/connectors", "/console/login", "/console/nowhere", "/console/static/console.css")
    )

    async def framing(_: web.Request) -> web.Response:
        return web.Response(text=f"<html><body>{frames}</body></html>", content_type="text/html")

    evil.router.add_get("/", framing)
    runner = web.AppRunner(evil)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        await page.goto(f"http://127.0.0.1:{port}/")
        await page.wait_for_load_state("load")
        framed = [f for f in page.frames if f != page.main_frame]
        assert len(framed) == 4
        for frame in framed:
            text = await frame.evaluate("document.body ? document.body.innerText : ''")
            # The browser refused to show it (its own error page), whatever the page was: nothing of the console.
            assert frame.url.startswith("chrome-error://"), (frame.url, text[:80])
    finally:
        await runner.cleanup()


# --- abuse of the wizard and the Test button ----------------------------------------------------------


async def test_the_wizard_holds_against_huge_out_of_order_and_overwriting_posts(console_world: ConsoleWorld) -> None:
    url = console_world.url
    store = console_world.cp.store
    first = await console_world.apply("First account")
    second = await console_world.apply("Second account")
    before = (await store.get_connector(second)).body  # type: ignore[union-attr]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        csrf = await _logged_in(http, url)

        async def post(path: str, **fields: str) -> tuple[int, str]:
            form = _wizard_form(csrf, **fields)
            async with http.post(url + path, data=form, allow_redirects=False) as answer:
                return answer.status, await answer.text()

        # Huge: a name of 100,000 characters and 20,000 tags answer at once, with the fields' errors.
        started = asyncio.get_running_loop().time()
        status, html = await post(
            "/console/connectors/new", step="overview", name="n" * 100_000, tags=",".join(["k:v"] * 20_000)
        )
        assert status == 200 and "is longer than 128 characters" in html
        assert len(html) < 200_000  # each field is cut, not echoed in full
        assert asyncio.get_running_loop().time() - started < 5
        # Out of order: straight to Save with only a name: every missing field is named, nothing stored.
        status, html = await post("/console/connectors/new", step="connectivity", action="save", access_key="")
        assert status == 200 and "Access key" in html and await store.get_connector("Leaky") is None
        status, html = await post("/console/connectors/new", step="finish", action="save")
        assert status == 200 and await store.get_connector("Leaky") is None  # an unknown step is Overview's
        # New, with another connector's identifier: refused, not overwritten.
        status, html = await post("/console/connectors/new", step="connectivity", action="save", identifier=second)
        assert status == 200 and "already exists" in html
        # The wizard's own URL word as an identifier: refused (it would shadow the connector's page).
        status, html = await post("/console/connectors/new", step="overview", identifier="new")
        assert status == 200 and "is a reserved word" in html
        # Editing one connector into another's identifier: the edit keeps its own.
        status, _ = await post(
            f"/console/connectors/{first}/edit", step="connectivity", action="save", identifier=second, name="Moved"
        )
        assert status == 303
        assert (await store.get_connector(second)).body == before  # type: ignore[union-attr]
        assert (await store.get_connector(first)).name == "Moved"  # type: ignore[union-attr]
        # A Test posted (without JavaScript) for a connector deleted meanwhile: a 404 page saying so.
        await console_world.cp.core.delete_connector(second)
        async with http.post(
            f"{url}/console/connectors/{second}/test", data={"csrf": csrf}, allow_redirects=False
        ) as answer:
            assert answer.status == 404
            _console_headers(answer, "test of a deleted connector")
            assert f"no connector with identifier {second!r}" in (await answer.text()).replace("&#39;", "'")


async def test_the_deleted_notice_only_names_an_identifier(console_world: ConsoleWorld) -> None:
    """?deleted= is what a link says: only an identifier is shown, not a sentence an attacker wrote."""
    url = console_world.url
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        await _logged_in(http, url)
        spoof = "prod. Your session expired: log in again at https://evil.example"
        async with http.get(f"{url}/console/connectors", params={"deleted": spoof}) as answer:
            html = await answer.text()
        assert "evil.example" not in html and "Deleted the connector" not in html
        async with http.get(f"{url}/console/connectors", params={"deleted": "Prod_account"}) as answer:
            assert "Deleted the connector Prod_account." in await answer.text()
