"""Task signatures: the delegate refuses tasks not signed by the control plane's key (when configured)."""

from __future__ import annotations

from agent.runtime.executor import TaskCheck


def task_check_from_key(public_key: str | None) -> TaskCheck | None:
    """None when no key is configured: tasks are not checked."""
    if public_key is None:
        return None
    raise NotImplementedError("task signatures arrive with the security work")
