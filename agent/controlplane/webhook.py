"""A webhook on connector status changes: one JSON POST per change to one URL, never in the caller's way.

:meth:`StatusWebhook.notify` encodes the event and puts it on a bounded queue (the oldest is dropped
when it is full, counted, and logged at most once a second); a background sender posts the events
in order, retrying connection errors, timeouts, 5xx and 429 (``Retry-After`` honoured) with
exponential back-off and jitter, and giving up at once on any other answer (a 4xx will not change).
:meth:`StatusWebhook.aclose` gives what is queued a couple of seconds, then says what it abandoned.

Chat webhooks (Slack, Teams) carry their credential in the URL, so the URL is never logged: only
``scheme://host[:port]``, and errors by their type, never their text (aiohttp's include the URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import time
import unicodedata
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, Literal, cast, get_args
from urllib.parse import urlsplit

import aiohttp
import msgspec
import structlog

from agent._version import __version__
from agent.protocol.models import ConnectorStatus
from agent.protocol.results import Failure
from agent.protocol.wire import Timestamp, Wire

__all__ = ["ConnectorRef", "StatusChangeEvent", "StatusWebhook", "status_change_event"]

log = structlog.get_logger("controlplane.webhook")

EVENT_STATUS_CHANGED: Final = "connector.status_changed"
#: Events waiting to be sent; past this the oldest is dropped.
DEFAULT_QUEUE_SIZE = 1000
#: Tries per event, the first included.
DEFAULT_ATTEMPTS = 5
#: The first retry's delay in seconds; it doubles for each later one (with jitter).
DEFAULT_BACKOFF = 1.0
#: Seconds for one request, connecting included.
DEFAULT_TIMEOUT = 10.0
#: Seconds :meth:`StatusWebhook.aclose` gives the queue before it abandons the rest.
DEFAULT_CLOSE_TIMEOUT = 2.0
#: A server's ``Retry-After`` is honoured up to this many seconds (a longer one would hold every
#: later event that long).
MAX_RETRY_AFTER = 60.0
_DROP_LOG_EVERY = 1.0

Sleep = Callable[[float], Awaitable[None]]
_STATUSES: tuple[str, ...] = get_args(ConnectorStatus)


class ConnectorRef(Wire, kw_only=True):
    identifier: str
    name: str


class StatusChangeEvent(Wire, kw_only=True):
    """The webhook's JSON body (camelCase keys, every key present, null when unknown)."""

    event: Literal["connector.status_changed"] = EVENT_STATUS_CHANGED
    connector: ConnectorRef
    from_: ConnectorStatus = msgspec.field(name="from")
    to: ConnectorStatus
    #: When the test that changed the status ran.
    tested_at: Timestamp | None
    error_summary: str | None
    #: The failing step, its category, AWS's error code and the hint; null when the new status is not FAILURE.
    failure: Failure | None
    delegate_name: str | None
    failures_in_row: int
    #: The control plane's base URL (for a link back), when it is configured.
    control_plane: str | None
    #: One line for people: chat webhooks (Slack, Mattermost, Teams' incoming webhooks) show ``text``
    #: and refuse a body without it.
    text: str


def _plain(value: str) -> str:
    """``value`` as one line of inert text: control characters and line breaks become spaces, and
    ``<``, ``>``, ``&`` are escaped, so a connector's name cannot break the line or ping a chat
    channel (``<!channel>``, ``<@U123>``); ``@here`` typed as text is not a mention in Slack's text."""
    flat = " ".join("".join(" " if unicodedata.category(c)[0] == "C" else c for c in value).split())
    return flat.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def status_change_event(
    *,
    identifier: str,
    name: str,
    from_status: str,
    to_status: str,
    tested_at: datetime | float | None,
    error_summary: str | None = None,
    failure: Failure | None = None,
    delegate_name: str | None = None,
    failures_in_row: int = 0,
    control_plane: str | None = None,
) -> dict[str, Any]:
    """The body of a ``connector.status_changed`` event, as plain JSON values for :meth:`StatusWebhook.notify`.

    ``tested_at`` is a datetime or epoch seconds. A status other than SUCCESS, FAILURE or UNKNOWN
    raises ValueError here, in the caller, rather than reaching the receiver.
    """
    for status in (from_status, to_status):
        if status not in _STATUSES:
            raise ValueError(f"a connector status is one of {', '.join(_STATUSES)}, not {status!r}")
    if isinstance(tested_at, int | float):
        tested_at = datetime.fromtimestamp(tested_at, UTC)
    text = f"Connector {_plain(name)} ({_plain(identifier)}): {from_status} -> {to_status}"
    if to_status == "FAILURE":
        detail = failure.hint if failure and failure.hint else error_summary
        if detail:
            text += f": {_plain(detail)}"
    event = StatusChangeEvent(
        connector=ConnectorRef(identifier=identifier, name=name),
        from_=cast(ConnectorStatus, from_status),  # checked against _STATUSES above
        to=cast(ConnectorStatus, to_status),
        tested_at=tested_at,
        error_summary=error_summary,
        failure=failure,
        delegate_name=delegate_name,
        failures_in_row=failures_in_row,
        control_plane=control_plane,
        text=text,
    )
    body: dict[str, Any] = msgspec.to_builtins(event)
    return body


