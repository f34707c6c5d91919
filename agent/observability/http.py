"""The delegate's own HTTP endpoints: /healthz, /readyz, /metrics, /status.

- ``/healthz`` (liveness), ``/readyz`` (readiness, 503 the moment a drain starts) and ``/status``
  (JSON for people) serve what the runtime's :class:`~agent.runtime.health.HealthPolicy`
  decides; this module only speaks HTTP, so it knows nothing of the runtime.
- ``/metrics``: Prometheus exposition from the delegate's own registry.
- ``/api/health`` and ``/api/metrics``: the Harness delegate's paths for the same two answers, so
  probes and scrape configs written for a Harness delegate keep working unchanged.

Both HTTP servers (this one and the control plane's) bind through :class:`LimitedSite`, so a flood
of connections that never send a request can neither exhaust the process's file descriptors nor
keep real clients out; see :class:`ConnectionLimits`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from agent._values import clip

log = structlog.get_logger("http")

#: Every path served, listed in the answer to any other path.
PATHS = ["/healthz", "/readyz", "/metrics", "/status", "/api/health", "/api/metrics"]


class Probes(Protocol):
    """What the server asks on each request; the runtime answers."""

    def liveness_problems(self) -> list[str]: ...

    def readiness_problems(self) -> list[str]: ...

    def status(self) -> dict[str, Any]: ...


class HealthServer:
    """Construct, then :meth:`start` binds the port; :meth:`stop` is safe to call twice."""

    def __init__(
        self,
        *,
        probes: Probes,
        registry: CollectorRegistry,
        host: str,
        port: int,
        limits: ConnectionLimits | None = None,
    ) -> None:
        self._probes = probes
        self._registry = registry
        self._host, self._port = host, port
        self._limits = limits or ConnectionLimits()
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
        self._runner = web.AppRunner(
            self.app(),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=1.0,
            keepalive_timeout=self._limits.keepalive_timeout,
        )
        await self._runner.setup()
        site = LimitedSite(
            self._runner, self._host, self._port, self._limits, metrics=(self._registry, "delegate_http")
        )
        await site.start()
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


# --- connection limits -----------------------------------------------------------------------------
# aiohttp closes a connection that sits idle for keepalive_timeout (the timer starts when it
# connects and again after each response, and data short of a whole request does not reset it),
# but it has no header timeout shorter than that and no cap on open connections: every accepted
# socket is a file descriptor held until the peer or the timer lets go. LimitedSite wraps the
# protocol aiohttp serves each connection with, to add the two.


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a connection may take to send its first request head, stay idle, and how many may be open."""

    #: A new connection that has not sent a whole request line and headers by then is closed.
    header_timeout: float = 10.0
    #: An idle connection (nothing sent since its last response) is closed after this long.
    keepalive_timeout: float = 75.0
    #: Open connections at most; over it, the oldest that has not sent a request (or sits idle
    #: between requests) is closed to make room, and if every one is busy with a request the new
    #: one gets a 503. A burst can briefly hold a few :data:`ACCEPT_BATCH` more descriptors: those
    #: accepted and not yet seen by the guard, or closed and not yet released.
    max_connections: int = 256

    def __post_init__(self) -> None:
        if self.header_timeout <= 0 or self.keepalive_timeout <= 0 or self.max_connections < 1:
            raise ValueError("connection limits must be positive")


#: Sockets accepted in one loop turn (asyncio's default is the listen backlog, 128).
ACCEPT_BATCH = 16

_REFUSED_BODY = b'{"error": "too many open connections: try again shortly"}'
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Retry-After: 1\r\nContent-Length: " + str(len(_REFUSED_BODY)).encode() + b"\r\n\r\n" + _REFUSED_BODY
)


