"""Validation "through the platform" (``executeOnDelegate: false``): the same validator, in the control plane.

It lives with the control plane, which runs it, not in ``agent.aws``: the AWS package is shared by
the delegate and the control plane and imports neither of them, nor our logging; it takes plain
callables (``redact``, ``on_read``, ``observer``) that the side wiring it up supplies, as here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import structlog

from agent.aws.clients import AwsClients
from agent.aws.connector import AwsConnector
from agent.aws.environment import AwsEnvironment
from agent.aws.secrets import CONTROL_PLANE_SECRETS, SecretStore
from agent.aws.validator import AwsValidator
from agent.observability.logging import Redactor
from agent.protocol.results import ValidationResult

log = structlog.get_logger("controlplane.platform")


class PlatformValidation:
    """The control plane's validator; :meth:`aclose` releases its AWS clients."""

    def __init__(self, validator: AwsValidator) -> None:
        self.validator = validator

    async def __call__(
        self, connector: AwsConnector, task_id: str, permissions: tuple[str, ...], *, oidc_token: str | None = None
    ) -> ValidationResult:
        return await self.validator.validate(
            connector,
            task_id=task_id,
            delegate_id=None,
            delegate_name="platform",
            permissions=permissions,
            oidc_token=oidc_token,
        )

    async def aclose(self) -> None:
        await self.validator.close()


def platform_validator_from_env(
    environ: Mapping[str, str], *, secrets_dir: Path | None, redactor: Redactor
) -> PlatformValidation:
    env, problems = AwsEnvironment.from_environ(environ)
    for p in problems:
        log.warning("controlplane.aws_setting_ignored", setting=p.field, problem=p.message)
    validator = AwsValidator(
        env,
        AwsClients(env),
        SecretStore(secrets_dir, on_read=redactor.add, place=CONTROL_PLANE_SECRETS),
        redact=redactor.value,
    )
    return PlatformValidation(validator)
