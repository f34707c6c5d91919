"""Registration and heartbeats: the delegate's standing with the control plane.

Registration retries with exponential backoff and full jitter (``Retry-After`` honoured) until it
succeeds; refused credentials are retried slowly and loudly, never by exiting (Kubernetes would
make that a crash loop). Heartbeats carry the state (running/draining) and the tasks in flight,
and bring back cancellations and the intervals the server wants. When the server no longer knows
the delegate, it registers again.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable

import structlog

from agent._version import __version__
from agent.observability.metrics import AgentMetrics
from agent.protocol.client import ControlPlaneClient
from agent.protocol.errors import AuthError, ProtocolError, RateLimited, UnknownDelegate
from agent.protocol.models import HeartbeatRequest, RegisterRequest
from agent.runtime.backoff import auth_backoff, transient_backoff
from agent.runtime.state import AgentState

log = structlog.get_logger("agent.connection")


class Connection:
    def __init__(
        self,
        *,
        client: ControlPlaneClient,
        state: AgentState,
        metrics: AgentMetrics,
        task_types: list[str],
        free_slots: Callable[[], int],
        in_flight: Callable[[], list[str]],
        cancel: Callable[[str, str], bool],
    ) -> None:
        self._client = client
        self._state = state
        self._metrics = metrics
        self._task_types = task_types
        self._free_slots = free_slots
        self._in_flight = in_flight
        self._cancel = cancel
        self._registered = asyncio.Event()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()

    async def wait_registered(self) -> str:
        await self._registered.wait()
        assert self._state.delegate_id is not None
        return self._state.delegate_id

    def reregister(self, delegate_id: str) -> None:
        """The server forgot ``delegate_id``: register again (once, however many loops noticed)."""
        if self._state.delegate_id == delegate_id and self._registered.is_set():
            self._registered.clear()
            self._set_registered(False)
            self._wake.set()

    def wake(self) -> None:
        """Heartbeat now (for example to report draining at once)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _set_registered(self, value: bool) -> None:
        self._state.registered = value
        self._metrics.registered.set(1 if value else 0)

    def _set_auth(self, error: str | None) -> None:
        if error and not self._state.auth_error:
            log.error(
                "agent.auth_refused",
                error=error,
                hint="check DELEGATE_TOKEN(_FILE) and that the control plane "
                "accepts this token (not revoked); retrying slowly",
            )
        elif not error and self._state.auth_error:
            log.info("agent.auth_accepted")
        self._state.auth_error = error
        self._metrics.auth_refused.set(1 if error else 0)

    async def run(self) -> None:
        while not self._stop.is_set():
            if not self._registered.is_set() and not await self._register():
                return
            await self._heartbeats()

    async def _register(self) -> bool:
        """Register, retrying until it works or the delegate stops. False when stopped first."""
        loop = asyncio.get_running_loop()
        transient, auth = transient_backoff(), auth_backoff()
        s = self._state
        request = RegisterRequest(
            name=s.name,
            instance_id=s.instance_id,
            tags=list(s.tags),
            version=__version__,
            task_types=self._task_types,
            capacity=s.capacity,
            hostname=socket.gethostname(),
        )
        while not self._stop.is_set():
            try:
                answer = await self._client.register(request)
            except AuthError as exc:
                self._set_auth(str(exc))
                delay = auth.next(exc.retry_after)
            except (RateLimited, ProtocolError) as exc:
                s.consecutive_failures += 1
                delay = transient.next(exc.retry_after)
                log.warning(
                    "agent.register_failed", error=str(exc), retry_in=round(delay, 2), attempt=transient.attempt
                )
            else:
                s.delegate_id = answer.delegate_id
                s.intervals = answer.intervals
                s.contact(loop.time(), time.time())
                s.last_heartbeat, s.last_heartbeat_wall = loop.time(), s.last_contact_wall
                self._set_auth(None)
                self._set_registered(True)
                self._registered.set()
                self._metrics.registrations.inc()
                log.info(
                    "agent.registered",
                    delegate_id=answer.delegate_id,
                    tags=list(s.tags),
                    capacity=s.capacity,
                    heartbeat_seconds=answer.intervals.heartbeat_seconds,
                    lease_seconds=answer.intervals.lease_seconds,
                )
                return True
            if await self._sleep(delay):
                return False
        return False

    async def _heartbeats(self) -> None:
        """Heartbeat until the delegate stops or must register again."""
        loop = asyncio.get_running_loop()
        transient, auth = transient_backoff(), auth_backoff()
        delay = self._state.intervals.heartbeat_seconds * random.uniform(0.9, 1.0)  # noqa: S311 - jitter
        while not self._stop.is_set():
            if await self._sleep(delay):
                return
            if not self._registered.is_set():
                return
            s = self._state
            assert s.delegate_id is not None
            request = HeartbeatRequest(
                state="draining" if s.draining else "running",
                in_flight=self._in_flight(),
                free_slots=max(0, self._free_slots()),
            )
            try:
                answer = await self._client.heartbeat(s.delegate_id, request)
            except UnknownDelegate:
                log.warning("agent.unknown_to_control_plane", delegate_id=s.delegate_id, hint="registering again")
                self.reregister(s.delegate_id)
                return
            except AuthError as exc:
                self._set_auth(str(exc))
                delay = auth.next(exc.retry_after)
                continue
            except ProtocolError as exc:
                s.consecutive_failures += 1
                s.last_error = str(exc)
                delay = min(transient.next(exc.retry_after), s.intervals.heartbeat_seconds)
                log.warning(
                    "agent.heartbeat_failed", error=str(exc), retry_in=round(delay, 2), failures=s.consecutive_failures
                )
                continue
            transient.reset()
            auth.reset()
            self._set_auth(None)
            s.contact(loop.time(), time.time())
            s.last_heartbeat, s.last_heartbeat_wall = loop.time(), s.last_contact_wall
            if answer.intervals != s.intervals:
                log.info(
                    "agent.intervals_changed",
                    heartbeat_seconds=answer.intervals.heartbeat_seconds,
                    poll_wait_seconds=answer.intervals.poll_wait_seconds,
                    lease_seconds=answer.intervals.lease_seconds,
                )
                s.intervals = answer.intervals
            for task_id in answer.cancel:
                if self._cancel(task_id, "cancelled by the control plane"):
                    log.info("task.cancel_requested", task_id=task_id)
            delay = s.intervals.heartbeat_seconds * random.uniform(0.9, 1.0)  # noqa: S311 - jitter

    async def deregister(self) -> None:
        """Tell the control plane we are gone (best effort: shutdown goes on either way)."""
        if not self._state.delegate_id or not self._state.registered:
            return
        try:
            await self._client.deregister(self._state.delegate_id)
            log.info("agent.deregistered", delegate_id=self._state.delegate_id)
        except ProtocolError as exc:
            log.warning("agent.deregister_failed", error=str(exc))
        self._set_registered(False)

    async def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` or until woken (a wake that came earlier counts); True if stopping."""
        if not self._wake.is_set():
            try:
                async with asyncio.timeout(seconds):
                    await self._wake.wait()
            except TimeoutError:
                pass
        self._wake.clear()
        return self._stop.is_set()
