"""Task signatures on the delegate: the check the executor runs before any handler."""

from __future__ import annotations

from agent.protocol.signing import TaskSignatureVerifier
from agent.runtime.executor import TaskCheck


def task_check_from_key(public_key: str | None) -> TaskCheck | None:
    """None when no key is configured (tasks are not checked); otherwise the verifier."""
    if public_key is None:
        return None
    return TaskSignatureVerifier(public_key)
