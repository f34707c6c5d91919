"""What "alive", "ready" and "status" mean for the delegate: the policy behind its probes.

The HTTP server in :mod:`agent.observability.http` only serves what these functions decide, so
the policy lives with the state it reads and the server knows nothing of the runtime.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent._version import __version__
from agent.runtime.state import AgentState

#: The poll loop is considered stuck when it made no progress for this long while it should have.
STUCK_AFTER_SECONDS = 300.0


@dataclass(frozen=True)
class HealthPolicy:
    """Reads the delegate's state on every probe; ``now`` is the event loop's clock."""

    state: AgentState
    now: Callable[[], float]
    busy: Callable[[], int]
    outbox_depth: Callable[[], int]
    outbox_durable: bool
    control_plane: str
    #: Why results cannot be written to disk now (the delegate takes no new work), or None.
    outbox_fault: Callable[[], str | None] = lambda: None

    def liveness_problems(self) -> list[str]:
        """Why a restart would help; waiting for a free slot or for the control plane is not stuck."""
        s = self.state
        if s.poll_progress is None or s.waiting_for_slots or not s.registered:
            return []
        stale = self.now() - s.poll_progress
        if stale > STUCK_AFTER_SECONDS:
            return [f"the poll loop has made no progress for {stale:.0f}s"]
        return []

    def readiness_problems(self) -> list[str]:
        """Why this delegate should not be counted as serving: draining, refused, unregistered, cut off."""
        s = self.state
        problems = []
        if s.draining:
            problems.append("draining: shutting down")
        if s.auth_error:
            problems.append(f"the control plane refuses our token: {s.auth_error}")
        fault = self.outbox_fault()
        if fault is not None:
            problems.append(f"taking no new work: {fault}")
        if not s.registered:
            problems.append("not registered with the control plane")
        if s.last_contact is not None:
            silent = self.now() - s.last_contact
            allowed = max(3 * s.intervals.heartbeat_seconds, 30.0)
            if silent > allowed:
                last = f" (last: {s.last_error})" if s.last_error else ""
                problems.append(f"no answer from the control plane for {silent:.0f}s{last}")
        return problems

    def status(self) -> dict[str, Any]:
        """The /status document for people: name, tags, state, tasks in flight, outbox; no secrets.

        It is served without authentication on the probe port, so it leaves out what identifies this
        process to the control plane (its delegateId and instanceId): the delegate logs its delegateId
        when it registers, and ``delegate-agent delegates list`` shows both to API-key holders.
        """
        s = self.state
        now = self.now()
        if s.draining:
            phase = "draining"
        elif s.auth_error:
            phase = "auth_refused"
        elif s.registered:
            phase = "running"
        else:
            phase = "registering"
        return {
            "version": __version__,
            "name": s.name,
            "tags": list(s.tags),
            "state": phase,
            "registered": s.registered,
            "draining": s.draining,
            "authError": s.auth_error,
            "controlPlane": self.control_plane,
            "capacity": s.capacity,
            "busySlots": self.busy(),
            "inFlight": [
                {"taskId": t.task_id, "type": t.type, "attempt": t.attempt, "runningSeconds": round(now - t.started, 3)}
                for t in s.running.values()
            ],
            "outboxDepth": self.outbox_depth(),
            "outboxDurable": self.outbox_durable,
            "outboxFault": self.outbox_fault(),
            "lastContact": datetime.fromtimestamp(s.last_contact_wall, UTC).isoformat()
            if s.last_contact_wall
            else None,
            "secondsSinceHeartbeat": round(now - s.last_heartbeat, 3) if s.last_heartbeat is not None else None,
            "intervals": {
                "heartbeatSeconds": s.intervals.heartbeat_seconds,
                "pollWaitSeconds": s.intervals.poll_wait_seconds,
                "leaseSeconds": s.intervals.lease_seconds,
            },
            "time": datetime.fromtimestamp(time.time(), UTC).isoformat(),
        }
