"""The delegate's own HTTP endpoints: /healthz, /readyz, /metrics, /status.

- ``/healthz`` (liveness), ``/readyz`` (readiness, 503 the moment a drain starts) and ``/status``
  (JSON for people) serve what the runtime's :class:`~agent.runtime.health.HealthPolicy`
  decides; this module only speaks HTTP, so it knows nothing of the runtime.
- ``/metrics``: Prometheus exposition from the delegate's own registry.
- ``/api/health`` and ``/api/metrics``: the Harness delegate's paths for the same two answers, so
  probes and scrape configs written for a Harness delegate keep working unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

#: Every path served, listed in the answer to any other path.
PATHS = ["/healthz", "/readyz", "/metrics", "/status", "/api/health", "/api/metrics"]


class Probes(Protocol):
    """What the server asks on each request; the runtime answers."""

    def liveness_problems(self) -> list[str]: ...

    def readiness_problems(self) -> list[str]: ...

    def status(self) -> dict[str, Any]: ...


class HealthServer:
    """Construct, then :meth:`start` binds the port; :meth:`stop` is safe to call twice."""

    def __init__(self, *, probes: Probes, registry: CollectorRegistry, host: str, port: int) -> None:
        self._probes = probes
        self._registry = registry
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024, middlewares=[_errors])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/status", self.status)
        # The Harness delegate's probe path and its prometheus.io/path annotation, answered the same.
        app.router.add_get("/api/health", self.healthz)
        app.router.add_get("/api/metrics", self.metrics)
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
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def healthz(self, request: web.Request) -> web.Response:
        problems = self._probes.liveness_problems()
        return web.json_response(
            {"status": "fail" if problems else "ok", "problems": problems}, status=503 if problems else 200
        )

    async def readyz(self, request: web.Request) -> web.Response:
        problems = self._probes.readiness_problems()
        return web.json_response({"ready": not problems, "problems": problems}, status=503 if problems else 200)

    async def metrics(self, request: web.Request) -> web.Response:
        # Content negotiation as prometheus_client does it: OpenMetrics if the scraper asks, else text 0.0.4.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self._registry), headers={"Content-Type": content_type})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self._probes.status())


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return web.json_response({"error": exc.reason, "paths": PATHS}, status=exc.status)
