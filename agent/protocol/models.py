"""Protocol v1 wire models, shared by the delegate and the control plane.

Both sides import these structs, so a field cannot drift between them; the control plane's
OpenAPI document is generated from the same types. Field names are camelCase on the wire.
Unknown fields are ignored on decode so that a newer peer can add fields without breaking an
older one (additive evolution inside v1).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from agent.protocol.patterns import Tag, TokenName
from agent.protocol.results import Failure, HarnessValidationResult, ValidationResult
from agent.protocol.wire import TaskStatus, Timestamp, Wire

PROTOCOL_VERSION = "v1"

#: The task type of an AWS connector validation.
TASK_TYPE_AWS_VALIDATE = "aws.validate-connector"

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Identifier = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]
DelegateState = Literal["running", "draining"]


# --- delegate side -------------------------------------------------------------------------


class Intervals(Wire, kw_only=True):
    """Timings the server wants; a fleet is retuned by changing them on the server."""

    heartbeat_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)]
    poll_wait_seconds: Annotated[float, msgspec.Meta(ge=0, le=60)]
    lease_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)]


class RegisterRequest(Wire, kw_only=True):
    name: Name
    #: Unique per process start; registering twice with it returns the same delegate id.
    instance_id: Identifier
    tags: Annotated[list[Tag], msgspec.Meta(max_length=64)] = []
    version: Annotated[str, msgspec.Meta(max_length=64)]
    task_types: Annotated[list[Annotated[str, msgspec.Meta(max_length=128)]], msgspec.Meta(max_length=64)]
    capacity: Annotated[int, msgspec.Meta(ge=1, le=4096)]
    hostname: Annotated[str, msgspec.Meta(max_length=255)] | None = None


class RegisterResponse(Wire, kw_only=True):
    delegate_id: str
    intervals: Intervals
    server_time: Timestamp


class HeartbeatRequest(Wire, kw_only=True):
    state: DelegateState
    in_flight: Annotated[list[str], msgspec.Meta(max_length=4096)] = []
    free_slots: Annotated[int, msgspec.Meta(ge=0)] = 0


class HeartbeatResponse(Wire, kw_only=True):
    #: Task ids the delegate must cancel (their results are still reported, as cancelled).
    cancel: list[str] = []
    intervals: Intervals


class AcquireRequest(Wire, kw_only=True):
    max_tasks: Annotated[int, msgspec.Meta(ge=1, le=4096)]
    #: How long the server may hold the request open when no task is ready (long poll).
    wait_seconds: Annotated[float, msgspec.Meta(ge=0, le=60)] = 20.0


class Task(Wire, kw_only=True):
    task_id: str
    #: Fences this attempt: only a result carrying the current lease id is accepted.
    lease_id: str
    type: str
    payload: dict[str, Any]
    created_at: Timestamp
    lease_seconds: float
    lease_expires_at: Timestamp
    #: Execution budget; the delegate stops the task when it runs out.
    timeout_seconds: float
    attempt: int
    #: The delegate the task was leased to: a signed task runs only there.
    delegate_id: str | None = None
    #: The task may not *start* after this (the signature bounds a replay; a renewed lease runs on).
    signature_expires_at: Timestamp | None = None
    #: Detached Ed25519 signature over the lease hand-out (see agent/protocol/signing.py), when the
    #: server signs tasks.
    signature: str | None = None
    #: For an ``OidcAuthentication`` connector: the control plane's OIDC token for this hand-out, which the
    #: delegate exchanges with ``sts:AssumeRoleWithWebIdentity``. A bearer secret for its few minutes of
    #: life: never logged, stored or reported.
    oidc_token: str | None = None


class AcquireResponse(Wire, kw_only=True):
    tasks: list[Task] = []


class LeaseResponse(Wire, kw_only=True):
    lease_expires_at: Timestamp
    lease_seconds: float
    #: Set when someone asked to cancel the task; the delegate stops it at once.
    cancel_requested: bool = False


class TaskResult(Wire, kw_only=True):
    lease_id: str
    status: TaskStatus
    #: What the test found: identity, steps, the failure with its AWS code and hint.
    output: ValidationResult
    started_at: Timestamp
    finished_at: Timestamp


class SubmitResultResponse(Wire, kw_only=True):
    #: "accepted" the first time; "duplicate" when the same lease already delivered it.
    outcome: Literal["accepted", "duplicate"]


#: Results one ``POST /v1/results`` carries at most.
MAX_RESULTS_PER_BATCH = 64


class ResultItem(Wire, kw_only=True):
    task_id: str
    result: TaskResult


class SubmitResultsRequest(Wire, kw_only=True):
    """Several results in one request: each is judged alone, exactly as its own PUT would be."""

    results: Annotated[list[ResultItem], msgspec.Meta(min_length=1, max_length=MAX_RESULTS_PER_BATCH)]


class ResultOutcome(Wire, kw_only=True):
    """What the control plane made of one result of a batch.

    ``status`` is the one ``PUT /v1/tasks/{taskId}/result`` would have answered: 200 with
    ``outcome``, or the error status with ``error`` (409 ``lease_fenced``, 404, 403, 400).
    """

    task_id: str
    status: int
    outcome: Literal["accepted", "duplicate"] | None = None
    error: ErrorDetail | None = None


class SubmitResultsResponse(Wire, kw_only=True):
    #: One per result, in the order they were sent.
    outcomes: list[ResultOutcome]


# --- errors ----------------------------------------------------------------------------------


class Problem(Wire, kw_only=True):
    """One thing wrong with a request: where, and what."""

    field: str
    message: str


class ErrorDetail(Wire, kw_only=True):
    code: str
    message: str
    problems: list[Problem] = []
    retry_after_seconds: float | None = None


class ErrorBody(Wire, kw_only=True):
    error: ErrorDetail


# --- user API --------------------------------------------------------------------------------


class ValidationSummary(Wire, kw_only=True):
    """The latest connection test of a connector, kept with it."""

    task_id: str
    status: TaskStatus
    tested_at: Timestamp
    delegate_name: str | None = None
    error_summary: str | None = None
    #: The connector's spec changed since this test ran: it describes the previous version. Test again.
    stale: bool = False


#: A connector's connectivity: UNKNOWN until its first test ends.
ConnectorStatus = Literal["SUCCESS", "FAILURE", "UNKNOWN"]
#: Why a connector test was created: by the schedule, by someone, or because the connector changed.
TestTrigger = Literal["scheduled", "manual", "changed"]


class ConnectorHealth(Wire, kw_only=True):
    """A connector's connectivity as the control plane keeps it (Harness's connectivity status)."""

    status: ConnectorStatus = "UNKNOWN"
    #: When the last test ran (not when its result arrived).
    tested_at: Timestamp | None = None
    #: The last test that succeeded; kept while tests fail.
    last_connected_at: Timestamp | None = None
    error_summary: str | None = None
    #: The failing step, its category and the one fitting hint, while the connector fails.
    failure: Failure | None = None
    delegate_name: str | None = None
    #: Tests in a row that failed (0 after a success).
    failures_in_row: int = 0
    #: When the current run of failures began.
    failing_since: Timestamp | None = None
    #: Seconds between scheduled tests: the connector's own ``testInterval`` or the control plane's
    #: default; 0 when scheduled tests are off for it.
    test_interval_seconds: float = 0.0
    #: Longer than the interval while the same failure repeats (doubling, at most 6 hours).
    backoff_seconds: float = 0.0
    next_test_at: Timestamp | None = None
    #: A test of this connector is queued or running.
    testing: bool = False


class HistoryEntry(Wire, kw_only=True):
    """One finished test of a connector."""

    task_id: str
    status: TaskStatus
    tested_at: Timestamp
    trigger: TestTrigger
    delegate_name: str | None = None
    error_summary: str | None = None
    failure: Failure | None = None
    duration_ms: int | None = None


class ConnectorHistory(Wire, kw_only=True):
    identifier: str
    #: Newest first; the control plane keeps the last N (``--connector-history``, default 50).
    entries: list[HistoryEntry]


class ConnectorRecord(Wire, kw_only=True):
    identifier: str
    name: str
    #: The connector in Harness form: ``{"connector": {...}}``; secret references only.
    connector: dict[str, Any]
    created_at: Timestamp
    updated_at: Timestamp
    last_test: ValidationSummary | None = None
    health: ConnectorHealth = msgspec.field(default_factory=ConnectorHealth)


class ConnectorList(Wire, kw_only=True):
    connectors: list[ConnectorRecord]


class ApplyResult(Wire, kw_only=True):
    identifier: str
    #: With ``dry_run``, what applying would do.
    outcome: Literal["created", "updated", "unchanged"]
    #: The connector as stored (with ``dry_run``: as it would be stored).
    connector: ConnectorRecord
    #: True when the request only validated (``?dryRun=true``): nothing was stored.
    dry_run: bool = False
    #: What the user should know though nothing is wrong: what the parser ignored (a Harness API
    #: export's metadata), and problems the connector does not have but will meet (no connected
    #: delegate has all its selectors).
    warnings: list[str] = []


class TestRequest(Wire, kw_only=True):
    #: How long the request waits for the result before answering 202 with the task to poll.
    wait_seconds: Annotated[float, msgspec.Meta(ge=0, le=600)] = 150.0
    #: How long the task may wait for an eligible delegate.
    pickup_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None = None
    #: Execution budget on the delegate (Harness: 2 minutes).
    timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None = None
    #: IAM actions a pipeline will need; checked with iam:SimulatePrincipalPolicy.
    permissions: Annotated[list[str], msgspec.Meta(max_length=200)] = []


class CreateTaskRequest(Wire, kw_only=True):
    type: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    payload: dict[str, Any]
    selectors: Annotated[list[Tag], msgspec.Meta(max_length=64)] = []
    pickup_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None = None
    timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None = None
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] | None = None


TaskState = Literal["queued", "running", "done"]


class TaskView(Wire, kw_only=True):
    task_id: str
    type: str
    state: TaskState
    status: TaskStatus | None = None
    selectors: list[str] = []
    connector_id: str | None = None
    created_at: Timestamp
    completed_at: Timestamp | None = None
    attempts: int = 0
    delegate_id: str | None = None
    delegate_name: str | None = None
    #: Set on a failure decided by the control plane (no delegate, lease lost, cancelled...).
    failure_reason: str | None = None
    result: ValidationResult | None = None
    #: The result of a connector test as Harness's ConnectorValidationResult (``testedAt`` in epoch
    #: milliseconds, integer error codes), for clients written against Harness; ``null`` until done.
    harness: HarnessValidationResult | None = None


class TaskList(Wire, kw_only=True):
    tasks: list[TaskView]


#: ``deregistered``: it stopped cleanly and said so; ``lost``: it went silent (crash, network, kill -9).
DelegateConnState = Literal["running", "draining", "deregistered", "lost"]


class DelegateView(Wire, kw_only=True):
    delegate_id: str
    name: str
    instance_id: str
    hostname: str | None = None
    tags: list[str]
    version: str
    task_types: list[str]
    capacity: int
    state: DelegateConnState
    in_flight: int
    registered_at: Timestamp
    last_heartbeat_at: Timestamp
    token_name: str | None = None


class DelegateList(Wire, kw_only=True):
    delegates: list[DelegateView]


#: A delegate name or tag pattern in a token's scope: the tag alphabet plus shell wildcards ``*`` and ``?``.
SCOPE_PATTERN = r"^[A-Za-z0-9*?][A-Za-z0-9_.:/=+@*?-]{0,127}$"
ScopePattern = Annotated[str, msgspec.Meta(pattern=SCOPE_PATTERN)]
ScopePatterns = Annotated[list[ScopePattern], msgspec.Meta(min_length=1, max_length=64)]


class TokenView(Wire, kw_only=True):
    name: str
    token_id: str
    revoked: bool
    revoked_at: Timestamp | None = None
    #: ``configured``: from the token file or environment; ``created``: made by ``POST /api/v1/delegate-tokens``.
    source: Literal["configured", "created"] = "configured"
    #: The delegate names its delegates may register (patterns); absent: any.
    names: list[str] | None = None
    #: The other tags they may carry (patterns); absent: any (or, with ``names``, only those patterns).
    tags: list[str] | None = None


class CreateTokenRequest(Wire, kw_only=True):
    name: TokenName
    #: Limit the token to these delegate names (shell patterns such as ``team-a-*``); absent: any name.
    names: ScopePatterns | None = None
    #: Limit the token to these tags (patterns); absent: any tag (with ``names``: only tags those allow).
    tags: ScopePatterns | None = None


class CreatedToken(Wire, kw_only=True):
    """A new delegate token. ``token`` is in this answer only: the server keeps a fingerprint, never the value."""

    name: str
    token_id: str
    token: str
    created_at: Timestamp
    names: list[str] | None = None
    tags: list[str] | None = None


class TokenList(Wire, kw_only=True):
    tokens: list[TokenView]


class Latency(Wire, kw_only=True):
    """End-to-end seconds from a task's creation to its result, over finished tasks."""

    count: int
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None


class Stats(Wire, kw_only=True):
    """What the control plane has counted since its data dir was created, and holds now (tasks)."""

    tasks: dict[str, int]
    #: Finished tasks by status (SUCCESS, FAILURE).
    done_by_status: dict[str, int] = {}
    #: Failed tasks by why: the control plane's reason (no_eligible_delegate, delegate_lost, timeout,
    #: cancelled, ...) or else the handler's failure category (throttled, permission_denied, ...).
    failures_by_reason: dict[str, int] = {}
    results_accepted: int
    results_duplicate: int
    results_fenced: int
    tasks_requeued: int
    tasks_failed_unpicked: int
    latency: Latency


class ServerInfo(Wire, kw_only=True):
    service: str
    version: str
    protocol: str
    audience: str
    task_public_key: str | None = None


class Readiness(Wire, kw_only=True):
    """``GET /readyz``: whether this control plane can take work, and if not, why."""

    ready: bool
    problems: list[str]
