"""A real HTTP forward proxy on 127.0.0.1 for tests: CONNECT tunnels and absolute-URI requests.

Clients send ``CONNECT host:port`` for an https target and a plain request with an absolute URI
(``POST http://host:port/ HTTP/1.1``) for an http one (botocore and aiohttp both do); this proxy
serves both, optionally demands Basic ``Proxy-Authorization`` (407 otherwise), and records what
went through it: each CONNECT target, each forwarded request (method, URL, body), and each
Proxy-Authorization header it was sent.

Forwarded requests go upstream with ``Connection: close`` and the answer is relayed until the
upstream closes, after which the client connection is closed too; clients simply reconnect.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_HOP_BY_HOP = {b"proxy-authorization", b"proxy-connection", b"connection", b"keep-alive"}


@dataclass
class Forwarded:
    method: str
    url: str
    body: bytes


@dataclass
class ConnectProxy:
    """``async with proxy.running() as (host, port)``; the records below say what it carried."""

    #: user:password the proxy demands (None: anyone may use it).
    credentials: tuple[str, str] | None = None
    tunnels: list[str] = field(default_factory=list)
    forwarded: list[Forwarded] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    refused: int = 0
    _pipes: set[asyncio.Task[None]] = field(default_factory=set)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[tuple[str, int]]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            yield "127.0.0.1", server.sockets[0].getsockname()[1]
        finally:
            server.close()
            for task in list(self._pipes):
                task.cancel()
            await asyncio.gather(*self._pipes, return_exceptions=True)
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; True to read another on this connection."""
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head[:-4].split(b"\r\n")
        method, target, version = request_line.decode().split(" ")
        headers = [tuple(line.split(b":", 1)) for line in header_lines]
        named = {k.strip().lower(): v.strip() for k, v in headers}
        auth = named.get(b"proxy-authorization", b"").decode()
        if auth:
            self.authorizations.append(auth)
        body = await reader.readexactly(int(named.get(b"content-length", b"0")))
        if not self._authorized(auth):
            self.refused += 1
            writer.write(
                b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="test"\r\n'
                b"Content-Length: 0\r\n\r\n"
            )
            await writer.drain()
            return True
        if method == "CONNECT":
            await self._tunnel(target, reader, writer)
            return False
        await self._forward(method, target, version, headers, body, writer)
        return False

    def _authorized(self, header: str) -> bool:
        if self.credentials is None:
            return True
        expected = base64.b64encode(":".join(self.credentials).encode()).decode()
        return header == f"Basic {expected}"

    async def _tunnel(self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, _, port = target.rpartition(":")
        self.tunnels.append(target)
        up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        pipes = {asyncio.create_task(_pipe(reader, up_writer)), asyncio.create_task(_pipe(up_reader, writer))}
        self._pipes |= pipes
        try:
            await asyncio.gather(*pipes)
        finally:
            self._pipes -= pipes
            up_writer.close()

    async def _forward(
        self,
        method: str,
        url: str,
        version: str,
        headers: list[tuple[bytes, ...]],
        body: bytes,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.forwarded.append(Forwarded(method, url, body))
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        up_reader, up_writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        kept = b"".join(k + b":" + v + b"\r\n" for k, v in headers if k.strip().lower() not in _HOP_BY_HOP)
        up_writer.write(f"{method} {path} {version}\r\n".encode() + kept + b"Connection: close\r\n\r\n" + body)
        await up_writer.drain()
        try:
            writer.write(await up_reader.read())  # until the upstream closes
            await writer.drain()
        finally:
            up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.write_eof()
