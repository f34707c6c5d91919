"""The poll loop: reserve every free slot, long-poll for that many tasks, hand them to the executor.

Slots are reserved *before* the request, so the delegate never asks for work it cannot start, and
never asks at all while full. The long poll means a task is picked up the moment it is queued
(no polling interval). Errors are classified: refused credentials back off slowly, a 429 waits as
told, an unknown delegate triggers registration, anything else backs off with full jitter.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import structlog

from agent.protocol.client import ControlPlaneClient
from agent.protocol.errors import AuthError, ProtocolError, RateLimited, UnknownDelegate
from agent.protocol.models import AcquireRequest
from agent.runtime.backoff import auth_backoff, transient_backoff
from agent.runtime.connection import Connection
from agent.runtime.executor import Executor, Slots
from agent.runtime.state import AgentState

log = structlog.get_logger("agent.poller")

#: After an empty answer, wait up to this before asking again, so a fleet drifts out of step.
EMPTY_POLL_JITTER = 0.05
#: While results cannot be written to disk, look again this often (the outbox retries the disk).
FAULT_RECHECK_SECONDS = 0.5
#: A saturated delegate with work waiting on the server (its last poll got every task it asked
#: for) waits up to this long for an eighth of its slots to be free before it asks again, so one
#: poll brings several tasks instead of one poll per finished task. Those tasks were queued behind
#: a full delegate anyway; a delegate with room asks at once, so pickup at idle or load is as before.
ACQUIRE_LINGER_SECONDS = 0.05
ACQUIRE_BATCH_SHARE = 8


class Poller:
    def __init__(
        self,
        *,
        client: ControlPlaneClient,
        connection: Connection,
        executor: Executor,
        slots: Slots,
        state: AgentState,
        outbox_fault: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._client = client
        self._outbox_fault = outbox_fault
        self._connection = connection
        self._executor = executor
        self._slots = slots
        self._state = state
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Stop asking for work (the loop ends after the request in flight, which is cancelled)."""
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        transient, auth = transient_backoff(), auth_backoff()
        batch = max(1, self._slots.capacity // ACQUIRE_BATCH_SHARE)
        backlog = False  # the last poll got every task it asked for: more are likely queued
        while not self._stop.is_set():
            self._state.poll_progress = loop.time()
            delegate_id = await self._connection.wait_registered()
            if self._stop.is_set():
                return
            if self._outbox_fault() is not None:
                # A result we could not keep on disk is at risk: take no new work until the disk
                # takes writes again. Deliberate waiting, so the poll loop still counts as alive.
                self._state.poll_progress = loop.time()
                await self._pause(FAULT_RECHECK_SECONDS, None)
                continue
            self._state.waiting_for_slots = True
            if backlog:
                free = await self._slots.wait_available(batch, linger=ACQUIRE_LINGER_SECONDS)
            else:
                free = await self._slots.wait_available()
            self._state.waiting_for_slots = False
            self._state.poll_progress = loop.time()
            if self._stop.is_set():
                return
            self._slots.reserve(free)
            wait = self._state.intervals.poll_wait_seconds * random.uniform(0.85, 1.0)  # noqa: S311 - jitter
            try:
                answer = await self._client.acquire(delegate_id, AcquireRequest(max_tasks=free, wait_seconds=wait))
            except asyncio.CancelledError:
                self._slots.unreserve(free)
                raise
            except UnknownDelegate:
                self._slots.unreserve(free)
                log.warning(
                    "agent.poll_unknown_delegate", hint="the control plane forgot this delegate; registering again"
                )
                self._connection.reregister(delegate_id)
                continue
            except AuthError as exc:
                self._slots.unreserve(free)
                await self._pause(auth.next(exc.retry_after), f"token refused: {exc}", loud=True)
                continue
            except RateLimited as exc:
                self._slots.unreserve(free)
                await self._pause(transient.next(exc.retry_after), f"rate limited: {exc}")
                continue
            except ProtocolError as exc:
                self._slots.unreserve(free)
                self._state.consecutive_failures += 1
                await self._pause(transient.next(exc.retry_after), str(exc))
                continue
            transient.reset()
            auth.reset()
            self._state.contact(loop.time(), time.time())
            tasks = answer.tasks[:free]
            backlog = len(tasks) == free
            self._slots.claim(len(tasks))
            self._slots.unreserve(free - len(tasks))
            if self._stop.is_set() and tasks:
                # Drain began while the answer was on its way: give the tasks straight back.
                await self._give_back([t.lease_id for t in tasks], len(tasks))
                return
            if tasks and self._outbox_fault() is not None:
                # The disk failed while this long poll waited: these tasks go back at once (without
                # using an attempt), to a delegate that can keep their results.
                await self._give_back([t.lease_id for t in tasks], len(tasks))
                continue
            for task in tasks:
                self._executor.start(task)
            if not tasks:
                await self._pause(random.uniform(0, EMPTY_POLL_JITTER), None)  # noqa: S311 - jitter

    async def _give_back(self, lease_ids: list[str], slots: int) -> None:
        for lease_id in lease_ids:
            try:
                await self._client.release_lease(lease_id)
            except ProtocolError as exc:
                log.warning("agent.release_failed", lease_id=lease_id, error=str(exc))
        self._slots.release(slots)

    async def _pause(self, seconds: float, reason: str | None, *, loud: bool = False) -> None:
        if reason is not None:
            (log.error if loud else log.warning)("agent.poll_failed", error=reason, retry_in=round(seconds, 2))
        try:
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        except TimeoutError:
            pass
