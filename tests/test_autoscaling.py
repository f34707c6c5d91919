"""The chart's KEDA trigger and the saturation alert, evaluated by a real Prometheus on real delegates.

The ScaledObject is rendered by the real helm; its query runs unchanged against a Prometheus that
scrapes two delegates under the labels the Prometheus Operator gives a ServiceMonitor's targets
(namespace, service). Idle, with long polls holding every slot, the fleet must be at 0; with every
slot running a task it must be above the threshold, so the HPA KEDA drives asks for more than two
replicas, and the shipped DelegateFleetSaturated alert must be pending.
"""

from __future__ import annotations

import math
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import FAST, AgentFactory, ControlPlaneFactory, Running
from tests.helpers import wait_for, wait_task, wait_until
from tests.promserver import running_prometheus
from tests.test_chart import VARIANTS, one, render

ALERTS = Path(__file__).resolve().parent.parent / "config" / "prometheus" / "alerts.yaml"
CAPACITY = 2


def hpa_desired(current: int, value: float, threshold: float, metric_type: str) -> int:
    """The replica count the HPA computes from a KEDA external metric (without its 10 % tolerance).

    Value: ceil(current * value / threshold). AverageValue: the metric is divided by the replica
    count first, so ceil(value / threshold) whatever the current count.
    """
    if metric_type == "Value":
        return math.ceil(current * value / threshold)
    assert metric_type == "AverageValue", metric_type
    return math.ceil(value / threshold)


def sample(d: Running, name: str) -> float | None:
    return d.agent.metrics.registry.get_sample_value(name)


@pytest.mark.slow
@pytest.mark.tooling
async def test_keda_query_and_alert_are_zero_idle_and_scale_out_loaded(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Idle: 0 running, 0 % and no alert, though polls hold every slot. Loaded: > threshold, 3 replicas."""
    docs = render(*VARIANTS["keda"])
    scaled = one(docs, "ScaledObject")
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    metric_type = trigger.get("metricType", "AverageValue")  # KEDA's default
    query, threshold = trigger["metadata"]["query"], float(trigger["metadata"]["threshold"])
    namespace, service = scaled["metadata"]["namespace"], scaled["metadata"]["name"]

    cp = await control_plane_factory(settings=FAST)
    fleet = [await agent_factory(cp, name=f"pod-{i}", capacity=CAPACITY) for i in range(2)]
    for d in fleet:
        await d.registered()
    # Idle but polling: each delegate's long poll holds all of its slots (the backpressure stays).
    for d in fleet:
        await wait_for(lambda d=d: sample(d, "delegate_task_slots_reserved") == CAPACITY, "a poll holding the slots")
        assert (sample(d, "delegate_tasks_running"), sample(d, "delegate_task_slots_busy")) == (0, 0)
        assert sample(d, "delegate_task_slots_free") == CAPACITY

    targets = ", ".join(f'"{d.agent.http_url.removeprefix("http://")}"' for d in fleet)
    config = f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{ALERTS}"]
scrape_configs:
  - job_name: {service}
    static_configs:
      - targets: [{targets}]
        labels: {{namespace: {namespace}, service: {service}}}
"""
    saturated = 'ALERTS{alertname="DelegateFleetSaturated"}'
    async with running_prometheus(tmp_path, config, http) as prom:

        async def both_scraped() -> bool:
            value = await prom.value(f'sum(delegate_registered{{namespace="{namespace}",service="{service}"}})')
            return value == 2

        await wait_until(both_scraped, lambda: "Prometheus to scrape both delegates\n" + prom.tail(), 30)
        idle = await prom.value(query)
        assert idle == 0, (query, idle)
        assert hpa_desired(2, idle, threshold, metric_type) == 0  # the HPA then keeps minReplicas
        assert await prom.query(saturated) == []

        # Loaded: a task held running in every slot of the fleet.
        tasks = [await cp.core.create_task(type="test.gate", payload={}) for _ in range(2 * CAPACITY)]
        for d in fleet:
            await wait_for(lambda d=d: sample(d, "delegate_tasks_running") == CAPACITY, "every slot running a task")
            assert (sample(d, "delegate_task_slots_busy"), sample(d, "delegate_task_slots_free")) == (CAPACITY, 0)

        async def above_threshold() -> float | None:
            value = await prom.value(query)
            return value if value is not None and value > threshold else None

        loaded = await wait_until(above_threshold, lambda: "Prometheus to see the load\n" + prom.tail(), 15)
        assert hpa_desired(2, loaded, threshold, metric_type) > 2, (metric_type, loaded, threshold)
        pending = await wait_until(lambda: prom.query(saturated), "DelegateFleetSaturated to be pending", 15)
        assert [a["metric"]["alertstate"] for a in pending] == ["pending"]  # fires after its 15 min
        for d in fleet:
            d.gate.open_all()
        for t in tasks:
            await wait_task(cp.core, t.id, lambda r: r.state == "done", "the held tasks to finish")
