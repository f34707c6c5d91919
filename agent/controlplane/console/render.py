"""Templates and the words the console shows for times and statuses.

Plain Jinja2 rather than aiohttp-jinja2: rendering is one call (``env.get_template(...).render``),
which the wrapper would only hide, and one dependency fewer. Autoescaping is on for every
template, and an undefined name is an error rather than an empty string.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import jinja2

from agent._connector_text import utc
from agent.protocol.models import ConnectorHealth

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("agent.controlplane.console", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def render(template: str, **context: Any) -> str:
    return _env.get_template(template).render(**context)


def ago(when: datetime | None, now: datetime) -> str:
    """``4 min ago``, ``2 h ago``, ``just now``; ``never`` for no time."""
    if when is None:
        return "never"
    seconds = (now - utc(when)).total_seconds()
    if seconds < 0:
        return "in " + _span(-seconds)
    if seconds < 5:
        return "just now"
    return _span(seconds) + " ago"


def moment(when: datetime | None) -> str:
    """``2026-05-01 10:42:03 UTC``, or an empty string."""
    return "" if when is None else f"{utc(when):%Y-%m-%d %H:%M:%S} UTC"


def status_text(health: ConnectorHealth, now: datetime) -> str:
    """The status cell: ``Success, 4 min ago``, ``Failed 3x, 12 min ago``, ``Never tested``, ``Testing…``."""
    if health.testing:
        return "Testing\u2026"
    if health.status == "FAILURE":
        return f"Failed {max(health.failures_in_row, 1)}x, {ago(health.tested_at, now)}"
    if health.status == "SUCCESS":
        return f"Success, {ago(health.tested_at, now)}"
    return "Never tested" if health.tested_at is None else f"Unknown, {ago(health.tested_at, now)}"


def status_class(health: ConnectorHealth) -> str:
    """The CSS class of the status dot (the text beside it says the same: never colour alone)."""
    if health.testing:
        return "testing"
    return {"SUCCESS": "success", "FAILURE": "failure"}.get(health.status, "unknown")


def _span(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h"
    return f"{s // 86400} d"
