"""The console's pages: connectors, one connector, delegates. Reads and changes go through the core.

Each view model below is built from the records the JSON API serves (``connector_records``,
``connector_history``, ``delegate_views``) and the connector parser the control plane uses; none
of them decides anything the API does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING
from urllib.parse import quote

from aiohttp import web

from agent._connector_text import connector_yaml, health_lines
from agent.aws.connector import ConnectorInvalid, parse_connector
from agent.controlplane.console import render
from agent.controlplane.console.security import HOME, ConsoleRefusal, safe_next, see_other
from agent.controlplane.console.session import Session
from agent.protocol.models import ConnectorRecord, HistoryEntry, TestRequest
from agent.protocol.patterns import CONNECTOR_IDENTIFIER_RE

if TYPE_CHECKING:
    from agent.controlplane.console.web import Console

#: The statuses the list filters by (the API's connectivity statuses).
STATUSES = ("SUCCESS", "FAILURE", "UNKNOWN")
#: Test history rows on a connector page.
HISTORY_ROWS = 20


@dataclass(frozen=True)
class ConnectorLine:
    """One line of the connectors list (and the fragment htmx swaps after a test)."""

    identifier: str
    name: str
    type: str
    credential: str
    region: str
    selectors: str
    status: str
    status_class: str
    status_text: str
    status_title: str
    last_connected: str
    last_connected_at: str
    delegate: str
    testing: bool


def connector_row(record: ConnectorRecord, now: datetime) -> ConnectorLine:
    health = record.health
    try:
        parsed = parse_connector(record.connector)
        credential: str = parsed.credential_type
        region = parsed.region
        selectors = ", ".join(parsed.delegate_selectors) or ("platform" if not parsed.execute_on_delegate else "any")
    except ConnectorInvalid:
        credential, region, selectors = "(unreadable)", "", ""
    title = health.error_summary or ""
    if health.failure is not None and health.failure.hint:
        title = f"{title} ({health.failure.hint})" if title else health.failure.hint
    return ConnectorLine(
        identifier=record.identifier,
        name=record.name,
        type=str(record.connector.get("connector", {}).get("type", "Aws")),
        credential=str(credential),
        region=region,
        selectors=selectors,
        status=health.status,
        status_class=render.status_class(health),
        status_text=render.status_text(health, now),
        status_title=title or render.status_text(health, now),
        last_connected=render.ago(health.last_connected_at, now),
        last_connected_at=render.moment(health.last_connected_at),
        delegate=health.delegate_name or "",
        testing=health.testing,
    )


@dataclass(frozen=True)
class HistoryLine:
    """One finished test on a connector's page."""

    status: str
    status_class: str
    tested_at: str
    tested_ago: str
    trigger: str
    delegate: str
    step: str
    aws_code: str
    hint: str
    error: str


def history_row(entry: HistoryEntry, now: datetime) -> HistoryLine:
    failure = entry.failure
    return HistoryLine(
        status=entry.status.capitalize(),
        status_class={"SUCCESS": "success", "FAILURE": "failure"}.get(entry.status, "unknown"),
        tested_at=render.moment(entry.tested_at),
        tested_ago=render.ago(entry.tested_at, now),
        trigger=entry.trigger,
        delegate=entry.delegate_name or "",
        step=failure.step if failure else "",
        aws_code=(failure.aws_error_code or "") if failure else "",
        hint=(failure.hint or "") if failure else "",
        error=entry.error_summary or "",
    )


#: Delegate states as the page says them (the API's words: lost is a delegate that went silent).
STATE_WORDS = {
    "running": "connected",
    "draining": "draining",
    "deregistered": "disconnected",
    "lost": "disconnected (lost)",
}


@dataclass(frozen=True)
class DelegateLine:
    name: str
    hostname: str
    tags: list[str]
    state: str
    state_class: str
    version: str
    running: int
    capacity: int
    last_heartbeat: str
    last_heartbeat_at: str
    connected: bool
    #: (identifier, name) of each connector whose tests it may pick up now.
    connectors: list[tuple[str, str]]


