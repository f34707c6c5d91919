"""The web console in a real browser: login, the connectors list and its Test button, a connector's
page, delegates, CSRF, security headers, no JavaScript, a phone's width, and no secret on any page.

Debian's chromium driven by Playwright (tests/browser.py), against a real control plane and real
delegates validating on moto. Screenshots of every page go to .artifacts/console/.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest

from agent.controlplane.console.security import CSP
from tests.browser import ROOT, ConsoleWorld, log_in, screenshot
from tests.conftest import API_KEY

pytestmark = pytest.mark.browser

HTMX_SHA256 = "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717"


def test_the_vendored_htmx_is_the_pinned_release() -> None:
    data = (ROOT / "agent/controlplane/console/static/htmx.min.js").read_bytes()
    assert hashlib.sha256(data).hexdigest() == HTMX_SHA256


async def test_login_refuses_a_wrong_key_and_lets_the_right_one_in(console_world: ConsoleWorld, browser: Any) -> None:
    page = await browser.new_page()
    response = await page.goto(f"{console_world.url}/console/connectors?status=FAILURE")
    assert page.url.startswith(f"{console_world.url}/console/login?next=")
    assert response.headers["content-security-policy"] == CSP
    await page.get_by_label("API key").fill("not-the-key")
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_load_state()
    assert await page.get_by_role("alert").inner_text() == "Wrong API key."
    await screenshot(page, "login-refused")
    await page.get_by_label("API key").fill(API_KEY)
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_url(f"{console_world.url}/console/connectors?status=FAILURE")
    assert await page.get_by_role("heading", level=1).inner_text() == "Connectors"
    assert API_KEY not in await page.content()


async def test_the_list_shows_each_connectors_status_with_a_dot_and_words(
    console_world: ConsoleWorld, browser: Any
) -> None:
    await console_world.delegate("eks-1", ("eks",))
    good = await console_world.apply("Prod account")
    bad = await console_world.apply("Broken account", secret="missing")
    await console_world.apply("Fresh account")
    assert await console_world.test(good) == "SUCCESS"
    assert await console_world.test(bad) == "FAILURE"
    page = await browser.new_page()
    await log_in(page, console_world.url)
    rows = page.locator("tbody tr")
    assert await rows.count() == 3
    good_row = page.locator(f"#row-{good}")
    assert re.fullmatch(r"Success, (just now|\d+ s ago)", await good_row.locator(".status-text").inner_text())
    assert await good_row.locator(".dot-success").count() == 1
    bad_row = page.locator(f"#row-{bad}")
    assert re.fullmatch(r"Failed 1x, (just now|\d+ s ago)", await bad_row.locator(".status-text").inner_text())
    assert "missing" in (await bad_row.locator(".status").get_attribute("title") or "")
    assert "Never tested" in await page.locator("tbody tr", has_text="Fresh account").inner_text()
    await screenshot(page, "connectors")
