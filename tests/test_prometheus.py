"""A real Prometheus server on 127.0.0.1 scrapes a running delegate, and a query returns its metrics."""

from __future__ import annotations

import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import FAST, AgentFactory, ControlPlaneFactory, done
from tests.helpers import wait_until
from tests.promserver import running_prometheus


@pytest.mark.slow
async def test_prometheus_scrapes_the_delegate(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The target is up, and PromQL sees registration, slots and completed tasks."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp, name="scraped", capacity=5)
    await a.registered()
    task = await cp.core.create_task(type="test.echo", payload={"message": "m"})
    await done(cp, task.id)
    target = a.agent.http_url.removeprefix("http://")
    config = f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: delegate-agent
    static_configs: [{{targets: ["{target}"]}}]
"""
    async with running_prometheus(tmp_path, config, http) as prom:
        # The first scrape lands about 5 s after Prometheus starts.
        value = await wait_until(
            lambda: prom.value("delegate_registered"), lambda: "Prometheus to scrape the delegate\n" + prom.tail(), 30
        )
        assert value == 1, prom.tail()
        async with http.get(prom.base + "/api/v1/targets") as resp:
            [t] = (await resp.json())["data"]["activeTargets"]
        assert t["health"] == "up"
        queries = {
            "delegate_task_slots": 5,
            'sum(delegate_tasks_completed_total{type="test.echo",outcome="success"})': 1,
            'delegate_agent_info{name="scraped"}': 1,
        }
        for query, expected in queries.items():
            assert await prom.value(query) == expected, query
        # docs/deploy.md: Harness's delegate_name label, by joining on the info metric.
        [joined] = await prom.query("delegate_tasks_running * on (instance) group_left (name) delegate_agent_info") or [
            {}
        ]
        assert (joined["metric"]["name"], joined["value"][1]) == ("scraped", "0"), joined


def test_the_shipped_alert_rules_are_valid() -> None:
    """config/prometheus/alerts.yaml passes promtool check rules."""
    rules = Path(__file__).resolve().parent.parent / "config" / "prometheus" / "alerts.yaml"
    out = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 7 rules found" in out.stdout
