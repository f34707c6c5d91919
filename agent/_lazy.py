"""PEP 562 lazy exports for package ``__init__`` files (the pattern stamina uses for ``__version__``).

Python runs every parent package's ``__init__`` before a submodule, so a package that re-exports
its heavy modules eagerly makes ``import agent.protocol.models`` load the daemon, aiohttp and
prometheus_client. A package built with :func:`lazy_exports` imports each public name on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    namespace: dict[str, Any], exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package whose ``exports`` map public names to modules.

    ``namespace`` is the package's ``globals()``: a resolved name is stored there, so Python finds it
    directly the next time and ``__getattr__`` runs once per name.
    """
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
