"""A canned AWS stand-in for the benchmark: answers a validation's two calls at once, and nothing else.

moto answers about 80 validations a second on this machine, so against moto the delegate's
throughput is moto's. This stand-in answers ``sts:GetCallerIdentity`` and ``ec2:DescribeRegions``
with fixed, well-formed XML as fast as one Python process can write it, so what is measured
against it is the delegate (and the control plane). It checks no signature and keeps no state:
it is a stand-in for AWS's speed, not for its behaviour (moto is that, in every test). Anything
other than those two calls gets an AWS-style XML error with HTTP 400, so a mistake is loud.

It is an ``asyncio.Protocol`` on a raw socket with a hand-written HTTP/1.1 reader (keep-alive, as
AWS serves). Against aiohttp's low-level server giving the same answers (20,000 signed requests on
16 keep-alive connections, 2026-12 on the bench machine), it spends 25-32 us of CPU per request
where aiohttp spends 78-96 us: a validation (two requests) costs it about 0.05 ms, against the
delegate's few ms, so it is not what limits a run.

Run: ``python -m bench.canned_aws PORT`` (127.0.0.1 only).
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
import time
import uuid
from urllib.parse import parse_qsl

ACCOUNT = "123456789012"
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d{1,2}")
_CREDENTIAL = re.compile(rb"Credential=([A-Z0-9]{16,128})/[0-9]{8}/[a-z0-9-]+/([a-z0-9-]+)/aws4_request")
#: Bounded memo of answers (per access key, per region): the bench uses a few hundred keys.
_MEMO_LIMIT = 10_000

_STS_NS = "https://sts.amazonaws.com/doc/2011-06-15/"
_EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
_REQUEST_ID = str(uuid.UUID(int=0x0BE7C4A7))  # fixed: the answers are canned, so is their id


def caller_identity(access_key: str) -> bytes:
    """GetCallerIdentity for an IAM user named after the key, so each connector sees its own identity."""
    user = f"bench-{access_key[-8:].lower()}"
    return (
        f'<GetCallerIdentityResponse xmlns="{_STS_NS}">'
        "<GetCallerIdentityResult>"
        f"<Arn>arn:aws:iam::{ACCOUNT}:user/{user}</Arn>"
        f"<UserId>AIDA{access_key[-16:].upper()}</UserId>"
        f"<Account>{ACCOUNT}</Account>"
        "</GetCallerIdentityResult>"
        f"<ResponseMetadata><RequestId>{_REQUEST_ID}</RequestId></ResponseMetadata>"
        "</GetCallerIdentityResponse>"
    ).encode()


def describe_regions(region: str) -> bytes:
    """DescribeRegions for the one region asked: its endpoint, opted in by default."""
    return (
        f'<DescribeRegionsResponse xmlns="{_EC2_NS}">'
        f"<requestId>{_REQUEST_ID}</requestId>"
        "<regionInfo><item>"
        f"<regionName>{region}</regionName>"
        f"<regionEndpoint>ec2.{region}.amazonaws.com</regionEndpoint>"
        "<optInStatus>opt-in-not-required</optInStatus>"
        "</item></regionInfo>"
        "</DescribeRegionsResponse>"
    ).encode()


def error(service: str, code: str, message: str) -> bytes:
    """An error in the protocol of the service the request was signed for (EC2's or the query one)."""
    message = message.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if service == "ec2":
        return (
            f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
            f"<RequestID>{_REQUEST_ID}</RequestID></Response>"
        ).encode()
    return (
        f'<ErrorResponse xmlns="{_STS_NS}">'
        f"<Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>"
        f"<RequestId>{_REQUEST_ID}</RequestId></ErrorResponse>"
    ).encode()


def answer(method: bytes, target: bytes, authorization: bytes | None, body: bytes) -> tuple[int, bytes]:
    """(HTTP status, XML body) for one request: the two calls a validation makes, or an error."""
    found = _CREDENTIAL.search(authorization) if authorization else None
    if found is None:
        return 400, error("sts", "MissingAuthenticationToken", "the request carries no SigV4 Authorization header")
    key, service = found.group(1).decode(), found.group(2).decode()
    if method != b"POST" or target.split(b"?", 1)[0] != b"/":
        return 400, error(service, "InvalidAction", "the canned stand-in answers POST / only")
    params = dict(parse_qsl(body.decode("utf-8", "replace")))
    action = params.get("Action", "")
    if service == "sts" and action == "GetCallerIdentity":
        return 200, caller_identity(key)
    if service == "ec2" and action == "DescribeRegions":
        regions = [v for k, v in params.items() if k.startswith("RegionName.")]
        if len(regions) != 1 or not _REGION.fullmatch(regions[0]):
            return 400, error(service, "InvalidParameterValue", f"one valid RegionName.1 expected, got {regions}")
        return 200, describe_regions(regions[0])
    return 400, error(service, "InvalidAction", f"the canned stand-in does not answer {service}:{action or '-'}")


def _response(status: int, body: bytes, *, close: bool) -> bytes:
    reason = b"OK" if status == 200 else b"Bad Request"
    head = b"HTTP/1.1 %d %s\r\nContent-Type: text/xml\r\nContent-Length: %d\r\nx-amzn-RequestId: %s\r\n%s\r\n" % (
        status,
        reason,
        len(body),
        _REQUEST_ID.encode(),
        b"Connection: close\r\n" if close else b"",
    )
    return head + body


class _Memo:
    """Keep-alive answers already built: a validation's requests repeat per connector and region.

    Keyed on what decides the answer (the key id and service from the credential scope, not the
    signature, which differs every time). Worth about a third of the stand-in's CPU per request.
    """

    def __init__(self) -> None:
        self.answers: dict[tuple[bytes, bytes, bytes, bytes], bytes] = {}

    def get(self, method: bytes, target: bytes, authorization: bytes | None, body: bytes) -> bytes:
        found = _CREDENTIAL.search(authorization) if authorization else None
        memo_key = (method, target, found.group(0) if found else b"", body)
        cached = self.answers.get(memo_key)
        if cached is None:
            cached = _response(*answer(method, target, authorization, body), close=False)
            if len(self.answers) >= _MEMO_LIMIT:
                self.answers.clear()
            self.answers[memo_key] = cached
        return cached


class _Http(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies (what botocore sends); pipelining works too."""

    def __init__(self, memo: _Memo) -> None:
        self.memo = memo
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).split(b"\r\n")
            length, authorization, close = 0, None, False
            for line in head[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value) if value.strip().isdigit() else -1
                elif name == b"authorization":
                    authorization = value.strip()
                elif name == b"connection":
                    close = value.strip().lower() == b"close"
                elif name == b"transfer-encoding":
                    self._fail(b"chunked bodies are not supported by the canned stand-in")
                    return
            if length < 0:
                self._fail(b"bad Content-Length")
                return
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            parts = head[0].split(b" ")
            if len(parts) != 3:
                self._fail(b"malformed request line")
                return
            method, target, version = parts
            close = close or version == b"HTTP/1.0"
            if close:
                self.transport.write(_response(*answer(method, target, authorization, body), close=True))
                self.transport.close()
                self.transport = None
            else:
                self.transport.write(self.memo.get(method, target, authorization, body))

    def _fail(self, why: bytes) -> None:
        assert self.transport is not None
        self.transport.write(_response(400, error("sts", "MalformedRequest", why.decode()), close=True))
        self.transport.close()
        self.transport = None


async def start(port: int = 0) -> asyncio.Server:
    """Listen on 127.0.0.1:``port`` (0: a free one) in this event loop; the caller closes the server."""
    memo = _Memo()
    return await asyncio.get_running_loop().create_server(lambda: _Http(memo), "127.0.0.1", port, backlog=1024)


def wait_ready(port: int, timeout: float = 30) -> None:
    """Return once the stand-in accepts connections on 127.0.0.1:``port`` (it was started as a process)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the canned AWS stand-in did not listen on port {port} in {timeout:.0f}s") from None
            time.sleep(0.02)


async def serve(port: int) -> None:
    """Serve on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    server = await start(port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    asyncio.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
