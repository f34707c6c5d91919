"""The one YAML loader: safe, and no anchors or aliases.

An alias repeats a whole subtree by reference, so a few nested lists of aliases expand without
bound once written out again (the security review's 539-byte request made a 142 MB answer).
Connectors and settings never need them, so any anchor or alias is refused, with its line.

Scanning and parsing stay in libyaml's C code; only composing the nodes is PyYAML's Python, so it
sees every anchor. Measured on config/connectors/access-key.yaml: 87 us with ``CSafeLoader``,
158 us with this loader, 823 us with the pure Python ``SafeLoader``.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import Node
from yaml.resolver import Resolver

__all__ = ["YamlRefused", "load", "load_all"]


class YamlRefused(yaml.YAMLError):
    """The document uses a YAML feature we do not accept (anchors, aliases); ``str`` is one line."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


class _Refusing(Composer):
    peek_event: Any  # the parser's, beside this in the loader

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()
        if isinstance(event, AliasEvent) or getattr(event, "anchor", None) is not None:
            line = event.start_mark.line + 1
            raise YamlRefused(f"YAML anchors and aliases are not accepted (line {line})", line)
        return super().compose_node(parent, index)


_CParser: Any
try:
    from yaml.cyaml import CParser as _CParser  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    _CParser = None

if _CParser is not None:

    class _Loader(_Refusing, _CParser, SafeConstructor, Resolver):  # type: ignore[misc]
        """libyaml's scanner and parser; PyYAML's composer, first in line, sees every node."""

        def __init__(self, stream: str) -> None:
            _CParser.__init__(self, stream)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            self.anchors: dict[Any, Node] = {}

else:  # pragma: no cover - PyYAML built without libyaml

    class _Loader(_Refusing, yaml.SafeLoader):  # type: ignore[no-redef]
        pass


def load(text: str) -> Any:
    """The single document in ``text``; yaml.YAMLError (YamlRefused among them) if it is not one."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_all(text: str) -> list[Any]:
    """Every document in ``text``, in order."""
    loader = _Loader(text)
    try:
        docs = []
        while loader.check_data():  # type: ignore[no-untyped-call]
            docs.append(loader.get_data())
        return docs
    finally:
        loader.dispose()
