"""Validation "through the platform" (``executeOnDelegate: false``): the control plane's seam."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from agent.aws.connector import AwsConnector
from agent.observability.logging import Redactor

#: Runs a connector test inside the control plane: (connector, task id, IAM actions) -> result document.
PlatformValidator = Callable[[AwsConnector, str, tuple[str, ...]], Awaitable[dict[str, Any]]]


def platform_validator_from_env(
    environ: Mapping[str, str], *, secrets_dir: Path | None, redactor: Redactor
) -> PlatformValidator | None:
    return None
