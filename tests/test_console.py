"""The web console in a real browser: login, the connectors list and its Test button, a connector's
page, delegates, CSRF, security headers, no JavaScript, a phone's width, and no secret on any page.

Debian's chromium driven by Playwright (tests/browser.py), against a real control plane and real
delegates validating on moto. Screenshots of every page go to .artifacts/console/; with
UPDATE_DOCS_IMAGES=1 the connectors page is also saved as docs/images/console-connectors.png.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import pytest
from playwright.async_api import expect

from agent.controlplane.console.security import CSP, HEADERS, safe_next
from agent.controlplane.store import StoreUnavailable
from tests.browser import ROOT, ConsoleWorld, log_in, screenshot
from tests.conftest import API_KEY, TOKEN
from tests.helpers import wait_until

pytestmark = pytest.mark.browser

HTMX_SHA256 = "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717"
#: How long a page waits for a test's result to appear (real delegates on moto answer in about a second).
RESULT_MS = 20_000


def _secrets(world: ConsoleWorld) -> list[str]:
    """What must never be on a page: the API key, the delegate token, the secret key on the delegates."""
    return [API_KEY, TOKEN, (world.secrets / "sk").read_text()]


async def _no_secret(page: Any, world: ConsoleWorld) -> None:
    html = await page.content()
    for secret in _secrets(world):
        assert secret not in html, f"a secret value is on {page.url}"


#: Every element with text of its own, whose colour on its (first opaque) background is below WCAG AA's
#: 4.5:1 for text. Computed by the browser from the styles it applied.
LOW_CONTRAST_JS = """() => {
  const parts = (c) => c.match(/[\\d.]+/g).map(Number);
  const lum = (c) => {
    const [r, g, b] = parts(c).slice(0, 3).map((v) => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const opaque = (c) => (parts(c)[3] ?? 1) > 0;
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = getComputedStyle(e).backgroundColor;
      if (opaque(c)) return c;
    }
    return "rgb(255, 255, 255)";
  };
  const low = [];
  for (const el of document.querySelectorAll("body *")) {
    if (![...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim())) continue;
    const a = lum(getComputedStyle(el).color), b = lum(background(el));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) low.push(`${el.tagName} "${el.textContent.trim().slice(0, 30)}" ${ratio.toFixed(2)}`);
  }
  return low;
}"""


async def _readable(page: Any, world: ConsoleWorld) -> None:
    """No secret in the page, and every text on it at WCAG AA contrast."""
    await _no_secret(page, world)
    assert await page.evaluate(LOW_CONTRAST_JS) == [], f"text below 4.5:1 contrast on {page.url}"


async def _csrf(page: Any) -> str:
    return str(await page.locator("form.logout input[name=csrf]").get_attribute("value"))


async def test_login_refuses_a_wrong_key_lets_the_right_one_in_and_logout_ends_the_session(
    console_world: ConsoleWorld, browser: Any
) -> None:
    url = console_world.url
    context = await browser.new_context()
    page = await context.new_page()
    response = await page.goto(f"{url}/")
    assert page.url == f"{url}/console/login?next=/console/connectors"
    await page.goto(f"{url}/console/connectors?status=FAILURE")
    assert page.url.startswith(f"{url}/console/login?next=")
    for name, value in HEADERS.items():
        assert response.headers[name.lower()] == value
    await page.get_by_label("API key").fill("not-the-key")
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("alert")).to_have_text("Wrong API key.")
    await screenshot(page, "login-refused")
    await page.get_by_label("API key").fill(API_KEY)
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_url(f"{url}/console/connectors?status=FAILURE")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Connectors")
    cookie = next(c for c in await context.cookies() if c["name"] == "console_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]  # plain HTTP here
    assert API_KEY not in cookie["value"]
    await _no_secret(page, console_world)

    await page.get_by_role("button", name="Log out").click()
    await page.wait_for_url(f"{url}/console/login")
    # The old cookie, presented again (as a thief would), no longer opens a page.
    other = await browser.new_context()
    await other.add_cookies([{"name": cookie["name"], "value": cookie["value"], "url": f"{url}/console/"}])
    stolen = await other.new_page()
    await stolen.goto(f"{url}/console/connectors")
    assert stolen.url.startswith(f"{url}/console/login")


async def test_too_many_wrong_keys_from_one_address_are_refused_with_429(
    console_world: ConsoleWorld, browser: Any
) -> None:
    page = await browser.new_page()
    await page.goto(f"{console_world.url}/console/login")
    for _ in range(5):
        await page.get_by_label("API key").fill("guess")
        await page.get_by_role("button", name="Log in").click()
        await expect(page.get_by_role("alert")).to_have_text("Wrong API key.")
    await page.get_by_label("API key").fill(API_KEY)  # even the right key waits now
    async with page.expect_response(f"{console_world.url}/console/login") as answer:
        await page.get_by_role("button", name="Log in").click()
    response = await answer.value
    assert response.status == 429 and int(response.headers["retry-after"]) > 0
    await expect(page.get_by_role("alert")).to_contain_text("Too many failed logins")


async def test_the_list_shows_each_status_with_a_dot_and_words_and_filters_without_javascript(
    console_world: ConsoleWorld, browser: Any
) -> None:
    await console_world.delegate("eks-1", ("eks",))
    good = await console_world.apply("Prod account", selectors=("eks",))
    staging = await console_world.apply("Staging account")
    bad = await console_world.apply("Audit account", secret="missing")
    await console_world.apply("Sandbox account")
    assert await console_world.test(good) == "SUCCESS"
    assert await console_world.test(staging) == "SUCCESS"
    assert await console_world.test(bad) == "FAILURE"
    assert await console_world.test(bad) == "FAILURE"
    page = await browser.new_page(viewport={"width": 1280, "height": 600})
    await log_in(page, console_world.url)
    assert await page.locator("tbody tr").count() == 4
    good_row = page.locator(f"#row-{good}")
    await expect(good_row.locator(".status-text")).to_have_text(re.compile(r"Success, (just now|\d+ s ago)"))
    assert await good_row.locator(".dot-success").count() == 1
    await expect(good_row.get_by_role("cell").nth(4)).to_have_text("eks-1")  # the delegate of the last test
    bad_row = page.locator(f"#row-{bad}")
    await expect(bad_row.locator(".status-text")).to_have_text(re.compile(r"Failed 2x, (just now|\d+ s ago)"))
    assert await bad_row.locator(".dot-failure").count() == 1
    assert "account.missing" in (await bad_row.locator(".status").get_attribute("title") or "")
    await expect(bad_row.get_by_role("cell").nth(3)).to_have_text("never")  # never connected
    await expect(page.locator("tbody tr", has_text="Sandbox account").locator(".status-text")).to_have_text(
        "Never tested"
    )
    await _readable(page, console_world)
    await screenshot(page, "connectors")
    if os.environ.get("UPDATE_DOCS_IMAGES"):
        await page.screenshot(path=str(ROOT / "docs/images/console-connectors.png"), full_page=True)

    await page.get_by_label("Status").select_option("FAILURE")
    await page.get_by_role("button", name="Filter").click()
    await page.wait_for_url(re.compile(r"status=FAILURE"))
    await expect(page.locator("tbody tr")).to_have_count(1)
    await expect(page.locator("tbody tr")).to_contain_text("Audit account")
    await page.get_by_label("Status").select_option("")
    await page.get_by_label("Name").fill("ACCOUNT")
    await page.get_by_role("button", name="Filter").click()
    await expect(page.locator("tbody tr")).to_have_count(4)
    await page.get_by_label("Name").fill("stag")
    await page.get_by_role("button", name="Filter").click()
    await expect(page.locator("tbody tr")).to_have_count(1)
    await expect(page.locator("#count")).to_have_text("1 of 4 connectors")
    await screenshot(page, "connectors-filtered")


async def test_the_test_button_reached_by_keyboard_updates_its_row_in_place(
    console_world: ConsoleWorld, browser: Any
) -> None:
    await console_world.delegate("eks-1")
    other = await console_world.apply("Other account")
    target = await console_world.apply("Prod account")
    page = await browser.new_page()
    messages: list[str] = []
    page.on("console", lambda message: messages.append(message.text))
    await log_in(page, console_world.url)
    await page.evaluate("window.consoleMarker = 'same page'")
    button = page.locator(f"#row-{target}").get_by_role("button", name="Test Prod account")
    for _ in range(40):  # Tab through the page, as a keyboard user does, until the button has the focus
        await page.keyboard.press("Tab")
        if await button.evaluate("b => b === document.activeElement"):
            break
    else:
        pytest.fail("the Test button cannot be reached with the Tab key")
    outline = await button.evaluate("b => getComputedStyle(b).outlineStyle + ' ' + getComputedStyle(b).outlineWidth")
    assert outline.startswith("solid") and not outline.endswith(" 0px"), f"no visible focus: {outline}"
    await page.keyboard.press("Enter")
    row = page.locator(f"#row-{target}")
    await expect(row.locator(".status-text")).to_have_text(re.compile(r"^Success, "), timeout=RESULT_MS)
    await expect(row.get_by_role("button", name="Test Prod account")).to_be_enabled()
    assert await page.evaluate("window.consoleMarker") == "same page", "the page was reloaded"
    assert page.url == f"{console_world.url}/console/connectors"
    await expect(page.locator(f"#row-{other} .status-text")).to_have_text("Never tested")  # only its row
    history = await console_world.cp.core.connector_history(target, 10)
    assert [e.trigger for e in history.entries] == ["manual"]
    await screenshot(page, "connectors-after-test")
    # A row whose connector was deleted meanwhile: the error says so in the page (still the same page).
    await console_world.cp.core.delete_connector(other)
    await page.locator(f"#row-{other}").get_by_role("button", name="Test Other account").click()
    await expect(page.get_by_role("alert")).to_contain_text(f"no connector with identifier {other!r}")
    assert await page.evaluate("window.consoleMarker") == "same page"
    # htmx worked within the CSP: nothing it did was blocked (no inline style or script, no eval).
    assert not [m for m in messages if "Content Security Policy" in m], messages


async def test_a_connector_page_shows_yaml_health_and_history_and_deletes_after_confirmation(
    console_world: ConsoleWorld, browser: Any
) -> None:
    await console_world.delegate("eks-1")
    identifier = await console_world.apply("Audit account", secret="missing")
    page = await browser.new_page()
    await log_in(page, console_world.url)
    await page.get_by_role("link", name="Audit account").click()
    await page.wait_for_url(f"{console_world.url}/console/connectors/{identifier}")
    rows = page.locator("table tbody tr")
    for tests in (1, 2):  # two tests through the page's own Test button; the page shows each result itself
        await page.get_by_role("button", name="Test Audit account").click()
        await page.wait_for_url(f"{console_world.url}/console/connectors/{identifier}")
        await expect(rows).to_have_count(tests, timeout=RESULT_MS)
        await expect(page.get_by_role("button", name="Test Audit account")).to_be_enabled()
    first = rows.first
    await expect(first.get_by_role("rowheader")).to_contain_text("Failure")
    await expect(first).to_contain_text("eks-1")
    await expect(first).to_contain_text("manual")
    api = await console_world.cp.core.connector_history(identifier, 10)
    assert len(api.entries) == 2 and api.entries[0].failure is not None
    await expect(first.locator("td[data-label=Step]")).to_have_text(api.entries[0].failure.step)
    yaml_text = await page.locator("pre code").inner_text()
    assert yaml_text.startswith("connector:\n")
    assert "secretKeyRef: account.missing" in yaml_text
    assert re.search(r"^# health:\n#   status: +FAILURE$", yaml_text, re.M)
    assert re.search(r"^#   failures in a row: +2", yaml_text, re.M)
    await expect(page.get_by_role("link", name="Edit")).to_have_attribute(
        "href", f"/console/connectors/{identifier}/edit"
    )
    await _readable(page, console_world)
    await screenshot(page, "connector")

    await page.get_by_role("link", name="Delete…").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Delete Audit account?")
    await screenshot(page, "connector-delete")
    await page.get_by_role("link", name="Cancel").click()
    assert await console_world.cp.store.get_connector(identifier) is not None  # cancelling keeps it
    await page.get_by_role("link", name="Delete…").click()
    await page.get_by_role("button", name="Delete connector").click()
    await page.wait_for_url(re.compile(r"/console/connectors\?deleted="))
    await expect(page.get_by_role("status")).to_contain_text(f"Deleted the connector {identifier}")
    assert await console_world.cp.store.get_connector(identifier) is None
    response = await page.goto(f"{console_world.url}/console/connectors/{identifier}")
    assert response.status == 404
    await expect(page.get_by_role("alert")).to_contain_text(f"no connector with identifier {identifier!r}")


async def _until_tested(world: ConsoleWorld, identifier: str) -> None:
    """Wait until no test of the connector is queued or running (its result is recorded by then)."""
    core = world.cp.core

    async def tested() -> bool:
        return not (await core.connector_record(await core.get_connector(identifier))).health.testing

    await wait_until(tested, f"the test of {identifier} to finish", RESULT_MS / 1000)


async def test_the_delegates_page_lists_state_load_and_the_connectors_each_can_test(
    console_world: ConsoleWorld, browser: Any
) -> None:
    await console_world.delegate("eks-1", ("eks", "prod"))
    lab = await console_world.delegate("lab-1", ("lab",))
    await console_world.apply("Prod account", selectors=("eks",))
    await console_world.apply("Any account")
    await console_world.apply("Lab account", selectors=("lab",))
    await console_world.apply("Gov account", selectors=("gov",))
    page = await browser.new_page()
    await log_in(page, console_world.url)
    await page.get_by_role("link", name="Delegates").click()
    await page.wait_for_url(f"{console_world.url}/console/delegates")
    eks = page.locator("#delegate-eks-1")
    await expect(eks.locator("td[data-label=State]")).to_have_text("connected")
    await expect(eks.locator("td[data-label=Tags]")).to_have_text(re.compile(r"eks\s*prod"))
    await expect(eks.locator("td[data-label='Tasks running / capacity']")).to_have_text("0 / 4")
    servable = {
        name: sorted(await page.locator(f"#delegate-{name} .servable a").all_inner_texts())
        for name in ("eks-1", "lab-1")
    }
    assert servable == {"eks-1": ["Any account", "Prod account"], "lab-1": ["Any account", "Lab account"]}
    await _readable(page, console_world)
    await screenshot(page, "delegates")

    lab.agent.request_shutdown()  # it drains and deregisters: disconnected, and it tests nothing now
    await lab.task
    await page.reload()
    await expect(page.locator("#delegate-lab-1 td[data-label=State]")).to_have_text("disconnected")
    await expect(page.locator("#delegate-lab-1 .servable")).to_have_text("— (not connected)")


async def test_posts_without_this_sessions_csrf_token_are_refused_and_change_nothing(
    console_world: ConsoleWorld, browser: Any
) -> None:
    identifier = await console_world.apply("Prod account")
    url = console_world.url
    page = await browser.new_page()
    await log_in(page, url)
    other = await browser.new_page()  # another browser (its own context): another session and token
    await log_in(other, url)
    foreign = await _csrf(other)
    assert foreign != await _csrf(page)
    delete = f"{url}/console/connectors/{identifier}/delete"
    attempts = [
        await page.request.post(delete, form={}, max_redirects=0),
        await page.request.post(delete, form={"csrf": foreign}, max_redirects=0),
        await page.request.post(delete, headers={"X-CSRF-Token": foreign, "HX-Request": "true"}, max_redirects=0),
        await page.request.post(f"{url}/console/connectors/{identifier}/test", form={"csrf": ""}, max_redirects=0),
        await page.request.post(f"{url}/console/logout", form={"csrf": foreign}, max_redirects=0),
    ]
    for answer in attempts:
        assert answer.status == 403
        assert answer.headers["content-security-policy"] == CSP
        assert "security (CSRF) token" in await answer.text()
    assert await console_world.cp.store.get_connector(identifier) is not None
    assert (await console_world.cp.core.connector_history(identifier, 5)).entries == []
    assert not await console_world.cp.store.connector_testing(identifier)
    await page.goto(f"{url}/console/connectors")  # the session survived the refused logout
    await expect(page.get_by_role("heading", level=1)).to_have_text("Connectors")
    # A login form posted from elsewhere (no login cookie, or another's token) is refused too.
    fresh = await browser.new_page()
    answer = await fresh.request.post(f"{url}/console/login", form={"api_key": API_KEY}, max_redirects=0)
    assert answer.status == 403
    # Without a session a POST goes to the login page, and nothing is done.
    answer = await fresh.request.post(delete, form={"csrf": foreign}, max_redirects=0)
    assert answer.status == 303 and answer.headers["location"].startswith("/console/login")
    assert await console_world.cp.store.get_connector(identifier) is not None
    refused = await page.request.post(delete, form={"csrf": "x"}, max_redirects=0)
    await page.set_content(await refused.text())
    await screenshot(page, "csrf-refused")


async def test_every_console_response_carries_the_security_headers(console_world: ConsoleWorld, browser: Any) -> None:
    identifier = await console_world.apply("Prod account")
    page = await browser.new_page()
    await log_in(page, console_world.url)
    paths = [
        "/console/login",
        "/console/connectors",
        f"/console/connectors/{identifier}",
        f"/console/connectors/{identifier}/row",
        f"/console/connectors/{identifier}/delete",
        "/console/delegates",
        "/console/static/console.css",
        "/console/static/htmx.min.js",
        "/console/nowhere",
        "/console/connectors/nope",
        "/",
    ]
    for path in paths:
        answer = await page.request.get(console_world.url + path, max_redirects=0)
        for name, value in HEADERS.items():
            assert answer.headers.get(name.lower()) == value, (path, name)
    assert (await page.request.get(console_world.url + "/console/nowhere")).status == 404
    static = await page.request.get(console_world.url + "/console/static/../static/console.css")
    assert static.status == 404 or static.headers["content-type"].startswith("text/css")
    # The API stays JSON, without the console's headers.
    api = await page.request.get(console_world.url + "/api/v1/connectors")
    assert api.status == 401 and api.headers["content-type"].startswith("application/json")


async def test_the_console_reads_without_javascript_and_fits_a_phone(console_world: ConsoleWorld, browser: Any) -> None:
    await console_world.delegate("eks-1", ("eks",))
    good = await console_world.apply("A connector with quite a long name for a phone", selectors=("eks",))
    bad = await console_world.apply("Audit account", secret="missing")
    assert await console_world.test(good) == "SUCCESS"
    assert await console_world.test(bad) == "FAILURE"
    context = await browser.new_context(java_script_enabled=False, viewport={"width": 390, "height": 844})
    page = await context.new_page()
    await log_in(page, console_world.url)
    for path, name in [
        ("/console/connectors", "phone-connectors"),
        (f"/console/connectors/{bad}", "phone-connector"),
        ("/console/delegates", "phone-delegates"),
    ]:
        await page.goto(console_world.url + path)
        width = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"{path} scrolls sideways at 390 px: {width}"
        await _readable(page, console_world)
        await screenshot(page, name)
    # Without JavaScript the Test button is a form: it posts, and the list comes back with the test running.
    await page.goto(console_world.url + "/console/connectors")
    await expect(page.locator(f"#row-{bad} .status-text")).to_have_text(re.compile("^Failed 1x"))
    await page.locator(f"#row-{bad}").get_by_role("button", name="Test Audit account").click()
    await page.wait_for_url(f"{console_world.url}/console/connectors")
    await _until_tested(console_world, bad)  # (the delegate may be quicker than the redirect: no "Testing…" check)
    await page.reload()
    await expect(page.locator(f"#row-{bad} .status-text")).to_have_text(re.compile("^Failed 2x"))


async def test_a_store_that_refuses_shows_a_page_not_a_traceback(
    console_world: ConsoleWorld, browser: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = await browser.new_page()
    await log_in(page, console_world.url)

    async def refuse() -> list[Any]:
        raise StoreUnavailable("disk full")

    # A stand-in for a full disk, at the one call this page makes (the sweeper keeps its real store).
    monkeypatch.setattr(console_world.cp.core, "connector_records", refuse)
    response = await page.goto(f"{console_world.url}/console/connectors")
    assert response.status == 503
    await expect(page.get_by_role("alert")).to_contain_text("cannot answer now (disk full); nothing was changed")


# Plain functions last: a synchronous test before the async ones leaves pytest-asyncio's unused loop behind
# (a ResourceWarning at the next test).


def test_the_vendored_htmx_is_the_pinned_release() -> None:
    data = (ROOT / "agent/controlplane/console/static/htmx.min.js").read_bytes()
    assert hashlib.sha256(data).hexdigest() == HTMX_SHA256


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("/console/connectors?status=FAILURE", True),
        ("/console/delegates", True),
        ("//evil.example/console/", False),
        ("https://evil.example/console/", False),
        ("/\\evil.example", False),
        ("/console/../api/v1/connectors", False),
        ("/api/v1/connectors", False),
        ("/console/login?next=//evil.example", False),
        ("javascript:alert(1)", False),
        ("/console/x\nSet-Cookie: a=b", False),
    ],
)
def test_a_login_only_sends_the_browser_to_a_console_page(given: str, kept: bool) -> None:
    assert (safe_next(given) == given) is kept
