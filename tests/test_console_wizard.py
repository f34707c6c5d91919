"""The New Connector wizard in a real browser, against a real control plane, real delegates and moto.

Each credential type is walked through the whole wizard (Overview, Credentials, Connectivity mode,
Connection test, Finish) as a person would, by label; a failing test shows its step, AWS code and
hint, and "Edit credentials" fixes it; validation errors sit beside their fields with the API's
own words; an existing connector is edited. Screenshots go to .artifacts/console/wizard-*.png;
with UPDATE_README_IMAGES=1, the test step of a successful run also to
docs/images/console-wizard-test.png (the README's).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import expect

from agent import _yaml
from agent.aws.connector import ConnectorInvalid, parse_connector
from agent.aws.environment import AwsEnvironment
from agent.cli import build_handlers
from agent.controlplane.app import ControlPlaneService
from agent.controlplane.console.security import CSP
from agent.controlplane.platform import platform_validator_from_env
from agent.observability.logging import Redactor
from agent.observability.metrics import AgentMetrics
from agent.protocol.models import TestRequest
from tests.awsfakes import ACCOUNT, Key, MotoIam, moto_api
from tests.browser import ROOT, SETTINGS, log_in, screenshot
from tests.conftest import AgentFactory, ControlPlaneFactory, Running
from tests.test_console import LOW_CONTRAST_JS

pytestmark = pytest.mark.browser

README_IMAGE = ROOT / "docs" / "images" / "console-wizard-test.png"
SECRET_VALUE = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
#: How long a page waits for the test to end (the delegates poll every 2 s at most; moto answers at once).
TEST_DEADLINE_MS = 20_000


@dataclass
class World:
    """A control plane (with the platform validator on moto) and the AWS delegates a test starts."""

    cp: ControlPlaneService
    moto: str
    secrets: Path
    key: Key
    agent_factory: AgentFactory

    @property
    def url(self) -> str:
        return self.cp.url

    async def delegate(self, name: str, tags: tuple[str, ...] = (), **env: str) -> Running:
        """A real delegate validating on moto; ``env``: its own AWS environment (keys, IRSA variables)."""
        aws, problems = AwsEnvironment.from_environ(
            {"AWS_ENDPOINT_URL": self.moto, "AWS_EC2_METADATA_DISABLED": "true", **env}
        )
        assert problems == []
        handlers = build_handlers(aws, Redactor(), AgentMetrics(name=name), secrets_dir=self.secrets)
        running = await self.agent_factory(self.cp, name=name, tags=tags, extra_handlers=tuple(handlers))
        await running.registered()
        return running

    async def stored(self, identifier: str) -> dict[str, Any]:
        return (await self.cp.core.get_connector(identifier)).body


@pytest.fixture
async def world(
    moto: str, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, tmp_path: Path
) -> World:
    key = await MotoIam(moto).user("wizard-user", ["ec2:DescribeRegions"])
    secrets = tmp_path / "secrets"  # the delegates' secrets dir, and the control plane's
    secrets.mkdir()
    (secrets / "aws_secret").write_text(key.secret_key)
    (secrets / "stale_secret").write_text("definitely-not-the-secret-key")
    platform = platform_validator_from_env(
        {"AWS_ENDPOINT_URL": moto, "AWS_EC2_METADATA_DISABLED": "true"}, secrets_dir=secrets, redactor=Redactor()
    )
    cp = await control_plane_factory(settings=SETTINGS, platform_validator=platform)
    return World(cp=cp, moto=moto, secrets=secrets, key=key, agent_factory=agent_factory)


@pytest.fixture
async def page(world: World, browser: Any) -> Any:
    page = await browser.new_page(viewport={"width": 1100, "height": 900})
    await log_in(page, world.url)
    return page


async def shot(page: Any, name: str) -> None:
    """A screenshot kept as an artifact, of a page whose every text is at WCAG AA contrast."""
    await screenshot(page, name)
    assert await page.evaluate(LOW_CONTRAST_JS) == [], f"text below 4.5:1 contrast on {name}"


# --- walking the wizard, as a person does ----------------------------------------------------------


async def overview(page: Any, name: str, *, tags: str = "") -> None:
    await page.get_by_label("Name", exact=True).fill(name)
    if tags:
        await page.get_by_label("Tags (optional)").fill(tags)
    await page.get_by_role("button", name="Continue").click()
    await expect_step(page, "Credentials")


async def credentials(page: Any, choice: str, fields: dict[str, str] | None = None, region: str = "") -> None:
    await page.get_by_label(choice, exact=True).check()
    for label, value in (fields or {}).items():
        await page.get_by_label(label, exact=True).fill(value)
    if region:
        await page.get_by_label("Test region").select_option(region)
    await page.get_by_role("button", name="Continue").click()
    await expect_step(page, "Connectivity mode")


async def connectivity(page: Any, mode: str, tags: str = "") -> None:
    await page.get_by_label(mode).check()
    if tags:
        await page.get_by_label("Delegate tags", exact=True).fill(tags)


async def save_and_test(page: Any) -> dict[str, str]:
    """Save and Continue, then wait on the Connection test step until the test ended; what it shows."""
    await page.get_by_role("button", name="Save and Continue").click()
    await page.wait_for_url(re.compile(r"/test/tsk_"))
    status = page.locator("#test-status[data-done=true]")
    await status.wait_for(timeout=TEST_DEADLINE_MS)
    shown = {"status": await status.get_attribute("data-status") or ""}
    shown["executing_on"] = await page.locator("#executing-on").inner_text()
    for key in ("identity-arn", "identity-account", "failed-step", "aws-error-code", "failure-hint"):
        if await page.locator(f"#{key}").count():
            shown[key] = await page.locator(f"#{key}").inner_text()
    return shown


async def expect_step(page: Any, title: str) -> None:
    await page.locator('.wizard-steps [aria-current="step"]', has_text=title).wait_for()


async def finish(page: Any, world: World, name: str) -> None:
    await page.get_by_role("link", name="Finish").click()
    await page.wait_for_url(f"{world.url}/console/connectors")
    row = page.locator("tbody tr", has_text=name)
    assert await row.count() == 1
    assert "Success" in await row.inner_text()


# --- the tests --------------------------------------------------------------------------------------


async def test_an_access_key_connector_from_overview_to_finish(world: World, page: Any) -> None:
    await world.delegate("eks-1", ("eks", "prod"))
    await world.delegate("lab", ("lab",))
    await page.get_by_role("link", name="New connector").click()
    await expect_step(page, "Overview")
    # The identifier is generated from the name while typing, and stays editable.
    await page.get_by_label("Name", exact=True).fill("Prod account")
    await expect(page.get_by_label("Identifier")).to_have_value("Prod_account")
    await page.get_by_label("Identifier").fill("prod_account")
    async with page.expect_response(re.compile(r"/console/connectors/new/identifier\?")):
        await page.get_by_label("Name", exact=True).fill("Prod account 1")
    await expect(page.get_by_label("Identifier")).to_have_value("prod_account")  # written by the person: kept
    await page.get_by_label("Tags (optional)").fill("env:prod, team:platform")
    await shot(page, "wizard-overview")
    await page.get_by_role("button", name="Continue").click()
    await expect_step(page, "Credentials")
    assert await page.get_by_label("Test region").input_value() == "us-east-1"  # preselected
    groups = await page.locator("#f-region optgroup").evaluate_all("gs => gs.map(g => g.label)")
    assert groups[:3] == ["commercial (aws)", "GovCloud (US) (aws-us-gov)", "China (aws-cn)"]
    await page.get_by_label("AWS Access Key", exact=True).check()
    await page.get_by_label("Access key", exact=True).fill(world.key.access_key)
    await page.get_by_label("Secret key: secret reference").fill("account.aws_secret")
    await shot(page, "wizard-credentials")
    await page.get_by_role("button", name="Continue").click()
    await expect_step(page, "Connectivity mode")
    # The delegates that would test it, updated while typing the tags.
    await connectivity(page, "delegates with all of these tags", "eks")
    await page.locator("#matching li", has_text="eks-1").wait_for()
    await page.get_by_label("Delegate tags", exact=True).fill("eks, nowhere")
    await page.locator("#matching-count", has_text="0").wait_for()
    assert "none has all of the tags [eks, nowhere]" in await page.locator("#matching").inner_text()
    await page.get_by_label("Delegate tags", exact=True).fill("eks prod")
    await page.locator("#matching li", has_text="eks-1").wait_for()
    assert await page.locator("#matching li").all_inner_texts() == ["eks-1"]
    await shot(page, "wizard-connectivity")
    # View YAML: the Harness document of what was entered.
    await page.get_by_role("button", name="View YAML").click()
    document = _yaml.load(await page.locator("#yaml").inner_text())
    assert document["connector"]["identifier"] == "prod_account"
    assert document["connector"]["tags"] == {"env": "prod", "team": "platform"}
    assert document["connector"]["spec"]["delegateSelectors"] == ["eks", "prod"]
    assert document["connector"]["spec"]["credential"]["spec"]["secretKeyRef"] == "account.aws_secret"
    parse_connector(document)  # the API's parser accepts it
    shown = await save_and_test(page)
    assert shown["status"] == "SUCCESS" and shown["executing_on"] == "eks-1"
    assert shown["identity-arn"] == world.key.arn and shown["identity-account"] == ACCOUNT
    if os.environ.get("UPDATE_README_IMAGES") == "1":  # not on every run: the file is committed
        await page.screenshot(path=str(README_IMAGE))
    await shot(page, "wizard-test-success")
    assert world.key.secret_key not in await page.content()
    stored = await world.stored("prod_account")
    assert stored == parse_connector(document).to_document()
    await finish(page, world, "Prod account 1")
    await shot(page, "wizard-finish-list")


async def test_assume_role_on_delegate_and_irsa(world: World, page: Any, tmp_path: Path) -> None:
    keys = await MotoIam(world.moto).user("delegate-user", ["ec2:DescribeRegions"])
    await world.delegate("vm-1", ("vm",), AWS_ACCESS_KEY_ID=keys.access_key, AWS_SECRET_ACCESS_KEY=keys.secret_key)
    token = tmp_path / "irsa-token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZDpkIn0.sig")
    irsa_role = f"arn:aws:iam::{ACCOUNT}:role/delegate-irsa"
    await world.delegate("k8s-1", ("k8s",), AWS_ROLE_ARN=irsa_role, AWS_WEB_IDENTITY_TOKEN_FILE=str(token))

    await page.goto(f"{world.url}/console/connectors/new")
    await overview(page, "Inherit")
    await credentials(page, "Assume IAM Role on Delegate")
    await connectivity(page, "delegates with all of these tags", "vm")
    shown = await save_and_test(page)
    assert (shown["status"], shown["executing_on"], shown["identity-arn"]) == ("SUCCESS", "vm-1", keys.arn)
    await shot(page, "wizard-test-inherit")

    await page.goto(f"{world.url}/console/connectors/new")
    await overview(page, "Irsa")
    await credentials(page, "Use IRSA")
    await connectivity(page, "delegates with all of these tags", "k8s")
    shown = await save_and_test(page)
    assert (shown["status"], shown["executing_on"]) == ("SUCCESS", "k8s-1")
    assert shown["identity-arn"].startswith(f"arn:aws:sts::{ACCOUNT}:assumed-role/delegate-irsa/")
    await shot(page, "wizard-test-irsa")
    await finish(page, world, "Irsa")
    assert await page.locator("tbody tr", has_text="Inherit").count() == 1


async def test_through_the_platform_with_a_gov_cloud_region_refused(world: World, page: Any) -> None:
    await page.goto(f"{world.url}/console/connectors/new")
    await overview(page, "Platform")
    await page.get_by_label("AWS Access Key", exact=True).check()
    await page.get_by_label("Access key", exact=True).fill(world.key.access_key)
    await page.get_by_label("Secret key: secret reference").fill("account.aws_secret")
    await page.get_by_label("Enable cross-account access").check()
    await page.get_by_label("Cross-account role ARN").fill("arn:aws-us-gov:iam::123456789012:role/deploy")
    await page.get_by_role("button", name="Continue").click()
    # The role's partition is not the test region's: the API's message, beside the ARN.
    error = page.locator("#f-cross_account_role_arn-error")
    assert "credentials never cross partitions" in await error.inner_text()
    assert await page.get_by_label("Cross-account role ARN").get_attribute("aria-describedby") == (
        "f-cross_account_role_arn-hint f-cross_account_role_arn-error"
    )
    await page.get_by_label("Enable cross-account access").uncheck()
    await page.get_by_role("button", name="Continue").click()
    await expect_step(page, "Connectivity mode")
    await connectivity(page, "through the platform")
    await page.locator("#matching", has_text="no delegate is needed").wait_for()
    shown = await save_and_test(page)
    assert shown["status"] == "SUCCESS" and shown["executing_on"].startswith("the platform")
    assert shown["identity-arn"] == world.key.arn
    stored = await world.stored("Platform")
    assert stored["connector"]["spec"]["executeOnDelegate"] is False
    await shot(page, "wizard-test-platform")


async def test_a_failing_test_shows_step_code_and_hint_and_edit_credentials_fixes_it(world: World, page: Any) -> None:
    await world.delegate("eks-1", ("eks",))
    moto_api(world.moto, "/moto-api/reset-auth", b"0")  # moto checks signatures and policies from here on
    await page.goto(f"{world.url}/console/connectors/new")
    await overview(page, "Stale key")
    await credentials(
        page,
        "AWS Access Key",
        {"Access key": world.key.access_key, "Secret key: secret reference": "account.stale_secret"},
    )
    await connectivity(page, "any delegate")
    shown = await save_and_test(page)
    assert shown["status"] == "FAILURE" and shown["executing_on"] == "eks-1"
    assert shown["failed-step"] == "Get caller identity"
    assert shown["aws-error-code"] == "SignatureDoesNotMatch"
    assert "account.stale_secret" in shown["failure-hint"]
    assert await page.locator(".test-steps .st-failure").count() == 1
    await shot(page, "wizard-test-failure")
    assert "definitely-not-the-secret-key" not in await page.content()

    # The way out of a failure stands out; Finish (keep it failing) is the secondary action.
    style = "e => getComputedStyle(e).backgroundColor"
    edit_bg = await page.get_by_role("link", name="Edit credentials").evaluate(style)
    assert edit_bg != await page.get_by_role("link", name="Finish").evaluate(style)
    await page.get_by_role("link", name="Edit credentials").click()
    await expect_step(page, "Credentials")
    assert await page.get_by_label("Secret key: secret reference").input_value() == "account.stale_secret"
    assert await page.get_by_label("Access key", exact=True).input_value() == world.key.access_key
    await page.get_by_label("Secret key: secret reference").fill("account.aws_secret")
    await page.get_by_role("button", name="Continue").click()
    await expect_step(page, "Connectivity mode")
    assert await page.get_by_label("any delegate").is_checked()
    shown = await save_and_test(page)
    assert shown["status"] == "SUCCESS" and shown["identity-arn"] == world.key.arn
    await finish(page, world, "Stale key")


async def test_validation_errors_sit_beside_their_fields_in_the_apis_words(world: World, page: Any) -> None:
    await page.goto(f"{world.url}/console/connectors/new")
    await page.get_by_role("button", name="Continue").click()
    assert await page.locator("#f-name-error").inner_text() == "is required"
    assert await page.get_by_label("Name", exact=True).get_attribute("aria-invalid") == "true"
    await overview(page, "Checked")
    await page.get_by_label("AWS Access Key", exact=True).check()
    await page.get_by_label("Access key", exact=True).fill(world.key.access_key)
    await page.get_by_label("Secret key: secret reference").fill(SECRET_VALUE)
    await page.get_by_role("button", name="Continue").click()
    expected = _api_message(
        {
            "connector": {
                "name": "x",
                "type": "Aws",
                "spec": {
                    "credential": {
                        "type": "ManualConfig",
                        "spec": {"accessKey": world.key.access_key, "secretKeyRef": SECRET_VALUE},
                    }
                },
            }
        },
        "connector.spec.credential.spec.secretKeyRef",
    )
    assert await page.locator("#f-secret_key_ref-error").inner_text() == expected
    assert await page.get_by_label("Secret key: secret reference").input_value() == ""
    assert SECRET_VALUE not in await page.content()  # refused, and never sent back
    await shot(page, "wizard-errors")
    await page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing wider than the screen
    assert await page.evaluate("() => document.documentElement.scrollWidth") <= 390
    await shot(page, "wizard-errors-phone")
    await page.set_viewport_size({"width": 1100, "height": 900})
    await page.get_by_label("Assume IAM Role on Delegate").check()
    await page.get_by_role("button", name="Continue").click()
    await connectivity(page, "any delegate")
    await page.get_by_role("button", name="Save and Continue").click()
    assert (await page.locator("#f-selectors-error").inner_text()).startswith(
        "Delegate Selector cannot be null for inherit from delegate credential type"
    )
    assert await world.cp.core.store.get_connector("Checked") is None  # nothing was applied
    # A new connector never replaces one with the same identifier.
    await world.cp.core.apply_connector(
        {
            "connector": {
                "name": "Taken",
                "type": "Aws",
                "spec": {"credential": {"type": "Irsa"}, "delegateSelectors": ["k8s"]},
            }
        }
    )
    await page.goto(f"{world.url}/console/connectors/new")
    await page.get_by_label("Name", exact=True).fill("Taken")
    await page.get_by_role("button", name="Continue").click()
    assert "already exists" in await page.locator("#f-identifier-error").inner_text()


async def test_an_existing_connector_is_edited_with_its_identifier_fixed(world: World, page: Any) -> None:
    await world.delegate("eks-1", ("eks",))
    document = {
        "connector": {
            "name": "Shared",
            "identifier": "shared",
            "orgIdentifier": "default",
            "type": "Aws",
            "testInterval": "2h",
            "spec": {
                "credential": {
                    "type": "ManualConfig",
                    "spec": {"accessKey": world.key.access_key, "secretKeyRef": "account.aws_secret"},
                },
                "delegateSelectors": ["eks"],
                "awsSdkClientBackOffStrategyOverride": {
                    "type": "FixedDelayBackoffStrategy",
                    "spec": {"fixedBackoff": 100, "retryCount": 1},
                },
            },
        }
    }
    await world.cp.core.apply_connector(document)
    await page.goto(f"{world.url}/console/connectors/shared/edit")
    await expect_step(page, "Overview")
    assert await page.get_by_label("Identifier").get_attribute("readonly") is not None
    assert await page.get_by_label("Name", exact=True).input_value() == "Shared"
    await page.get_by_label("Description (optional)").fill("edited in the console")
    await page.get_by_role("button", name="Continue").click()
    await page.get_by_label("Test region").select_option("eu-west-1")
    await page.get_by_role("button", name="Continue").click()
    assert await page.get_by_label("Delegate tags", exact=True).input_value() == "eks"
    shown = await save_and_test(page)
    assert shown["status"] == "SUCCESS" and shown["executing_on"] == "eks-1"
    stored = (await world.stored("shared"))["connector"]
    assert stored["description"] == "edited in the console"
    assert stored["spec"]["credential"]["region"] == "eu-west-1"
    # Kept, though the wizard does not show them.
    assert stored["spec"]["awsSdkClientBackOffStrategyOverride"]["spec"] == {"fixedBackoff": 100, "retryCount": 1}
    assert (stored["testInterval"], stored["orgIdentifier"]) == ("2h", "default")
    assert len(await world.cp.core.store.connectors()) == 1


async def test_without_javascript_the_wizard_still_works(world: World, browser: Any) -> None:
    await world.delegate("eks-1", ("eks",))
    context = await browser.new_context(java_script_enabled=False)
    page = await context.new_page()
    await log_in(page, world.url)
    await page.goto(f"{world.url}/console/connectors/new")
    await overview(page, "No script")
    # Generated when leaving Overview (no script ran to show it while typing), carried by the page.
    assert await page.locator("input[type=hidden][name=identifier]").input_value() == "No_script"
    await credentials(
        page, "AWS Access Key", {"Access key": world.key.access_key, "Secret key: secret reference": "aws_secret"}
    )
    await connectivity(page, "delegates with all of these tags", "eks")
    await page.get_by_role("button", name="Show matching delegates").click()
    await page.locator("#matching li", has_text="eks-1").wait_for()
    shown = await save_and_test(page)  # the page reloads itself (meta refresh) until the test ends
    assert shown["status"] == "SUCCESS" and shown["executing_on"] == "eks-1"
    await context.close()


def _api_message(document: dict[str, Any], path: str) -> str:
    try:
        parse_connector(document)
    except ConnectorInvalid as exc:
        return next(p.message for p in exc.problems if p.field == path)
    raise AssertionError("the parser accepted it")


async def test_a_step_without_the_sessions_token_is_refused(world: World, page: Any) -> None:
    response = await page.goto(f"{world.url}/console/connectors/new")
    assert response.headers["content-security-policy"] == CSP
    form = {"step": "connectivity", "action": "save", "name": "Forged", "credential_type": "Irsa"}
    forged = await page.request.post(
        f"{world.url}/console/connectors/new", form={**form, "connectivity": "tags", "selectors": "k8s"}
    )
    assert forged.status == 403
    assert await world.cp.core.store.get_connector("Forged") is None
    # A test step only shows a test of its own connector.
    await world.cp.core.apply_connector(
        {
            "connector": {
                "name": "One",
                "type": "Aws",
                "spec": {"credential": {"type": "Irsa"}, "delegateSelectors": ["x"]},
            }
        }
    )
    task = await world.cp.core.test_connector("One", TestRequest(wait_seconds=0))
    assert (await page.goto(f"{world.url}/console/connectors/One/edit/test/{task.id}")).status == 200
    assert (await page.goto(f"{world.url}/console/connectors/Other/edit/test/{task.id}")).status == 404
    assert (await page.goto(f"{world.url}/console/connectors/new/test/tsk_unknown")).status == 404
