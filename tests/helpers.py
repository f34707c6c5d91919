"""Test helpers: waiting on a condition with a deadline (never a fixed sleep), reading a metric,
serving a stand-in on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.observability.metrics import AgentMetrics

#: How often a condition is looked at again: short enough not to slow a test down, long enough
#: not to starve the loop (or a subprocess) it is waiting on.
POLL_SECONDS = 0.01


def sample(metrics: AgentMetrics, name: str, **labels: str) -> float:
    """One sample of a delegate's own registry, read through prometheus_client's public API.

    ``name`` is the exposed sample name (``..._total``, ``..._sum``). A label set never observed
    reads 0, as a counter that never counted would; a name the registry does not know is an error,
    so a typo cannot pass for a zero.
    """
    value = metrics.registry.get_sample_value(name, labels)
    if value is not None:
        return float(value)
    families = {family.name for family in metrics.registry.collect()}
    if not any(name == f or name.startswith(f + "_") for f in families):
        raise AssertionError(f"the delegate's registry has no metric {name!r}")
    return 0.0


async def wait_for(
    condition: Callable[[], Any], what: str, timeout: float = 10.0, *, every: float = POLL_SECONDS
) -> Any:
    """Yield to the loop until ``condition()`` is truthy; fail with ``what`` after ``timeout`` seconds."""

    async def check() -> Any:
        return condition()

    return await wait_until(check, what, timeout, every=every)


async def wait_until(
    condition: Callable[[], Awaitable[Any]], what: str | Callable[[], str], timeout: float = 10.0, *, every: float = 0.1
) -> Any:
    """Like :func:`wait_for` for a condition that must itself await (an HTTP call, a thread).

    Returns the first truthy value; the condition may raise to fail the wait at once. ``what`` may be
    a function, called only on failure, to describe the last state seen. ``timeout`` is in the loop's
    time: real seconds, or virtual seconds in a test on looptime.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what if isinstance(what, str) else what()}")
        await asyncio.sleep(every)


async def wait_task(core: Any, task_id: str, check: Callable[[Any], Any], what: str, timeout: float = 10.0) -> Any:
    """Wait until the control plane's task passes ``check``; returns the task as it then was."""

    async def look() -> Any:
        t = await core.get_task(task_id)
        return t if check(t) else None

    return await wait_until(look, what, timeout)


async def wait_views(core: Any, check: Callable[[list[Any]], Any], what: str, timeout: float = 10.0) -> Any:
    """Wait until the control plane's delegate views pass ``check``."""

    async def look() -> Any:
        views = await core.delegate_views()
        return views if check(views) else None

    return await wait_until(look, what, timeout)


@contextlib.asynccontextmanager
async def results_held_then_released(cp: Any, agent_factory: Any, n: int = 12) -> AsyncIterator[tuple[Any, list[Any]]]:
    """``n`` tasks finish together while ``POST /v1/results`` answers 503 (a chaos proxy in front of
    the control plane), so their results wait in the outbox together; then the proxy lets them
    through. Yields the delegate and the tasks as the control plane ended them, the proxy still
    running (a test may send more through it)."""
    from bench.chaos import ChaosProxy
    from tests.conftest import done

    proxy = ChaosProxy(cp.url, mode="error", share=1.0, only_suffix="/v1/results")
    async with proxy.running() as url:
        a = await agent_factory(url, capacity=16)
        await a.registered()
        tasks = [await cp.core.create_task(type="test.gate", payload={}) for _ in range(n)]
        await wait_for(lambda: len(a.gate.started) == n, f"all {n} to start")
        a.gate.open_all()
        await wait_for(lambda: sample(a.agent.metrics, "delegate_outbox_depth") == n, f"all {n} to wait")
        proxy.set("pass")
        results = [await done(cp, t.id) for t in tasks]
        await wait_for(lambda: sample(a.agent.metrics, "delegate_outbox_depth") == 0, "the outbox to empty")
        yield a, results
