"""What a user moving from Harness's delegate relies on: its HTTP paths and a delegate group's name."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgspec
import pytest
from prometheus_client import CollectorRegistry, Counter

from agent.cli import main
from agent.observability.http import HealthServer
from tests.conftest import API_KEY, FAST, AgentFactory, ControlPlaneFactory, done, register_request
from tests.helpers import wait_for

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


async def get(http: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, str, str]:
    async with http.get(url, headers=headers) as resp:
        return resp.status, resp.headers["Content-Type"], await resp.text()


def families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


async def test_a_running_delegate_answers_harness_paths_like_its_own(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, http: aiohttp.ClientSession
) -> None:
    """/api/health answers as /healthz; /api/metrics serves the same registry as /metrics, OpenMetrics too."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp, name="harness-paths")
    await a.registered()
    await done(cp, (await cp.core.create_task(type="test.echo", payload={"message": "x"})).id)
    await wait_for(lambda: a.agent.state.last_heartbeat, "a heartbeat")
    base = a.agent.http_url

    assert await get(http, base + "/api/health") == await get(http, base + "/healthz")
    status, content_type, body = await get(http, base + "/api/health")
    assert (status, content_type) == (200, "application/json; charset=utf-8")
    assert body == '{"status": "ok", "problems": []}'

    status, content_type, text = await get(http, base + "/api/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    assert 'delegate_tasks_completed_total{outcome="success",type="test.echo"} 1.0' in text
    _, _, ours = await get(http, base + "/metrics")
    assert families(text) == families(ours) and "delegate_registered" in families(text)

    # Harness's delegate serves OpenMetrics; a scraper asking for it gets it here too.
    status, content_type, text = await get(http, base + "/api/metrics", Accept=OPENMETRICS)
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")

    status, _, body = await get(http, base + "/api/nope")
    assert status == 404 and '"/api/health"' in body and '"/api/metrics"' in body


class Failing:
    """Probes that report a stuck delegate, to see that the alias fails as /healthz does."""

    def liveness_problems(self) -> list[str]:
        return ["the poll loop has made no progress for 301s"]

    def readiness_problems(self) -> list[str]:
        return ["not registered with the control plane"]

    def status(self) -> dict[str, Any]:
        return {}


async def test_api_health_fails_when_healthz_fails(http: aiohttp.ClientSession) -> None:
    """A Harness-style probe on /api/health restarts a stuck delegate: 503 with the problem, as /healthz."""
    registry = CollectorRegistry()
    Counter("probe_test_total", "a sample", registry=registry).inc()
    server = HealthServer(probes=Failing(), registry=registry, host="127.0.0.1", port=0)
    url = await server.start()
    try:
        harness, ours = await get(http, url + "/api/health"), await get(http, url + "/healthz")
        assert harness == ours
        assert harness[0] == 503 and "no progress for 301s" in harness[2]
        assert "probe_test_total 1.0" in (await get(http, url + "/api/metrics"))[2]
    finally:
        await server.stop()


async def test_replicas_sharing_the_release_name_keep_a_selector_on_it_working_across_a_rollout(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """As the chart names them (a delegate group): a selector on the name finds the new pods after the old are gone."""
    cp = await control_plane_factory(settings=FAST)
    group = "rel-delegate-agent"  # the chart's DELEGATE_NAME for release "rel" (tests/test_chart.py)
    old = [await agent_factory(cp, name=group, tags=("eks",)) for _ in range(2)]
    old_ids = {await a.registered() for a in old}
    assert len(old_ids) == 2  # each pod is still its own instance
    first = await done(
        cp, (await cp.core.create_task(type="test.echo", payload={"message": "x"}, selectors=[group])).id
    )
    assert first.status == "SUCCESS" and first.delegate_id in old_ids

    new = await agent_factory(cp, name=group, tags=("eks",))  # the rollout's new pod ...
    new_id = await new.registered()
    for a in old:  # ... and the old pods stopped
        assert await a.stop() == 0
    second = await done(
        cp, (await cp.core.create_task(type="test.echo", payload={"message": "y"}, selectors=[group])).id
    )
    assert (second.status, second.delegate_id) == ("SUCCESS", new_id)


async def test_delegates_list_tells_the_pods_of_a_group_apart_by_host(
    control_plane_factory: ControlPlaneFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two replicas named after the release: one row each, told apart by their pod names."""
    cp = await control_plane_factory()
    pods = ["rel-delegate-agent-7d9f8-abcde", "rel-delegate-agent-7d9f8-fghij"]
    for pod in pods:
        request = msgspec.structs.replace(register_request("rel-delegate-agent"), hostname=pod)
        await cp.core.register(request)
    argv = ["delegates", "list", "--control-plane", cp.url, "--api-key", API_KEY]
    assert await asyncio.to_thread(main, argv) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["NAME", "ID", "HOST"]
    assert sorted((r.split()[0], r.split()[2]) for r in rows) == [("rel-delegate-agent", pod) for pod in pods]