def add_pages(console: Console, app: web.Application) -> None:
    r = app.router
    g = console.guard

    async def connectors(request: web.Request, session: Session) -> web.StreamResponse:
        status = request.query.get("status", "")
        if status and status not in STATUSES:
            wanted = ", ".join(STATUSES)
            raise ConsoleRefusal(400, "Invalid filter", f"status must be one of {wanted}, not {status[:40]!r}")
        query = request.query.get("q", "").strip()[:200]
        # Only an identifier: a link's ?deleted= must not put a sentence of its author's in the page.
        deleted = request.query.get("deleted", "")
        if not CONNECTOR_IDENTIFIER_RE.match(deleted):
            deleted = ""
        now = console.now()
        rows = [connector_row(rec, now) for rec in await console.cp.connector_records()]
        total = len(rows)
        if status:
            rows = [row for row in rows if row.status == status]
        if query:
            needle = query.lower()
            rows = [row for row in rows if needle in row.name.lower() or needle in row.identifier.lower()]
        return console.html(
            "connectors.html",
            session,
            title="Connectors",
            rows=rows,
            total=total,
            status_filter=status,
            statuses=STATUSES,
            q=query,
            deleted=deleted,
            here=request.path_qs,
        )

    def row_fragment(record: ConnectorRecord, session: Session) -> web.Response:
        return console.html("_connector_row.html", session, row=connector_row(record, console.now()), here=HOME)

    async def row(request: web.Request, session: Session) -> web.StreamResponse:
        return row_fragment(await _record(console, request), session)

    async def test(request: web.Request, session: Session) -> web.StreamResponse:
        identifier = request.match_info["identifier"]
        # wait_seconds=0: the test runs on a delegate while the page polls the row; a platform test
        # (executeOnDelegate: false) ends inside this call.
        await console.cp.test_connector(identifier, TestRequest(wait_seconds=0))
        if request.headers.get("HX-Request"):
            return row_fragment(await _record(console, request), session)
        form = await request.post()
        back = form.get("next")
        return see_other(safe_next(back if isinstance(back, str) else None, f"/console/connectors/{quote(identifier)}"))

    async def connector(request: web.Request, session: Session) -> web.StreamResponse:
        record = await _record(console, request)
        history = await console.cp.connector_history(record.identifier, HISTORY_ROWS)
        now = console.now()
        return console.html(
            "connector.html",
            session,
            title=record.name,
            row=connector_row(record, now),
            record=record,
            yaml=connector_yaml(record, now),
            facts=health_lines(record.health, now),
            history=[history_row(entry, now) for entry in history.entries],
            here=request.path,
        )

    async def confirm_delete(request: web.Request, session: Session) -> web.StreamResponse:
        record = await _record(console, request)
        return console.html("delete.html", session, title=f"Delete {record.name}", record=record)

    async def delete(request: web.Request, session: Session) -> web.StreamResponse:
        identifier = request.match_info["identifier"]
        await console.cp.delete_connector(identifier)
        return see_other(f"{HOME}?deleted={quote(identifier)}")

    async def delegates(request: web.Request, session: Session) -> web.StreamResponse:
        views = await console.cp.delegate_views()
        servable = await console.cp.servable_connectors()
        names = {rec.identifier: rec.name for rec in await console.cp.connector_records()}
        now = console.now()
        rows = [
            DelegateLine(
                name=v.name,
                hostname=v.hostname or "",
                tags=[t for t in v.tags if t != v.name.lower()],
                state=STATE_WORDS.get(v.state, v.state),
                state_class=v.state,
                version=v.version,
                running=v.in_flight,
                capacity=v.capacity,
                last_heartbeat=render.ago(v.last_heartbeat_at, now),
                last_heartbeat_at=render.moment(v.last_heartbeat_at),
                connected=v.delegate_id in servable,
                connectors=[(i, names.get(i, i)) for i in servable.get(v.delegate_id, [])],
            )
            for v in sorted(views, key=lambda v: (v.state not in ("running", "draining"), v.name))
        ]
        return console.html("delegates.html", session, title="Delegates", nav="delegates", rows=rows)

    r.add_get("/console/connectors", g(connectors), name="console_connectors")
    r.add_get("/console/connectors/{identifier}", g(connector), name="console_connector")
    r.add_get("/console/connectors/{identifier}/delete", g(confirm_delete), name="console_connector_delete_form")
    r.add_post("/console/connectors/{identifier}/delete", g(delete, post=True), name="console_connector_delete")
    r.add_get("/console/delegates", g(delegates), name="console_delegates")
    r.add_get("/console/connectors/{identifier}/row", g(row), name="console_connector_row")
    r.add_post("/console/connectors/{identifier}/test", g(test, post=True), name="console_connector_test")


async def _record(console: Console, request: web.Request) -> ConnectorRecord:
    row = await console.cp.get_connector(request.match_info["identifier"])
    return await console.cp.connector_record(row)
