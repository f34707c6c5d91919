"""Serving a small aiohttp app on loopback: the demo's stand-ins, the benchmark's chaos proxy, tests.

One definition for all three (none of them imports another: tests and bench must not import the
demo), kept outside the demo package for that reason.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web


@asynccontextmanager
async def serve_on_loopback(
    app: web.Application, *, ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[str]:
    """Serve ``app`` on a free port of 127.0.0.1 and yield its base URL (``host`` names it, for TLS)."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
    try:
        yield f"{'https' if ssl_context else 'http'}://{host}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
