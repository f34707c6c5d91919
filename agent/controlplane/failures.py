"""The refusals the control plane's logic raises, and the failures it decides for a task itself."""

from __future__ import annotations

from collections.abc import Iterable

from agent.protocol.models import Problem
from agent.protocol.results import ValidationResult, failure_result


class ApiFailure(Exception):
    """A request the control plane refuses; the HTTP layer turns it into an error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        problems: Iterable[Problem] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.problems = list(problems)
        self.retry_after = retry_after


def failure_document(message: str, *, reason: str) -> ValidationResult:
    """A failure decided here (no delegate, lease lost, cancelled), in the result every side reads."""
    step = "delegate_selection" if reason == "no_eligible_delegate" else "control_plane"
    return failure_result(reason, message, step=step)
