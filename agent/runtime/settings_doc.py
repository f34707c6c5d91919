"""The settings block of ``config/agent.yaml``, written from the settings table so it cannot drift.

    python -m agent.runtime.settings_doc [config/agent.yaml]

rewrites the lines between the two markers; the prose around them stays hand-written. A test
fails when the file differs from what this would write.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import yaml

from agent.runtime.settings import SETTINGS, Setting

BEGIN = "# --- generated from the settings table in agent/runtime/settings.py: python -m agent.runtime.settings_doc"
END = "# --- end of the generated settings"
REFERENCE = Path("config/agent.yaml")
WIDTH = 100


def render() -> str:
    """Every setting in table order, grouped as in the file: where it comes from, what it does, a value."""
    lines: list[str] = []
    group: str | None = None
    for row in SETTINGS:
        parent, _, leaf = row.key.rpartition(".")
        if parent != group or not parent:
            lines += [""] + ([f"{parent}:"] if parent else [])
            group = parent
        lines += _describe(row, leaf, indent="  " if parent else "")
    return "\n".join(lines[1:]) + "\n"


def _describe(row: Setting, leaf: str, indent: str) -> list[str]:
    names = row.env[0] + (f" (or {', '.join(row.env[1:])})" if row.env[1:] else "")
    where = names if row.in_file else f"{names}, environment only"
    prefix = f"{indent}# "
    comment = textwrap.wrap(f"{where}. {row.doc}", WIDTH - len(prefix), break_long_words=False, break_on_hyphens=False)
    lines = [prefix + line for line in comment]
    if row.in_file:
        value = row.example if row.example is not None else _yaml_value(row.default)
        lines.append(f"{indent}{'# ' if row.commented else ''}{leaf}: {value}")
    return lines


def _yaml_value(value: object) -> str:
    if value is None or callable(value):
        raise ValueError("a setting shown in the file needs an example or a plain default")
    return str(yaml.safe_dump(value, default_flow_style=True)).removesuffix("\n...\n").strip()


def generated_block(text: str) -> str:
    """The lines between the markers in ``text`` (ValueError when a marker is missing)."""
    lines = text.splitlines(keepends=True)
    start, end = lines.index(BEGIN + "\n"), lines.index(END + "\n")
    return "".join(lines[start + 1 : end])


def rewrite(path: Path) -> bool:
    """Put the rendered block between the markers of ``path``; True when the file changed."""
    text = path.read_text()
    old = generated_block(text)
    new = render()
    if old == new:
        return False
    head, _, rest = text.partition(BEGIN + "\n")
    _, _, tail = rest.partition(END + "\n")
    path.write_text(f"{head}{BEGIN}\n{new}{END}\n{tail}")
    return True


def main(argv: Sequence[str]) -> int:
    path = Path(argv[0]) if argv else REFERENCE
    changed = rewrite(path)
    print(f"{path}: {'settings rewritten from the table' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
