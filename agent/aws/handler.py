"""The delegate's task handler for ``aws.validate-connector``."""

from __future__ import annotations

from agent.aws.connector import ConnectorInvalid, parse_actions, parse_connector
from agent.aws.partitions import partition_table
from agent.aws.validator import AwsValidator
from agent.protocol.models import TASK_TYPE_AWS_VALIDATE
from agent.protocol.results import ValidationResult, failure_result
from agent.taskapi import InvalidTask, TaskContext

#: Time kept back from the task's budget so the result is written before the executor's deadline.
RESULT_MARGIN_SECONDS = 2.0


class AwsValidationHandler:
    """Parses the connector from the task and runs the connection test."""

    task_type = TASK_TYPE_AWS_VALIDATE

    def __init__(self, validator: AwsValidator) -> None:
        self.validator = validator

    async def warm(self) -> None:
        """Load the AWS models, endpoint rules and partitions before the first task (not during it)."""
        partition_table()
        await self.validator.clients.warm()

    async def aclose(self) -> None:
        await self.validator.close()

    async def __call__(self, ctx: TaskContext) -> ValidationResult:
        document = ctx.payload.get("connector")
        if document is None:
            raise InvalidTask("payload.connector", "is required: the Harness connector document to test")
        try:
            connector = parse_connector(document)
        except ConnectorInvalid as exc:
            first = exc.problems[0]
            summary = f"the connector is invalid: {first.field}: {first.message}" + (
                f" (and {exc.total - 1:,} more)" if exc.total > 1 else ""
            )
            return failure_result(
                "invalid_config",
                summary,
                step="resolve_credentials",
                hint="fix the connector; every problem is listed in errors",
                problems=[(p.field, p.message) for p in exc.problems],
                delegate_id=ctx.delegate_id,
                delegate_name=ctx.delegate_name,
            )
        try:
            permissions = parse_actions(None, ctx.payload.get("permissions"), "payload.permissions")
        except ConnectorInvalid as exc:
            raise InvalidTask(exc.problems[0].field, exc.problems[0].message) from None
        return await self.validator.validate(
            connector,
            task_id=ctx.task_id,
            delegate_id=ctx.delegate_id,
            delegate_name=ctx.delegate_name,
            permissions=permissions,
            timeout=max(1.0, ctx.timeout - RESULT_MARGIN_SECONDS),
            oidc_token=ctx.oidc_token,
        )
