"""Connector status changes, end to end: the schedule tests, the status changes, the webhook fires once.

A real control plane (HTTP, store, sweeper, scheduler) posts to a real receiver on 127.0.0.1. The
connector runs ``executeOnDelegate: false``, so the control plane tests it itself; the platform
validator is a stand-in whose answer the test sets (SUCCESS, or a FAILURE with its hint), named as
such: what is under test is what the control plane does with the answer, not AWS.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web

from agent.aws.connector import AwsConnector
from agent.controlplane.core import ControlPlaneSettings
from agent.protocol.models import TestRequest
from agent.protocol.results import ValidationResult, failure_result
from tests.conftest import ControlPlaneFactory, free_port, manual_connector
from tests.helpers import wait_until


class StandInValidator:
    """Answers each platform test as the test says (``broken``: the failure category and hint)."""

    def __init__(self) -> None:
        self.broken: tuple[str, str] | None = None
        self.calls = 0

    async def __call__(
        self, connector: AwsConnector, task_id: str, permissions: tuple[str, ...], *, oidc_token: str | None = None
    ) -> ValidationResult:
        self.calls += 1
        if self.broken is None:
            return ValidationResult(status="SUCCESS", tested_at=datetime.now(UTC))
        category, hint = self.broken
        return failure_result(
            category, "The security token included in the request is invalid.", step="get_caller_identity", hint=hint
        )

    async def aclose(self) -> None:
        return None


async def receiver() -> tuple[web.AppRunner, str, list[dict[str, Any]]]:
    bodies: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hooks/T0KEN-canary-webhook-path", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/hooks/T0KEN-canary-webhook-path", bodies


async def test_a_broken_credential_turns_the_connector_to_failure_and_the_webhook_fires_once(
    control_plane_factory: ControlPlaneFactory,
) -> None:
    runner, url, bodies = await receiver()
    validator = StandInValidator()
    settings = ControlPlaneSettings(sweep_interval_seconds=0.05, connector_test_interval_seconds=60)
    try:
        with structlog.testing.capture_logs() as logs:
            cp = await control_plane_factory(settings=settings, status_webhook_url=url, platform_validator=validator)
            doc = manual_connector("Prod account", executeOnDelegate=False)
            await cp.core.apply_connector(doc)
            # Applied: tested at once (it changed), SUCCESS, and that is news: UNKNOWN -> SUCCESS.
            await wait_until(lambda: _is(bodies, 1), "the first status change to be posted", 10)
            assert (bodies[0]["from"], bodies[0]["to"]) == ("UNKNOWN", "SUCCESS")
            assert bodies[0]["connector"]["identifier"] == "Prod_account"

            validator.broken = ("invalid_credentials", "The access key was deleted or deactivated: create a new one.")
            for _ in range(3):  # failing three times is one change, not three
                await cp.core.test_connector("Prod_account", TestRequest(wait_seconds=10))
            await wait_until(lambda: _is(bodies, 2), "the failure to be posted", 10)
            record = await cp.core.connector_record(await cp.core.get_connector("Prod_account"))
            assert record.health.status == "FAILURE" and record.health.failures_in_row == 3
            assert record.health.failure is not None
            assert record.health.failure.hint == "The access key was deleted or deactivated: create a new one."
            assert record.health.last_connected_at is not None  # kept while it fails

            validator.broken = None
            await cp.core.test_connector("Prod_account", TestRequest(wait_seconds=10))
            await wait_until(lambda: _is(bodies, 3), "the recovery to be posted", 10)
        assert [(b["from"], b["to"]) for b in bodies] == [
            ("UNKNOWN", "SUCCESS"),
            ("SUCCESS", "FAILURE"),
            ("FAILURE", "SUCCESS"),
        ]
        assert bodies[1]["failure"]["hint"] == "The access key was deleted or deactivated: create a new one."
        assert bodies[1]["failuresInRow"] == 1
        history = await cp.core.connector_history("Prod_account", 50)
        assert [e.trigger for e in history.entries][::-1][:2] == ["changed", "manual"]
        assert [e.status for e in history.entries] == ["SUCCESS", "FAILURE", "FAILURE", "FAILURE", "SUCCESS"]
        changes = [e for e in logs if e["event"] == "controlplane.connector_status_changed"]
        assert len(changes) == 3  # one line per change, not per test
        assert not any("T0KEN-canary" in str(e) for e in logs)  # the webhook's path is a secret
    finally:
        await runner.cleanup()


async def _is(bodies: list[dict[str, Any]], n: int) -> bool:
    return len(bodies) >= n


def test_the_webhook_text_is_one_inert_line() -> None:
    """A connector named to break the line or ping a chat channel cannot (review finding)."""
    from agent.controlplane.webhook import status_change_event

    event = status_change_event(
        identifier="evil",
        name="Evil <!channel> *bold*\n@here \u202e",
        from_status="SUCCESS",
        to_status="FAILURE",
        tested_at=0.0,
        error_summary="line one\nline two <@U123>",
    )
    text = event["text"]
    assert "\n" not in text and "\u202e" not in text
    assert "<!channel>" not in text and "<@U123>" not in text and "&lt;!channel&gt;" in text
    assert event["connector"]["name"] == "Evil <!channel> *bold*\n@here \u202e"  # the data itself is kept
