"""The user's files and data dirs, treated alike by the delegate, the control plane and the CLI.

A file the user names (a connector, a config, a token or API key file) is read as UTF-8 text or
refused in one line that names it; a data dir is judged (without writing) and then opened, and
either step failing is one line naming the directory and the flag or variable that chose it.
Nothing here imports anything else of ours, so every room may use it.
"""

from __future__ import annotations

import os
from pathlib import Path


class NotUtf8Text(ValueError):
    """A file (or stdin) that does not decode as UTF-8; ``str()`` is the one line to show."""

    def __init__(self, name: str | Path) -> None:
        super().__init__(f"{name} is not UTF-8 text")


class DataDirUnusable(Exception):
    """The data dir cannot be created or written; the message names the path and why, in one line."""


def decode_utf8(data: bytes, name: str | Path) -> str:
    """``data`` as text (a UTF-8 byte-order mark is dropped); :class:`NotUtf8Text` naming ``name`` if it is not."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise NotUtf8Text(name) from None


def read_text(path: Path) -> str:
    """The file as text; ``OSError`` as ``Path.read_text`` raises it, :class:`NotUtf8Text` for UTF-16 or binary."""
    return decode_utf8(path.read_bytes(), path)


def data_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot become a writable directory, judged without writing; None when it can."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    blocked = "" if existing == path else f"cannot create {path}: "
    if not existing.is_dir():
        return f"{blocked}{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{blocked}{existing} is not writable by this user"
    return None


def make_data_dir(path: Path, source: str) -> None:
    """Create ``path`` if needed; :class:`DataDirUnusable` naming it and ``source`` (the flag) if it cannot be used."""
    problem = data_dir_problem(path)
    if problem is None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problem = exc.strerror or str(exc)
    if problem is not None:
        raise DataDirUnusable(f"cannot use the data dir {path} ({source}): {problem}")
