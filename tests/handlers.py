"""Task handlers for testing the daemon: real TaskHandler implementations with observable behaviour."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from agent.taskapi import InvalidTask, TaskContext, TaskOutcome


class EchoHandler:
    """Returns its payload; fails when asked to; rejects a payload without ``message``."""

    task_type = "test.echo"

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, ctx: TaskContext) -> TaskOutcome:
        self.seen.append(ctx.task_id)
        if "message" not in ctx.payload:
            raise InvalidTask("payload.message", "is required")
        status = "FAILURE" if ctx.payload.get("fail") else "SUCCESS"
        return TaskOutcome(
            status, {"status": status, "echo": ctx.payload["message"], "delegateName": ctx.delegate_name}
        )


class GateHandler:
    """Blocks each task until the test opens its gate; records how many ran at once."""

    task_type = "test.gate"

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.started: list[str] = []
        self.running = 0
        self.max_running = 0
        self.cancelled: list[str] = []

    def open(self, task_id: str) -> None:
        self.gates[task_id].set()

    def open_all(self) -> None:
        for task_id in self.started:
            self.gates[task_id].set()

    async def __call__(self, ctx: TaskContext) -> TaskOutcome:
        self.started.append(ctx.task_id)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await self.gates[ctx.task_id].wait()
        except asyncio.CancelledError:
            self.cancelled.append(ctx.task_id)
            raise
        finally:
            self.running -= 1
        return TaskOutcome("SUCCESS", {"status": "SUCCESS", "gate": ctx.task_id})


class SleepHandler:
    """Sleeps ``payload.seconds`` (cancellable), then succeeds."""

    task_type = "test.sleep"

    async def __call__(self, ctx: TaskContext) -> TaskOutcome:
        await asyncio.sleep(float(ctx.payload.get("seconds", 1)))
        return TaskOutcome("SUCCESS", {"status": "SUCCESS", "slept": ctx.payload.get("seconds", 1)})


class CrashHandler:
    """Raises, as a buggy handler would."""

    task_type = "test.crash"

    async def __call__(self, ctx: TaskContext) -> TaskOutcome:
        raise RuntimeError(f"boom with secret {ctx.payload.get('secret', '')}")


class StallHandler:
    """Ignores cancellation for a while (a badly behaved handler)."""

    task_type = "test.stall"

    async def __call__(self, ctx: TaskContext) -> TaskOutcome:
        try:
            await asyncio.Event().wait()  # runs until cancelled
        except asyncio.CancelledError:
            await asyncio.sleep(0.1)  # the misbehaviour: slow to unwind after a cancel
            raise
        return TaskOutcome("SUCCESS", {})


def all_handlers() -> dict[str, Any]:
    return {h.task_type: h for h in (EchoHandler(), GateHandler(), SleepHandler(), CrashHandler(), StallHandler())}
