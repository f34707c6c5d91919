"""The connection test: resolve -> (assume role) -> who am I -> DescribeRegions -> (permissions).

Every step is timed and reported. The result has Harness's shape (status, testedAt, errorSummary,
errors) plus what Harness lacks: the identity, the step that failed, the AWS error code and the
one hint that fits. The whole test is bounded (Harness: 2 minutes), and so is every call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import structlog
from botocore.exceptions import BotoCoreError, ClientError

from agent.aws.clients import AwsClients, RetryPolicy
from agent.aws.connector import AwsConnector
from agent.aws.credentials import CredentialResolver, Resolved, oidc_claims, session_name
from agent.aws.diagnosis import Context, Diagnosis, OidcContext, diagnose
from agent.aws.environment import AwsEnvironment
from agent.aws.partitions import principal_for_simulation
from agent.aws.secrets import SecretStore
from agent.protocol.results import (
    Identity,
    PermissionCheck,
    PermissionDenial,
    Redact,
    Step,
    StepStatus,
    ValidationResult,
    failed,
)

log = structlog.get_logger("aws")

STEPS = ("resolve_credentials", "assume_role", "get_caller_identity", "describe_regions", "simulate_permissions")
DEFAULT_TIMEOUT = 120.0

#: Called once per step: (step, status, seconds, credential type, failure category or None).
StepObserver = Callable[[str, str, float, str, str | None], None]


class _StepFailed(Exception):
    def __init__(self, step: str, diagnosis: Diagnosis) -> None:
        super().__init__(diagnosis.message)
        self.step = step
        self.diagnosis = diagnosis


class _Refused(Exception):
    """Raised inside a step when its call answered but the answer fails the step (a region not opted
    in, a denied permission): the step records it as a failure like any error."""

    def __init__(self, diagnosis: Diagnosis) -> None:
        super().__init__(diagnosis.message)
        self.diagnosis = diagnosis


@dataclass
class _TestRun:
    """One connection test in progress: its steps so far and what the hints would need to know."""

    connector: AwsConnector
    endpoints: tuple[tuple[str, str], ...] = ()
    oidc_token: str | None = field(default=None, repr=False)
    steps: list[Step] = field(default_factory=list)
    current: str | None = None
    current_started: float = 0.0
    observer: StepObserver | None = None
    #: The principal a hint names, once known (a role that refused to be assumed) ...
    principal: str | None = None
    #: ... or (caller ARN, known role ARN) as GetCallerIdentity answered, resolved only if a hint needs it.
    caller: tuple[str | None, str | None] | None = None

    def context(self) -> Context:
        """What the hints need to be concrete; built only when a step fails (most tests pass)."""
        c = self.connector
        return Context(
            credential_type=c.credential_type,
            region=c.region,
            partition=c.partition,
            principal=_iam_principal(*self.caller) if self.caller is not None else self.principal,
            role_arn=c.cross_account.role_arn if c.cross_account else None,
            external_id_set=bool(c.cross_account and c.cross_account.external_id),
            secret_ref=c.secret_key_ref.raw if c.secret_key_ref else None,
            session_token_ref=c.session_token_ref.raw if c.session_token_ref else None,
            endpoints=self.endpoints,
            oidc=_oidc_context(c, self.oidc_token),
        )

    def step(self, name: str) -> _Step:
        """Time a step; record it (steps and observer) as a success, or as the failure it raised."""
        return _Step(self, name)

    def failed(self, name: str, started: float, exc: BaseException) -> _StepFailed:
        """The step ``name`` raised ``exc``: record it, and say what it means for the user."""
        if isinstance(exc, _Refused):
            self._record(name, "FAILURE", started, exc.diagnosis.category)
            return _StepFailed(name, exc.diagnosis)
        diagnosis = diagnose(exc, step=name, ctx=self.context())
        if diagnosis.category == "internal":
            # Not the user's mistake: keep the traceback (redacted like every log line).
            log.error("aws.validation_internal_error", step=name, connector=self.connector.identifier, exc_info=exc)
        self._record(name, "FAILURE", started, diagnosis.category)
        return _StepFailed(name, diagnosis)

    def fail(self, name: str, started: float, diagnosis: Diagnosis) -> _StepFailed:
        self._record(name, "FAILURE", started, diagnosis.category)
        return _StepFailed(name, diagnosis)

    def timed_out(self, name: str) -> None:
        """The whole test's bound ran out during ``name``: that step failed (unless it was recorded)."""
        if not any(s.name == name for s in self.steps):
            self._record(name, "FAILURE", self.current_started, "timeout")

    def _record(self, name: str, status: StepStatus, started: float, category: str | None) -> None:
        seconds = time.perf_counter() - started
        self.steps.append(Step(name=name, status=status, duration_ms=round(seconds * 1000)))
        if self.observer is not None:
            self.observer(name, status, seconds, self.connector.credential_type, category)

    def skip_rest(self, planned: list[str]) -> None:
        done = {s.name for s in self.steps}
        for name in planned:
            if name not in done:
                self.steps.append(Step(name=name, status="SKIPPED"))


