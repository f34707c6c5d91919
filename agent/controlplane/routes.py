"""HTTP routes of the reference control plane: one table drives both the router and OpenAPI.

Because the aiohttp router and ``/openapi.json`` are generated from the same :data:`ROUTES`, the
document cannot list a route the server lacks (or the reverse); the tests also check every
documented status against what the handlers actually return.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import structlog
import yaml
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client.exposition import choose_encoder

from agent._values import bounded_message, clip, parse_bounded
from agent._version import __version__
from agent._yaml import load as load_yaml
from agent.controlplane.core import ApiFailure, ControlPlane, ts
from agent.controlplane.metrics import ControlPlaneMetrics
from agent.controlplane.oidc import OidcIssuer
from agent.controlplane.ratelimit import FailureLimiter, OncePerSecond
from agent.controlplane.store import RowDamaged, StoredScope, StoreUnavailable
from agent.controlplane.tokens import UNRESTRICTED, Caller, ScopeInvalid, TokenScope
from agent.protocol.auth import Claims, IssuedToken, TokenVerifier
from agent.protocol.errors import AuthError, Code, error_body
from agent.protocol.models import (
    PROTOCOL_VERSION,
    AcquireRequest,
    AcquireResponse,
    ApplyResult,
    ConnectorHistory,
    ConnectorList,
    ConnectorRecord,
    CreatedToken,
    CreateTaskRequest,
    CreateTokenRequest,
    DelegateList,
    ErrorBody,
    ErrorDetail,
    HeartbeatRequest,
    HeartbeatResponse,
    LeaseResponse,
    Problem,
    Readiness,
    RegisterRequest,
    RegisterResponse,
    ResultOutcome,
    ServerInfo,
    Stats,
    SubmitResultResponse,
    SubmitResultsRequest,
    SubmitResultsResponse,
    TaskList,
    TaskResult,
    TaskView,
    TestRequest,
    TokenList,
    TokenView,
)

log = structlog.get_logger("controlplane.http")

Auth = Literal["delegate", "api", "none"]
MAX_BODY_BYTES = 1024 * 1024
#: Connector bodies larger than this are parsed in a worker thread.
PARSE_IN_THREAD_BYTES = 64 * 1024
#: Retry-After while the database refuses writes: the sweeper probes it about as often.
STORE_RETRY_SECONDS = 5.0
#: ``GET /api/v1/connectors/{identifier}/history``: entries answered when no limit is given, and at most.
DEFAULT_HISTORY_LIMIT = 50
MAX_HISTORY_LIMIT = 500


@dataclass(frozen=True)
class Param:
    name: str
    where: Literal["path", "query"]
    description: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = True


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: str
    summary: str
    tag: str
    auth: Auth
    responses: Mapping[int, tuple[str, type[Any] | None]]
    request: type[Any] | None = None
    request_optional: bool = False
    #: "json" bodies decode into ``request``; "connector" bodies are Harness YAML or JSON documents.
    body_kind: Literal["json", "connector"] = "json"
    params: tuple[Param, ...] = ()


_DELEGATE_ID = Param("delegateId", "path", "The id returned by register.")
_LEASE_ID = Param("leaseId", "path", "The lease id handed out with the task.")
_TASK_ID = Param("taskId", "path", "A task id.")
_IDENTIFIER = Param("identifier", "path", "A connector identifier.")
_DRY_RUN = Param(
    "dryRun",
    "query",
    "true: validate only. Answers as the apply would (200 or 400 listing every problem) and stores nothing; "
    "a client applying several documents checks them all this way first.",
    {"type": "boolean", "default": False},
    False,
)


def _force(what: str) -> Param:
    return Param("force", "query", what, {"type": "boolean", "default": False}, required=False)


#: Creating or replacing a connector answers the same by POST and by PUT.
_APPLY_RESPONSES: Mapping[int, tuple[str, type[Any] | None]] = {
    200: (
        "Updated or unchanged; with dryRun, valid (outcome says what applying would do, nothing stored)",
        ApplyResult,
    ),
    201: ("Created", ApplyResult),
    400: ("Invalid connector: every problem is listed", ErrorBody),
}

ROUTES: tuple[Route, ...] = (
    # --- delegate protocol ---------------------------------------------------------------------
    Route(
        "POST",
        "/v1/delegates/register",
        "register",
        "Register a delegate (idempotent per instanceId)",
        "delegate protocol",
        "delegate",
        {200: ("Registered; intervals the server wants", RegisterResponse)},
        request=RegisterRequest,
    ),
    Route(
        "POST",
        "/v1/delegates/{delegateId}/heartbeat",
        "heartbeat",
        "Heartbeat; answers tasks to cancel",
        "delegate protocol",
        "delegate",
        {
            200: ("Tasks to cancel and current intervals", HeartbeatResponse),
            404: ("Unknown delegate: register again (code unknown_delegate)", ErrorBody),
        },
        request=HeartbeatRequest,
        params=(_DELEGATE_ID,),
    ),
    Route(
        "POST",
        "/v1/delegates/{delegateId}/acquire",
        "acquire",
        "Long-poll for up to maxTasks tasks; each comes with a lease",
        "delegate protocol",
        "delegate",
        {
            200: ("Leased tasks (possibly none when the wait ran out)", AcquireResponse),
            404: ("Unknown delegate: register again (code unknown_delegate)", ErrorBody),
        },
        request=AcquireRequest,
        params=(_DELEGATE_ID,),
    ),
    Route(
        "POST",
        "/v1/delegates/{delegateId}/deregister",
        "deregister",
        "Deregister (after draining)",
        "delegate protocol",
        "delegate",
        {204: ("Deregistered", None), 404: ("Unknown delegate", ErrorBody)},
        params=(_DELEGATE_ID,),
    ),
    Route(
        "POST",
        "/v1/leases/{leaseId}/renew",
        "renew",
        "Extend a lease while the task runs",
        "delegate protocol",
        "delegate",
        {
            200: ("New expiry; says whether a cancel was requested", LeaseResponse),
            409: ("The lease is no longer valid (code lease_fenced)", ErrorBody),
        },
        params=(_LEASE_ID,),
    ),
    Route(
        "POST",
        "/v1/leases/{leaseId}/release",
        "release",
        "Give a task back so it re-queues at once",
        "delegate protocol",
        "delegate",
        {204: ("Released", None), 409: ("The lease is no longer valid (code lease_fenced)", ErrorBody)},
        params=(_LEASE_ID,),
    ),
    Route(
        "PUT",
        "/v1/tasks/{taskId}/result",
        "submit_result",
        "Submit a result (idempotent per lease)",
        "delegate protocol",
        "delegate",
        {
            200: ("accepted, or duplicate when this lease already delivered it", SubmitResultResponse),
            404: ("Unknown task", ErrorBody),
            409: ("The lease expired or the task was reassigned (code lease_fenced): drop the result", ErrorBody),
        },
        request=TaskResult,
        params=(_TASK_ID,),
    ),
    Route(
        "POST",
        "/v1/results",
        "submit_results",
        "Submit several results at once; each is judged alone, as its own PUT would be (idempotent per lease)",
        "delegate protocol",
        "delegate",
        {
            200: (
                "One outcome per result, in order: the status and outcome or error its PUT would answer",
                SubmitResultsResponse,
            ),
            400: ("Not a valid batch (at most 64 results): nothing was recorded", ErrorBody),
            503: ("The store refused a write: results before it may be recorded; sending all again is safe", ErrorBody),
        },
        request=SubmitResultsRequest,
    ),
    # --- public --------------------------------------------------------------------------------
    Route(
        "GET",
        "/v1/info",
        "info",
        "Who this server is (audience, protocol, task signing key)",
        "public",
        "none",
        {200: ("Server information", ServerInfo)},
    ),
    Route("GET", "/healthz", "healthz", "Liveness of the control plane", "public", "none", {200: ("Alive", None)}),
    Route(
        "GET",
        "/readyz",
        "readyz",
        "Readiness: 503 while the database refuses writes (disk full), with the reason",
        "public",
        "none",
        {200: ("Ready", Readiness), 503: ("Not ready: problems says why", Readiness)},
    ),
    Route("GET", "/openapi.json", "openapi", "This document", "public", "none", {200: ("OpenAPI 3.1", None)}),
    Route(
        "GET",
        "/metrics",
        "metrics",
        "Prometheus metrics: queue depth, tasks by state, lease expiries, delegates connected, request latency",
        "public",
        "none",
        {200: ("Prometheus text exposition (OpenMetrics when the Accept header asks for it)", None)},
    ),
    # --- user API ------------------------------------------------------------------------------
    Route(
        "GET",
        "/api/v1/connectors",
        "list_connectors",
        "List connectors",
        "connectors",
        "api",
        {200: ("Connectors", ConnectorList)},
    ),
    Route(
        "POST",
        "/api/v1/connectors",
        "apply_connector",
        "Create or replace a connector from a Harness YAML or JSON document",
        "connectors",
        "api",
        _APPLY_RESPONSES,
        body_kind="connector",
        params=(_DRY_RUN,),
    ),
    Route(
        "GET",
        "/api/v1/connectors/{identifier}",
        "get_connector",
        "Get a connector and its latest test",
        "connectors",
        "api",
        {200: ("The connector", ConnectorRecord), 404: ("No such connector", ErrorBody)},
        params=(_IDENTIFIER,),
    ),
    Route(
        "PUT",
        "/api/v1/connectors/{identifier}",
        "put_connector",
        "Create or replace a connector by identifier",
        "connectors",
        "api",
        _APPLY_RESPONSES,
        body_kind="connector",
        params=(_IDENTIFIER, _DRY_RUN),
    ),
    Route(
        "DELETE",
        "/api/v1/connectors/{identifier}",
        "delete_connector",
        "Delete a connector",
        "connectors",
        "api",
        {204: ("Deleted", None), 404: ("No such connector", ErrorBody)},
        params=(_IDENTIFIER,),
    ),
    Route(
        "POST",
        "/api/v1/connectors/{identifier}/test",
        "test_connector",
        "Test the connection: queue a validation on an eligible delegate and wait for its result",
        "connectors",
        "api",
        {
            200: ("The test finished; the result is in the task", TaskView),
            202: ("Still running after waitSeconds: poll GET /api/v1/tasks/{taskId}", TaskView),
            400: ("Invalid test request", ErrorBody),
            404: ("No such connector", ErrorBody),
        },
        request=TestRequest,
        request_optional=True,
        params=(_IDENTIFIER,),
    ),
    Route(
        "GET",
        "/api/v1/connectors/{identifier}/history",
        "connector_history",
        "The connector's last test results, newest first (scheduled, manual and after a change)",
        "connectors",
        "api",
        {
            200: ("The connector's history", ConnectorHistory),
            400: ("Invalid limit", ErrorBody),
            404: ("No such connector", ErrorBody),
        },
        params=(
            _IDENTIFIER,
            Param(
                "limit",
                "query",
                f"At most this many entries (1-{MAX_HISTORY_LIMIT}; default {DEFAULT_HISTORY_LIMIT})",
                {"type": "integer", "minimum": 1, "maximum": MAX_HISTORY_LIMIT, "default": DEFAULT_HISTORY_LIMIT},
                False,
            ),
        ),
    ),
    Route(
        "GET",
        "/api/v1/tasks",
        "list_tasks",
        "List recent tasks",
        "tasks",
        "api",
        {200: ("Tasks", TaskList)},
        params=(
            Param("state", "query", "queued, running or done", {"enum": ["queued", "running", "done"]}, False),
            Param("connectorId", "query", "Only this connector's tasks", required=False),
            Param(
                "limit",
                "query",
                "At most this many (1-1000)",
                {"type": "integer", "minimum": 1, "maximum": 1000},
                False,
            ),
        ),
    ),
    Route(
        "POST",
        "/api/v1/tasks",
        "create_task",
        "Queue a task of any type (for tooling and load tests)",
        "tasks",
        "api",
        {201: ("Queued", TaskView), 400: ("Invalid task", ErrorBody)},
        request=CreateTaskRequest,
    ),
    Route(
        "GET",
        "/api/v1/tasks/{taskId}",
        "get_task",
        "Get a task; ?wait=S waits up to S seconds for it to finish",
        "tasks",
        "api",
        {200: ("The task", TaskView), 404: ("No such task", ErrorBody)},
        params=(
            _TASK_ID,
            Param(
                "wait",
                "query",
                "Seconds to wait for completion (0-600)",
                {"type": "number", "minimum": 0, "maximum": 600},
                False,
            ),
        ),
    ),
    Route(
        "POST",
        "/api/v1/tasks/{taskId}/cancel",
        "cancel_task",
        "Cancel a task",
        "tasks",
        "api",
        {200: ("The task after the request", TaskView), 404: ("No such task", ErrorBody)},
        params=(_TASK_ID,),
    ),
    Route(
        "GET",
        "/api/v1/stats",
        "stats",
        "Counters since start, tasks by state, end-to-end latency percentiles",
        "tasks",
        "api",
        {200: ("Statistics", Stats)},
    ),
    Route(
        "GET",
        "/api/v1/delegates",
        "list_delegates",
        "List delegates with their tags and state",
        "delegates",
        "api",
        {200: ("Delegates", DelegateList)},
    ),
    Route(
        "DELETE",
        "/api/v1/delegates/{delegateId}",
        "forget_delegate",
        "Forget a delegate that is gone (deregistered or lost); a connected one only with force",
        "delegates",
        "api",
        {
            204: ("Removed", None),
            404: ("No such delegate", ErrorBody),
            409: ("The delegate is connected: stop it first, or pass force (code conflict)", ErrorBody),
        },
        params=(_DELEGATE_ID, _force("Also forget a connected delegate (it registers again if it is alive)")),
    ),
    Route(
        "GET",
        "/api/v1/delegate-tokens",
        "list_tokens",
        "Delegate tokens the server accepts",
        "delegates",
        "api",
        {200: ("Tokens (fingerprints only)", TokenList)},
    ),
    Route(
        "POST",
        "/api/v1/delegate-tokens",
        "create_token",
        "Create a delegate token; its value is in this answer only (the server keeps a fingerprint)",
        "delegates",
        "api",
        {201: ("Created: hand the token to the delegates now", CreatedToken), 409: ("The name is taken", ErrorBody)},
        request=CreateTokenRequest,
    ),
    Route(
        "POST",
        "/api/v1/delegate-tokens/{name}/revoke",
        "revoke_token",
        "Revoke a delegate token: requests signed with it get 403 token_revoked",
        "delegates",
        "api",
        {
            200: ("Revoked", TokenView),
            404: ("No such token", ErrorBody),
            409: ("It is the last active token: revoking it locks every delegate out; pass force", ErrorBody),
        },
        params=(Param("name", "path", "Token name or id"), _force("Revoke it even if it is the last active token")),
    ),
)

_CLAIMS = web.RequestKey("claims", Claims)
_CALLER = web.RequestKey("caller", Caller)
#: Refusals of an authenticated delegate, counted with the failed authentications.
_REFUSALS = frozenset({Code.DELEGATE_TOKEN_MISMATCH, Code.TOKEN_SCOPE})
_json_encoder = msgspec.json.Encoder()


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=_json_encoder.encode(value), status=status, content_type="application/json")


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    problems: list[Problem] | None = None,
    retry_after: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    hdrs = dict(headers or {})
    if retry_after is not None:
        hdrs["Retry-After"] = str(int(retry_after + 0.999))
    return web.Response(
        body=error_body(code, message, problems=problems, retry_after=retry_after),
        status=status,
        content_type="application/json",
        headers=hdrs,
    )


class Handlers:
    """The route handlers: thin translation between HTTP and :class:`ControlPlane`."""

    def __init__(
        self,
        cp: ControlPlane,
        verifier: TokenVerifier,
        api_keys: list[str],
        openapi: dict[str, Any],
        *,
        task_public_key: str | None = None,
        scopes: Mapping[str, TokenScope] | None = None,
        issued_scopes: Mapping[str, StoredScope] | None = None,
    ) -> None:
        self.cp = cp
        self.verifier = verifier
        #: The OIDC issuer whose documents are served, when the control plane is one (set by the owner).
        self.oidc: OidcIssuer | None = None
        self._api_keys = [k.encode() for k in api_keys]
        self._openapi = _json_encoder.encode(openapi)
        self._task_public_key = task_public_key
        #: The scope of each configured token name (replaced when the token file is re-read).
        self.scopes: Mapping[str, TokenScope] = dict(scopes or {})
        self._issued_scopes = {kid: TokenScope(*scope) for kid, scope in (issued_scopes or {}).items()}
        s = cp.settings
        self._failures = FailureLimiter(s.auth_failure_limit, s.auth_failure_window_seconds, cp.now)
        self._refusals_logged = OncePerSecond(cp.now)

    # --- auth --------------------------------------------------------------------------------

    def authenticate(self, request: web.Request, auth: Auth) -> None:
        """Check the request's credential; an address with too many wrong ones waits (429) first."""
        address = request.remote or "unknown"
        credential = "delegate" if auth == "delegate" else "api_key"
        wait = self._failures.retry_after(address)
        if wait is not None:
            self.cp.metrics.auth_refused(credential, Code.RATE_LIMITED)
            raise ApiFailure(
                429,
                Code.RATE_LIMITED,
                f"too many failed authentications from {address}: try again in {int(wait + 0.999)}s",
                retry_after=wait,
            )
        try:
            _ascii_credentials(request)
            if auth == "delegate":
                claims = request[_CLAIMS] = self.check_delegate(request)
                scope = self.scope_of(claims.token_name, claims.token_id)
                request[_CALLER] = Caller(claims.token_name, scope, self.token_active)
            else:
                self.check_api_key(request)
        except AuthError as exc:
            self.cp.metrics.auth_refused(credential, exc.code or Code.UNAUTHENTICATED)
            if request.headers.get("Authorization") or request.headers.get("X-API-Key"):
                # A credential was presented and is wrong: a guess, or a stolen one gone stale. A request
                # with none (a probe, a misconfigured client) guesses nothing, so it is only counted.
                self._failures.failed(address)
            raise

    def delegate_refused(self, request: web.Request, code: str) -> None:
        """A valid token acting for another's delegate, or beyond its scope: a failure like a wrong credential.

        Counted against the address as failed authentications are (so a flood of them gets 429s), and
        logged once a second per address and code, with the count of those held back.
        """
        address = request.remote or "unknown"
        self.cp.metrics.auth_refused("delegate", code)
        self._failures.failed(address)
        held_back = self._refusals_logged.held_back(address, code)
        if held_back is not None:
            log.warning(
                "controlplane.delegate_refused", address=address, code=code, path=request.path, held_back=held_back
            )

    def adopt_issued(self, kid: str, scope: TokenScope) -> None:
        """A token another replica created: its scope, for this replica's checks."""
        self._issued_scopes[kid] = scope

    def scope_of(self, name: str, kid: str) -> TokenScope:
        """A created token's scope by its id; a configured one's by its name (shared when rotating)."""
        issued = self._issued_scopes.get(kid)
        return issued if issued is not None else self.scopes.get(name, UNRESTRICTED)

    def token_active(self, name: str) -> bool:
        """Whether a token of this name is configured or created, and not revoked."""
        return any(k.name == name and not self.verifier.is_revoked(k.kid) for k in self.verifier.all_keys)

    def check_delegate(self, request: web.Request) -> Claims:
        return self.verifier.verify(request.headers.get("Authorization"))

    def check_api_key(self, request: web.Request) -> None:
        given = request.headers.get("X-API-Key")
        if given is None:
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            given = value.strip() if scheme.lower() == "bearer" else None
        if not given:
            raise AuthError(
                "missing API key (Authorization: Bearer <key> or X-API-Key)", status=401, code=Code.UNAUTHENTICATED
            )
        if self.api_key_index(given) is None:
            raise AuthError("wrong API key", status=401, code=Code.UNAUTHENTICATED)

    def api_key_index(self, given: str) -> int | None:
        """Which configured API key ``given`` is (its index), or None; every key is compared, in constant time."""
        if not given.isascii():
            return None
        raw = given.encode()
        found = None
        for index, key in enumerate(self._api_keys):
            if hmac.compare_digest(raw, key) and found is None:
                found = index
        return found

    def derived_keys(self, label: bytes) -> list[bytes]:
        """HMAC-SHA256 of ``label`` under each API key, in key order: keys for others (the console's
        sessions) that end when the API key is removed, without the API key leaving this object."""
        return [hmac.new(k, label, hashlib.sha256).digest() for k in self._api_keys]

    @property
    def failures(self) -> FailureLimiter:
        """Failed authentications per address: the console's logins count in the same limiter."""
        return self._failures

    # --- delegate protocol -------------------------------------------------------------------

    async def register(self, request: web.Request, body: RegisterRequest) -> web.Response:
        return json_response(await self.cp.register(body, caller=request[_CALLER]))

    async def heartbeat(self, request: web.Request, body: HeartbeatRequest) -> web.Response:
        return json_response(await self.cp.heartbeat(request.match_info["delegateId"], body, caller=request[_CALLER]))

    async def acquire(self, request: web.Request, body: AcquireRequest) -> web.Response:
        def gone() -> bool:
            return request.transport is None or request.transport.is_closing()

        delegate_id = request.match_info["delegateId"]
        return json_response(await self.cp.acquire(delegate_id, body, gone=gone, caller=request[_CALLER]))

    async def deregister(self, request: web.Request, body: None) -> web.Response:
        await self.cp.deregister(request.match_info["delegateId"], caller=request[_CALLER])
        return web.Response(status=204)

    async def renew(self, request: web.Request, body: None) -> web.Response:
        return json_response(await self.cp.renew(request.match_info["leaseId"], caller=request[_CALLER]))

    async def release(self, request: web.Request, body: None) -> web.Response:
        await self.cp.release(request.match_info["leaseId"], caller=request[_CALLER])
        return web.Response(status=204)

    async def submit_result(self, request: web.Request, body: TaskResult) -> web.Response:
        outcome = await self.cp.submit_result(request.match_info["taskId"], body, caller=request[_CALLER])
        return json_response(SubmitResultResponse(outcome=outcome))  # type: ignore[arg-type]

    async def submit_results(self, request: web.Request, body: SubmitResultsRequest) -> web.Response:
        """One request for many results; each is judged as its own PUT would be.

        That includes what the HTTP layer does around a PUT: a refused item (another token's lease)
        counts against the address, and once the address is over its limit the items after it get
        the 429 their own PUTs would; a damaged task row is that item's 500. Otherwise a batch would
        probe 64 foreign leases per request unthrottled, and one damaged row would fail the whole
        batch on every retry, so the results after it would never be recorded.
        """
        outcomes: list[ResultOutcome] = []
        address = request.remote or "unknown"
        for item in body.results:
            try:
                wait = self._failures.retry_after(address)
                if wait is not None:
                    self.cp.metrics.auth_refused("delegate", Code.RATE_LIMITED)
                    raise ApiFailure(
                        429,
                        Code.RATE_LIMITED,
                        f"too many failed authentications from {address}: try again in {int(wait + 0.999)}s",
                        retry_after=wait,
                    )
                outcome = await self.cp.submit_result(item.task_id, item.result, caller=request[_CALLER])
            except ApiFailure as exc:
                if exc.code in _REFUSALS:
                    self.delegate_refused(request, exc.code)
                error = ErrorDetail(
                    code=exc.code, message=exc.message, problems=exc.problems, retry_after_seconds=exc.retry_after
                )
                outcomes.append(ResultOutcome(task_id=item.task_id, status=exc.status, error=error))
                continue
            except RowDamaged as exc:
                log.error("controlplane.http.row_damaged", method=request.method, path=request.path, error=str(exc))
                error = ErrorDetail(code=Code.INTERNAL, message=f"{exc}; see the control plane's log")
                outcomes.append(ResultOutcome(task_id=item.task_id, status=500, error=error))
                continue
            outcomes.append(ResultOutcome(task_id=item.task_id, status=200, outcome=outcome))  # type: ignore[arg-type]
        return json_response(SubmitResultsResponse(outcomes=outcomes))

    # --- public ------------------------------------------------------------------------------

    async def info(self, request: web.Request, body: None) -> web.Response:
        return json_response(
            ServerInfo(
                service="delegate-agent control plane",
                version=__version__,
                protocol=PROTOCOL_VERSION,
                audience=self.cp.settings.audience,
                task_public_key=self._task_public_key,
            )
        )

    async def healthz(self, request: web.Request, body: None) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request, body: None) -> web.Response:
        fault = self.cp.write_fault
        if fault is None:
            problems = []
        elif self.cp.store.kind == "sqlite":
            problems = [f"disk full or failing: {fault}"]
        else:  # unauthenticated: the database's address and user stay in the log
            problems = ["database unavailable: the control plane's log says why"]
        return json_response(Readiness(ready=not problems, problems=problems), 503 if problems else 200)

    async def openapi(self, request: web.Request, body: None) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")

    async def metrics(self, request: web.Request, body: None) -> web.Response:
        # Content negotiation as prometheus_client does it: OpenMetrics if the scraper asks, else text 0.0.4.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        with contextlib.suppress(StoreUnavailable):  # the state gauges keep their last reading
            await self.cp.refresh_gauges()
        return web.Response(body=encoder(self.cp.metrics.registry), headers={"Content-Type": content_type})

    # --- connectors --------------------------------------------------------------------------

    async def list_connectors(self, request: web.Request, body: None) -> web.Response:
        return json_response(ConnectorList(connectors=await self.cp.connector_records()))

    async def apply_connector(self, request: web.Request, body: Any) -> web.Response:
        dry_run = _flag(request, "dryRun")
        result = await self.cp.apply_connector(body, dry_run=dry_run)
        return json_response(result, 201 if result.outcome == "created" and not dry_run else 200)

    async def get_connector(self, request: web.Request, body: None) -> web.Response:
        row = await self.cp.get_connector(request.match_info["identifier"])
        return json_response(await self.cp.connector_record(row))

    async def put_connector(self, request: web.Request, body: Any) -> web.Response:
        identifier = request.match_info["identifier"]
        if isinstance(body, dict) and isinstance(body.get("connector"), dict):
            given = body["connector"].get("identifier")
            if given is None:
                body = {**body, "connector": {**body["connector"], "identifier": identifier}}
            elif given != identifier:
                raise ApiFailure(
                    400,
                    Code.INVALID_CONNECTOR,
                    "the identifier in the path and in the body differ",
                    problems=[
                        Problem(field="connector.identifier", message=f"is {given!r} but the URL says {identifier!r}")
                    ],
                )
        return await self.apply_connector(request, body)

    async def delete_connector(self, request: web.Request, body: None) -> web.Response:
        await self.cp.delete_connector(request.match_info["identifier"])
        return web.Response(status=204)

    async def test_connector(self, request: web.Request, body: TestRequest | None) -> web.Response:
        task = await self.cp.test_connector(request.match_info["identifier"], body or TestRequest())
        return json_response(self.cp.task_view(task), 200 if task.state == "done" else 202)

    async def connector_history(self, request: web.Request, body: None) -> web.Response:
        limit = int(_number(request, "limit", DEFAULT_HISTORY_LIMIT, 1, MAX_HISTORY_LIMIT, integer=True))
        return json_response(await self.cp.connector_history(request.match_info["identifier"], limit))

    # --- tasks -------------------------------------------------------------------------------

    async def list_tasks(self, request: web.Request, body: None) -> web.Response:
        state = request.query.get("state")
        if state not in (None, "queued", "running", "done"):
            raise ApiFailure(
                400,
                Code.INVALID_REQUEST,
                "state must be queued, running or done",
                problems=[Problem(field="state", message=f"{state!r} is not a task state")],
            )
        limit = _number(request, "limit", 100, 1, 1000, integer=True)
        rows = await self.cp.store.list_tasks(
            state=state, connector_id=request.query.get("connectorId"), limit=int(limit)
        )
        return json_response(TaskList(tasks=[self.cp.task_view(t) for t in rows]))

    async def create_task(self, request: web.Request, body: CreateTaskRequest) -> web.Response:
        row = await self.cp.create_task(
            type=body.type,
            payload=body.payload,
            selectors=body.selectors,
            pickup_timeout=body.pickup_timeout_seconds,
            timeout=body.timeout_seconds,
            max_attempts=body.max_attempts,
        )
        return json_response(self.cp.task_view(row), 201)

    async def get_task(self, request: web.Request, body: None) -> web.Response:
        wait = _number(request, "wait", 0, 0, 600)
        task = await self.cp.wait_task(request.match_info["taskId"], wait)
        return json_response(self.cp.task_view(task))

    async def cancel_task(self, request: web.Request, body: None) -> web.Response:
        return json_response(self.cp.task_view(await self.cp.cancel_task(request.match_info["taskId"])))

    async def stats(self, request: web.Request, body: None) -> web.Response:
        return json_response(await self.cp.stats())

    # --- delegates and tokens ----------------------------------------------------------------

    async def list_delegates(self, request: web.Request, body: None) -> web.Response:
        return json_response(DelegateList(delegates=await self.cp.delegate_views()))

    async def forget_delegate(self, request: web.Request, body: None) -> web.Response:
        await self.cp.forget_delegate(request.match_info["delegateId"], force=_flag(request, "force"))
        return web.Response(status=204)

    async def list_tokens(self, request: web.Request, body: None) -> web.Response:
        revoked = await self.cp.store.revoked_tokens()
        keys = [(k, "configured") for k in self.verifier.keys] + [(k, "created") for k in self.verifier.issued]
        views = [
            TokenView(
                name=k.name,
                token_id=k.kid,
                revoked=k.kid in revoked,
                revoked_at=_ts(revoked.get(k.kid)),
                source=source,  # type: ignore[arg-type]
                **_scope_fields(self.scope_of(k.name, k.kid)),
            )
            for k, source in keys
        ]
        return json_response(TokenList(tokens=views))

    async def create_token(self, request: web.Request, body: CreateTokenRequest) -> web.Response:
        taken = [k for k in self.verifier.all_keys if k.name == body.name]
        if taken:
            state = "revoked" if self.verifier.is_revoked(taken[0].kid) else "active"
            raise ApiFailure(
                409,
                Code.CONFLICT,
                f"a delegate token named {body.name!r} already exists ({state}); choose another name",
                problems=[Problem(field="name", message="is taken")],
            )
        try:
            scope = TokenScope.of(body.names, body.tags)
        except ScopeInvalid as exc:
            raise ApiFailure(400, Code.INVALID_REQUEST, str(exc)) from None
        key, value = IssuedToken.create(body.name)
        now = self.cp.now()
        await self.cp.store.add_issued_token(key.name, key.kid, key.key, now, scope=(scope.names, scope.tags))
        self._issued_scopes[key.kid] = scope
        self.verifier.add_issued(key)
        log.warning("controlplane.token_created", token=key.name, token_id=key.kid, scope=scope.describe())
        created = CreatedToken(name=key.name, token_id=key.kid, token=value, created_at=ts(now), **_scope_fields(scope))
        return json_response(created, 201)

    async def revoke_token(self, request: web.Request, body: None) -> web.Response:
        name = request.match_info["name"]
        force = _flag(request, "force")
        key = self.verifier.find(name)
        if key is None:
            raise ApiFailure(404, Code.NOT_FOUND, f"no delegate token named {name!r}")
        active = [k for k in self.verifier.all_keys if not self.verifier.is_revoked(k.kid)]
        if not force and [k.kid for k in active] == [key.kid]:
            raise ApiFailure(
                409,
                Code.CONFLICT,
                f"{key.name!r} is the last active delegate token: revoking it locks every delegate out. "
                "Create another first (delegate-agent tokens create NAME), or pass force (--force)",
            )
        now = self.cp.now()
        await self.cp.store.revoke_token(key.kid, key.name, now)
        self.verifier.revoke(key.kid)
        log.warning("controlplane.token_revoked", token=key.name, token_id=key.kid)
        return json_response(TokenView(name=key.name, token_id=key.kid, revoked=True, revoked_at=_ts(now)))


