"""The control plane's own /metrics: queue, tasks by state, lease expiries, delegates, request latency."""

from __future__ import annotations

import shutil
import subprocess

import aiohttp

from agent.protocol.models import AcquireRequest, HeartbeatRequest
from tests.conftest import API_KEY, FAST, AgentFactory, ControlPlaneFactory, ManualClock, done, register_request

H = {"X-API-Key": API_KEY}


async def test_the_control_plane_serves_metrics_that_pass_promtool(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, http: aiohttp.ClientSession
) -> None:
    """Queue depth per selector set, tasks by state and end, delegates connected, every route timed."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run tools/install-test-tools.sh (make test does)"
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp, name="m1", tags=("eks",))
    await a.registered()
    ok = await cp.core.create_task(type="test.echo", payload={"message": "x"}, selectors=["eks"])
    await done(cp, ok.id)
    # Nobody has both tags: these wait in one queue (the selector set "eks,gpu").
    for _ in range(2):
        await cp.core.create_task(type="test.echo", payload={"message": "x"}, selectors=["GPU", "eks"])
    cancelled = await cp.core.create_task(type="test.echo", payload={}, selectors=["arm"])
    async with http.post(f"{cp.url}/api/v1/tasks/{cancelled.id}/cancel", headers=H) as resp:
        assert resp.status == 200
    async with http.get(cp.url + "/healthz") as resp:
        assert resp.status == 200
    async with http.get(cp.url + "/no/such/route") as resp:
        assert resp.status == 404

    async with http.get(cp.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "_created" not in text

    get = cp.core.metrics.registry.get_sample_value
    assert get("controlplane_queue_depth", {"type": "test.echo", "selectors": "eks,gpu"}) == 2
    assert get("controlplane_queue_depth", {"type": "test.echo", "selectors": "arm"}) is None  # cancelled
    assert get("controlplane_tasks", {"state": "queued"}) == 2
    assert get("controlplane_tasks", {"state": "running"}) == 0
    assert get("controlplane_tasks", {"state": "done"}) == 2
    assert get("controlplane_tasks_completed_total", {"status": "success", "reason": "reported"}) == 1
    assert get("controlplane_tasks_completed_total", {"status": "failure", "reason": "cancelled"}) == 1
    assert get("controlplane_delegates_connected") == 1
    assert get("controlplane_http_requests_total", {"route": "healthz", "code": "200"}) == 1
    assert get("controlplane_http_requests_total", {"route": "unmatched", "code": "404"}) == 1
    assert get("controlplane_http_requests_total", {"route": "cancel_task", "code": "200"}) == 1
    assert (get("controlplane_http_request_duration_seconds_count", {"route": "acquire"}) or 0) >= 1
    assert (get("controlplane_http_requests_total", {"route": "register", "code": "200"}) or 0) >= 1

    a.agent.request_shutdown()
    await a.task
    await cp.core.refresh_gauges()  # what the next scrape does first
    assert get("controlplane_delegates_connected") == 0


async def test_an_expired_lease_is_counted(control_plane_factory: ControlPlaneFactory, clock: ManualClock) -> None:
    """A delegate that heartbeats but stops renewing: the sweeper re-queues the task and counts one lease expiry."""
    cp = await control_plane_factory(clock=clock)
    d = await cp.core.register(register_request("silent"))
    task = await cp.core.create_task(type="test.echo", payload={})
    answer = await cp.core.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))
    assert [t.task_id for t in answer.tasks] == [task.id]
    get = cp.core.metrics.registry.get_sample_value
    assert get("controlplane_lease_expiries_total") == 0
    await cp.core.refresh_gauges()  # what a scrape does first
    assert get("controlplane_tasks", {"state": "running"}) == 1
    clock.advance(cp.core.settings.lease_seconds + 1)
    await cp.core.heartbeat(d.delegate_id, HeartbeatRequest(state="running"))  # alive, but the lease was not renewed
    await cp.core.sweep()
    assert get("controlplane_lease_expiries_total") == 1
    assert (await cp.core.get_task(task.id)).state == "queued"
