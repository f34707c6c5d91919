"""Timings and limits the control plane enforces, parsed once at the edge (CLI, tests) into one frozen object."""

from __future__ import annotations

from dataclasses import dataclass

from agent.protocol.auth import CLOCK_LEEWAY_SECONDS, DEFAULT_AUDIENCE
from agent.protocol.models import Intervals


@dataclass(frozen=True)
class ControlPlaneSettings:
    """Timings the control plane enforces and hands to every delegate at registration."""

    heartbeat_seconds: float = 10.0
    poll_wait_seconds: float = 20.0
    lease_seconds: float = 30.0
    #: A delegate silent this long is disconnected and its leases re-queue (default 3 heartbeats).
    disconnect_after_seconds: float | None = None
    #: How long a task may wait for an eligible delegate before it fails.
    pickup_timeout_seconds: float = 30.0
    #: Execution budget handed to the delegate (Harness: 2 minutes).
    task_timeout_seconds: float = 120.0
    max_attempts: int = 3
    #: After timeout plus this, a running task fails even if its lease is still renewed.
    execution_grace_seconds: float = 30.0
    sweep_interval_seconds: float = 0.5
    forget_disconnected_after_seconds: float = 6 * 3600.0
    keep_done_tasks_seconds: float = 7 * 86400.0
    audience: str = DEFAULT_AUDIENCE
    #: Failed authentications (delegate token or API key) one client address may make per window;
    #: beyond that it gets 429 with Retry-After until the window its first failure opened ends.
    auth_failure_limit: int = 1000
    auth_failure_window_seconds: float = 60.0
    #: Tolerated difference between a delegate's clock and this server's when checking request tokens.
    clock_leeway_seconds: float = CLOCK_LEEWAY_SECONDS
    #: Seconds between scheduled tests of a connector without its own ``testInterval``; 0: none. The
    #: CLI's default is 30 minutes (Harness's connector heartbeat); in-process users opt in.
    connector_test_interval_seconds: float = 0.0
    #: A connector failing the same way again waits twice as long, up to this (or its interval if longer).
    connector_backoff_max_seconds: float = 6 * 3600.0
    #: Finished tests kept per connector.
    connector_history: int = 50
    #: Budget of a scheduled test (Harness: 2 minutes).
    connector_test_timeout_seconds: float = 120.0
    #: After downtime, overdue scheduled tests are spread over this long (or their interval if shorter).
    connector_restart_spread_seconds: float = 600.0

    @property
    def disconnect_after(self) -> float:
        return self.disconnect_after_seconds or 3 * self.heartbeat_seconds

    def intervals(self) -> Intervals:
        return Intervals(
            heartbeat_seconds=self.heartbeat_seconds,
            poll_wait_seconds=self.poll_wait_seconds,
            lease_seconds=self.lease_seconds,
        )
