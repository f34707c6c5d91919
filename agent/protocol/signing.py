"""Ed25519 task signatures: the control plane signs each lease hand-out; a delegate with its public key checks.

A delegate configured with the key refuses a task that is unsigned or whose signature does not
match: a compromised path between the control plane's signing key and the delegate (a proxy, a
tampered database) cannot make it run validations it did not intend.

The signature (v2) covers the *hand-out*, not only the task: task id, lease id, the delegate it
was leased to, the attempt, type, payload, creation time, timeout, an expiry, and the SHA-256 of the
OIDC token handed out with it (when there is one; the token itself is a bearer secret). So a captured
task cannot be replayed to another delegate (the delegate id), nor later (the expiry), and the
delegate remembers the (task id, lease id) pairs it ran until their expiry, so it cannot be
replayed to the same delegate either (agent/runtime/signing.py). The expiry bounds when a task may
*start*; a task whose lease is renewed runs on past it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from agent.protocol.models import Task

#: The version is in the signed bytes: a v1 signature (content only) never verifies as v2.
_DOMAIN = b"delegate-agent/task-signature/v2\n"

#: Why a delegate refuses a task: the signature's own checks, then where and when it may run.
RefusalReason = Literal["unsigned", "bad_signature", "other_delegate", "replayed", "expired", "replay_memory_full"]


@dataclass(frozen=True)
class Refusal:
    """Why a task is refused (``message`` starts with "refused:"), and what an operator checks."""

    reason: RefusalReason
    message: str
    hint: str

    @property
    def lease_is_ours(self) -> bool:
        """Whether the refusal may be reported under the task's lease.

        A replayed task carries a lease that belongs to the run it copies, here or on another
        delegate; a FAILURE reported under it would end that genuine run. Those refusals are
        logged, never reported.
        """
        return self.reason not in ("other_delegate", "replayed")


def canonical_task_bytes(task: Task) -> bytes:
    """The bytes a signature covers: a fixed domain tag and canonical JSON of the lease hand-out."""
    expires = task.signature_expires_at
    content: dict[str, Any] = {
        "attempt": task.attempt,
        "createdAt": task.created_at.isoformat(),
        "delegateId": task.delegate_id,
        "leaseId": task.lease_id,
        "payload": task.payload,
        "signatureExpiresAt": expires.isoformat() if expires is not None else None,
        "taskId": task.task_id,
        "timeoutSeconds": task.timeout_seconds,
        "type": task.type,
    }
    if task.oidc_token is not None:
        # Only when present, so the bytes of every other task stay what delegates already verify.
        content["oidcTokenSha256"] = hashlib.sha256(task.oidc_token.encode()).hexdigest()
    return _DOMAIN + json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class TaskSigningKey:
    """The control plane's private key (a 32-byte Ed25519 seed, base64)."""

    def __init__(self, seed_b64: str) -> None:
        # PyNaCl loads only where a key is in use: a delegate that checks no signatures (no key
        # pinned) goes without it, 1.2 MiB of idle memory (docs/performance.md, issue 20).
        import nacl.exceptions  # noqa: PLC0415
        import nacl.signing  # noqa: PLC0415

        try:
            seed = base64.b64decode(seed_b64.strip(), validate=True)
            self._key = nacl.signing.SigningKey(seed)
        except (binascii.Error, ValueError, nacl.exceptions.CryptoError):
            raise ValueError("a task signing key is 32 bytes, base64-encoded") from None

    @classmethod
    def generate(cls) -> TaskSigningKey:
        import nacl.signing  # noqa: PLC0415 - see __init__

        return cls(base64.b64encode(bytes(nacl.signing.SigningKey.generate())).decode())

    @property
    def seed_b64(self) -> str:
        return base64.b64encode(bytes(self._key)).decode()

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(bytes(self._key.verify_key)).decode()

    def sign(self, task: Task) -> str:
        """Sign a lease hand-out: the task must name its delegate and carry its expiry."""
        if task.delegate_id is None or task.signature_expires_at is None:
            raise ValueError("a task is signed when it is leased: it needs its delegate id and expiry")
        return base64.b64encode(self._key.sign(canonical_task_bytes(task)).signature).decode()


class TaskSignatureVerifier:
    """Whether a task's signature is the control plane's, over exactly these hand-out fields."""

    def __init__(self, public_key_b64: str) -> None:
        import nacl.exceptions  # noqa: PLC0415 - see TaskSigningKey.__init__
        import nacl.signing  # noqa: PLC0415

        try:
            self._key = nacl.signing.VerifyKey(base64.b64decode(public_key_b64.strip(), validate=True))
        except (binascii.Error, ValueError, nacl.exceptions.CryptoError):
            raise ValueError("a task public key is 32 bytes, base64-encoded") from None

    def __call__(self, task: Task) -> Refusal | None:
        if not task.signature:
            return Refusal(
                "unsigned",
                "refused: the task is not signed, and this delegate only runs tasks signed by its control plane",
                "the task was not run; check the control plane's signing key",
            )
        from nacl.exceptions import BadSignatureError  # noqa: PLC0415 - loaded by __init__ already

        try:
            signature = base64.b64decode(task.signature, validate=True)
            self._key.verify(canonical_task_bytes(task), signature)
        except (binascii.Error, ValueError, BadSignatureError):
            return Refusal(
                "bad_signature",
                "refused: the task's signature does not match the control plane's key (the task or its lease "
                "was altered, or it was signed with another key or by an older control plane)",
                "the task was not run; check the control plane's signing key (GET /v1/info shows it)",
            )
        if task.delegate_id is None or task.signature_expires_at is None:
            # Only a key misused outside the control plane signs a hand-out without them.
            return Refusal(
                "bad_signature",
                "refused: the task's signature names no delegate or no expiry",
                "the task was not run; check the control plane's signing key",
            )
        return None
