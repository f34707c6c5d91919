"""The contract between the delegate's executor and the task handlers it runs.

The runtime imports this; task implementations (the AWS validator) import this; neither imports
the other. A handler gets a :class:`TaskContext` and returns a :class:`TaskOutcome`. A payload it
cannot use is an :class:`InvalidTask` naming the field, which the executor turns into a FAILURE
result, and the delegate carries on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

Status = Literal["SUCCESS", "FAILURE"]


@dataclass(frozen=True)
class TaskContext:
    task_id: str
    type: str
    payload: Mapping[str, Any]
    delegate_id: str
    delegate_name: str
    #: Seconds the handler may take in total (the executor enforces it too).
    timeout: float
    attempt: int = 1


@dataclass(frozen=True)
class TaskOutcome:
    status: Status
    #: The result document sent to the control plane (Harness's connector validation shape).
    output: dict[str, Any] = field(default_factory=dict)


class InvalidTask(Exception):
    """The payload cannot be used: ``field`` says where, the message says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class TaskHandler(Protocol):
    """Runs one task type. Must not raise for expected failures: return a FAILURE outcome."""

    task_type: str

    async def __call__(self, ctx: TaskContext) -> TaskOutcome: ...


def failure_output(
    category: str,
    message: str,
    *,
    step: str,
    hint: str | None = None,
    problems: list[tuple[str, str]] | None = None,
    delegate_id: str | None = None,
    delegate_name: str | None = None,
) -> dict[str, Any]:
    """A FAILURE result in the same shape as a connector validation, for failures around a handler."""
    errors = [{"reason": category, "message": f"{f}: {m}", "code": category} for f, m in (problems or [])]
    return {
        "status": "FAILURE",
        "testedAt": datetime.now(UTC).isoformat(),
        "delegateId": delegate_id,
        "delegateName": delegate_name,
        "errorSummary": message,
        "errors": errors or [{"reason": category, "message": message, "code": category}],
        "failure": {"step": step, "category": category, "awsErrorCode": None, "hint": hint},
        "steps": [],
    }
