"""A connector in words: ``connector get``'s YAML with its health as comments, printed by the CLI and
shown by the console (one copy of both).

Imports nothing of ours at run time, and YAML only to print one: the CLI's quick commands use it too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.protocol.models import ConnectorHealth, ConnectorRecord


def connector_yaml(record: ConnectorRecord, now: datetime, paint: Callable[[str], str] = str) -> str:
    """The connector as Harness YAML (it applies as it is), then its health and last test as comments."""
    import yaml  # noqa: PLC0415 (here, not at the top: `connector list` uses this module's words without YAML)

    extra = []
    if record.last_test:
        t = record.last_test
        text = f"{t.status} at {t.tested_at:%Y-%m-%d %H:%M:%S}Z: `delegate-agent tasks get {t.task_id}` shows it"
        if t.stale:
            text += "; that test ran an earlier version of the spec: test it again"
        extra.append(("last test", text))
    body = yaml.safe_dump(record.connector, sort_keys=False).rstrip()
    return "\n".join([body, *comment_block(health_lines(record.health, now, extra), paint)])


def comment_block(lines: Sequence[tuple[str, str]], paint: Callable[[str], str] = str) -> list[str]:
    """``# health:`` and the lines under it, labels aligned; ``paint`` colours the status (a terminal's)."""
    width = max(len(label) for label, _ in lines) + 1
    return ["# health:"] + [
        f"#   {label + ':':<{width}} {paint(value) if label == 'status' else value}" for label, value in lines
    ]


def health_lines(
    health: ConnectorHealth, now: datetime, extra: Sequence[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """The health block as (label, text) lines: status, when tested and connected, the failure and its
    hint, the delegate, the failures in a row, the schedule; then ``extra``."""
    lines: list[tuple[str, str]] = [
        ("status", health.status + (" (a test is queued or running)" if health.testing else "")),
        ("tested at", moment(health.tested_at, now) or "never"),
        ("last connected", moment(health.last_connected_at, now) or "never"),
    ]
    if health.error_summary:
        lines.append(("error", one_line(health.error_summary, 1000)))
    failure = health.failure
    if failure is not None:
        code = f", AWS {failure.aws_error_code}" if failure.aws_error_code else ""
        lines.append(("failed at", f"{failure.step} ({failure.category}{code})"))
        if failure.hint:
            lines.append(("hint", one_line(failure.hint, 1000)))
    lines.append(("delegate", health.delegate_name or "-"))
    if health.failures_in_row:
        since = moment(health.failing_since, now)
        lines.append(("failures in a row", f"{health.failures_in_row}" + (f", since {since}" if since else "")))
    lines.append(("test interval", schedule_text(health)))
    lines.append(("next test", moment(health.next_test_at, now) or "not scheduled"))
    lines.extend(extra)
    return lines


def schedule_text(health: ConnectorHealth) -> str:
    if health.test_interval_seconds <= 0:
        return "off (no scheduled tests)"
    text = f"every {span(health.test_interval_seconds)}"
    if health.backoff_seconds > health.test_interval_seconds:
        text += f"; backing off to {span(health.backoff_seconds)} while the same failure repeats"
    return text


def utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def span(seconds: float) -> str:
    """A duration as people say it: ``45s``, ``4m``, ``1h30m``, ``2d``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d{h}h" if h else f"{d}d"


def ago(when: datetime, now: datetime) -> str:
    """``4m ago`` (``just now`` under a second, ``in 2m`` for the future)."""
    seconds = (now - utc(when)).total_seconds()
    if abs(seconds) < 1:
        return "just now"
    return f"{span(seconds)} ago" if seconds > 0 else f"in {span(-seconds)}"


def moment(when: datetime | None, now: datetime) -> str | None:
    """``2026-05-01 10:42:03Z (4m ago)``, or None for no time."""
    if when is None:
        return None
    return f"{utc(when):%Y-%m-%d %H:%M:%S}Z ({ago(when, now)})"


def one_line(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "\u2026"