def webhook_target(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: what may be logged (no user, path or query: tokens live there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


class StatusWebhook:
    """Posts each event given to :meth:`notify` to ``url``; ``start()`` it in the loop, ``aclose()`` it at the end.

    Args:
        url: where to POST (http or https). It may hold a token; it is never logged.
        queue_size: events kept waiting at most; when full, the oldest is dropped.
        attempts: tries per event, the first included.
        backoff: the first retry's delay in seconds, doubling each time, with jitter (a draw between
            half and all of it); a ``Retry-After`` is a floor, up to :data:`MAX_RETRY_AFTER`.
        timeout: seconds for one request.
        close_timeout: seconds :meth:`aclose` gives the queue.
        sleep: awaited for each back-off (tests pass a fake).
        rand: jitter's source, in [0, 1).
    """

    def __init__(
        self,
        url: str,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff: float = DEFAULT_BACKOFF,
        timeout: float = DEFAULT_TIMEOUT,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
        sleep: Sleep = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        target = webhook_target(url)
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ValueError(f"the status webhook needs an http:// or https:// URL with a host, not {target}")
        if queue_size < 1 or attempts < 1:
            raise ValueError("the status webhook needs queue_size >= 1 and attempts >= 1")
        self._url = url
        self._target = target
        self._queue: deque[bytes] = deque(maxlen=queue_size)
        self._attempts = attempts
        self._backoff = backoff
        self._timeout = timeout
        self._close_timeout = close_timeout
        self._sleep = sleep
        self._rand = rand
        self._wakeup = asyncio.Event()
        self._closing = False
        self._in_flight = False
        self._session: aiohttp.ClientSession | None = None
        self._sender: asyncio.Task[None] | None = None
        self._headers = {"Content-Type": "application/json", "User-Agent": f"delegate-agent/{__version__}"}
        self._unlogged_drops = 0
        self._next_drop_log = 0.0
        self.delivered = 0
        self.failed = 0
        self.dropped = 0

    @property
    def target(self) -> str:
        """Where events go, as it may be logged: ``scheme://host[:port]``."""
        return self._target

    def notify(self, event: Mapping[str, Any]) -> None:
        """Queue ``event`` (JSON-encodable) to be posted; returns at once. Raises if it cannot be encoded."""
        body = msgspec.json.encode(event)
        if self._closing:
            log.debug("controlplane.webhook_closed", target=self._target)
            return
        if len(self._queue) == self._queue.maxlen:
            self._note_drop()
        self._queue.append(body)  # a full deque drops its oldest
        self._wakeup.set()

    async def start(self) -> None:
        """Start the sender (idempotent). Events queued before are sent now."""
        if self._sender is not None:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            trust_env=True,  # HTTPS_PROXY: chat services are usually outside, behind the egress proxy
        )
        self._sender = asyncio.create_task(self._run(), name="status-webhook")

    async def aclose(self) -> None:
        """Send what is queued for at most ``close_timeout`` seconds, then drop the rest (one log line)."""
        self._closing = True
        self._wakeup.set()
        sender, self._sender = self._sender, None
        if sender is not None:
            done, _ = await asyncio.wait({sender}, timeout=self._close_timeout)
            if not done:
                abandoned = len(self._queue) + self._in_flight
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
                log.warning(
                    "controlplane.webhook_abandoned", target=self._target, events=abandoned, seconds=self._close_timeout
                )
        elif self._queue:
            log.warning("controlplane.webhook_abandoned", target=self._target, events=len(self._queue), seconds=0)
        self._queue.clear()
        if self._unlogged_drops:
            self._log_drops()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            body = self._queue.popleft()
            self._in_flight = True
            try:
                await self._deliver(body)
            except Exception as exc:  # a bug, not the receiver: keep the sender alive for the next event
                self.failed += 1
                log.warning("controlplane.webhook_failed", target=self._target, attempts=None, error=type(exc).__name__)
            finally:
                self._in_flight = False

    async def _deliver(self, body: bytes) -> None:
        assert self._session is not None
        headers = {**self._headers, "X-Delivery-Id": uuid.uuid4().hex}  # the same on every retry: dedupe on it
        status: int | None = None
        error: str | None = None
        for attempt in range(1, self._attempts + 1):
            retry_after: float | None = None
            try:
                async with self._session.post(self._url, data=body, headers=headers, allow_redirects=False) as resp:
                    status, error = resp.status, None
                    if 200 <= status < 300:
                        self.delivered += 1
                        log.debug(
                            "controlplane.webhook_delivered", target=self._target, status=status, attempts=attempt
                        )
                        return
                    if status != 429 and status < 500:
                        break  # the receiver refuses this body: sending it again will not help
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, error = None, type(exc).__name__  # not str(exc): it may hold the URL
            if attempt < self._attempts:
                await self._sleep(self._delay(attempt, retry_after))
        self.failed += 1
        log.warning(
            "controlplane.webhook_failed",
            target=self._target,
            attempts=attempt,
            status=status,
            error=error,
        )

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Back-off before try ``attempt + 1``: base * 2**(attempt-1), jittered to between half and all of it."""
        ceiling = self._backoff * 2.0 ** (attempt - 1)
        delay = ceiling * (0.5 + 0.5 * self._rand())
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        return delay

    def _note_drop(self) -> None:
        self.dropped += 1
        self._unlogged_drops += 1
        now = time.monotonic()
        if now >= self._next_drop_log:
            self._next_drop_log = now + _DROP_LOG_EVERY
            self._log_drops()

    def _log_drops(self) -> None:
        log.warning(
            "controlplane.webhook_dropped",
            target=self._target,
            dropped=self._unlogged_drops,
            dropped_total=self.dropped,
            queue_size=self._queue.maxlen,
        )
        self._unlogged_drops = 0


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, float(when.timestamp()) - time.time())
