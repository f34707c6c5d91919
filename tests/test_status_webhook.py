"""The status webhook against a real aiohttp receiver on 127.0.0.1: delivery, retries, refusals, bounds, secrecy.

Back-off goes through an injected sleep that records the delay and returns at once, so the retry
tests take milliseconds; the tests wait on what the receiver saw (an asyncio queue), not on time.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
import structlog
from aiohttp import web

from agent._version import __version__
from agent.controlplane.webhook import StatusChangeEvent, StatusWebhook, status_change_event
from agent.observability.logging import configure_logging
from agent.protocol.results import Failure
from tests.conftest import free_port
from tests.helpers import wait_for

TOKEN = "T0AAAAAA/B0BBBBBB/xoxbSECRETsecretSECRET"

#: What the receiver does with one request: answer with a status (and headers), drop the connection,
#: or never answer.
Step = int | tuple[int, dict[str, str]] | str


@pytest.fixture(autouse=True)
def _debug_logs(_logging: None) -> None:
    """Debug lines on (webhook_delivered is one), after conftest's info-level setup."""
    configure_logging(fmt="json", level="debug", stream=sys.__stderr__)


@dataclass
class Received:
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Receiver:
    """A webhook receiver that follows a script, one step per request; 200 once the script runs out."""

    script: list[Step] = field(default_factory=list)
    requests: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)
    received: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        got = Received(dict(request.headers), json.loads(await request.read()))
        self.received.append(got)
        self.requests.put_nowait(got)
        step: Step = self.script.pop(0) if self.script else 200
        if step == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)  # never reaches the client
        if step == "hang":
            await self.release.wait()
            return web.Response(status=200)
        status, headers = step if isinstance(step, tuple) else (step, {})
        assert isinstance(status, int)
        return web.Response(status=status, headers=headers, text="ok" if status < 300 else "no")

    async def next(self, timeout: float = 5.0) -> Received:
        return await asyncio.wait_for(self.requests.get(), timeout)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/services/{tail:.*}", r.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    r.url = f"http://127.0.0.1:{runner.addresses[0][1]}/services/{TOKEN}?token=qs{TOKEN[-12:]}"
    try:
        yield r
    finally:
        r.release.set()
        await runner.cleanup()