class _Guarded(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, so :class:`_ConnectionGuard` sees it open and close."""

    def __init__(self, guard: _ConnectionGuard, inner: web.RequestHandler) -> None:
        self.guard, self.inner = guard, inner
        self.transport: asyncio.Transport | None = None
        self.header_timer: asyncio.TimerHandle | None = None
        self.refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.guard.admit(self):
            self.refused = True
            transport.write(_REFUSED)
            transport.close()
            return
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.refused:
            self.inner.data_received(data)

    def eof_received(self) -> None:
        if not self.refused:
            self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.refused:
            self.guard.forget(self)
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if not self.refused:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if not self.refused:
            self.inner.resume_writing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _between_requests(handler: web.RequestHandler) -> bool:
    """True while aiohttp's handler waits for the next request (none in progress, nothing whole queued).

    This is aiohttp's own test for an idle connection (``RequestHandler._process_keepalive``), read
    from its private ``_waiter``; aiohttp is pinned, and the flood test fails if this stops working.
    """
    waiter = getattr(handler, "_waiter", None)
    return waiter is not None and not waiter.done()


class _ConnectionGuard:
    """Counts the open connections, arms each one's header timer, and makes room over the cap."""

    def __init__(self, server: web.Server, limits: ConnectionLimits) -> None:
        self._server, self._limits = server, limits
        #: Open connections, oldest first.
        self._open: dict[_Guarded, None] = {}
        self._last_refusal = float("-inf")
        #: Connections closed to protect the server, by reason (a metric).
        self.closed = {"header_timeout": 0, "make_room": 0, "refused": 0}
        #: Connections that have not sent a whole request head yet, oldest first.
        self._waiting: dict[web.RequestHandler, _Guarded] = {}
        #: The handlers' logger, once the first handler shows which one it is (see :class:`BadRequestLog`).
        self.bad_requests: BadRequestLog | None = None
        # The request factory runs once a request's head is parsed: the moment a connection has
        # shown it is a client and not a slot held open.
        make_request = server.request_factory

        def request_factory(*args: Any) -> web.BaseRequest:
            self._started(args[2])
            return make_request(*args)

        server.request_factory = request_factory

    def __call__(self) -> asyncio.Protocol:
        handler = self._server()
        if self.bad_requests is None:
            self.bad_requests = BadRequestLog(handler.logger)
        # aiohttp types the attribute as a Logger; the adapter answers every call a handler makes.
        handler.logger = self.bad_requests  # type: ignore[assignment]
        return _Guarded(self, handler)

    def admit(self, conn: _Guarded) -> bool:
        if len(self._open) >= self._limits.max_connections:
            victim = self._idlest()
            if victim is None:
                self._refused()
                return False
            self._drop(victim)
            victim.close()
            self.closed["make_room"] += 1
        self._open[conn] = None
        self._waiting[conn.inner] = conn
        conn.header_timer = asyncio.get_running_loop().call_later(self._limits.header_timeout, self._expire, conn)
        return True

    def _idlest(self) -> _Guarded | None:
        """The connection to close for a new one: the oldest yet to send a request, else the oldest idle
        between requests (a client that sent one request and sits on the connection holds no slot)."""
        waiting = next(iter(self._waiting.values()), None)
        return waiting or next((c for c in self._open if _between_requests(c.inner)), None)

    def _refused(self) -> None:
        self.closed["refused"] += 1
        now = asyncio.get_running_loop().time()
        if now - self._last_refusal >= 1.0:  # a line a second at most: the metric has the count
            self._last_refusal = now
            log.warning("http.connection_refused", open=len(self._open), hint="every connection is busy with a request")

    def _expire(self, conn: _Guarded) -> None:
        self.closed["header_timeout"] += 1
        self._drop(conn)
        conn.close()

    def forget(self, conn: _Guarded) -> None:
        self._open.pop(conn, None)
        self._drop(conn)

    def _drop(self, conn: _Guarded) -> None:
        if self._waiting.pop(conn.inner, None) is not None and conn.header_timer is not None:
            conn.header_timer.cancel()

    def _started(self, protocol: object) -> None:
        conn = self._waiting.get(protocol)  # type: ignore[call-overload]
        if conn is not None:
            self._drop(conn)

    @property
    def open_connections(self) -> int:
        return len(self._open)


class LimitedSite(web.BaseSite):
    """A TCP site like ``web.TCPSite`` whose connections obey :class:`ConnectionLimits`.

    aiohttp's own timer (``keepalive_timeout``, set on the runner) closes idle connections; this
    site adds the header timeout and the cap, and logs accept errors and requests that do not parse
    at most once a second (:class:`AcceptErrorLog`, :class:`BadRequestLog`).
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        limits: ConnectionLimits,
        *,
        ssl_context: ssl.SSLContext | None = None,
        metrics: tuple[CollectorRegistry, str] | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host, self._port, self._limits = host, port, limits
        #: Where to publish the connection counts, and the metric names' prefix.
        self._metrics = metrics
        self._collector: _ConnectionCollector | None = None
        self.guard: _ConnectionGuard | None = None

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # BaseSite refuses a runner that is not set up
        loop = asyncio.get_running_loop()
        accept_errors = limit_accept_errors(loop)
        self.guard = _ConnectionGuard(server, self._limits)
        if self._metrics is not None:
            registry, prefix = self._metrics
            self._collector = _ConnectionCollector(prefix, self.guard, accept_errors)
            registry.register(self._collector)
        # A TLS connection reaches the guard once its handshake is done; the handshake gets the
        # header timeout as its own bound, so a silent TLS client is not held for asyncio's 60 s.
        tls_timeout = self._limits.header_timeout if self._ssl_context else None
        # asyncio uses one number as the kernel's listen queue and as how many sockets it accepts in one
        # loop turn, before the guard sees any of them. Accept in small batches, so a burst cannot hold
        # many descriptors past the cap, but keep a deep queue, so real clients' SYNs are not dropped.
        self._server = await loop.create_server(
            self.guard,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=ACCEPT_BATCH,
            reuse_address=True,
            ssl_handshake_timeout=tls_timeout,
        )
        for listening in self._server.sockets:
            with listening.dup() as sock:  # the same socket; listen() again only deepens its queue
                sock.listen(self._backlog)

    async def stop(self) -> None:
        if self._collector is not None and self._metrics is not None:
            self._metrics[0].unregister(self._collector)
            self._collector = None
        await super().stop()


class _ConnectionCollector:
    """The guard's counts as Prometheus metrics, read at scrape time."""

    def __init__(self, prefix: str, guard: _ConnectionGuard, accept_errors: AcceptErrorLog) -> None:
        self._prefix, self._guard, self._accept_errors = prefix, guard, accept_errors

    def collect(self) -> list[Any]:
        closed = CounterMetricFamily(
            f"{self._prefix}_connections_closed",
            "Connections closed to protect the server: header_timeout (no request head in time), make_room "
            "(the oldest idle one, over the cap), refused (over the cap, all busy).",
            labels=["reason"],
        )
        for reason, count in self._guard.closed.items():
            closed.add_metric([reason], count)
        bad_requests = self._guard.bad_requests
        return [
            closed,
            CounterMetricFamily(
                f"{self._prefix}_bad_requests",
                "Requests that could not be parsed (answered 400; logged once a second, without a traceback).",
                value=bad_requests.count if bad_requests is not None else 0,
            ),
            GaugeMetricFamily(
                f"{self._prefix}_connections_open", "Open connections to this port.", value=self._guard.open_connections
            ),
            CounterMetricFamily(
                f"{self._prefix}_accept_errors",
                "accept() failures in this process, out of file descriptors or memory (logged once a second).",
                value=self._accept_errors.count,
            ),
        ]


# --- unparseable requests --------------------------------------------------------------------------


class BadRequestLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger aiohttp's request handlers use, with requests that do not parse logged once a second.

    aiohttp answers a request it cannot parse (a header or URL over 8190 bytes, a negative
    Content-Length, Content-Length with Transfer-Encoding, too many headers, a non-ASCII path) with
    a 400, and logs "Error handling request" at ERROR with the parser's traceback
    (``RequestHandler.handle_error``): anyone who can reach the port could fill the log, with no
    credential. Those become one line a second, without a traceback, with a count of the ones held
    back; every other record (a handler's real error, with its traceback) passes on unchanged.
    """

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})
        self._last: float | None = None
        self._held_back = 0
        #: Unparseable requests seen since the server started (each logged, or counted in a later line).
        self.count = 0

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if not isinstance(exc, HttpProcessingError) or level <= logging.DEBUG:
            super().log(level, msg, *args, **kwargs)
            return
        self.count += 1
        now = asyncio.get_running_loop().time()
        if self._last is not None and now - self._last < 1.0:
            self._held_back += 1
            return
        log.warning(
            "http.bad_request",
            address=args[0] if args else None,
            status=exc.code,
            error=clip(" ".join(exc.message.split())),
            held_back=self._held_back,
        )
        self._last, self._held_back = now, 0


# --- accept errors ----------------------------------------------------------------------------------

_ACCEPT_FAILED = "socket.accept() out of system resource"


class AcceptErrorLog:
    """The loop's exception handler, logging asyncio's accept failures (EMFILE...) once a second at most.

    Out of descriptors, asyncio reports every failed ``accept()`` through the loop's exception
    handler, a traceback each time; under a flood that buries every other line. This keeps one
    line a second with a count of those it held back, and passes every other report on unchanged.
    """

    def __init__(self, previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None) -> None:
        self._previous = previous
        self._last: float | None = None
        self._held_back = 0
        #: Accept failures seen since installed (each is also in the log, or counted in a later line).
        self.count = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != _ACCEPT_FAILED:
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self.count += 1
        now = loop.time()
        if self._last is not None and now - self._last < 1.0:
            self._held_back += 1
            return
        exc = context.get("exception")
        log.error(
            "http.accept_failed",
            error=str(exc) if exc else _ACCEPT_FAILED,
            held_back=self._held_back,
            hint="out of file descriptors: lower the connection cap or raise the open-files limit (ulimit -n)",
        )
        self._last, self._held_back = now, 0


def limit_accept_errors(loop: asyncio.AbstractEventLoop) -> AcceptErrorLog:
    """Install :class:`AcceptErrorLog` on ``loop`` once (it stays for the loop's life); returns it."""
    current = loop.get_exception_handler()
    if isinstance(current, AcceptErrorLog):
        return current
    handler = AcceptErrorLog(current)
    loop.set_exception_handler(handler)
    return handler
