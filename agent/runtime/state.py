"""What the delegate knows about itself right now; read by health checks, /status and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.protocol.models import Intervals

DEFAULT_INTERVALS = Intervals(heartbeat_seconds=10.0, poll_wait_seconds=20.0, lease_seconds=30.0)


@dataclass
class RunningTask:
    task_id: str
    type: str
    lease_id: str
    started: float  # loop time
    attempt: int


@dataclass
class AgentState:
    """Mutable on purpose: one owner (the Agent) and its loops update it, everyone else reads."""

    name: str
    tags: tuple[str, ...]
    capacity: int
    instance_id: str
    delegate_id: str | None = None
    registered: bool = False
    draining: bool = False
    #: Set while the control plane refuses our token; the reason, in words.
    auth_error: str | None = None
    intervals: Intervals = DEFAULT_INTERVALS
    #: Loop time of the last answer from the control plane (any call), and of the last heartbeat.
    last_contact: float | None = None
    last_heartbeat: float | None = None
    #: Wall-clock time of the last contact, for /status; of the last acknowledged heartbeat, for metrics.
    last_contact_wall: float | None = None
    last_heartbeat_wall: float | None = None
    #: Loop time the poll loop last made progress (or None before it started).
    poll_progress: float | None = None
    #: True while the poll loop waits for a free slot (idle by design, not stuck).
    waiting_for_slots: bool = False
    consecutive_failures: int = 0
    #: Why the last heartbeat failed (cleared by the next that succeeds), for the readiness reason.
    last_error: str | None = None
    running: dict[str, RunningTask] = field(default_factory=dict)

    def contact(self, now: float, wall: float) -> None:
        self.last_contact = now
        self.last_contact_wall = wall
        self.consecutive_failures = 0
        self.last_error = None
        self.auth_error = None

    def summary(self) -> dict[str, Any]:
        return {"delegateId": self.delegate_id, "registered": self.registered, "draining": self.draining}
