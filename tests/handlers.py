"""Task handlers for testing the daemon: real TaskHandler implementations with observable behaviour."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from agent.protocol.results import ValidationResult
from agent.taskapi import InvalidTask, TaskContext


def outcome(ctx: TaskContext, status: str = "SUCCESS", **fields: Any) -> ValidationResult:
    """The result a test handler reports: the status, who ran it, and what the test wants to see."""
    return ValidationResult(
        status="SUCCESS" if status == "SUCCESS" else "FAILURE",
        tested_at=datetime.now(UTC),
        delegate_name=ctx.delegate_name,
        **fields,
    )


class _Handler:
    """Nothing to warm or close: the lifecycle hooks every TaskHandler has."""

    task_type = ""

    async def warm(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class EchoHandler(_Handler):
    """Echoes ``payload.message`` as the connector identifier; fails when asked to; rejects a payload without it."""

    task_type = "test.echo"

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, ctx: TaskContext) -> ValidationResult:
        self.seen.append(ctx.task_id)
        if "message" not in ctx.payload:
            raise InvalidTask("payload.message", "is required")
        status = "FAILURE" if ctx.payload.get("fail") else "SUCCESS"
        return outcome(ctx, status, connector_identifier=str(ctx.payload["message"]))


class GateHandler(_Handler):
    """Blocks each task until the test opens its gate; records how many ran at once, and when
    (in loop time) each task started and was cancelled."""

    task_type = "test.gate"

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.started: list[str] = []
        self.started_at: dict[str, float] = {}
        self.running = 0
        self.max_running = 0
        self.cancelled: list[str] = []
        self.cancelled_at: dict[str, float] = {}

    def open(self, task_id: str) -> None:
        self.gates[task_id].set()

    def open_all(self) -> None:
        for task_id in self.started:
            self.gates[task_id].set()

    async def __call__(self, ctx: TaskContext) -> ValidationResult:
        loop = asyncio.get_running_loop()
        self.started.append(ctx.task_id)
        self.started_at[ctx.task_id] = loop.time()
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await self.gates[ctx.task_id].wait()
        except asyncio.CancelledError:
            self.cancelled.append(ctx.task_id)
            self.cancelled_at[ctx.task_id] = loop.time()
            raise
        finally:
            self.running -= 1
        return outcome(ctx)


class SleepHandler(_Handler):
    """Sleeps ``payload.seconds`` (cancellable), then succeeds."""

    task_type = "test.sleep"

    async def __call__(self, ctx: TaskContext) -> ValidationResult:
        await asyncio.sleep(float(ctx.payload.get("seconds", 1)))
        return outcome(ctx)


class CrashHandler(_Handler):
    """Raises, as a buggy handler would."""

    task_type = "test.crash"

    async def __call__(self, ctx: TaskContext) -> ValidationResult:
        raise RuntimeError(f"boom with secret {ctx.payload.get('secret', '')}")


class StallHandler(_Handler):
    """Ignores cancellation for a while (a badly behaved handler)."""

    task_type = "test.stall"

    async def __call__(self, ctx: TaskContext) -> ValidationResult:
        try:
            await asyncio.Event().wait()  # runs until cancelled
        except asyncio.CancelledError:
            await asyncio.sleep(0.1)  # the misbehaviour: slow to unwind after a cancel
            raise
        return outcome(ctx)


class DeafHandler(_Handler):
    """Swallows the cancel at its timeout and carries on for a minute (a call that eats the cancel);
    a second cancel (the delegate shutting down) ends it."""

    task_type = "test.deaf"

    async def __call__(self, ctx: TaskContext) -> ValidationResult:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(60)
        return outcome(ctx)


def all_handlers() -> dict[str, Any]:
    return {
        h.task_type: h
        for h in (EchoHandler(), GateHandler(), SleepHandler(), CrashHandler(), StallHandler(), DeafHandler())
    }
