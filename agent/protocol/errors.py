"""The protocol's error family, mapped once from HTTP answers.

Callers branch on the exception type (how to react: retry, re-register, drop, stop asking), never
on status codes or message text. The server builds its error bodies from the same codes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import ClassVar

import msgspec

from agent.protocol.models import ErrorBody, ErrorDetail, Problem


class Code:
    """Machine-readable error codes carried in ``error.code``."""

    UNAUTHENTICATED = "unauthenticated"  # 401: missing, malformed or badly signed token
    TOKEN_EXPIRED = "token_expired"  # 401
    TOKEN_REVOKED = "token_revoked"  # 403
    FORBIDDEN = "forbidden"  # 403
    #: 403: the delegate (or the lease's delegate) was registered with another delegate token.
    DELEGATE_TOKEN_MISMATCH = "delegate_token_mismatch"
    #: 403 at registration: the token's scope does not allow the delegate's name or tags.
    TOKEN_SCOPE = "token_scope"
    INVALID_REQUEST = "invalid_request"  # 400: body or parameters do not validate
    INVALID_CONNECTOR = "invalid_connector"  # 400: every problem is listed
    NOT_FOUND = "not_found"  # 404
    UNKNOWN_DELEGATE = "unknown_delegate"  # 404 on delegate calls: register again
    LEASE_FENCED = "lease_fenced"  # 409: the lease expired or the task went to someone else
    CONFLICT = "conflict"  # 409
    PAYLOAD_TOO_LARGE = "payload_too_large"  # 413
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # 415
    RATE_LIMITED = "rate_limited"  # 429 with Retry-After
    INTERNAL = "internal"  # 500
    UNAVAILABLE = "unavailable"  # 503


class ProtocolError(Exception):
    """An answer (or a missing answer) from the control plane that was not a success."""

    #: Whether retrying the same request later can succeed.
    transient: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        problems: tuple[Problem, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.problems = problems

    def __str__(self) -> str:
        prefix = f"HTTP {self.status} " if self.status else ""
        code = f"{self.code}: " if self.code else ""
        return f"{prefix}{code}{self.message}"


class AuthError(ProtocolError):
    """401 or 403: our token is not accepted. Retrying soon will not help; rotating the token may."""


class UnknownDelegate(ProtocolError):
    """The server does not know this delegate (restarted without state, or timed us out)."""


class LeaseFenced(ProtocolError):
    """The lease is no longer ours: the result will never be accepted, so drop it."""


class NotFound(ProtocolError):
    """The thing addressed does not exist."""


class RequestRejected(ProtocolError):
    """Any other 4xx: the request itself is wrong; sending it again will not help."""


class RateLimited(ProtocolError):
    """429: wait for ``retry_after`` seconds before asking again."""

    transient = True


class TransientError(ProtocolError):
    """5xx, connection failure or timeout: retry with backoff."""

    transient = True


_decoder = msgspec.json.Decoder(ErrorBody)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_from_response(status: int, body: bytes, headers: Mapping[str, str]) -> ProtocolError:
    """Map a non-2xx answer to the exception a caller should react to."""
    try:
        detail = _decoder.decode(body).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        text = body[:200].decode("utf-8", "replace").strip() or "no error body"
        detail = ErrorDetail(code=_default_code(status), message=text)
    retry_after = parse_retry_after(headers.get("Retry-After"))
    return error_from_detail(status, detail, retry_after=retry_after)


def error_from_detail(status: int, detail: ErrorDetail, *, retry_after: float | None = None) -> ProtocolError:
    """The exception for an error ``status`` and its body's detail (a response's, or a batch item's)."""
    if retry_after is None:
        retry_after = detail.retry_after_seconds
    kwargs = {
        "status": status,
        "code": detail.code,
        "retry_after": retry_after,
        "problems": tuple(detail.problems),
    }
    cls: type[ProtocolError]
    if status in (401, 403):
        cls = AuthError
    elif status == 404 and detail.code == Code.UNKNOWN_DELEGATE:
        cls = UnknownDelegate
    elif status == 404:
        cls = NotFound
    elif status == 409 and detail.code == Code.LEASE_FENCED:
        cls = LeaseFenced
    elif status == 429:
        cls = RateLimited
    elif status >= 500 or status == 408:
        cls = TransientError
    else:
        cls = RequestRejected
    return cls(detail.message, **kwargs)  # type: ignore[arg-type]


def _default_code(status: int) -> str:
    return {
        400: Code.INVALID_REQUEST,
        401: Code.UNAUTHENTICATED,
        403: Code.FORBIDDEN,
        404: Code.NOT_FOUND,
        409: Code.CONFLICT,
        413: Code.PAYLOAD_TOO_LARGE,
        429: Code.RATE_LIMITED,
        503: Code.UNAVAILABLE,
    }.get(status, Code.INTERNAL if status >= 500 else Code.INVALID_REQUEST)


def error_body(
    code: str,
    message: str,
    *,
    problems: list[Problem] | None = None,
    retry_after: float | None = None,
) -> bytes:
    """The JSON body the server sends with an error status."""
    detail = ErrorDetail(code=code, message=message, problems=problems or [], retry_after_seconds=retry_after)
    return msgspec.json.encode(ErrorBody(error=detail))
