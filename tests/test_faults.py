"""The fault suite: delegates, control plane and AWS misbehaving at once; every task, exactly once."""

from __future__ import annotations

import asyncio
import random
import urllib.request
from pathlib import Path

import pytest

from agent.protocol.models import CreateTaskRequest, Stats
from bench.chaos import ChaosProxy
from bench.load import Stack
from tests.awsfakes import FaultProxy
from tests.conftest import FAST, AgentFactory, ControlPlaneFactory, done
from tests.helpers import wait_until


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return resp.read().decode()


def _count(text: str, operation: str, statuses: tuple[str, ...]) -> float:
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("delegate_control_plane_requests_total{")
            and f'operation="{operation}"' in line
            and any(f'status="{s}"' in line for s in statuses)
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.fault
@pytest.mark.timeout(300)
async def test_every_task_gets_exactly_one_result_through_faults(tmp_path: Path) -> None:
    """Resets, 5xx bursts, 429s, latency, a black hole longer than the lease, the control plane killed
    and restarted, a delegate killed mid-task: all tasks finish, each result accepted exactly once."""
    stack = Stack(tmp_path, capacity=8, lease_seconds=2.0, agent_handlers="test")
    stack.start_control_plane()
    proxy = ChaosProxy(stack.cp_url, share=0.3, latency=0.3)
    try:
        async with proxy.running() as proxy_url:
            urls = {name: stack.start_agent(name, proxy_url) for name in ("f-0", "f-1", "f-2")}
            api = stack.api

            async def states() -> dict[str, str]:
                return {d.name: d.state for d in (await asyncio.to_thread(api.list_delegates)).delegates}

            async def running(*names: str) -> bool:
                current = await states()
                return all(current.get(n) == "running" for n in names)

            await wait_until(lambda: running("f-0", "f-1", "f-2"), "three delegates running", timeout=60)
            rand = random.Random(11)
            ids = []
            for _ in range(240):
                request = CreateTaskRequest(
                    type="test.sleep",
                    payload={"seconds": round(rand.uniform(0.05, 0.4), 2)},
                    selectors=["load"],
                    max_attempts=10,
                )
                ids.append((await asyncio.to_thread(api.create_task, request)).task_id)
            # The faults, one after another, while the tasks run. The sleeps below are how long each fault
            # lasts (the fault itself), not waits for something to happen.
            for mode, seen_as in (("reset", "reset"), ("error", "503"), ("ratelimit", "429"), ("latency", "latency")):
                proxy.set(mode)  # type: ignore[arg-type]
                await asyncio.sleep(1.5)

                async def hit(key: str = seen_as) -> bool:
                    return proxy.seen[key] > 0

                # Results travel in batches now, so a quiet phase may see few requests: each fault
                # lasts until it has met at least one (heartbeats and polls keep coming meanwhile).
                await wait_until(hit, f"the {mode} fault to meet a request", timeout=30)
            proxy.set("blackhole")
            await asyncio.sleep(4.0)  # twice the lease: leases expire, tasks re-queue, late results are fenced
            proxy.set("pass")
            stack.kill("f-2")  # a delegate dies mid-task (SIGKILL)
            stack.kill("control-plane")  # and so does the control plane
            await asyncio.sleep(1.0)  # a second with no control plane at all
            await asyncio.to_thread(stack.start_control_plane)
            api = stack.api

            seen: list[Stats] = []

            async def all_done() -> Stats | None:
                seen.append(await asyncio.to_thread(api.stats))
                return seen[-1] if seen[-1].tasks.get("done", 0) >= len(ids) else None

            stats = await wait_until(all_done, lambda: f"all tasks done: {seen[-1:]}", timeout=120, every=0.5)
            statuses = {t: (await asyncio.to_thread(api.get_task, t)).status for t in ids[:40]}
            # The survivors recover by themselves (same processes, running again), though not at once: a
            # heartbeat sent into the black hole is given up only at the request timeout (10 s), and the
            # work may all be done by then. Recovery is waited for, with a deadline.
            await wait_until(lambda: running("f-0", "f-1"), "the surviving delegates running again", timeout=30)
            survivors = {n: _metrics(urls[n]) for n in ("f-0", "f-1")}
    finally:
        stack.stop()
    assert stats.tasks == {"done": len(ids)}
    assert stats.done_by_status == {"SUCCESS": len(ids)}
    assert stats.results_accepted == len(ids)  # exactly one accepted result per task, across the restart
    assert set(statuses.values()) == {"SUCCESS"}
    assert proxy.seen["reset"] and proxy.seen["503"] and proxy.seen["429"] and proxy.seen["blackhole"]
    # The survivors' metrics say what they went through.
    for text in survivors.values():
        failed = sum(
            _count(text, op, ("error", "503", "429", "502", "timeout"))
            for op in ("acquire", "heartbeat", "submit_results", "renew_lease")
        )
        assert failed > 0
        assert "delegate_registered 1.0" in text


@pytest.mark.fault
async def test_aws_throttling_and_5xx_are_retried_or_reported(
    moto: str, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """AWS answering Throttling and 503 now and then: validations retry; the rest fail as throttled or
    network, never as an internal error, and the delegate carries on."""
    from agent.aws.environment import AwsEnvironment
    from agent.cli import build_handlers
    from agent.observability.logging import Redactor
    from agent.observability.metrics import AgentMetrics

    aws_proxy = FaultProxy(moto)
    rand = random.Random(5)
    aws_proxy.plan = [rand.choice([400, 503, "pass", "pass", "pass"]) for _ in range(400)]
    async with aws_proxy.running() as aws_url:
        cp = await control_plane_factory(settings=FAST)
        env, _ = AwsEnvironment.from_environ(
            {"AWS_ENDPOINT_URL": aws_url, "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "3"}
        )
        secrets = Path(cp.config.data_dir or ".") / "secrets"
        secrets.mkdir(exist_ok=True)
        (secrets / "sk").write_text("secret")
        [handler] = build_handlers(env, Redactor(), AgentMetrics(name="aws-faults"), secrets_dir=secrets)
        a = await agent_factory(cp, capacity=8, extra_handlers=(handler,))
        await a.registered()
        doc = {
            "connector": {
                "name": "t",
                "type": "Aws",
                "spec": {
                    "credential": {
                        "type": "ManualConfig",
                        "spec": {"accessKey": "AKIAIOSFODNN7EXAMPLE", "secretKeyRef": "sk"},
                    }
                },
            }
        }
        tasks = [
            await cp.core.create_task(type="aws.validate-connector", payload={"connector": doc}) for _ in range(40)
        ]
        results = [await done(cp, t.id, timeout=60) for t in tasks]
    categories = [r.result.failure.category if r.result and r.result.failure else None for r in results]
    assert sum(r.status == "SUCCESS" for r in results) >= 20  # retries absorb most faults
    assert set(categories) <= {None, "throttled", "network"}
    assert aws_proxy.requests > 80
