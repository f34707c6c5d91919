"""Sends results from the outbox, and removes each one only when the control plane has it.

"accepted" and "duplicate" both mean the control plane has the result. A fenced lease means it
never will (the task went to someone else): the result is dropped with a log line. Anything
transient is retried with backoff; nothing is lost while the delegate waits.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from agent.protocol.client import ControlPlaneClient
from agent.protocol.errors import AuthError, LeaseFenced, NotFound, ProtocolError, RequestRejected
from agent.runtime.backoff import auth_backoff, transient_backoff
from agent.runtime.outbox import Entry, Outbox
from agent.runtime.state import AgentState

log = structlog.get_logger("agent.reporter")


class Reporter:
    def __init__(self, *, client: ControlPlaneClient, outbox: Outbox, state: AgentState, metrics: object) -> None:
        self._client = client
        self._outbox = outbox
        self._state = state
        self._metrics = metrics
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()
        self._outbox.changed.set()

    async def run(self) -> None:
        transient, auth = transient_backoff(), auth_backoff()
        while not self._stop.is_set():
            await self._outbox.changed.wait()
            self._outbox.changed.clear()
            while not self._stop.is_set():
                batch = self._outbox.pending()
                if not batch:
                    break
                error = await self._send_all(batch)
                if error is None:
                    transient.reset()
                    auth.reset()
                    continue
                delay = (auth if isinstance(error, AuthError) else transient).next(error.retry_after)
                log.warning(
                    "agent.results_not_delivered", error=str(error), pending=len(self._outbox), retry_in=round(delay, 2)
                )
                try:
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
                except TimeoutError:
                    pass

    async def flush(self, timeout: float) -> bool:
        """Send what is pending within ``timeout``; True when the outbox is empty."""
        deadline = asyncio.get_running_loop().time() + max(0.0, timeout)
        backoff = transient_backoff()
        while len(self._outbox):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    error = await self._send_all(self._outbox.pending())
                    if error is not None:
                        await asyncio.sleep(min(backoff.next(error.retry_after), max(0.0, remaining)))
            except TimeoutError:
                break
        return len(self._outbox) == 0

    async def _send_all(self, batch: list[Entry]) -> ProtocolError | None:
        """Send each entry; stop at the first error worth retrying, and return it."""
        for entry in batch:
            try:
                answer = await self._client.submit_result(entry.task_id, entry.result)
            except LeaseFenced as exc:
                self._drop(entry, "lease_fenced", str(exc))
                continue
            except NotFound as exc:
                self._drop(entry, "unknown_task", str(exc))
                continue
            except RequestRejected as exc:
                self._drop(entry, "rejected", str(exc))
                continue
            except ProtocolError as exc:
                return exc
            self._outbox.remove(entry.key)
            self._state.contact(asyncio.get_running_loop().time(), time.time())
            if answer.outcome == "duplicate":
                log.info("task.result_already_delivered", task_id=entry.task_id)
        return None

    def _drop(self, entry: Entry, reason: str, detail: str) -> None:
        self._outbox.remove(entry.key)
        self._metrics.results_dropped.labels(reason).inc()  # type: ignore[attr-defined]
        log.warning("task.result_dropped", task_id=entry.task_id, reason=reason, detail=detail)
