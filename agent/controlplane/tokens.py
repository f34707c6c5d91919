"""What a delegate token may do: its scope (the delegate names and tags it may register).

A token without a scope may register any name and tags, as before. A token with one is kept to its
own routing: a delegate's name is one of its routing tags (connectors select by it), so every tag a
delegate asks for must be allowed by ``tags`` or ``names``, and its name by ``names`` (or, when
only ``tags`` is given, by ``tags``). Patterns are shell-style (``team-a-*``) and case-insensitive,
as tags are.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent.protocol.models import SCOPE_PATTERN

_SCOPE_RE = re.compile(SCOPE_PATTERN)
#: The options a token line may carry after the token, each ``key=a|b|c``.
_OPTIONS = ("names", "tags")


class ScopeInvalid(ValueError):
    """A scope option that cannot be used; the message names it."""


@dataclass(frozen=True)
class TokenScope:
    """The delegate names and tags a token may register; ``None`` means any."""

    names: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None

    @classmethod
    def of(cls, names: Iterable[str] | None, tags: Iterable[str] | None) -> TokenScope:
        """A scope from pattern lists (lowercased, checked); raises :class:`ScopeInvalid`."""
        return cls(names=_patterns("names", names), tags=_patterns("tags", tags))

    @property
    def unrestricted(self) -> bool:
        return self.names is None and self.tags is None

    def refused(self, name: str, tags: Iterable[str]) -> tuple[str | None, list[str]]:
        """The name (or None) and the tags this scope does not allow a delegate to register."""
        if self.unrestricted:
            return None, []
        routing = (*(self.names or ()), *(self.tags or ()))
        name_patterns = self.names if self.names is not None else routing
        bad_name = None if _matches(name.lower(), name_patterns) else name
        bad_tags = [t for t in tags if t != name.lower() and not _matches(t, routing)]
        return bad_name, bad_tags

    def describe(self) -> str:
        """``names [a-*] and tags [a-*, eks]`` (or ``any name and tag``), for messages and tables."""
        if self.unrestricted:
            return "any name and tag"
        routing = (*(self.names or ()), *(self.tags or ()))
        names = self.names if self.names is not None else routing
        return f"names [{', '.join(names)}] and tags [{', '.join(routing)}]"


UNRESTRICTED = TokenScope()


def _always(token_name: str) -> bool:
    return True


@dataclass(frozen=True)
class Caller:
    """Who signed a delegate request: its token's name and scope.

    ``is_active`` says whether another token (the one a delegate is bound to) is still configured
    and unrevoked: a delegate whose token is gone may be bound again by a registration.
    """

    token_name: str
    scope: TokenScope = UNRESTRICTED
    is_active: Callable[[str], bool] = _always


def parse_scope_options(options: Iterable[str]) -> TokenScope:
    """The scope from a token line's options, such as ``names=team-a-*`` and ``tags=eks|prod``."""
    values: dict[str, list[str]] = {}
    for number, option in enumerate(options, 2):
        key, sep, value = option.partition("=")
        if not sep or key not in _OPTIONS:
            # Not quoted: a token mistakenly written with a space in it would show its second half here.
            raise ScopeInvalid(
                f"word {number} is not names=A|B or tags=A|B (a token cannot contain spaces; what follows it "
                "is its scope)"
            )
        if key in values:
            raise ScopeInvalid(f"{key}= is given twice")
        values[key] = value.split("|")
    return TokenScope.of(values.get("names"), values.get("tags"))


def _patterns(what: str, given: Iterable[str] | None) -> tuple[str, ...] | None:
    if given is None:
        return None
    patterns = tuple(dict.fromkeys(p.strip().lower() for p in given))
    if not patterns or not all(patterns):
        raise ScopeInvalid(f"{what}= needs at least one pattern, and no empty ones")
    bad = [p for p in patterns if not _SCOPE_RE.match(p)]
    if bad:
        raise ScopeInvalid(
            f"{what}= has {bad[0][:40]!r}, which is not a tag pattern (letters, digits, '_.:/=+@-', and * or ?)"
        )
    return patterns


def _matches(value: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)
