"""The user's files and data dirs, treated alike by the delegate, the control plane and the CLI.

A file the user names (a connector, a config, a token or API key file) is read as UTF-8 text or
refused in one line that names it; a data dir is judged (without writing) and then opened, and
either step failing is one line naming the directory and the flag or variable that chose it.
Nothing here imports anything else of ours, so every room may use it.
"""

from __future__ import annotations

import contextlib
import fcntl
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


class DataDirInUse(DataDirUnusable):
    """Another live process owns the data dir; two owners would overwrite each other's state."""


class DataFileDamaged(DataDirUnusable):
    """A file in the data dir is damaged; the message names it and what to do, in one line."""


#: The lock file in every data dir: held (flock) for the owner's life, and proof the dir was used before.
LOCK_NAME = ".lock"


class DataDirLock:
    """Exclusive ownership of a data dir for as long as this process lives.

    ``flock`` on the directory itself: the kernel drops it when the process dies however it dies
    (kill -9, OOM), so there is no stale lock to clean up, and no file whose removal would let a
    second owner in. A second process on the same dir (a second control plane, two delegates on
    one volume) is refused at start instead of rewriting the first one's state later. The owner's
    PID is written to ``.lock`` in the dir, only for the message the second one prints.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: Path, source: str) -> DataDirLock:
        """Take the lock on ``directory`` (which exists); :class:`DataDirInUse` naming the holder's PID."""
        pid_file = directory / LOCK_NAME
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise DataDirUnusable(f"cannot use the data dir {directory} ({source}): {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = _read_pid(pid_file)
            who = f"PID {holder}" if holder else "another process"
            raise DataDirInUse(
                f"the data dir {directory} ({source}) is in use by {who}: stop it first, or give this "
                "process its own data dir"
            ) from None
        # A full disk only costs the PID in the next refusal's message: the lock is held all the same.
        with contextlib.suppress(OSError):
            pid_fd = os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(pid_fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(pid_fd)
        return cls(directory, fd)

    def release(self) -> None:
        """Let go (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_bytes()[:32].decode("ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def lost_state_file(path: Path) -> bool:
    """Whether ``path`` (a database) existed at an earlier start and is now missing or empty.

    Each successful open leaves a marker beside it (:func:`mark_state_file`), so a database lost
    between two starts (a wiped volume, a truncation) is told apart from a first start.
    """
    if not _marker(path).exists():
        return False
    try:
        return path.stat().st_size == 0
    except OSError:
        return True


def mark_state_file(path: Path) -> None:
    """Note that ``path`` exists now (best effort: a full disk only costs the next warning)."""
    with contextlib.suppress(OSError):
        _marker(path).touch(mode=0o600, exist_ok=True)


def _marker(path: Path) -> Path:
    return path.with_name(f".{path.name}.seen")
