"""What the wizard's Connection test step says about a test, from queued to its end (no browser needed)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from agent.controlplane.console.wizard_pages import describe_test
from agent.controlplane.store import TaskRow
from agent.protocol.results import Identity, Step, ValidationResult, failed


def task(state: str, **values: Any) -> TaskRow:
    fields: dict[str, Any] = {
        "id": "tsk_1",
        "type": "aws.validate-connector",
        "payload": {},
        "selectors": ("eks",),
        "connector_id": "prod",
        "state": state,
        "created_at": 0.0,
        "pickup_timeout": 30.0,
        "pickup_deadline": 30.0,
        "timeout_seconds": 120.0,
        "attempts": 0,
        "max_attempts": 3,
    }
    return TaskRow(**{**fields, **values})


def view(t: TaskRow) -> Any:
    return describe_test(
        t, name="Prod", page_url="/console/connectors/new/test/tsk_1", edit_url="/edit?step=credentials"
    )


def test_queued_then_running_says_who_runs_it() -> None:
    queued = view(task("queued"))
    assert not queued.done and queued.executing_on is None
    assert [(s.label, s.status) for s in queued.steps] == [
        ("Queued", "SUCCESS"),
        ("Picked up", "RUNNING"),
        ("Validating", "WAITING"),
    ]
    assert "waiting for a delegate with the tags [eks]" in queued.steps[1].detail
    assert queued.status_url == "/console/connectors/new/test/tsk_1/status"
    running = view(task("running", delegate_id="d1", delegate_name="eks-1"))
    assert running.executing_on == "eks-1" and running.steps[2].status == "RUNNING"
    # Taken: the step is done and says by whom, not that it still waits for a delegate.
    assert (running.steps[1].status, running.steps[1].detail) == ("SUCCESS", "by eks-1")


def test_a_success_shows_the_identity() -> None:
    result = ValidationResult(
        status="SUCCESS",
        tested_at=datetime.now(UTC),
        delegate_name="eks-1",
        identity=Identity(account="123456789012", arn="arn:aws:iam::123456789012:user/u"),
        steps=[Step(name="get_caller_identity", status="SUCCESS", duration_ms=12)],
    )
    shown = view(task("done", delegate_id="d1", delegate_name="eks-1", status="SUCCESS", result=result))
    assert shown.done and shown.status == "SUCCESS" and shown.executing_on == "eks-1"
    assert (shown.account, shown.arn) == ("123456789012", "arn:aws:iam::123456789012:user/u")
    assert [(s.label, s.status, s.detail) for s in shown.steps] == [("Get caller identity", "SUCCESS", "12 ms")]


def test_a_failure_shows_step_code_and_hint() -> None:
    result = failed(
        ValidationResult(status="FAILURE", tested_at=datetime.now(UTC), delegate_name="eks-1"),
        step="assume_role",
        category="assume_role_denied",
        message="AccessDenied",
        hint="trust the delegate's role",
        aws_error_code="AccessDenied",
    )
    shown = view(task("done", delegate_id="d1", delegate_name="eks-1", status="FAILURE", result=result))
    assert (shown.failed_step, shown.aws_error_code, shown.hint) == (
        "Assume role",
        "AccessDenied",
        "trust the delegate's role",
    )
    assert [(s.label, s.status) for s in shown.steps] == [("Assume role", "FAILURE")]
    assert shown.edit_url == "/edit?step=credentials"


def test_a_platform_test_says_so_and_a_result_less_end_is_an_end() -> None:
    platform = view(task("running", delegate_name="platform"))
    assert platform.executing_on == "the platform (this control plane)"
    ended = view(task("done", status="FAILURE", failure_reason="cancelled"))
    assert ended.done and ended.status == "FAILURE" and ended.category == "cancelled"
