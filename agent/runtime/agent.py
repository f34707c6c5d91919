"""The delegate daemon: one owner object, wired in one place, with a written-down shutdown order.

Root loops: the connection (register, heartbeat), the poller (long poll gated by free slots), and
the reporter (outbox -> control plane). Tasks run in the executor. The HTTP server (probes,
metrics, status) starts before the loops and stops after them.

Lifecycle: construct (no I/O), then either ``await agent.run()`` (a process's main job, see
:func:`serve`) or ``async with agent:`` (run in the background, :meth:`Agent.shutdown` on exit).
An Agent runs once. Everything :meth:`run` opens is entered into one ``AsyncExitStack``, so it is
closed in reverse order and one failing close does not stop the others.

Shutdown ladder (first SIGTERM/SIGINT, or :meth:`Agent.shutdown`):

1. drain: stop polling, report "draining" at once (readiness turns 503 now; heartbeats go on);
2. wait for running tasks, up to the drain timeout;
3. stop what remains and give each task back (release its lease): the control plane re-queues it
   for another delegate, or fails it if its own deadline has passed. A rolling restart never
   turns a task into a FAILURE just because its delegate went away;
4. flush the outbox (whatever cannot be sent stays in a durable outbox for the next start);
5. deregister;
6. close the task handlers (their AWS clients) and the HTTP session; stop the HTTP server; close
   the outbox; exit 0.

A second signal skips the wait (step 2). A watchdog thread exits hard if the whole ladder takes
longer than drain timeout + grace. Signal handlers only call :meth:`Agent.request_shutdown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import signal
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any

import aiohttp
import structlog

from agent._version import __version__
from agent.observability.http import ConnectionLimits, HealthServer
from agent.observability.logging import Redactor
from agent.observability.metrics import AgentMetrics
from agent.protocol.auth import RequestSigner, TokenSource
from agent.protocol.client import ControlPlaneClient
from agent.runtime.connection import Connection
from agent.runtime.executor import UNWIND_SECONDS, Executor, Slots, TaskCheck
from agent.runtime.health import HealthPolicy
from agent.runtime.outbox import open_outbox
from agent.runtime.poller import Poller
from agent.runtime.reporter import Reporter
from agent.runtime.settings import AgentSettings, ca_files
from agent.runtime.state import AgentState
from agent.taskapi import TaskHandler

log = structlog.get_logger("agent")

#: Minimum time kept for flushing results and deregistering, even after a long drain.
FLUSH_SECONDS = 3.0
#: Exit code when the watchdog has to end a shutdown that hangs.
HARD_EXIT_CODE = 70
#: Net new container objects between young garbage collections, once warm (CPython: 700).
GC_YOUNG_OBJECTS = 10_000


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        handlers: Sequence[TaskHandler],
        redactor: Redactor | None = None,
        metrics: AgentMetrics | None = None,
        task_check: TaskCheck | None = None,
        watchdog: bool = True,
        unused_env: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.settings = settings
        #: (variable, why) of the Harness variables set that mean nothing here (named once at startup).
        self.unused_env = tuple(unused_env)
        self.handlers: dict[str, TaskHandler] = {}
        for handler in handlers:
            if handler.task_type in self.handlers:
                raise ValueError(f"two handlers for the task type {handler.task_type!r}")
            self.handlers[handler.task_type] = handler
        self.redactor = redactor if redactor is not None else Redactor()
        self.metrics = metrics or AgentMetrics(name=settings.name)
        self.state = AgentState(
            name=settings.name,
            tags=settings.tags,
            capacity=settings.capacity,
            instance_id=f"{settings.name}-{uuid.uuid4().hex[:12]}",
        )
        self._task_check = task_check
        self._watchdog_enabled = watchdog
        self._watchdog: threading.Timer | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._ran = False
        self._stopped = asyncio.Event()
        self._background: asyncio.Task[int] | None = None
        self.started = asyncio.Event()
        self.http_url = ""
        for secret in settings.secrets():
            self.redactor.add(secret)

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        """Run in the background; returns once the loops are up (or raises why they are not)."""
        self._background = asyncio.create_task(self.run(), name="agent")
        started = asyncio.create_task(self.started.wait())
        await asyncio.wait({self._background, started}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if self._background.done():
            self._background.result()  # the start failed: raise it here
            raise RuntimeError("the agent stopped before it started")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()
        if self._background is not None:
            await asyncio.gather(self._background, return_exceptions=True)

    async def shutdown(self) -> None:
        """Drain and stop, and return once stopped. Safe to call twice, or before :meth:`run`."""
        if not self._ran:
            self._ran = True  # never started: nothing to drain, and it may not start now
            self._stopped.set()
            return
        self.request_shutdown()
        await self._stopped.wait()

    # --- signals -----------------------------------------------------------------------------

    def request_shutdown(self) -> None:
        """First call drains; the second cancels at once. Safe from a signal handler."""
        if self._stop.is_set():
            if not self._force.is_set():
                log.warning("agent.shutdown_forced", hint="second signal: cancelling running tasks now")
            self._force.set()
            return
        self._stop.set()
        if self._watchdog_enabled:
            self._start_watchdog()

    def _start_watchdog(self) -> None:
        limit = self.settings.drain_timeout + self.settings.shutdown_grace

        def fire() -> None:
            sys.stderr.write(f"delegate-agent: shutdown did not finish within {limit:.0f}s; exiting hard\n")
            sys.stderr.flush()
            os._exit(HARD_EXIT_CODE)

        timer = threading.Timer(limit, fire)
        timer.daemon = True
        timer.start()
        self._watchdog = timer

    def _cancel_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    # --- run ---------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until asked to stop; returns the process exit code. An Agent runs once."""
        if self._ran:
            raise RuntimeError("this Agent has already run (or was shut down); make a new one")
        self._ran = True
        stack = contextlib.AsyncExitStack()
        try:
            code = await self._run(stack)
        finally:
            try:
                await stack.aclose()
            except Exception:
                # Every other close has run; one that failed is worth a line, not a traceback at exit.
                log.exception("agent.close_failed")
            self._stopped.set()
        log.info("agent.stopped", exit_code=code)
        return code

    async def _run(self, stack: contextlib.AsyncExitStack) -> int:
        """Open everything in order, each close entered at once; the stack closes them in reverse."""
        s = self.settings
        loop = asyncio.get_running_loop()
        stack.callback(self._cancel_watchdog)
        outbox = open_outbox(s.data_dir, on_quarantine=self.metrics.outbox_quarantined.inc)
        stack.callback(outbox.close)
        if not outbox.durable:
            log.warning(
                "agent.outbox_in_memory",
                hint="results not yet delivered are lost if the delegate stops; set AGENT_DATA_DIR to keep them",
            )
        elif len(outbox):
            log.info("agent.outbox_replay", pending=len(outbox), path=str(s.data_dir))
        slots = Slots(s.capacity)
        self.metrics.sample(
            capacity=s.capacity,
            busy=lambda: slots.busy,
            reserved=lambda: slots.polling,
            running=lambda: len(self.state.running),
            outbox=lambda: len(outbox),
            outbox_fault=lambda: outbox.fault is not None,
            last_heartbeat=lambda: self.state.last_heartbeat_wall,
        )
        probes = HealthPolicy(
            state=self.state,
            now=loop.time,
            busy=lambda: slots.busy,
            outbox_depth=lambda: len(outbox),
            outbox_durable=outbox.durable,
            outbox_fault=lambda: outbox.fault,
            control_plane=s.control_plane.url,
        )
        limits = ConnectionLimits(s.http_header_timeout, s.http_keepalive_timeout, s.http_max_connections)
        http = HealthServer(
            probes=probes, registry=self.metrics.registry, host=s.http_host, port=s.http_port, limits=limits
        )
        stack.push_async_callback(http.stop)
        self.http_url = await http.start()
        proxy = s.control_plane_proxy()
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl_context(), limit=s.capacity + 8),
            proxy=proxy,
        )
        proxy_headers = None
        if proxy and s.proxy_user:
            proxy_headers = {"Proxy-Authorization": aiohttp.encode_basic_auth(s.proxy_user, s.proxy_password or "")}
        stack.push_async_callback(session.close)
        stack.push_async_callback(self._close_handlers)
        token = (
            TokenSource(path=s.token_file, on_read=self.redactor.pin)
            if s.token_file
            else TokenSource(value=s.token or "", on_read=self.redactor.pin)
        )
        signer = RequestSigner(token, audience=s.control_plane.audience, issuer=s.name)
        client = ControlPlaneClient(
            session,
            s.control_plane.url,
            signer,
            observer=self.metrics.observe_request,
            request_timeout=s.control_plane.request_timeout,
            proxy_headers=proxy_headers,
        )
        executor = Executor(
            handlers=self.handlers,
            client=client,
            outbox=outbox,
            slots=slots,
            state=self.state,
            metrics=self.metrics,
            redact=self.redactor.value,
            check=self._task_check,
        )
        connection = Connection(
            client=client,
            state=self.state,
            metrics=self.metrics,
            task_types=executor.task_types,
            free_slots=lambda: slots.free,
            in_flight=lambda: executor.in_flight,
            cancel=executor.cancel,
        )
        poller = Poller(
            client=client,
            connection=connection,
            executor=executor,
            slots=slots,
            state=self.state,
            outbox_fault=lambda: outbox.fault,
        )
        reporter = Reporter(client=client, outbox=outbox, state=self.state, metrics=self.metrics)
        log.info("agent.starting", version=__version__, endpoints=self.http_url, settings=s.describe())
        self._warn_unused_env()
        if s.control_plane.allow_insecure:
            log.warning(
                "agent.insecure_control_plane_allowed",
                url=s.control_plane.url,
                plaintext=s.control_plane.plaintext_remote,
                hint="AGENT_ALLOW_INSECURE=true: the delegate token and task credentials may cross the network "
                "unencrypted; use an https:// control plane and unset it",
            )
        await self._warm()
        if self._stop.is_set():  # asked to stop while warming up: nothing is running yet
            return 0
        roots = {
            "connection": _guarded("connection", connection.run()),
            "poller": _guarded("poller", poller.run()),
            "reporter": _guarded("reporter", reporter.run()),
        }
        stack.push_async_callback(_cancel_all, list(roots.values()))
        self.started.set()
        code = 0
        stop = asyncio.create_task(self._stop.wait(), name="stop-request")
        done, _ = await asyncio.wait({stop, *roots.values()}, return_when=asyncio.FIRST_COMPLETED)
        if stop not in done:
            failed = [name for name, t in roots.items() if t in done]
            log.error("agent.root_task_ended", tasks=failed, hint="a bug: shutting down so Kubernetes restarts us")
            code = 1
            self._stop.set()
        stop.cancel()
        await self._shutdown(roots, connection, poller, reporter, executor)
        return code

    async def _shutdown(
        self,
        roots: dict[str, asyncio.Task[None]],
        connection: Connection,
        poller: Poller,
        reporter: Reporter,
        executor: Executor,
    ) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        started = loop.time()
        drain_until = started + s.drain_timeout
        # 1. drain: readiness flips now; the server hears "draining" at once and stops handing us work.
        self.state.draining = True
        self.metrics.draining.set(1)
        log.info("agent.draining", running=len(executor.in_flight), drain_timeout=s.drain_timeout)
        connection.wake()
        poller.stop()
        roots["poller"].cancel()
        await asyncio.gather(roots["poller"], return_exceptions=True)
        # 2. wait for running tasks (or a second signal).
        if executor.in_flight and not self._force.is_set():
            force = asyncio.create_task(self._force.wait())
            idle = asyncio.create_task(executor.wait_idle(drain_until - loop.time()))
            await asyncio.wait({force, idle}, return_when=asyncio.FIRST_COMPLETED)
            force.cancel()
            idle.cancel()
        # 3. stop what remains and give it back, so another delegate runs it.
        if executor.in_flight:
            stopped = executor.give_back_all("the delegate is shutting down")
            log.warning("agent.giving_back_tasks", count=stopped, hint="the control plane re-queues them")
            # As long as before giving back existed: the shutdown grace is not stretched. A release
            # still in flight after this goes on meanwhile, and deregistering hands back what it misses.
            await executor.wait_idle(UNWIND_SECONDS)
        # 4. flush the outbox.
        reporter.stop()
        await asyncio.gather(roots["reporter"], return_exceptions=True)
        budget = max(FLUSH_SECONDS, drain_until + s.shutdown_grace / 2 - loop.time())
        if not await reporter.flush(budget):
            log.warning(
                "agent.results_undelivered",
                pending=reporter.undelivered,
                kept="in the durable outbox" if reporter.durable else "lost (memory outbox)",
            )
        # 5. deregister (after the flush, so results arrive while the lease is ours).
        connection.stop()
        await asyncio.gather(roots["connection"], return_exceptions=True)
        await asyncio.shield(connection.deregister())
        log.info("agent.drained", seconds=round(loop.time() - started, 3))

    # --- helpers -----------------------------------------------------------------------------

    def _warn_unused_env(self) -> None:
        """Name, once, the Harness variables that were set but mean nothing here; INIT_SCRIPT on its own."""
        unused = dict(self.unused_env)
        if unused.pop("INIT_SCRIPT", None) is not None:
            log.warning("agent.init_script_not_run", hint="install what you need in the image instead")
        if unused:
            log.warning("agent.harness_variables_ignored", names=sorted(unused), reasons=unused)

    def _ssl_context(self) -> ssl.SSLContext | bool:
        cp = self.settings.control_plane
        custom = cp.ca_file or self.settings.additional_ca_path or (cp.client_cert_file and cp.client_key_file)
        if not cp.url.startswith("https://") or not custom:
            # aiohttp's own verifying context (the system's trust store, as create_default_context):
            # a second identical one would cost 2 MiB for the CA certificates it parses.
            return True
        ctx = ssl.create_default_context(cafile=str(cp.ca_file) if cp.ca_file else None)
        if self.settings.additional_ca_path is not None:
            for pem in ca_files(self.settings.additional_ca_path):
                ctx.load_verify_locations(cafile=str(pem))
        if cp.client_cert_file is not None and cp.client_key_file is not None:
            ctx.load_cert_chain(cp.client_cert_file, cp.client_key_file)
        return ctx

    async def _warm(self) -> None:
        for handler in self.handlers.values():
            started = time.perf_counter()
            await handler.warm()
            log.info(
                "agent.handler_warmed", task_type=handler.task_type, ms=round((time.perf_counter() - started) * 1000)
            )

    async def _close_handlers(self) -> None:
        """Close every handler, even when one fails to (it is logged, and the rest still close)."""
        for handler in self.handlers.values():
            try:
                await handler.aclose()
            except Exception:
                log.exception("agent.handler_close_failed", task_type=handler.task_type)


