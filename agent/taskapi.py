"""The contract between the delegate's executor and the task handlers it runs.

The runtime imports this; task implementations (the AWS validator) import this; neither imports
the other. A handler gets a :class:`TaskContext` and returns a
:class:`~agent.protocol.results.ValidationResult`. A payload it cannot use is an
:class:`InvalidTask` naming the field, which the executor turns into a FAILURE result, and the
delegate carries on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.protocol.results import ValidationResult


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
    #: The control plane's OIDC token for this task (OidcAuthentication connectors), a bearer secret.
    oidc_token: str | None = field(default=None, repr=False)


class InvalidTask(Exception):
    """The payload cannot be used: ``field`` says where, the message says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class TaskHandler(Protocol):
    """Runs one task type. Must not raise for expected failures: return a FAILURE result.

    The Agent calls :meth:`warm` once before it asks for work (so the first task does not pay
    for loading models or opening pools) and :meth:`aclose` once when it stops, even after a
    failed start.
    """

    @property
    def task_type(self) -> str: ...

    async def warm(self) -> None: ...

    async def aclose(self) -> None: ...

    async def __call__(self, ctx: TaskContext) -> ValidationResult: ...
