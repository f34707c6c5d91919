"""Sends results from the outbox, and removes each one only when the control plane has it.

"accepted" and "duplicate" both mean the control plane has the result. A fenced lease means it
never will (the task went to someone else): the result is dropped with a log line. Anything
transient is retried with backoff; nothing is lost while the delegate waits.

While a result waits, its lease is kept alive: a lease that expired because a finished task's
result was stuck behind a few 503s would send the task to another delegate and fence a perfectly
good result (the load run with faults showed exactly that before this keepalive existed).
"""

from __future__ import annotations

import asyncio
import math
import time

import structlog

from agent.observability.metrics import AgentMetrics
from agent.protocol.client import ControlPlaneClient
from agent.protocol.errors import AuthError, Code, LeaseFenced, NotFound, ProtocolError, RequestRejected
from agent.protocol.models import MAX_RESULTS_PER_BATCH, SubmitResultResponse
from agent.runtime.backoff import Backoff, auth_backoff
from agent.runtime.outbox import Entry, Outbox
from agent.runtime.state import AgentState

log = structlog.get_logger("agent.reporter")

#: Requests in flight at once when delivering results or renewing their leases.
CONCURRENCY = 8
#: How early a renewal round may run: below asyncio's timer resolution, so no spin.
_DUE_SLACK = 0.001
#: At most one round of result requests per this many seconds: under load, the results that finish
#: in that time share a request (over a slow AWS each used to go nearly alone: 0.74 requests per
#: validation). A result that finishes when none was sent for that long goes at once.
RESULTS_PACE_SECONDS = 0.05


