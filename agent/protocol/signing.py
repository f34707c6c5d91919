"""Ed25519 task signatures: the control plane signs each task; a delegate with its public key checks.

A delegate configured with the key refuses a task that is unsigned or whose signature does not
match: a compromised path between the control plane's signing key and the delegate (a proxy, a
tampered database) cannot make it run validations it did not intend. The signature covers the
task's identity and content (id, type, payload, creation time, timeout), not the lease, which
changes with every attempt.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import nacl.exceptions
import nacl.signing

from agent.protocol.models import Task

_DOMAIN = b"delegate-agent/task-signature/v1\n"


def canonical_task_bytes(task: Task) -> bytes:
    """The bytes a signature covers: a fixed domain tag and canonical JSON of the task's content."""
    content: dict[str, Any] = {
        "createdAt": task.created_at.isoformat(),
        "payload": task.payload,
        "taskId": task.task_id,
        "timeoutSeconds": task.timeout_seconds,
        "type": task.type,
    }
    return _DOMAIN + json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class TaskSigningKey:
    """The control plane's private key (a 32-byte Ed25519 seed, base64)."""

    def __init__(self, seed_b64: str) -> None:
        try:
            seed = base64.b64decode(seed_b64.strip(), validate=True)
            self._key = nacl.signing.SigningKey(seed)
        except (binascii.Error, ValueError, nacl.exceptions.CryptoError):
            raise ValueError("a task signing key is 32 bytes, base64-encoded") from None

    @classmethod
    def generate(cls) -> TaskSigningKey:
        return cls(base64.b64encode(bytes(nacl.signing.SigningKey.generate())).decode())

    @property
    def seed_b64(self) -> str:
        return base64.b64encode(bytes(self._key)).decode()

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(bytes(self._key.verify_key)).decode()

    def sign(self, task: Task) -> str:
        return base64.b64encode(self._key.sign(canonical_task_bytes(task)).signature).decode()


class TaskSignatureVerifier:
    """The delegate's check: returns why a task must be refused, or None when it may run."""

    def __init__(self, public_key_b64: str) -> None:
        try:
            self._key = nacl.signing.VerifyKey(base64.b64decode(public_key_b64.strip(), validate=True))
        except (binascii.Error, ValueError, nacl.exceptions.CryptoError):
            raise ValueError("a task public key is 32 bytes, base64-encoded") from None

    def __call__(self, task: Task) -> str | None:
        if not task.signature:
            return "refused: the task is not signed, and this delegate only runs tasks signed by its control plane"
        try:
            signature = base64.b64decode(task.signature, validate=True)
            self._key.verify(canonical_task_bytes(task), signature)
        except (binascii.Error, ValueError, nacl.exceptions.BadSignatureError):
            return (
                "refused: the task's signature does not match the control plane's key (the task was altered, "
                "or signed with another key)"
            )
        return None
