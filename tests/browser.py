"""Fixtures for the console's browser tests: Debian's chromium driven by Playwright, a real control
plane, real delegates validating against moto.

Chromium is the one ``tools/install-test-tools.sh`` installs with apt (never ``playwright install``,
which downloads a browser). Playwright's async API runs in the test's own event loop, beside the
in-process control plane and delegates; so each test launches its own browser (about 0.8 s: the
driver and chromium), since the control plane fixtures, and the loop, are the test's own.

``console_world`` builds the usual scene: a control plane, moto with an IAM user, a secrets dir on
the delegates holding that user's secret key, and a helper to start AWS delegates and to apply
connectors that succeed (``good``) or fail (``bad``: a secret reference the delegates lack).
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.aws.environment import AwsEnvironment
from agent.cli import build_handlers
from agent.controlplane.app import ControlPlaneService
from agent.controlplane.core import ControlPlaneSettings
from agent.observability.logging import Redactor
from agent.observability.metrics import AgentMetrics
from agent.protocol.models import TestRequest
from tests.awsfakes import MotoIam
from tests.conftest import API_KEY, AgentFactory, ControlPlaneFactory, Running

#: The repository's root: screenshots go to .artifacts/console/ (gitignored), the README's to docs/images/.
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / ".artifacts" / "console"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

#: Quick heartbeats and sweeps; a test that no delegate takes fails after 5 s rather than 5 minutes;
#: the sixth wrong credential from an address within a minute is refused.
SETTINGS = ControlPlaneSettings(
    heartbeat_seconds=1,
    poll_wait_seconds=2,
    lease_seconds=5,
    pickup_timeout_seconds=5,
    sweep_interval_seconds=0.1,
    connector_test_interval_seconds=0,
    auth_failure_limit=5,
)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A headless Chromium (Debian's), closed at the end of the test."""
    from playwright.async_api import async_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run `bash tools/install-test-tools.sh` (make test does)")
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield launched
        finally:
            await launched.close()


async def screenshot(page: Any, name: str) -> Path:
    """Save the whole page as ``.artifacts/console/<name>.png`` (kept as a test artifact)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def log_in(page: Any, base_url: str, api_key: str = API_KEY) -> None:
    """Log in through the form, as a person would; ends on the connectors page."""
    await page.goto(f"{base_url}/console/login")
    await page.get_by_label("API key").fill(api_key)
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_url(f"{base_url}/console/connectors")


@dataclass
class ConsoleWorld:
    """A control plane with AWS delegates on moto, and the connectors a test applies to it."""

    cp: ControlPlaneService
    moto: str
    secrets: Path
    access_key: str
    agent_factory: AgentFactory
    delegates: list[Running] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.cp.url

    async def delegate(self, name: str, tags: tuple[str, ...] = ()) -> Running:
        """A real delegate running the AWS validation, with the secrets dir and moto as its AWS."""
        aws, _ = AwsEnvironment.from_environ({"AWS_ENDPOINT_URL": self.moto, "AWS_EC2_METADATA_DISABLED": "true"})
        handlers = build_handlers(aws, Redactor(), AgentMetrics(name=name), secrets_dir=self.secrets)
        running = await self.agent_factory(self.cp, name=name, tags=tags, extra_handlers=tuple(handlers))
        self.delegates.append(running)
        return running

    def document(self, name: str, *, secret: str = "sk", selectors: tuple[str, ...] = ()) -> dict[str, Any]:
        credential = {
            "type": "ManualConfig",
            "spec": {"accessKey": self.access_key, "secretKeyRef": f"account.{secret}"},
            "region": "us-east-1",
        }
        spec = {"credential": credential, "delegateSelectors": list(selectors), "executeOnDelegate": True}
        return {"connector": {"name": name, "type": "Aws", "spec": spec}}

    async def apply(self, name: str, **kwargs: Any) -> str:
        """Apply a connector (``secret="missing"`` makes its tests fail); returns its identifier."""
        return (await self.cp.core.apply_connector(self.document(name, **kwargs))).identifier

    async def test(self, identifier: str) -> str:
        """Test a connector through the core and wait for the result; returns its status."""
        task = await self.cp.core.test_connector(identifier, TestRequest(wait_seconds=30))
        assert task.state == "done", f"the test of {identifier} did not finish ({task.state})"
        return str(task.status)


@pytest.fixture
async def console_world(
    moto: str, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, tmp_path: Path
) -> ConsoleWorld:
    key = await MotoIam(moto).user("console-user")
    secrets = tmp_path / "delegate-secrets"
    secrets.mkdir()
    (secrets / "sk").write_text(key.secret_key)
    cp = await control_plane_factory(settings=SETTINGS)
    return ConsoleWorld(cp=cp, moto=moto, secrets=secrets, access_key=key.access_key, agent_factory=agent_factory)
