"""Secret references resolved where the test runs: ``account.NAME``, ``org.NAME`` or ``NAME``.

Each reads the file ``NAME`` in a secrets directory: on a delegate ``AGENT_SECRETS_DIR`` (a mounted
Kubernetes Secret: one key per file), in the control plane (``executeOnDelegate: false``) its
``--secrets-dir``. Files are read per task, so a rotated Secret is picked up without a restart.
Every value read is handed to the redactor before anything else can see it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from agent.aws.connector import SecretRef

MAX_SECRET_BYTES = 64 * 1024
#: A control character (C0 or DEL) inside a value: line breaks, tabs, NULs.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

log = structlog.get_logger("aws")

#: Why a reference could not be resolved; the diagnosis picks its hint by it.
SecretProblem = Literal["no_directory", "missing", "empty", "unreadable", "invalid"]


@dataclass(frozen=True)
class SecretsPlace:
    """Who reads the secret files and how its operator names the directory (for messages and hints)."""

    #: "the delegate" or "the control plane".
    owner: str
    #: The setting that names the directory, as the operator writes it.
    setting: str
    #: Where a missing key is to be created.
    store: str


DELEGATE_SECRETS = SecretsPlace(
    owner="the delegate",
    setting="AGENT_SECRETS_DIR",
    store="the Kubernetes Secret mounted at AGENT_SECRETS_DIR (helm: connectorSecrets.existingSecret)",
)
CONTROL_PLANE_SECRETS = SecretsPlace(
    owner="the control plane",
    setting="--secrets-dir",
    store="the control plane's --secrets-dir",
)


class SecretNotFound(Exception):
    """A reference that cannot be resolved; the message names the reference, never a value."""

    def __init__(
        self,
        ref: SecretRef,
        message: str,
        *,
        problem: SecretProblem = "missing",
        place: SecretsPlace = DELEGATE_SECRETS,
        directory: Path | None = None,
    ) -> None:
        super().__init__(message)
        self.ref = ref
        self.problem = problem
        self.place = place
        self.directory = directory


class SecretStore:
    def __init__(
        self,
        directory: Path | None,
        *,
        on_read: Callable[[str], None] | None = None,
        place: SecretsPlace = DELEGATE_SECRETS,
    ) -> None:
        self.directory = directory
        self.place = place
        self._on_read = on_read

    def resolve(self, ref: SecretRef) -> str:
        place, directory = self.place, self.directory

        def problem(kind: SecretProblem, message: str) -> SecretNotFound:
            return SecretNotFound(ref, message, problem=kind, place=place, directory=directory)

        if directory is None:
            raise problem(
                "no_directory", f"secret {ref.raw} cannot be resolved: {place.setting} is not set on {place.owner}"
            )
        # The name is validated by the connector parser; this is a second guard against escapes
        # (textual: resolving paths would cost half a dozen syscalls per validation).
        if not ref.name or "/" in ref.name or "\0" in ref.name or ref.name in (".", ".."):
            raise problem("invalid", f"secret {ref.raw} is not a plain file name")
        path = f"{directory}/{ref.name}"
        try:
            # Kubernetes mounts each key as a symlink into ..data/, so links are followed. Three
            # system calls and no file object: this runs for every validation.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.read(fd, MAX_SECRET_BYTES + 1)
            finally:
                os.close(fd)
        except OSError as exc:
            # The result names the reference and the setting; the path and the OS's reason stay in
            # this process's log, for whoever runs it (results travel to the control plane and users).
            log.warning("aws.secret.unreadable", ref=ref.raw, path=path, reason=exc.strerror or str(exc))
            if isinstance(exc, FileNotFoundError):
                raise problem(
                    "missing", f"secret {ref.raw} not found: {place.owner} has no file {ref.name!r} in {place.setting}"
                ) from None
            if isinstance(exc, IsADirectoryError):
                raise problem("unreadable", f"secret {ref.raw} is unreadable: it is a directory, not a file") from None
            if isinstance(exc, PermissionError):
                raise problem(
                    "unreadable", f"secret {ref.raw} is unreadable: {place.owner} may not read the file {ref.name!r}"
                ) from None
            raise problem("unreadable", f"secret {ref.raw} is unreadable: {exc.strerror or 'read error'}") from None
        if len(data) > MAX_SECRET_BYTES:
            raise problem("invalid", f"secret {ref.raw} is larger than {MAX_SECRET_BYTES} bytes")
        try:
            value = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise problem("invalid", f"secret {ref.raw} is not UTF-8 text") from None
        if not value:
            raise problem(
                "empty",
                f"secret {ref.raw} is empty: the file {ref.name!r} in {place.setting} has "
                f"{'only white space' if data else 'no content'}",
            )
        self.remember(value)
        if _CONTROL.search(value):
            # An AWS key or token is one printable line; a line break inside one would only fail
            # later, deep in the HTTP client, as an error that names neither the secret nor why.
            raise problem(
                "invalid",
                f"secret {ref.raw} holds a line break or another control character inside its value: "
                "AWS keys and session tokens are one line",
            )
        return value

    def remember(self, *values: str | None) -> None:
        """Hand secret values read elsewhere (fetched session keys, the environment's) to the redactor."""
        if self._on_read is not None:
            for value in values:
                if value:
                    self._on_read(value)
