"""The delegate's Prometheus metrics, on a registry of its own (never the global one).

Names follow the Prometheus conventions (``_total`` counters, units in the name: ``_seconds``,
``_timestamp_seconds``) and pass ``promtool check metrics``. Label values are lowercase, always.
State that is cheap to read (slots, running tasks, outbox depth, the last heartbeat) is sampled at
scrape time through callbacks instead of being pushed. :class:`MetricsRegistry` leaves out the
``_created`` series prometheus_client adds to counters and histograms (a second series per child
that nobody queries), for this registry only: the library's switch for that is process-wide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import Metric

from agent._version import __version__

_TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PICKUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class MetricsRegistry(CollectorRegistry):
    """A registry whose exposition (and ``get_sample_value``) has no ``_created`` series."""

    def __init__(self) -> None:
        super().__init__(auto_describe=True)

    def collect(self) -> Iterable[Metric]:
        for family in super().collect():
            if family.type in ("counter", "histogram", "summary"):
                created = family.name + "_created"
                family.samples = [s for s in family.samples if s.name != created]
            yield family


class AgentMetrics:
    def __init__(self, *, name: str, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or MetricsRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.info = Info("delegate_agent", "The delegate's version and name.", registry=r)
        self.info.info({"version": __version__, "name": name})
        self.registered = Gauge(
            "delegate_registered", "1 while the delegate is registered with the control plane.", registry=r
        )
        self.draining = Gauge("delegate_draining", "1 while the delegate drains for shutdown.", registry=r)
        self.auth_refused = Gauge(
            "delegate_control_plane_auth_refused",
            "1 while the control plane refuses the delegate's token (401/403).",
            registry=r,
        )
        self.slots = Gauge("delegate_task_slots", "Tasks the delegate may run at once (its capacity).", registry=r)
        self.slots_busy = Gauge(
            "delegate_task_slots_busy",
            "Task slots running a task (a long poll waiting for work holds none).",
            registry=r,
        )
        self.slots_free = Gauge(
            "delegate_task_slots_free", "Task slots not running a task: capacity minus busy.", registry=r
        )
        self.slots_reserved = Gauge(
            "delegate_task_slots_reserved",
            "Free slots a long poll in flight holds for the work it asks for (the delegate never asks for more).",
            registry=r,
        )
        self.tasks_running = Gauge(
            "delegate_tasks_running", "Tasks running now (handlers started and not finished).", registry=r
        )
        self.tasks_started = Counter("delegate_tasks_started", "Tasks started, by type.", ["type"], registry=r)
        self.tasks_completed = Counter(
            "delegate_tasks_completed",
            "Tasks finished, by type and outcome (success, failure, timeout, cancelled, invalid, error, released).",
            ["type", "outcome"],
            registry=r,
        )
        self.task_duration = Histogram(
            "delegate_task_duration_seconds",
            "Time from start to result, by type.",
            ["type"],
            buckets=_TASK_BUCKETS,
            registry=r,
        )
        self.pickup_latency = Histogram(
            "delegate_task_pickup_latency_seconds",
            "Time from the task's creation on the control plane to its start here.",
            buckets=_PICKUP_BUCKETS,
            registry=r,
        )
        self.cp_requests = Counter(
            "delegate_control_plane_requests",
            "Requests to the control plane, by operation and status (HTTP status, or error/timeout).",
            ["operation", "status"],
            registry=r,
        )
        self.cp_latency = Histogram(
            "delegate_control_plane_request_duration_seconds",
            "Control plane request latency, by operation (long polls included).",
            ["operation"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.outbox_depth = Gauge("delegate_outbox_depth", "Results written but not yet acknowledged.", registry=r)
        self.outbox_fault = Gauge(
            "delegate_outbox_fault",
            "1 while results cannot be written to the data dir (disk full, I/O error): no new work is taken.",
            registry=r,
        )
        self.outbox_quarantined = Counter(
            "delegate_outbox_quarantined",
            "Outbox rows that no longer decoded and were moved to its dead_letter table.",
            registry=r,
        )
        self.last_heartbeat = Gauge(
            "delegate_last_heartbeat_timestamp_seconds",
            "Unix time of the last heartbeat (or registration) the control plane acknowledged; 0 before the first.",
            registry=r,
        )
        self.results_dropped = Counter(
            "delegate_results_dropped",
            "Results the control plane will never accept, by reason (lease_fenced, unknown_task, rejected).",
            ["reason"],
            registry=r,
        )
        self.registrations = Counter(
            "delegate_registrations", "Successful registrations (re-registrations included).", registry=r
        )
        self.aws_steps = Histogram(
            "delegate_aws_validation_step_duration_seconds",
            "Duration of each AWS validation step, by step and status (success, failure).",
            ["step", "status"],
            buckets=_TASK_BUCKETS,
            registry=r,
        )
        self.aws_failures = Counter(
            "delegate_aws_validation_failures",
            "Failed AWS validations, by failing step, failure category and credential type.",
            ["step", "category", "credential_type"],
            registry=r,
        )

        #: Labelled children already looked up: ``labels()`` validates and locks on every call, about
        #: 1.6 us each, and a validation makes six of them. Label values here are bounded sets.
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}

    def labelled(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once per distinct label set."""
        child = self._children.get((metric, values))
        if child is None:
            child = self._children[(metric, values)] = metric.labels(*values)
        return child

    def observe_request(self, operation: str, status: str, seconds: float) -> None:
        self.labelled(self.cp_requests, operation, status).inc()
        self.labelled(self.cp_latency, operation).observe(seconds)

    def observe_aws_step(
        self, step: str, status: str, seconds: float, credential_type: str, category: str | None
    ) -> None:
        """One validation step. ``status`` and ``credential_type`` come as the result writes them
        ("FAILURE", "ManualConfig"); labels carry them lowercase ("failure", "manualconfig")."""
        status = status.lower()
        self.labelled(self.aws_steps, step, status).observe(seconds)
        if status == "failure":
            self.aws_failures.labels(step, category or "unknown", credential_type.lower()).inc()

    def sample(
        self,
        *,
        capacity: int,
        busy: Callable[[], float],
        reserved: Callable[[], float],
        running: Callable[[], float],
        outbox: Callable[[], float],
        outbox_fault: Callable[[], bool] = lambda: False,
        last_heartbeat: Callable[[], float | None],
    ) -> None:
        """Read these at scrape time instead of updating them on every change."""
        self.slots.set(capacity)
        self.slots_busy.set_function(busy)
        self.slots_free.set_function(lambda: capacity - busy())
        self.slots_reserved.set_function(reserved)
        self.tasks_running.set_function(running)
        self.outbox_depth.set_function(outbox)
        self.outbox_fault.set_function(lambda: float(outbox_fault()))
        self.last_heartbeat.set_function(lambda: last_heartbeat() or 0.0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