def _scope_fields(scope: TokenScope) -> dict[str, list[str] | None]:
    return {
        "names": None if scope.names is None else list(scope.names),
        "tags": None if scope.tags is None else list(scope.tags),
    }


def _ts(value: float | None) -> Any:
    return ts(value) if value is not None else None


def _number(request: web.Request, name: str, default: float, lo: float, hi: float, *, integer: bool = False) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    value = parse_bounded(raw, lo, hi, integer=integer)
    if value is None:
        message = bounded_message(raw, lo, hi, integer=integer)
        raise ApiFailure(
            400, Code.INVALID_REQUEST, f"{name} {message}", problems=[Problem(field=name, message=message)]
        )
    return value


def _flag(request: web.Request, name: str) -> bool:
    """A boolean query parameter. An empty one (``?force=``) is refused: a force is said explicitly."""
    raw = request.query.get(name)
    if raw is None or raw.lower() in ("false", "0"):
        return False
    if raw.lower() in ("true", "1"):
        return True
    raise ApiFailure(
        400,
        Code.INVALID_REQUEST,
        f"{name} must be true or false",
        problems=[Problem(field=name, message=f"{raw!r} is not true or false")],
    )


Handler = Callable[[web.Request, Any], Awaitable[web.StreamResponse]]


#: How deep a connector document may nest: Harness's is five levels; deeper is an attack, not a connector.
MAX_CONNECTOR_DEPTH = 32


