"""A fault-injecting HTTP proxy for the fault suite and the load run (loopback only).

It forwards to one upstream and, depending on its mode, misbehaves for a share of requests:
resets the connection, answers 503, answers 429 with Retry-After, adds latency, or holds every
request without answering (a black hole) until the mode changes. In front of AWS (moto) it answers
as AWS does: ``error`` is a 503 ServiceUnavailable and ``throttle`` a 400 Throttling, in XML.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
from aiohttp import web

from agent._loopback import serve_on_loopback

Mode = Literal["pass", "reset", "error", "ratelimit", "throttle", "latency", "blackhole", "missing", "not_allowed"]

_AWS_THROTTLING = (
    "<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error>"
    "<RequestId>chaos</RequestId></ErrorResponse>"
)
_AWS_UNAVAILABLE = (
    "<ErrorResponse><Error><Type>Receiver</Type><Code>ServiceUnavailable</Code><Message>chaos: 503</Message>"
    "</Error><RequestId>chaos</RequestId></ErrorResponse>"
)


@dataclass
class ChaosProxy:
    upstream: str
    mode: Mode = "pass"
    #: Share of requests the mode applies to (black hole and latency apply to all).
    share: float = 0.3
    latency: float = 0.2
    seed: int = 7
    #: When set, only requests whose path ends with this suffix are touched; the rest pass.
    only_suffix: str | None = None
    #: Answer errors as AWS does (XML, Throttling) instead of as the control plane does (JSON).
    aws: bool = False
    seen: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rand = random.Random(self.seed)
        self._released = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    def set(self, mode: Mode, share: float | None = None) -> None:
        self.mode = mode
        if share is not None:
            self.share = share
        if mode != "blackhole":
            self._released.set()
            self._released = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        mode = self.mode
        if self.only_suffix is not None and not request.path.endswith(self.only_suffix):
            mode = "pass"
        hit = self._rand.random() < self.share
        if mode == "blackhole":
            self.seen["blackhole"] += 1
            await self._released.wait()
            return self._abort(request)  # the caller sees its connection die, as after a partition heals
        if mode == "reset" and hit:
            self.seen["reset"] += 1
            return self._abort(request)
        if mode == "error" and hit:
            self.seen["503"] += 1
            if self.aws:
                return web.Response(status=503, text=_AWS_UNAVAILABLE, content_type="text/xml")
            return web.json_response({"error": {"code": "unavailable", "message": "chaos: 503"}}, status=503)
        if mode == "throttle" and hit:
            self.seen["throttling"] += 1
            return web.Response(status=400, text=_AWS_THROTTLING, content_type="text/xml")
        if mode == "ratelimit" and hit:
            self.seen["429"] += 1
            return web.json_response(
                {"error": {"code": "rate_limited", "message": "chaos: slow down"}},
                status=429,
                headers={"Retry-After": "1"},
            )
        if mode == "missing":  # a control plane without this route (an older version)
            self.seen["404"] += 1
            message = f"no route for {request.method} {request.path}"
            return web.json_response({"error": {"code": "not_found", "message": message}}, status=404)
        if mode == "not_allowed":  # a server with this path for other methods only (as ours answers then)
            self.seen["405"] += 1
            message = f"{request.method} is not allowed on {request.path}"
            return web.json_response(
                {"error": {"code": "invalid_request", "message": message}}, status=405, headers={"Allow": "GET"}
            )
        if mode == "latency":
            self.seen["latency"] += 1
            await asyncio.sleep(self.latency)
        self.seen["forwarded"] += 1
        return await self._forward(request)

    @staticmethod
    def _abort(request: web.Request) -> web.Response:
        """Drop the connection without an answer (the response below is never written)."""
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=499)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("host", "content-length", "transfer-encoding", "connection")
        }
        try:
            async with self._session.request(
                request.method, self.upstream + request.path_qs, data=body, headers=headers
            ) as resp:
                data = await resp.read()
                out = {
                    k: v
                    for k, v in resp.headers.items()
                    if k.lower() in ("content-type", "retry-after", "www-authenticate", "allow")
                }
                return web.Response(status=resp.status, body=data, headers=out)
        except (aiohttp.ClientError, OSError):
            self.seen["upstream_down"] += 1
            return web.json_response({"error": {"code": "unavailable", "message": "chaos: upstream down"}}, status=502)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application(client_max_size=2 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        timeout = aiohttp.ClientTimeout(total=None, connect=2)
        async with aiohttp.ClientSession(timeout=timeout) as self._session, serve_on_loopback(app) as url:
            try:
                yield url
            finally:
                self._released.set()  # requests held in a black hole let go before the server stops
