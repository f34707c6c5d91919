"""Secret references resolved on the delegate: ``account.NAME``, ``org.NAME`` or ``NAME``.

Each reads the file ``NAME`` in ``AGENT_SECRETS_DIR`` (a mounted Kubernetes Secret: one key per
file). Files are read per task, so a rotated Secret is picked up without a restart. Every value
read is handed to the redactor before anything else can see it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agent.aws.connector import SecretRef

MAX_SECRET_BYTES = 64 * 1024


class SecretNotFound(Exception):
    """A reference that cannot be resolved; the message names the reference, never a value."""

    def __init__(self, ref: SecretRef, message: str) -> None:
        super().__init__(message)
        self.ref = ref


class SecretStore:
    def __init__(self, directory: Path | None, *, on_read: Callable[[str], None] | None = None) -> None:
        self.directory = directory
        self._on_read = on_read

    def resolve(self, ref: SecretRef) -> str:
        if self.directory is None:
            raise SecretNotFound(
                ref, f"secret {ref.raw} cannot be resolved: AGENT_SECRETS_DIR is not set on this delegate"
            )
        # The name is validated by the connector parser; this is a second guard against escapes
        # (textual: resolving paths would cost half a dozen syscalls per validation).
        if not ref.name or "/" in ref.name or "\0" in ref.name or ref.name in (".", ".."):
            raise SecretNotFound(ref, f"secret {ref.raw} is not a plain file name")
        path = self.directory / ref.name
        try:
            # Kubernetes mounts each key as a symlink into ..data/, so links are followed.
            with path.open("rb") as f:
                data = f.read(MAX_SECRET_BYTES + 1)
        except FileNotFoundError:
            raise SecretNotFound(
                ref,
                f"secret {ref.raw} not found: the delegate has no file {ref.name!r} in "
                f"AGENT_SECRETS_DIR ({self.directory})",
            ) from None
        except IsADirectoryError:
            raise SecretNotFound(ref, f"secret {ref.raw} is a directory, not a file, in {self.directory}") from None
        except PermissionError:
            raise SecretNotFound(
                ref, f"secret {ref.raw} exists but the delegate may not read it ({self.directory / ref.name})"
            ) from None
        except OSError as exc:
            raise SecretNotFound(ref, f"secret {ref.raw} cannot be read: {exc.strerror}") from None
        if len(data) > MAX_SECRET_BYTES:
            raise SecretNotFound(ref, f"secret {ref.raw} is larger than {MAX_SECRET_BYTES} bytes")
        try:
            value = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise SecretNotFound(ref, f"secret {ref.raw} is not UTF-8 text") from None
        if not value:
            raise SecretNotFound(ref, f"secret {ref.raw} is empty")
        if self._on_read is not None:
            self._on_read(value)
        return value
