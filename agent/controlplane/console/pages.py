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

from agent.aws.connector import ConnectorInvalid, parse_connector
from agent.controlplane.console import render
from agent.controlplane.console.security import Refusal, safe_next, see_other
from agent.controlplane.console.session import Session
from agent.protocol.models import ConnectorRecord, TestRequest

if TYPE_CHECKING:
    from agent.controlplane.console.web import Console

#: The statuses the list filters by (the API's connectivity statuses).
STATUSES = ("SUCCESS", "FAILURE", "UNKNOWN")
#: Test history rows on a connector page.
HISTORY_ROWS = 20


@dataclass(frozen=True)
class ConnectorRow:
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


def connector_row(record: ConnectorRecord, now: datetime) -> ConnectorRow:
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
    return ConnectorRow(
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


def add_pages(console: Console, app: web.Application) -> None:
    r = app.router
    g = console.guard

    async def connectors(request: web.Request, session: Session) -> web.StreamResponse:
        status = request.query.get("status", "")
        if status and status not in STATUSES:
            raise Refusal(400, "Invalid filter", f"status must be one of {', '.join(STATUSES)}, not {status[:40]!r}")
        query = request.query.get("q", "").strip()[:200]
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
            here=request.path_qs,
        )

    def row_fragment(record: ConnectorRecord, session: Session) -> web.Response:
        return console.html("_connector_row.html", session, row=connector_row(record, console.now()), here=HOME_LIST)

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

    r.add_get("/console/connectors", g(connectors), name="console_connectors")
    r.add_get("/console/connectors/{identifier}/row", g(row), name="console_connector_row")
    r.add_post("/console/connectors/{identifier}/test", g(test, post=True), name="console_connector_test")


HOME_LIST = "/console/connectors"


async def _record(console: Console, request: web.Request) -> ConnectorRecord:
    row = await console.cp.get_connector(request.match_info["identifier"])
    return await console.cp.connector_record(row)