class Reporter:
    def __init__(self, *, client: ControlPlaneClient, outbox: Outbox, state: AgentState, metrics: AgentMetrics) -> None:
        self._client = client
        self._outbox = outbox
        self._state = state
        self._metrics = metrics
        self._stop = asyncio.Event()
        #: False once the control plane turned out not to have ``POST /v1/results``.
        self._batches = True

    @property
    def undelivered(self) -> int:
        """Results still waiting for the control plane."""
        return len(self._outbox)

    @property
    def durable(self) -> bool:
        """Whether undelivered results survive a restart."""
        return self._outbox.durable

    def stop(self) -> None:
        self._stop.set()
        self._outbox.changed.set()

    async def run(self) -> None:
        keepalive = asyncio.create_task(self._keep_leases(), name="reporter-leases")
        try:
            await self._deliver()
        finally:
            keepalive.cancel()
            await asyncio.gather(keepalive, return_exceptions=True)

    async def _deliver(self) -> None:
        # Results are small and matter most: retry them quickly (seconds, not half a minute).
        transient, auth = Backoff(base=0.2, cap=5.0), auth_backoff()
        loop = asyncio.get_running_loop()
        sent_at = -math.inf
        while not self._stop.is_set():
            await self._outbox.changed.wait()
            self._outbox.changed.clear()
            while not self._stop.is_set():
                if (hold := sent_at + RESULTS_PACE_SECONDS - loop.time()) > _DUE_SLACK:
                    await self._rest(hold)
                    continue
                batch = self._outbox.pending()
                if not batch:
                    break
                sent_at = loop.time()
                error = await self._send_all(batch)
                if error is None:
                    transient.reset()
                    auth.reset()
                    continue
                delay = (auth if isinstance(error, AuthError) else transient).next(error.retry_after)
                log.warning(
                    "agent.results_not_delivered", error=str(error), pending=len(self._outbox), retry_in=round(delay, 2)
                )
                await self._rest(delay)

    async def _rest(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the reporter is stopped."""
        try:
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        except TimeoutError:
            pass

    async def _keep_leases(self) -> None:
        """Renew the leases of results not yet delivered, so their tasks are not handed out again.

        A result is renewed only once it has waited a full round: most are delivered within
        milliseconds, and renewing those would double the requests for nothing. A renewal that
        comes back fenced drops nothing: the result may have been delivered in the meantime (the
        task completed, so its lease is gone), and the send itself is what decides. Each lease is
        renewed on its own (a few at a time): one failed renewal must not leave the others to expire.
        """
        gate = asyncio.Semaphore(CONCURRENCY)
        waiting: set[str] = set()  # keys seen in the previous round and not delivered since
        fenced: set[str] = set()  # the control plane will not renew these; the send will settle them

        async def renew(entry: Entry) -> None:
            async with gate:
                try:
                    await self._client.renew_lease(entry.key)
                except LeaseFenced:
                    fenced.add(entry.key)
                except ProtocolError:
                    pass  # the next round tries again, a quarter of a lease later

        loop = asyncio.get_running_loop()
        last_round = loop.time()
        while not self._stop.is_set():
            # The lease length comes from the server (at registration, and it may change): a tick
            # of at most a quarter second notices a shorter lease in time; a tick only compares clocks.
            period = max(0.05, self._state.intervals.lease_seconds / 4)
            await asyncio.sleep(min(0.25, max(0.0, last_round + period - loop.time())))
            # asyncio may wake a timer up to its clock resolution early: a remainder below a
            # millisecond counts as due, or the loop would spin on zero-length sleeps.
            if loop.time() < last_round + period - _DUE_SLACK:
                continue
            last_round = loop.time()
            pending = {e.key: e for e in self._outbox.pending(limit=500)}
            due = [e for k, e in pending.items() if k in waiting and k not in fenced]
            waiting = set(pending)
            fenced &= waiting
            await asyncio.gather(*(renew(e) for e in due))

    async def flush(self, timeout: float) -> bool:
        """Send what is pending within ``timeout``; True when the outbox is empty."""
        deadline = asyncio.get_running_loop().time() + max(0.0, timeout)
        backoff = Backoff(base=0.2, cap=2.0)
        while len(self._outbox):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    error = await self._send_all(self._outbox.pending())
                    if error is not None:
                        await asyncio.sleep(min(backoff.next(error.retry_after), max(0.0, remaining)))
            except TimeoutError:
                break
        return len(self._outbox) == 0

    async def _send_all(self, batch: list[Entry]) -> ProtocolError | None:
        """Send every entry, up to ``MAX_RESULTS_PER_BATCH`` per request (a few requests at a time);
        return an error worth retrying, if any occurred.

        One request carries many results, each judged alone by the control plane: at load, most
        of what a result cost the delegate was its own request. A control plane without the batch
        route gets one ``PUT`` per result, as before.
        """
        gate = asyncio.Semaphore(CONCURRENCY)
        errors: list[ProtocolError] = []

        async def send_batch(chunk: list[Entry]) -> None:
            async with gate:
                if errors and not errors[-1].transient:
                    return  # refused credentials: no point asking again in this round
                if self._batches:
                    try:
                        answers = await self._client.submit_results([(e.task_id, e.result) for e in chunk])
                    except ProtocolError as exc:
                        # 405 is a RequestRejected too: ask "is the route there?" before "was the batch bad?".
                        if exc.status in (404, 405) and exc.code in (Code.NOT_FOUND, Code.INVALID_REQUEST):
                            self._batches = False
                            log.info("agent.results_one_by_one", reason="the control plane has no POST /v1/results")
                        elif not isinstance(exc, RequestRejected):
                            errors.append(exc)
                            return
                        # else: the batch as a whole (a server with a lower size limit): each alone says which
                    else:
                        self._settle(list(zip(chunk, answers, strict=True)), errors)
                        return
            await asyncio.gather(*(send_one(e) for e in chunk))

        async def send_one(entry: Entry) -> None:
            async with gate:
                if errors and not errors[-1].transient:
                    return
                answer: SubmitResultResponse | ProtocolError
                try:
                    answer = await self._client.submit_result(entry.task_id, entry.result)
                except ProtocolError as exc:
                    answer = exc
                self._settle([(entry, answer)], errors)

        size = MAX_RESULTS_PER_BATCH
        await asyncio.gather(*(send_batch(batch[i : i + size]) for i in range(0, len(batch), size)))
        return errors[-1] if errors else None

    def _settle(
        self, answers: list[tuple[Entry, SubmitResultResponse | ProtocolError]], errors: list[ProtocolError]
    ) -> None:
        """What each answer means for its result: delivered, dropped for good, or kept to retry."""
        done: list[str] = []
        for entry, answer in answers:
            if isinstance(answer, LeaseFenced):
                self._drop(entry, "lease_fenced", str(answer))
            elif isinstance(answer, NotFound):
                self._drop(entry, "unknown_task", str(answer))
            elif isinstance(answer, RequestRejected):
                self._drop(entry, "rejected", str(answer))
            elif isinstance(answer, ProtocolError):
                errors.append(answer)
                continue
            elif answer.outcome == "duplicate":
                log.info("task.result_already_delivered", task_id=entry.task_id)
            done.append(entry.key)
        if done:
            self._outbox.remove_many(done)
            self._state.contact(asyncio.get_running_loop().time(), time.time())

    def _drop(self, entry: Entry, reason: str, detail: str) -> None:
        self._metrics.results_dropped.labels(reason).inc()
        log.warning("task.result_dropped", task_id=entry.task_id, reason=reason, detail=detail)