class _Step:
    """One step of a run as a ``with`` block (a class, not a generator: three per test)."""

    __slots__ = ("_name", "_run", "_started")

    def __init__(self, run: _TestRun, name: str) -> None:
        self._run = run
        self._name = name
        self._started = 0.0

    def __enter__(self) -> None:
        self._run.current = self._name
        self._started = self._run.current_started = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None:
            self._run._record(self._name, "SUCCESS", self._started, None)
        elif not isinstance(exc, _StepFailed | asyncio.CancelledError):
            raise self._run.failed(self._name, self._started, exc) from None


class AwsValidator:
    """Runs connection tests. One per process; safe for many concurrent tests."""

    def __init__(
        self,
        env: AwsEnvironment,
        clients: AwsClients,
        secrets: SecretStore,
        *,
        redact: Redact | None = None,
        observer: StepObserver | None = None,
    ) -> None:
        self.env = env
        self.clients = clients
        self.secrets = secrets
        self._redact = redact
        self._observer = observer
        self.resolver = CredentialResolver(env, clients, secrets)
        #: The environment is frozen: its endpoint overrides (named in hints) and the retry policy of a
        #: connector without a backoff override are worked out once.
        self._endpoints = env.endpoint_overrides()
        self._policy = RetryPolicy.for_connector(env, None)

    async def validate(
        self,
        connector: AwsConnector,
        *,
        task_id: str,
        delegate_id: str | None,
        delegate_name: str,
        permissions: tuple[str, ...] = (),
        timeout: float = DEFAULT_TIMEOUT,
        oidc_token: str | None = None,
    ) -> ValidationResult:
        """Test the connector; always returns a result, never raises for a failed test."""
        region = connector.region
        actions = tuple(dict.fromkeys(connector.permissions + permissions))
        planned = [
            "resolve_credentials",
            *(["assume_role"] if connector.cross_account else []),
            "get_caller_identity",
            "describe_regions",
            *(["simulate_permissions"] if actions else []),
        ]
        run = _TestRun(connector, self._endpoints, oidc_token, observer=self._observer)
        policy = self._policy if connector.backoff is None else RetryPolicy.for_connector(self.env, connector.backoff)
        result = ValidationResult(
            status="SUCCESS",
            tested_at=datetime.now(UTC),
            delegate_id=delegate_id,
            delegate_name=delegate_name,
            connector_identifier=connector.identifier,
            credential_type=connector.credential_type,
            test_region=region,
            partition=connector.partition,
            steps=run.steps,
        )
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                await self._steps(
                    run,
                    result,
                    policy,
                    task_id=task_id,
                    delegate_name=delegate_name,
                    actions=actions,
                    oidc_token=oidc_token,
                )
        except _StepFailed as failed:
            self._fail(result, failed.step, failed.diagnosis)
        except TimeoutError:
            step = run.current or "resolve_credentials"
            if run.current is None:
                run.current_started = started
            run.timed_out(step)
            self._fail(
                result,
                step,
                Diagnosis(
                    "timeout",
                    f"the connection test did not finish within {timeout:.0f}s (at {step})",
                    "AWS or the network in between is not answering; check egress from the delegate and test again",
                ),
            )
        run.skip_rest(planned)
        result.duration_ms = round((time.perf_counter() - started) * 1000)
        return result if self._redact is None else self._redact(result)

    async def _steps(
        self,
        run: _TestRun,
        result: ValidationResult,
        policy: RetryPolicy,
        *,
        task_id: str,
        delegate_name: str,
        actions: tuple[str, ...],
        oidc_token: str | None,
    ) -> None:
        connector, region = run.connector, run.connector.region
        resolved: Resolved
        with run.step("resolve_credentials"):
            resolved = await self.resolver.base(
                connector, region=region, delegate_name=delegate_name, task_id=task_id, oidc_token=oidc_token
            )
            try:
                # Deferred credentials (web identity) fetch now, so errors land on this step.
                await self.resolver.remember(resolved.credentials)
            except BaseException:
                self.resolver.forget(resolved)
                raise
        result.credential_source = resolved.source
        if connector.cross_account is not None:
            with run.step("assume_role"):
                base = resolved
                resolved = self.resolver.assume(
                    base,
                    connector.cross_account,
                    region=region,
                    policy=policy,
                    name=session_name(delegate_name, task_id),
                )
                try:
                    await self.resolver.remember(resolved.credentials)
                except ClientError:
                    # Name who was refused: the hint is about *that* principal's trust relationship.
                    caller = await self._whoami(base, region, policy)
                    run.principal = _iam_principal(caller, base.role_arn) or base.role_arn
                    raise
            result.credential_source = resolved.source
        with self.clients.bound(resolved.credentials):
            with run.step("get_caller_identity"):
                async with self.clients.client("sts", region, policy) as sts:
                    ident = await sts.get_caller_identity()
                identity = Identity(account=ident.get("Account"), arn=ident.get("Arn"), user_id=ident.get("UserId"))
                result.identity = identity
                # Hints name what a policy can name: the role, not this one session of it.
                run.caller = (ident.get("Arn"), resolved.role_arn)
            with run.step("describe_regions"):
                async with self.clients.client("ec2", region, policy) as ec2:
                    answer = await ec2.describe_regions(RegionNames=[region], AllRegions=True)
                regions = {r.get("RegionName"): r for r in answer.get("Regions", [])}
                info = regions.get(region)
                if info is not None and info.get("OptInStatus") == "not-opted-in":
                    raise _Refused(
                        Diagnosis(
                            "invalid_config",
                            f"{region} is not enabled for account {identity.account}",
                            f"enable {region} (Account > AWS Regions) or pick another test region",
                            "OptInRequired",
                        )
                    )
            if actions:
                await self._simulate(run, result, policy, resolved, actions)

    async def _simulate(
        self,
        run: _TestRun,
        result: ValidationResult,
        policy: RetryPolicy,
        resolved: Resolved,
        actions: tuple[str, ...],
    ) -> None:
        started = time.perf_counter()
        identity = result.identity or Identity()
        principal = principal_for_simulation(identity.arn or "", resolved.role_arn)
        if principal is None:
            raise run.fail(
                "simulate_permissions",
                started,
                Diagnosis(
                    "invalid_config",
                    f"{identity.arn} cannot be simulated",
                    "the permission check needs an IAM user or role; it cannot check the account root or a "
                    "federated user",
                ),
            )
        with run.step("simulate_permissions"):
            decisions: dict[str, str] = {}
            resources = list(run.connector.permission_resources) or ["*"]
            async with self.clients.client("iam", run.connector.region, policy) as iam:
                marker = None
                while True:
                    kwargs: dict[str, Any] = {
                        "PolicySourceArn": principal,
                        "ActionNames": list(actions),
                        "ResourceArns": resources,
                    }
                    if marker:
                        kwargs["Marker"] = marker
                    page = await iam.simulate_principal_policy(**kwargs)
                    for r in page.get("EvaluationResults", []):
                        name, decision = r.get("EvalActionName"), r.get("EvalDecision", "implicitDeny")
                        # With several resources an action is allowed only if every resource is.
                        if decisions.get(name, "allowed") == "allowed":
                            decisions[name] = decision
                    marker = page.get("Marker") if page.get("IsTruncated") else None
                    if not marker:
                        break
            allowed = [a for a in actions if decisions.get(a) == "allowed"]
            denied = [
                PermissionDenial(action=a, decision=decisions.get(a, "implicitDeny"))
                for a in actions
                if decisions.get(a) != "allowed"
            ]
            result.permission_check = PermissionCheck(
                principal=principal, resources=resources, allowed=allowed, denied=denied
            )
            if denied:
                names = ", ".join(d.action for d in denied)
                explicit = any(d.decision == "explicitDeny" for d in denied)
                raise _Refused(
                    Diagnosis(
                        "permission_denied",
                        f"{principal} is not allowed: {names}",
                        f"grant {names} to {principal} before pipelines use this connector"
                        + (
                            "; an explicit Deny (policy, permission boundary or SCP) blocks some of them"
                            if explicit
                            else ""
                        ),
                        "ImplicitDeny" if not explicit else "ExplicitDeny",
                    ),
                )

    async def _whoami(self, resolved: Resolved, region: str, policy: RetryPolicy) -> str | None:
        """Best effort, for a better hint only: the ARN behind some credentials, or None."""
        try:
            async with asyncio.timeout(5):
                with self.clients.bound(resolved.credentials):
                    async with self.clients.client("sts", region, policy) as sts:
                        return str((await sts.get_caller_identity())["Arn"])
        except (ClientError, BotoCoreError, TimeoutError, OSError):
            return None

    @staticmethod
    def _fail(result: ValidationResult, step: str, d: Diagnosis) -> None:
        failed(result, step=step, category=d.category, message=d.message, hint=d.hint, aws_error_code=d.aws_code)

    async def close(self) -> None:
        await self.clients.close()


def _oidc_context(connector: AwsConnector, token: str | None) -> OidcContext | None:
    """What an OIDC hint names: the issuer, the exact ``sub`` and ``aud`` the trust policy must allow."""
    if connector.credential_type != "OidcAuthentication":
        return None
    claims = oidc_claims(token)
    aud = claims.get("aud")
    return OidcContext(
        role_arn=connector.oidc_role_arn or "",
        issuer=str(claims.get("iss") or ""),
        subject=str(claims.get("sub") or ""),
        audience=aud if isinstance(aud, str) else connector.oidc_audience,
    )


def _iam_principal(caller_arn: str | None, known_role_arn: str | None) -> str | None:
    """The ARN a policy names for a caller: an assumed-role session becomes its role (path kept if known)."""
    if not caller_arn:
        return None
    return principal_for_simulation(caller_arn, known_role_arn) or caller_arn
