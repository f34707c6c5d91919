"""The wizard's "Use OIDC" in a real browser: the control plane is the issuer, STS checks the token.

The scene is test_oidc_e2e's (imported, not copied): a control plane on a fixed port serving
``/oidc`` as the issuer, moto seeded with the IAM OIDC provider and roles whose trust policies pin
the token's ``sub`` (``oidc-prod`` trusts ``connector:-/-/Prod`` only), the verifying STS stand-in
(agent/demo/oidc_sts.py) in front of moto for the delegate, and one real delegate, ``eks-prod``.
The walking helpers are test_console_wizard's. Screenshots: .artifacts/console/wizard-oidc-*.png.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.awsfakes import ACCOUNT
from tests.browser import log_in
from tests.test_console_wizard import connectivity, credentials, expect_step, overview, save_and_test, shot
from tests.test_oidc_e2e import World, sts_clock, world  # noqa: F401  (fixtures: the OIDC scene)

pytestmark = pytest.mark.browser

ROLE = f"arn:aws:iam::{ACCOUNT}:role/oidc-prod"


@pytest.fixture
async def page(world: World, browser: Any) -> Any:  # noqa: F811  (the imported fixture, requested)
    page = await browser.new_page(viewport={"width": 1100, "height": 900})
    await log_in(page, world.cp.url)
    await page.goto(f"{world.cp.url}/console/connectors/new")
    await expect_step(page, "Overview")
    return page


async def test_use_oidc_with_the_default_audience_assumes_the_role(world: World, page: Any) -> None:  # noqa: F811
    # The name gives the identifier Prod, so the token's sub is connector:-/-/Prod, which oidc-prod trusts.
    await overview(page, "Prod")
    # The credentials step shows the OIDC fields only for "Use OIDC"; the audience is left to its default.
    await page.get_by_label("Use OIDC", exact=True).check()
    assert await page.get_by_label("IAM role ARN", exact=True).is_visible()
    assert await page.get_by_label("Audience (optional)").input_value() == ""
    await credentials(page, "Use OIDC", {"IAM role ARN": ROLE})
    await connectivity(page, "any delegate")
    await page.locator("#matching li", has_text="eks-prod").wait_for()
    shown = await save_and_test(page)
    assert (shown["status"], shown["executing_on"]) == ("SUCCESS", "eks-prod"), shown
    assert shown["identity-arn"].startswith(f"arn:aws:sts::{ACCOUNT}:assumed-role/oidc-prod/eks-prod@"), shown
    assert shown["identity-account"] == ACCOUNT
    await shot(page, "wizard-oidc-success")
    # What was saved: the role, no audience (STS's default, sts.amazonaws.com), no stored key.
    stored = (await world.cp.core.get_connector("Prod")).body
    assert stored["connector"]["spec"]["credential"] == {
        "type": "OidcAuthentication",
        "spec": {"iamRoleArn": ROLE},
        "region": "us-east-1",
    }
    content = await page.content()  # the tokens (bearer secrets for five minutes) are on no page
    assert world.minted and not any(token in content for token in world.minted)
    await page.get_by_role("link", name="Finish").click()
    await page.wait_for_url(f"{world.cp.url}/console/connectors")
    row = page.locator("tbody tr", has_text="Prod")
    assert "OidcAuthentication" in await row.inner_text() and "Success" in await row.inner_text()


async def test_a_sub_the_trust_policy_does_not_allow_shows_access_denied_naming_the_sub(
    world: World,  # noqa: F811
    page: Any,
) -> None:
    # Identifier Staging: the token's sub is connector:-/-/Staging, which oidc-prod does not trust.
    await overview(page, "Staging")
    await credentials(page, "Use OIDC", {"IAM role ARN": ROLE})
    await connectivity(page, "any delegate")
    shown = await save_and_test(page)
    assert (shown["status"], shown["executing_on"]) == ("FAILURE", "eks-prod"), shown
    assert (shown["failed-step"], shown["aws-error-code"]) == ("Resolve credentials", "AccessDenied")
    provider = world.cloud.provider
    # The hint is the trust policy's condition to write, with the exact sub of this connector.
    assert f'"{provider}:sub": "connector:-/-/Staging"' in shown["failure-hint"]
    assert f"oidc-provider/{provider}" in shown["failure-hint"]
    assert "identity-arn" not in shown
    await shot(page, "wizard-oidc-access-denied")
    content = await page.content()  # the tokens (bearer secrets for five minutes) are on no page
    assert world.minted and not any(token in content for token in world.minted)
    # "Edit credentials" goes back to the role, to fix it there (or the trust policy in AWS).
    await page.get_by_role("link", name="Edit credentials").click()
    await expect_step(page, "Credentials")
    assert await page.get_by_label("Use OIDC", exact=True).is_checked()
    assert await page.get_by_label("IAM role ARN", exact=True).input_value() == ROLE
