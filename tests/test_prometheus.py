"""A real Prometheus server on 127.0.0.1 scrapes a running delegate, and a query returns its metrics."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import FAST, AgentFactory, ControlPlaneFactory, done, free_port
from tests.helpers import wait_until


@pytest.mark.slow
async def test_prometheus_scrapes_the_delegate(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The target is up, and PromQL sees registration, slots and completed tasks."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: run tools/install-test-tools.sh (make test does)"
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp, name="scraped", capacity=5)
    await a.registered()
    task = cp.core.create_task(type="test.echo", payload={"message": "m"})
    await done(cp, task.id)
    target = a.agent.http_url.removeprefix("http://")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: delegate-agent
    static_configs: [{{targets: ["{target}"]}}]
""")
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    log = (tmp_path / "prometheus.log").open("w")
    proc = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=log,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        async def scraped() -> str | None:
            try:
                async with http.get(base + "/api/v1/query", params={"query": "delegate_registered"}) as resp:
                    result = (await resp.json())["data"]["result"]
            except (aiohttp.ClientError, KeyError):
                return None
            return str(result[0]["value"][1]) if result else None

        # The first scrape lands about 5 s after Prometheus starts.
        try:
            value = await wait_until(scraped, "Prometheus to scrape the delegate", timeout=30, every=0.25)
        except AssertionError as exc:
            raise AssertionError((tmp_path / "prometheus.log").read_text()[-2000:]) from exc
        assert value == "1", (tmp_path / "prometheus.log").read_text()[-2000:]
        async with http.get(base + "/api/v1/targets") as resp:
            [t] = (await resp.json())["data"]["activeTargets"]
        assert t["health"] == "up"
        queries = {
            "delegate_task_slots": "5",
            'sum(delegate_tasks_completed_total{type="test.echo",outcome="success"})': "1",
            'delegate_agent_info{name="scraped"}': "1",
        }
        for query, expected in queries.items():
            async with http.get(base + "/api/v1/query", params={"query": query}) as resp:
                result = (await resp.json())["data"]["result"]
            assert result and result[0]["value"][1] == expected, (query, result)
    finally:
        proc.terminate()
        await proc.wait()
        log.close()


def test_the_shipped_alert_rules_are_valid() -> None:
    """config/prometheus/alerts.yaml passes promtool check rules."""
    rules = Path(__file__).resolve().parent.parent / "config" / "prometheus" / "alerts.yaml"
    out = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 7 rules found" in out.stdout
