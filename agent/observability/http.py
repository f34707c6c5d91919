"""The delegate's own HTTP endpoints: /healthz, /readyz, /metrics, /status.

- ``/healthz`` (liveness): the event loop answers and the poll loop made progress recently.
  Waiting for a free slot or for the control plane is not "stuck": restarting would not help.
- ``/readyz`` (readiness): registered, not draining, token accepted, control plane reachable.
  It turns 503 the moment a drain starts.
- ``/metrics``: Prometheus exposition from the delegate's own registry.
- ``/status``: JSON for people (id, tags, state, tasks in flight, outbox, last contact); no secrets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from agent._version import __version__
from agent.runtime.state import AgentState

#: The poll loop is considered stuck when it made no progress for this long while it should have.
STUCK_AFTER_SECONDS = 300.0


class HealthServer:
    def __init__(
        self,
        *,
        state: AgentState,
        metrics: Any,
        busy: Callable[[], int],
        outbox_depth: Callable[[], int],
        outbox_durable: bool,
        control_plane: str,
        host: str,
        port: int,
    ) -> None:
        self._state = state
        self._metrics = metrics
        self._busy = busy
        self._outbox_depth = outbox_depth
        self._outbox_durable = outbox_durable
        self._control_plane = control_plane
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024, middlewares=[_errors])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/status", self.status)
        return app

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app(), handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port, reuse_address=True).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- checks ------------------------------------------------------------------------------

    def liveness_problems(self) -> list[str]:
        s = self._state
        if s.poll_progress is None or s.waiting_for_slots or not s.registered:
            return []
        stale = asyncio.get_running_loop().time() - s.poll_progress
        if stale > STUCK_AFTER_SECONDS:
            return [f"the poll loop has made no progress for {stale:.0f}s"]
        return []

    def readiness_problems(self) -> list[str]:
        s = self._state
        problems = []
        if s.draining:
            problems.append("draining: shutting down")
        if s.auth_error:
            problems.append(f"the control plane refuses our token: {s.auth_error}")
        if not s.registered:
            problems.append("not registered with the control plane")
        if s.last_contact is not None:
            silent = asyncio.get_running_loop().time() - s.last_contact
            allowed = max(3 * s.intervals.heartbeat_seconds, 30.0)
            if silent > allowed:
                problems.append(f"no answer from the control plane for {silent:.0f}s")
        return problems

    async def healthz(self, request: web.Request) -> web.Response:
        problems = self.liveness_problems()
        return web.json_response(
            {"status": "fail" if problems else "ok", "problems": problems}, status=503 if problems else 200
        )

    async def readyz(self, request: web.Request) -> web.Response:
        problems = self.readiness_problems()
        return web.json_response({"ready": not problems, "problems": problems}, status=503 if problems else 200)

    async def metrics(self, request: web.Request) -> web.Response:
        # Content negotiation as prometheus_client does it: OpenMetrics if the scraper asks, else text 0.0.4.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self._metrics.registry), headers={"Content-Type": content_type})

    async def status(self, request: web.Request) -> web.Response:
        s = self._state
        now = asyncio.get_running_loop().time()
        if s.draining:
            phase = "draining"
        elif s.auth_error:
            phase = "auth_refused"
        elif s.registered:
            phase = "running"
        else:
            phase = "registering"
        body = {
            "version": __version__,
            "name": s.name,
            "delegateId": s.delegate_id,
            "instanceId": s.instance_id,
            "tags": list(s.tags),
            "state": phase,
            "registered": s.registered,
            "draining": s.draining,
            "authError": s.auth_error,
            "controlPlane": self._control_plane,
            "capacity": s.capacity,
            "busySlots": self._busy(),
            "inFlight": [
                {"taskId": t.task_id, "type": t.type, "attempt": t.attempt, "runningSeconds": round(now - t.started, 3)}
                for t in s.running.values()
            ],
            "outboxDepth": self._outbox_depth(),
            "outboxDurable": self._outbox_durable,
            "lastContact": datetime.fromtimestamp(s.last_contact_wall, UTC).isoformat()
            if s.last_contact_wall
            else None,
            "secondsSinceHeartbeat": round(now - s.last_heartbeat, 3) if s.last_heartbeat is not None else None,
            "intervals": {
                "heartbeatSeconds": s.intervals.heartbeat_seconds,
                "pollWaitSeconds": s.intervals.poll_wait_seconds,
                "leaseSeconds": s.intervals.lease_seconds,
            },
            "time": datetime.fromtimestamp(time.time(), UTC).isoformat(),
        }
        return web.json_response(body)


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return web.json_response(
            {"error": exc.reason, "paths": ["/healthz", "/readyz", "/metrics", "/status"]}, status=exc.status
        )