def _decode_connector_body(ctype: str, raw: bytes) -> Any:
    text = raw.decode("utf-8", errors="replace")
    try:
        if ctype in ("application/json", "text/json"):
            doc = json.loads(text)
        elif ctype in (
            "application/yaml",
            "application/x-yaml",
            "text/yaml",
            "text/x-yaml",
            "text/plain",
            "application/octet-stream",
        ):
            doc = load_yaml(text)
        else:
            raise ApiFailure(
                415,
                Code.UNSUPPORTED_MEDIA_TYPE,
                f"send the connector as application/json or application/yaml, not {clip(ctype)}",
            )
    except (ValueError, yaml.YAMLError) as exc:
        raise ApiFailure(
            400, Code.INVALID_CONNECTOR, f"the body is not valid {_kind_name(ctype)}: {str(exc).splitlines()[0][:200]}"
        ) from None
    except RecursionError:
        raise _too_deep(MAX_CONNECTOR_DEPTH) from None
    if _nested_deeper_than(doc, MAX_CONNECTOR_DEPTH):
        raise _too_deep(MAX_CONNECTOR_DEPTH)
    return doc


def _too_deep(limit: int) -> ApiFailure:
    return ApiFailure(400, Code.INVALID_CONNECTOR, f"the body nests deeper than {limit} levels: not a connector")


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether lists and mappings in ``value`` nest deeper than ``limit`` (without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _kind_name(ctype: str) -> str:
    return "JSON" if "json" in ctype else "YAML"


def bind(route: Route, handlers: Handlers) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wrap a handler with its route's auth and body decoding."""
    fn: Handler = getattr(handlers, route.handler)
    model = route.request

    async def endpoint(request: web.Request) -> web.StreamResponse:
        if route.auth != "none":
            handlers.authenticate(request, route.auth)
        body: Any = None
        if route.body_kind == "connector":
            raw = await request.read()
            if not raw.strip():
                raise ApiFailure(400, Code.INVALID_CONNECTOR, "the body is empty: send a Harness connector document")
            if len(raw) > PARSE_IN_THREAD_BYTES:
                # A large document takes a tenth of a second or more to parse: not on the event loop,
                # where every long poll and heartbeat would wait for it.
                body = await asyncio.to_thread(_decode_connector_body, request.content_type, raw)
            else:
                body = _decode_connector_body(request.content_type, raw)
        elif model is not None:
            raw = await request.read()
            if raw.strip():
                if request.content_type not in ("application/json", "text/json"):
                    raise ApiFailure(
                        415, Code.UNSUPPORTED_MEDIA_TYPE, f"send application/json, not {request.content_type}"
                    )
                try:
                    body = msgspec.convert(_integral(_json_decode(raw)), model)
                except msgspec.ValidationError as exc:
                    raise ApiFailure(
                        400, Code.INVALID_REQUEST, f"invalid request body: {clip(str(exc))}", problems=[_problem(exc)]
                    ) from None
                except msgspec.DecodeError as exc:
                    raise ApiFailure(
                        400, Code.INVALID_REQUEST, f"the body is not valid JSON: {clip(str(exc))}"
                    ) from None
                except RecursionError:  # no request model nests; a body that does is refused, not a 500
                    raise ApiFailure(400, Code.INVALID_REQUEST, "the body nests too deeply") from None
            elif not route.request_optional:
                raise ApiFailure(400, Code.INVALID_REQUEST, "this request needs a JSON body")
        try:
            return await fn(request, body)
        except ApiFailure as exc:
            if exc.code in _REFUSALS:
                handlers.delegate_refused(request, exc.code)
            raise

    return endpoint


_json_decode = msgspec.json.Decoder().decode


def _ascii_credentials(request: web.Request) -> None:
    """Credentials are ASCII: other bytes (even invalid UTF-8, which would not encode again) are a 401."""
    given = request.headers.get("X-API-Key")
    if given is not None and not given.isascii():
        raise AuthError("wrong API key", status=401, code=Code.UNAUTHENTICATED)
    if not request.headers.get("Authorization", "").isascii():
        raise AuthError(
            "the Authorization header must be ASCII (Bearer <token>)", status=401, code=Code.UNAUTHENTICATED
        )


def _integral(value: Any) -> Any:
    """JSON has one number type: 142.0 is a valid integer (as JSON Schema says), so make it one.

    Non-integral floats and strings stay as they are, so "142" or 142.5 is still refused for an int.
    """
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def _problem(exc: msgspec.ValidationError) -> Problem:
    text = str(exc)
    where = "body"
    if " - at `$" in text:
        text, _, path = text.rpartition(" - at `")
        where = path.rstrip("`").removeprefix("$").lstrip(".") or "body"
    return Problem(field=where, message=clip(text))


def metrics_middleware(metrics: ControlPlaneMetrics) -> Middleware:
    """Count and time every request by route name; outermost, so it sees the status that was sent."""

    @web.middleware
    async def observe(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        code = 500
        try:
            response = await handler(request)
            code = response.status
            return response
        except asyncio.CancelledError:
            code = 499  # the client hung up first (a long poll whose delegate went away)
            raise
        finally:
            route = getattr(request.match_info.route, "name", None) or "unmatched"
            metrics.observe_request(route, code, time.perf_counter() - started)

    return observe


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves as JSON with a code; nothing user-caused becomes a 500 or a traceback."""
    try:
        return await handler(request)
    except ApiFailure as exc:
        return error_response(exc.status, exc.code, exc.message, problems=exc.problems, retry_after=exc.retry_after)
    except RowDamaged as exc:
        log.error("controlplane.http.row_damaged", method=request.method, path=request.path, error=str(exc))
        return error_response(500, Code.INTERNAL, f"{exc}; see the control plane's log")
    except StoreUnavailable as exc:
        return error_response(
            503,
            Code.UNAVAILABLE,
            f"the control plane cannot record this now ({exc}); nothing was changed, retry later",
            retry_after=STORE_RETRY_SECONDS,
        )
    except AuthError as exc:
        status = exc.status or 401
        headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if status == 401 else None
        return error_response(status, exc.code or Code.UNAUTHENTICATED, exc.message, headers=headers)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, Code.PAYLOAD_TOO_LARGE, f"the body is larger than {MAX_BODY_BYTES} bytes")
    except web.HTTPNotFound:
        return error_response(404, Code.NOT_FOUND, f"no route for {request.method} {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        return error_response(
            405,
            Code.INVALID_REQUEST,
            f"{request.method} is not allowed on {request.path}",
            headers={"Allow": ", ".join(sorted(exc.allowed_methods))},
        )
    except web.HTTPException as exc:
        return error_response(exc.status, Code.INVALID_REQUEST, exc.reason)
    except Exception:
        log.exception("controlplane.http.internal_error", method=request.method, path=request.path)
        return error_response(500, Code.INTERNAL, "internal error; see the control plane's log")
