"""The one error for input with several things wrong, so every such error reads the same way.

The settings (``ConfigError``) and the connector document (``ConnectorInvalid``) both check
everything before refusing and list each problem with its field, so a user fixes them in one
round; the CLI prints any of them the same way and exits 2.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.protocol.models import Problem


class ProblemsError(Exception):
    """Input with problems; all of them are in ``problems``, in the order they were found.

    ``total`` is how many there are: ``len(problems)``, unless the list was cut short and its last
    entry counts the rest (as a connector document's is, past ``MAX_PROBLEMS``).
    """

    def __init__(self, problems: Iterable[Problem], *, total: int | None = None) -> None:
        self.problems = list(problems)
        self.total = len(self.problems) if total is None else total
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in self.problems))
