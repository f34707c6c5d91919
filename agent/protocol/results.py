"""The result document: what a connection test found, typed once for every side.

A connector test answers more than pass/fail: who the credentials are, which step failed, the
AWS error code and the one hint that fits. The validator on the delegate, the executor (for
failures around a handler), the control plane (for failures it decides: no delegate, lease lost,
cancelled) and the CLI all build or read this one type, and :func:`failed` is the one way a
failure is written into it.

On the wire it borrows the names of Harness's connector validation result (``status``,
``testedAt``, ``errorSummary``, ``errors``) and adds our own fields, camelCase. Every field is
present in the JSON (``null`` when unknown); unknown fields are ignored on decode, so a newer peer
can add some. Its types are ours (an RFC 3339 ``testedAt``, string error codes); what a Harness
client parses, exactly typed, is :class:`HarnessValidationResult`, made from it by
:func:`harness_result` whenever the control plane serves a connector test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Literal

from agent.protocol.wire import TaskStatus, Timestamp, Wire

StepStatus = Literal["SUCCESS", "FAILURE", "SKIPPED"]
#: Harness's ConnectivityStatus; a test here ends SUCCESS or FAILURE.
ConnectivityStatus = Literal["SUCCESS", "FAILURE", "PARTIAL", "UNKNOWN"]
#: The code Harness gives every connector-test error (NGErrorHelper's default): a client switches on
#: ``reason`` and shows ``message``, never the code.
HARNESS_GENERIC_ERROR_CODE = 450


class Identity(Wire, kw_only=True):
    """Who the credentials are, as ``sts:GetCallerIdentity`` says."""

    account: str | None = None
    arn: str | None = None
    user_id: str | None = None


class Step(Wire, kw_only=True):
    name: str
    status: StepStatus
    duration_ms: int = 0


class Failure(Wire, kw_only=True):
    """Where and why a test failed, and what to do about it."""

    #: The step that failed (``assume_role``, ``describe_regions``, ``delegate_selection``, ...).
    step: str
    #: What kind of failure, in our words (``permission_denied``, ``no_eligible_delegate``, ...).
    category: str
    #: The error code AWS answered with, when AWS answered.
    aws_error_code: str | None = None
    #: The one hint that fits, when there is one.
    hint: str | None = None


class ErrorEntry(Wire, kw_only=True):
    """One entry of Harness's ``errors`` list."""

    reason: str
    message: str
    #: The AWS error code when there is one, else the failure category.
    code: str


class PermissionDenial(Wire, kw_only=True):
    action: str
    decision: str


class PermissionCheck(Wire, kw_only=True):
    """The outcome of ``iam:SimulatePrincipalPolicy`` for the actions a pipeline will need."""

    principal: str
    resources: list[str] = []
    allowed: list[str] = []
    denied: list[PermissionDenial] = []


class ValidationResult(Wire, kw_only=True):
    status: TaskStatus
    tested_at: Timestamp
    delegate_id: str | None = None
    delegate_name: str | None = None
    connector_identifier: str | None = None
    credential_type: str | None = None
    test_region: str | None = None
    partition: str | None = None
    #: Where the credentials came from (``irsa``, ``access_key``, ``assume_role``, ...).
    credential_source: str | None = None
    identity: Identity | None = None
    error_summary: str | None = None
    errors: list[ErrorEntry] = []
    steps: list[Step] = []
    failure: Failure | None = None
    permission_check: PermissionCheck | None = None
    duration_ms: int | None = None


class HarnessErrorDetail(Wire, kw_only=True):
    """Harness's ``ErrorDetail``: ``code`` is an integer."""

    reason: str
    message: str
    code: int = HARNESS_GENERIC_ERROR_CODE


class HarnessValidationResult(Wire, kw_only=True):
    """Harness's ``ConnectorValidationResult``, field for field and type for type.

    Made from a :class:`ValidationResult` by :func:`harness_result`, never stored: it cannot
    disagree with the result it comes from.
    """

    status: ConnectivityStatus
    #: Epoch milliseconds, as Harness has it.
    tested_at: int
    error_summary: str | None = None
    errors: list[HarnessErrorDetail] = []
    #: The delegate that ran the test (``null`` when the control plane ran it or decided the failure).
    delegate_id: str | None = None
    task_id: str | None = None


def epoch_ms(when: datetime) -> int:
    """Milliseconds since the epoch, exactly (no float rounding); a naive time counts as UTC."""
    aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return (aware - _EPOCH) // timedelta(milliseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def harness_result(result: ValidationResult, *, task_id: str | None = None) -> HarnessValidationResult:
    """What a Harness client parses, from our result: the one place the two shapes meet.

    Each of our ``errors`` becomes one Harness error with code 450, keeping its ``reason`` (our
    failure category) and ``message``; our string code (the AWS error code) stays in the full result.
    """
    return HarnessValidationResult(
        status=result.status,
        tested_at=epoch_ms(result.tested_at),
        error_summary=result.error_summary,
        errors=[HarnessErrorDetail(reason=e.reason, message=e.message) for e in result.errors],
        delegate_id=result.delegate_id,
        task_id=task_id,
    )


#: Masks secret values in a result before it leaves the process (the delegate's Redactor does it).
Redact = Callable[[ValidationResult], ValidationResult]


def failed(
    result: ValidationResult,
    *,
    step: str,
    category: str,
    message: str,
    hint: str | None = None,
    aws_error_code: str | None = None,
    problems: Iterable[tuple[str, str]] = (),
) -> ValidationResult:
    """Mark ``result`` as a FAILURE at ``step`` and return it: the one way a failure is written.

    ``problems`` (field, message) become one ``errors`` entry each, so an invalid connector lists
    every mistake at once; otherwise ``errors`` holds the failure itself.
    """
    code = aws_error_code or category
    errors = [ErrorEntry(reason=category, message=f"{f}: {m}", code=code) for f, m in problems]
    result.status = "FAILURE"
    result.error_summary = message
    result.errors = errors or [ErrorEntry(reason=category, message=message, code=code)]
    result.failure = Failure(step=step, category=category, aws_error_code=aws_error_code, hint=hint)
    return result


def failure_result(
    category: str,
    message: str,
    *,
    step: str,
    hint: str | None = None,
    problems: Iterable[tuple[str, str]] = (),
    delegate_id: str | None = None,
    delegate_name: str | None = None,
) -> ValidationResult:
    """A new FAILURE result for a failure around the test itself (invalid task, timeout, no delegate)."""
    return failed(
        ValidationResult(
            status="FAILURE", tested_at=datetime.now(UTC), delegate_id=delegate_id, delegate_name=delegate_name
        ),
        step=step,
        category=category,
        message=message,
        hint=hint,
        problems=problems,
    )