async def serve(agent: Agent) -> int:
    """Run ``agent`` as a process's main job: SIGTERM and SIGINT request the shutdown ladder.

    The handlers only call :meth:`Agent.request_shutdown`; as PID 1 in a container, handling
    SIGTERM ourselves is what makes the pod stop gracefully instead of waiting to be killed.
    """
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.request_shutdown)
    freeze = asyncio.create_task(_freeze_when_started(agent), name="gc-freeze")
    try:
        return await agent.run()
    finally:
        freeze.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _freeze_when_started(agent: Agent) -> None:
    """Once warm, move what start-up built out of the garbage collector's reach.

    Modules, models, clients and settings live as long as the process; left in the oldest
    generation, every full collection walks them all again, and a full collection stalls the event
    loop: with the pickup of every task that arrives meanwhile (docs/performance.md, issue 20).
    Only a process's main job does this: frozen objects are never freed, fine for what lives as
    long as the process, a leak for an embedding application or a test suite that runs many agents.
    """
    await agent.started.wait()
    gc.collect()
    gc.freeze()
    # A young collection every 700 net new objects (CPython's default) ran ~230 times per 1,000
    # validations at once, each walking the in-flight ones, 0.23-0.33 ms of CPU per validation in
    # all; every 10,000 it is 0.06-0.09 ms (docs/performance.md). Garbage without cycles is freed
    # by reference counting either way; at a steady rate few objects outlive a task, so collections
    # stay rare and short.
    gc.set_threshold(GC_YOUNG_OBJECTS, *gc.get_threshold()[1:])
    _trim_heap()


def _trim_heap() -> None:
    """Hand the start-up's freed heap back to the system (glibc keeps it otherwise): about 1 MiB."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return
    trim(0)


def _guarded(name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """A root task that logs how it ended: failing or returning early is a bug worth a line."""

    async def guard() -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("agent.root_task_failed", task=name)
            raise

    return asyncio.create_task(guard(), name=name)


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
