"""The control plane's Prometheus metrics, on a registry of its own, served at ``GET /metrics``.

What an operator watches: the queue (per task type and selector set), tasks by state, how tasks
end, leases that expire (a delegate that stopped renewing), delegates connected, and the latency
of every route (the delegates' long polls included, labelled ``acquire``, so they can be left out).
State is read from the store just before each scrape (:meth:`ControlPlane.refresh_gauges`); events
are counted where they happen. Label values are lowercase (selector sets are tags, which are
lowercase already) and bounded: routes are the route table's names, and selector sets beyond
:data:`MAX_SELECTOR_SETS` are summed as ``(other)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent._version import __version__
from agent.observability.metrics import MetricsRegistry

#: Distinct selector sets reported one by one in the queue depth; the rest are summed.
MAX_SELECTOR_SETS = 50
#: Connector statuses, all reported (0 when none).
CONNECTOR_STATUSES = ("SUCCESS", "FAILURE", "UNKNOWN")
#: Task states, all reported (0 when none), so a query never finds a state missing.
TASK_STATES = ("queued", "running", "done")
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

#: (task type, selector set) -> tasks queued.
QueueDepth = Mapping[tuple[str, tuple[str, ...]], int]


def selector_label(selectors: Iterable[str]) -> str:
    """A selector set as one label value: its tags sorted, comma-separated ("" for none)."""
    return ",".join(sorted(selectors))


class _State(Collector):
    """Gauges of the state, as last read from the store."""

    def __init__(self) -> None:
        self.queue: QueueDepth = {}
        self.tasks: Mapping[str, int] = {}
        self.connected = 0
        self.connectors: Mapping[str, int] = {}
        self.failing_seconds_max = 0.0
        self.untested_intervals_max = 0.0

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "controlplane_queue_depth",
            f"Tasks waiting for a delegate, by task type and selector set (sorted tags; beyond "
            f"{MAX_SELECTOR_SETS} sets the rest are summed as (other)).",
            labels=["type", "selectors"],
        )
        counts: dict[tuple[str, str], int] = {}
        for (task_type, selectors), n in sorted(self.queue.items(), key=lambda kv: (-kv[1], kv[0][0])):
            label = selector_label(selectors) if len(counts) < MAX_SELECTOR_SETS else "(other)"
            counts[(task_type, label)] = counts.get((task_type, label), 0) + n
        for (task_type, label), n in sorted(counts.items()):
            depth.add_metric([task_type, label], n)
        yield depth
        tasks = GaugeMetricFamily(
            "controlplane_tasks", "Tasks by state (done ones until they are purged).", labels=["state"]
        )
        known = self.tasks
        for state in TASK_STATES:
            tasks.add_metric([state], known.get(state, 0))
        yield tasks
        connectors = GaugeMetricFamily(
            "controlplane_connectors", "Connectors by connectivity status (unknown: never tested).", labels=["status"]
        )
        for status in CONNECTOR_STATUSES:
            connectors.add_metric([status.lower()], self.connectors.get(status, 0))
        yield connectors
        yield GaugeMetricFamily(
            "controlplane_connector_failing_seconds_max",
            "How long the connector failing longest has been failing (0 when none fails). Aggregated on "
            "purpose: a label per connector would be one series per connector; `connector list` names them.",
            value=self.failing_seconds_max,
        )
        yield GaugeMetricFamily(
            "controlplane_connector_untested_intervals_max",
            "Over connectors with scheduled tests: the longest time since a test (or since creation), in "
            "test intervals. Above 3: tests are not running (no eligible delegate, scheduler or database down).",
            value=self.untested_intervals_max,
        )
        yield GaugeMetricFamily(
            "controlplane_delegates_connected",
            "Delegates connected (registered, heartbeating, running or draining).",
            value=self.connected,
        )


class ControlPlaneMetrics:
    """One per control plane; :meth:`sample` tells it where the state is."""

    def __init__(self) -> None:
        r = self.registry = MetricsRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Info("controlplane", "The control plane's version.", registry=r).info({"version": __version__})
        self._state = _State()
        r.register(self._state)
        self.tasks_completed = Counter(
            "controlplane_tasks_completed",
            "Tasks finished, by status (success, failure) and reason (reported by a delegate, or why the "
            "control plane ended it: cancelled, timeout, delegate_lost, no_eligible_delegate).",
            ["status", "reason"],
            registry=r,
        )
        self.store_available = Gauge(
            "controlplane_store_available",
            "1 while the store (the SQLite file, or Postgres) takes writes; 0 while it refuses them (a full "
            "disk, Postgres down or unreachable): this replica is then not ready and answers 503.",
            registry=r,
        )
        self.store_available.set(1)
        self.connector_tests_created = Counter(
            "controlplane_connector_tests",
            "Connector tests created, by trigger: scheduled (the connector's interval), manual (someone asked), "
            "changed (the connector was applied).",
            ["trigger"],
            registry=r,
        )
        self.connector_status_changes = Counter(
            "controlplane_connector_status_changes",
            "Connectors whose connectivity changed, by the status they changed to (success, failure).",
            ["to"],
            registry=r,
        )
        self.lease_expiries = Counter(
            "controlplane_lease_expiries",
            "Leases that expired before the delegate renewed them or reported (the task is re-queued or fails).",
            registry=r,
        )
        self.auth_refusals = Counter(
            "controlplane_auth_refusals",
            "Delegate and API requests refused for their credentials, by credential (delegate, api_key) and "
            "reason (the error code: unauthenticated, token_expired, token_revoked, delegate_token_mismatch, "
            "token_scope, rate_limited).",
            ["credential", "reason"],
            registry=r,
        )
        self.requests = Counter(
            "controlplane_http_requests",
            "HTTP requests, by route (the route table's name, or unmatched) and status code.",
            ["route", "code"],
            registry=r,
        )
        self.request_latency = Histogram(
            "controlplane_http_request_duration_seconds",
            "HTTP request latency by route (acquire is a long poll: it waits for work on purpose).",
            ["route"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )

    def set_state(self, *, queue: QueueDepth, tasks: Mapping[str, int], connected: int) -> None:
        self._state.queue, self._state.tasks, self._state.connected = queue, tasks, connected

    def set_connector_state(
        self, *, by_status: Mapping[str, int], failing_seconds_max: float, untested_intervals_max: float
    ) -> None:
        self._state.connectors = by_status
        self._state.failing_seconds_max = failing_seconds_max
        self._state.untested_intervals_max = untested_intervals_max

    def task_completed(self, status: str, reason: str | None) -> None:
        self.tasks_completed.labels(status.lower(), reason or "reported").inc()

    def auth_refused(self, credential: str, reason: str) -> None:
        self.auth_refusals.labels(credential, reason).inc()

    def observe_request(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route, str(code)).inc()
        self.request_latency.labels(route).observe(seconds)
