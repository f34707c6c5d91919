"""Who may run what: delegate tags, task selectors, and how to explain a mismatch to a user.

Routing follows Harness: a task goes only to a connected delegate that supports its type and whose
tags (its name included, case-insensitively) contain **all** of the task's selectors.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.controlplane.store import DelegateRow

#: Delegate states that count as connected. The others: ``deregistered`` (it said goodbye) and
#: ``lost`` (it went silent); rows written before that distinction say ``disconnected`` (read: lost).
CONNECTED = frozenset({"running", "draining"})


def normalise_tags(tags: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t.strip().lower() for t in tags if t.strip()))


def describe_tags(delegates: Iterable[DelegateRow], limit: int = 6) -> str:
    """The tag sets the given delegates have, each with the names that have it.

    For example ``Connected delegates: eks-1, eks-2 have [eks, prod]; lab has no tags but its name.``
    """
    groups: dict[tuple[str, ...], list[str]] = {}
    for d in delegates:
        tags = tuple(sorted(t for t in d.tags if t != d.name.lower()))
        names = groups.setdefault(tags, [])
        if d.name not in names:
            names.append(d.name)
    parts = []
    for tags, names in sorted(groups.items(), key=lambda g: (not g[0], g[0])):  # the untagged last
        verb = "has" if len(names) == 1 else "have"
        what = f"[{', '.join(tags)}]" if tags else "no tags but " + ("its name" if len(names) == 1 else "their names")
        parts.append(f"{', '.join(sorted(names))} {verb} {what}")
    more = f"; and {len(parts) - limit} more" if len(parts) > limit else ""
    return "Connected delegates: " + "; ".join(parts[:limit]) + more + "."