class FakeSleep:
    """Records each back-off and returns at once (after letting the loop run)."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


WebhookFactory = Callable[..., Awaitable[StatusWebhook]]


@pytest.fixture
async def webhook() -> AsyncIterator[WebhookFactory]:
    """Started webhooks, closed at teardown; rand=1.0 makes the jitter take the whole back-off."""
    made: list[StatusWebhook] = []

    async def make(url: str, **kwargs: Any) -> StatusWebhook:
        kwargs.setdefault("rand", lambda: 1.0)
        w = StatusWebhook(url, **kwargs)
        made.append(w)
        await w.start()
        return w

    yield make
    for w in made:
        await w.aclose()


def an_event(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "identifier": "aws_prod",
        "name": "AWS prod",
        "from_status": "SUCCESS",
        "to_status": "FAILURE",
        "tested_at": datetime(2026, 12, 3, 10, 42, 5, tzinfo=UTC),
        "error_summary": "AccessDenied: not authorized to perform sts:AssumeRole",
        "failure": Failure(
            step="assume_role",
            category="assume_role_denied",
            aws_error_code="AccessDenied",
            hint="The role's trust policy does not name this principal.",
        ),
        "delegate_name": "eks-prod",
        "failures_in_row": 1,
        "control_plane": "https://cp.example.com",
    }
    return status_change_event(**{**values, **overrides})


async def idle(w: StatusWebhook) -> None:
    """Until the sender has nothing queued and nothing in flight."""
    await wait_for(lambda: not w._queue and not w._in_flight, "the webhook to go idle", every=0.001)


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_the_event_body_has_the_documented_shape() -> None:
    """camelCase keys, "from" spelled so, every key present, and it decodes as StatusChangeEvent."""
    body = an_event()
    assert body == {
        "event": "connector.status_changed",
        "connector": {"identifier": "aws_prod", "name": "AWS prod"},
        "from": "SUCCESS",
        "to": "FAILURE",
        "testedAt": "2026-12-03T10:42:05Z",
        "errorSummary": "AccessDenied: not authorized to perform sts:AssumeRole",
        "failure": {
            "step": "assume_role",
            "category": "assume_role_denied",
            "awsErrorCode": "AccessDenied",
            "hint": "The role's trust policy does not name this principal.",
        },
        "delegateName": "eks-prod",
        "failuresInRow": 1,
        "controlPlane": "https://cp.example.com",
        "text": "Connector AWS prod (aws_prod): SUCCESS -> FAILURE: "
        "The role's trust policy does not name this principal.",
    }
    assert msgspec.convert(body, StatusChangeEvent).from_ == "SUCCESS"
    back = an_event(from_status="FAILURE", to_status="SUCCESS", failure=None, error_summary=None, control_plane=None)
    assert (back["failure"], back["errorSummary"], back["controlPlane"]) == (None, None, None)
    assert back["text"] == "Connector AWS prod (aws_prod): FAILURE -> SUCCESS"


def test_a_wrong_status_fails_in_the_caller_and_epoch_seconds_are_a_time() -> None:
    """A status outside the three raises at once; tested_at may be epoch seconds (the store's clock)."""
    with pytest.raises(ValueError, match="not 'BROKEN'"):
        an_event(to_status="BROKEN")
    at = datetime(2026, 12, 3, 10, 42, 5, tzinfo=UTC)
    assert an_event(tested_at=at.timestamp())["testedAt"] == "2026-12-03T10:42:05Z"
    assert an_event(tested_at=None)["testedAt"] is None


async def test_delivered_once_with_the_body_and_headers(receiver: Receiver, webhook: WebhookFactory) -> None:
    """One POST, JSON body as built, Content-Type and User-Agent set; a debug line says delivered."""
    sleep = FakeSleep()
    w = await webhook(receiver.url, sleep=sleep)
    with structlog.testing.capture_logs() as logs:
        w.notify(an_event())
        got = await receiver.next()
        await idle(w)
    assert got.body == an_event()
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["User-Agent"] == f"delegate-agent/{__version__}"
    assert len(receiver.received) == 1 and sleep.delays == []
    [delivered] = events(logs, "controlplane.webhook_delivered")
    assert delivered["log_level"] == "debug" and delivered["attempts"] == 1 and delivered["status"] == 200
    assert (w.delivered, w.failed, w.dropped) == (1, 0, 0)


async def test_retried_after_500_and_a_dropped_connection_then_delivered_once(
    receiver: Receiver, webhook: WebhookFactory
) -> None:
    """500, then a connection closed without an answer, then 200: three tries, back-off 1 s then 2 s, one delivery."""
    receiver.script = [500, "drop"]
    sleep = FakeSleep()
    w = await webhook(receiver.url, sleep=sleep)
    with structlog.testing.capture_logs() as logs:
        w.notify(an_event())
        tries = [await receiver.next() for _ in range(3)]
        await idle(w)
    assert len(receiver.received) == 3
    assert all(t.body == an_event() for t in tries)
    assert len({t.headers["X-Delivery-Id"] for t in tries}) == 1, "one id across retries, to dedupe on"
    assert sleep.delays == [1.0, 2.0]
    assert events(logs, "controlplane.webhook_failed") == []
    [delivered] = events(logs, "controlplane.webhook_delivered")
    assert delivered["attempts"] == 3
    assert (w.delivered, w.failed) == (1, 0)


async def test_backoff_doubles_with_jitter_and_gives_up_after_five_tries(
    receiver: Receiver, webhook: WebhookFactory
) -> None:
    """Five 503s: four back-offs between half and all of 1, 2, 4, 8 s; then one warning with attempts and status."""
    receiver.script = [503] * 5
    sleep = FakeSleep()
    draws = iter([0.0, 1.0, 0.5, 0.0])
    w = await webhook(receiver.url, sleep=sleep, rand=lambda: next(draws))
    with structlog.testing.capture_logs() as logs:
        w.notify(an_event())
        for _ in range(5):
            await receiver.next()
        await idle(w)
    assert sleep.delays == [0.5, 2.0, 3.0, 4.0]
    [failed] = events(logs, "controlplane.webhook_failed")
    assert failed["log_level"] == "warning"
    assert (failed["attempts"], failed["status"], failed["error"]) == (5, 503, None)
    assert (w.delivered, w.failed) == (0, 1)


async def test_429_waits_as_retry_after_says(receiver: Receiver, webhook: WebhookFactory) -> None:
    """A 429 with Retry-After: 7 waits 7 s (more than the 1 s back-off), then delivers."""
    receiver.script = [(429, {"Retry-After": "7"})]
    sleep = FakeSleep()
    w = await webhook(receiver.url, sleep=sleep)
    w.notify(an_event())
    await receiver.next()
    await receiver.next()
    await idle(w)
    assert sleep.delays == [7.0]
    assert w.delivered == 1


async def test_retry_after_as_a_date_and_a_cap(receiver: Receiver, webhook: WebhookFactory) -> None:
    """Retry-After as an HTTP date in the past is no wait beyond the back-off; an hour is capped at 60 s."""
    receiver.script = [(429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), (429, {"Retry-After": "3600"})]
    sleep = FakeSleep()
    w = await webhook(receiver.url, sleep=sleep)
    w.notify(an_event())
    for _ in range(3):
        await receiver.next()
    await idle(w)
    assert sleep.delays == [1.0, 60.0]


async def test_400_is_not_retried(receiver: Receiver, webhook: WebhookFactory) -> None:
    """A 4xx other than 429 will not change: one try, no back-off, one warning."""
    receiver.script = [400]
    sleep = FakeSleep()
    w = await webhook(receiver.url, sleep=sleep)
    with structlog.testing.capture_logs() as logs:
        w.notify(an_event())
        await receiver.next()
        await idle(w)
    assert len(receiver.received) == 1 and sleep.delays == []
    [failed] = events(logs, "controlplane.webhook_failed")
    assert (failed["attempts"], failed["status"]) == (1, 400)
    assert (w.delivered, w.failed) == (0, 1)


async def test_a_slow_receiver_times_out_and_the_retry_delivers(receiver: Receiver, webhook: WebhookFactory) -> None:
    """The first request never answers: the per-request timeout ends it, and the second try delivers."""
    receiver.script = ["hang"]
    sleep = FakeSleep()
    w = await webhook(receiver.url, sleep=sleep, timeout=0.2)
    w.notify(an_event())
    await receiver.next()
    await receiver.next()
    await idle(w)
    assert (w.delivered, sleep.delays) == (1, [1.0])


async def test_nothing_listening_is_retried_then_given_up(webhook: WebhookFactory) -> None:
    """Connection refused five times: one warning, with the error's type and no status."""
    sleep = FakeSleep()
    w = await webhook(f"http://127.0.0.1:{free_port()}/services/{TOKEN}", sleep=sleep)
    with structlog.testing.capture_logs() as logs:
        w.notify(an_event())
        await wait_for(lambda: w.failed == 1, "the webhook to give up", every=0.001)
    assert len(sleep.delays) == 4
    [failed] = events(logs, "controlplane.webhook_failed")
    assert (failed["attempts"], failed["status"]) == (5, None)
    assert failed["error"] == "ClientConnectorError"


async def test_a_receiver_that_never_answers_blocks_neither_notify_nor_the_bound(
    receiver: Receiver, webhook: WebhookFactory
) -> None:
    """While the first post hangs, 100 notifies return at once; 10 wait, the oldest are dropped, logged once."""
    receiver.script = ["hang"]
    w = await webhook(receiver.url, queue_size=10, timeout=60.0, close_timeout=0.2)
    with structlog.testing.capture_logs() as logs:
        w.notify(an_event(name="first"))
        await receiver.next()  # in flight, hanging
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(100):
            w.notify(an_event(name=f"n{i}"))
        assert loop.time() - started < 0.5
        assert len(w._queue) == 10
        assert [json.loads(b)["connector"]["name"] for b in w._queue] == [f"n{i}" for i in range(90, 100)]
        assert w.dropped == 90
        dropped = events(logs, "controlplane.webhook_dropped")
        assert 1 <= len(dropped) <= 2, "logged at most once a second"
        await w.aclose()
    assert sum(e["dropped"] for e in events(logs, "controlplane.webhook_dropped")) == 90, "every drop is counted"
    [abandoned] = events(logs, "controlplane.webhook_abandoned")
    assert abandoned["events"] == 11, "ten queued and the one in flight"


async def test_aclose_delivers_what_is_queued(receiver: Receiver) -> None:
    """Events queued before start and before aclose are all delivered, in order, by aclose."""
    w = StatusWebhook(receiver.url, sleep=FakeSleep())
    for i in range(5):
        w.notify(an_event(name=f"c{i}"))
    await w.start()
    receiver.script = [500]  # one retry on the way, still within the close timeout
    with structlog.testing.capture_logs() as logs:
        await w.aclose()
    names = [r.body["connector"]["name"] for r in receiver.received]
    assert names == ["c0", "c0", "c1", "c2", "c3", "c4"]
    assert (w.delivered, w.failed) == (5, 0)
    assert events(logs, "controlplane.webhook_abandoned") == []
    w.notify(an_event())  # after close: ignored, no error
    assert len(receiver.received) == 6


async def test_the_url_token_never_reaches_the_logs(
    receiver: Receiver, webhook: WebhookFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Delivered, refused, unreachable and dropped, as rendered at debug level: scheme://host:port only."""
    stream = io.StringIO()
    configure_logging(fmt="json", level="debug", stream=stream)
    caplog.set_level(logging.DEBUG)
    receiver.script = [500, 400, "drop", "drop", "drop", "drop", "drop"]
    port = receiver.url.split(":")[2].split("/")[0]
    w = await webhook(receiver.url, sleep=FakeSleep(), queue_size=1)
    w.notify(an_event())
    w.notify(an_event())  # drops the first
    for _ in range(2):  # 500, then 400: given up
        await receiver.next()
    w.notify(an_event())
    for _ in range(5):  # dropped connections: given up
        await receiver.next()
    await idle(w)
    w.notify(an_event())  # delivered
    await receiver.next()
    await idle(w)
    dead_port = free_port()
    dead = await webhook(f"https://user:pw{TOKEN[-12:]}@127.0.0.1:{dead_port}/x/{TOKEN}", sleep=FakeSleep())
    dead.notify(an_event())
    await idle(dead)
    await w.aclose()
    await dead.aclose()
    text = stream.getvalue() + caplog.text
    for secret in ("SECRET", "xoxb", "B0BBBBBB", "/services", "token=", "user", "pw"):
        assert secret not in text, (secret, text)
    logs = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert {e["target"] for e in logs if "target" in e} == {
        f"http://127.0.0.1:{port}",
        f"https://127.0.0.1:{dead_port}",
    }
    assert {e["event"] for e in logs} >= {
        "controlplane.webhook_delivered",
        "controlplane.webhook_failed",
        "controlplane.webhook_dropped",
    }


def test_a_bad_url_is_refused_without_echoing_it() -> None:
    """Not http(s), or no host: ValueError naming scheme://host only."""
    with pytest.raises(ValueError, match=r"ftp://example\.com$") as e:
        StatusWebhook(f"ftp://example.com/{TOKEN}")
    assert TOKEN not in str(e.value)
    with pytest.raises(ValueError, match=r"needs an http:// or https:// URL with a host"):
        StatusWebhook("https:///nohost")


async def test_start_twice_and_close_twice_are_harmless(receiver: Receiver) -> None:
    """start() and aclose() are idempotent; aclose() without start() drops the queue with one line."""
    w = StatusWebhook(receiver.url)
    await w.start()
    await w.start()
    await w.aclose()
    await w.aclose()
    never = StatusWebhook(receiver.url)
    never.notify(an_event())
    with structlog.testing.capture_logs() as logs:
        await never.aclose()
    [abandoned] = events(logs, "controlplane.webhook_abandoned")
    assert abandoned["events"] == 1
