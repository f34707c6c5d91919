"""Request authentication between delegate and control plane.

The delegate token is a shared secret that never crosses the wire. Each request carries a
short-lived HS256 JWT whose key is derived from the token; its ``kid`` header is a fingerprint of
the token, so the server can hold several tokens at once (rotation) and revoke one by name.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.protocol.errors import AuthError, Code

#: Lifetime of one request token. Short, so a leaked header is useless minutes later.
TOKEN_LIFETIME_SECONDS = 300.0
#: A token is re-minted when less than this is left, so it never expires in flight.
TOKEN_REFRESH_MARGIN_SECONDS = 60.0
#: Tolerated clock difference between delegate and control plane.
CLOCK_LEEWAY_SECONDS = 60.0
#: The server refuses tokens that expire later than this from its own now.
MAX_TOKEN_LIFETIME_SECONDS = 3600.0
DEFAULT_AUDIENCE = "delegate-agent-control-plane"

#: Wall-clock seconds, ``time.time`` by default; the one clock type, so tests can pass a fake anywhere.
Clock = Callable[[], float]


def token_id(secret: str) -> str:
    """A stable public fingerprint of a delegate token (the JWT ``kid``)."""
    return hashlib.sha256(b"delegate-agent/token-id\x00" + secret.encode()).hexdigest()[:16]


def _signing_key(secret: str) -> bytes:
    # A fixed-length key whatever the token's length; the raw token is never used directly.
    return hashlib.sha256(b"delegate-agent/jwt-key\x00" + secret.encode()).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _hs256(claims: dict[str, Any], key: bytes, *, kid: str) -> str:
    """A compact HS256 JWT of our own claims (RFC 7519).

    Written here rather than with PyJWT because the delegate only ever *mints* its own tokens, and
    importing PyJWT loads ``cryptography`` and OpenSSL's bindings: 9 MiB of a delegate's idle memory
    for one HMAC. The control plane, which parses untrusted tokens, verifies them with PyJWT.
    """
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}, separators=(",", ":")).encode())
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}"
    signature = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def generate_token() -> str:
    """A new random delegate token (or API key)."""
    return secrets.token_urlsafe(32)


class TokenUnavailable(Exception):
    """The delegate token could not be read (missing or empty file)."""


class TokenSource:
    """Where the delegate's token comes from: a value, or a file re-read when it changes."""

    def __init__(
        self, *, value: str | None = None, path: Path | None = None, on_read: Callable[[str], None] | None = None
    ) -> None:
        """``on_read`` is told every token value read (the redactor's ``add``: protocol imports no logging)."""
        if (value is None) == (path is None):
            raise ValueError("give exactly one of value or path")
        self._value = value.strip() if value is not None else None
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._cached: str | None = None
        self._on_read = on_read
        if self._value and on_read is not None:
            on_read(self._value)

    @property
    def path(self) -> Path | None:
        return self._path

    def current(self) -> str:
        """The token now; a file is re-read whenever its mtime or size changed (rotation)."""
        if self._value is not None:
            if not self._value:
                raise TokenUnavailable("the delegate token is empty")
            return self._value
        assert self._path is not None
        try:
            st = os.stat(self._path)
        except OSError as exc:
            raise TokenUnavailable(f"cannot read the delegate token file {self._path}: {exc.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp or self._cached is None:
            try:
                text = self._path.read_bytes().decode("utf-8-sig").strip()
            except OSError as exc:
                raise TokenUnavailable(f"cannot read the delegate token file {self._path}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise TokenUnavailable(f"the delegate token file {self._path} is not UTF-8 text") from None
            if not text:
                raise TokenUnavailable(f"the delegate token file {self._path} is empty")
            if self._on_read is not None:
                self._on_read(text)  # before anything can log or send it
            self._cached, self._stamp = text, stamp
        return self._cached

    def __repr__(self) -> str:  # never show the value
        return f"TokenSource(path={self._path!s})" if self._path else "TokenSource(value=<hidden>)"


class RequestSigner:
    """Mints the ``Authorization`` header for each request, caching it until near expiry."""

    def __init__(
        self,
        source: TokenSource,
        *,
        audience: str = DEFAULT_AUDIENCE,
        issuer: str,
        lifetime: float = TOKEN_LIFETIME_SECONDS,
        clock: Clock = time.time,
    ) -> None:
        self._source = source
        self._audience = audience
        self._issuer = issuer
        self._lifetime = lifetime
        self._clock = clock
        self._header: str | None = None
        self._expires = 0.0

    def header(self) -> str:
        """``Bearer <jwt>``; the token (file) is read again whenever a new JWT is minted."""
        now = self._clock()
        if self._header is None or now >= self._expires:
            self._mint(self._source.current(), now)
        assert self._header is not None
        return self._header

    def invalidate(self) -> None:
        """Forget the cached header: the next request re-reads the token (after a 401/403)."""
        self._header = None

    @property
    def token_id(self) -> str:
        return token_id(self._source.current())

    def _mint(self, secret: str, now: float) -> None:
        claims = {
            "iss": self._issuer,
            "aud": self._audience,
            "iat": int(now),
            "exp": int(now + self._lifetime),
            "jti": secrets.token_hex(8),
        }
        encoded = _hs256(claims, _signing_key(secret), kid=token_id(secret))
        self._header = f"Bearer {encoded}"
        self._expires = now + self._lifetime - TOKEN_REFRESH_MARGIN_SECONDS


@dataclass(frozen=True)
class TokenKey:
    """One delegate token the server accepts, under a name people can revoke it by."""

    name: str
    secret: str = field(repr=False)

    @property
    def kid(self) -> str:
        return token_id(self.secret)

    @property
    def key(self) -> bytes:
        """The JWT signing key derived from the token."""
        return _signing_key(self.secret)


@dataclass(frozen=True)
class IssuedToken:
    """A delegate token the server created: its name, fingerprint and derived key, never its value.

    The value is shown once, to whoever asked for it; the server keeps only what it needs to check
    a request's signature, so its database does not hold the token itself.
    """

    name: str
    kid: str
    key: bytes = field(repr=False)

    @classmethod
    def create(cls, name: str) -> tuple[IssuedToken, str]:
        """A new token named ``name``: what the server keeps, and the value to hand out once."""
        secret = generate_token()
        return cls(name=name, kid=token_id(secret), key=_signing_key(secret)), secret


@dataclass(frozen=True)
class Claims:
    token_name: str
    token_id: str
    issuer: str
    expires_at: float


class TokenVerifier:
    """Server side: checks a request's JWT against every accepted, unrevoked token."""

    def __init__(
        self,
        keys: Iterable[TokenKey],
        *,
        audience: str = DEFAULT_AUDIENCE,
        revoked: Iterable[str] = (),
        issued: Iterable[IssuedToken] = (),
        leeway: float = CLOCK_LEEWAY_SECONDS,
        clock: Clock = time.time,
    ) -> None:
        self._audience = audience
        self._leeway = leeway
        self._clock = clock
        self._keys: dict[str, TokenKey] = {}
        self._issued: dict[str, IssuedToken] = {k.kid: k for k in issued}
        self._revoked: set[str] = set(revoked)
        self.replace_keys(keys)

    def replace_keys(self, keys: Iterable[TokenKey]) -> None:
        """Replace the configured tokens (a re-read token file); tokens the server issued stay."""
        self._keys = {k.kid: k for k in keys}

    def add_issued(self, key: IssuedToken) -> None:
        self._issued[key.kid] = key

    @property
    def keys(self) -> list[TokenKey]:
        """The configured tokens (file or environment)."""
        return list(self._keys.values())

    @property
    def issued(self) -> list[IssuedToken]:
        """The tokens the server created (``POST /api/v1/delegate-tokens``)."""
        return list(self._issued.values())

    @property
    def all_keys(self) -> list[TokenKey | IssuedToken]:
        return [*self._keys.values(), *self._issued.values()]

    def revoke(self, kid: str) -> None:
        self._revoked.add(kid)

    def is_revoked(self, kid: str) -> bool:
        return kid in self._revoked

    def find(self, name_or_id: str) -> TokenKey | IssuedToken | None:
        for key in self.all_keys:
            if name_or_id in (key.name, key.kid):
                return key
        return None

    def verify(self, authorization: str | None) -> Claims:
        if not authorization:
            raise _unauthenticated("missing Authorization header (expected: Bearer <token>)")
        if not authorization.isascii():
            raise _unauthenticated("the Authorization header must be ASCII (Bearer <token>)")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthenticated("the Authorization header must be 'Bearer <token>'")
        token = token.strip()
        import jwt  # noqa: PLC0415 - the control plane's alone: the delegate never loads PyJWT (see _hs256)

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _unauthenticated("the request token is not a well-formed JWT") from None
        kid = header.get("kid")
        if header.get("alg") != "HS256" or not isinstance(kid, str):
            raise _unauthenticated("the request token must be HS256 with a kid header")
        key: TokenKey | IssuedToken | None = self._keys.get(kid) or self._issued.get(kid)
        if key is None:
            raise _unauthenticated(f"unknown delegate token (id {kid[:16]}); is the token configured on the server?")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=["HS256"],
                audience=self._audience,
                leeway=self._leeway,
                # Times are checked below, on this server's clock, so the refusal can name both clocks.
                options={"require": ["exp", "iat", "aud", "iss"], "verify_iat": False, "verify_exp": False},
            )
        except jwt.InvalidAudienceError:
            raise _unauthenticated(f"the request token is for another audience (expected {self._audience!r})") from None
        except jwt.PyJWTError:
            raise _unauthenticated("the request token's signature or claims are invalid") from None
        now = self._clock()
        iat, exp = _seconds(claims, "iat"), _seconds(claims, "exp")
        if exp + self._leeway < now:
            raise AuthError(
                f"the request token has expired: {_clocks(now, 'expired at', exp, self._leeway)}",
                status=401,
                code=Code.TOKEN_EXPIRED,
            )
        if iat > now + self._leeway:
            raise _unauthenticated(
                f"the request token was issued in the future: {_clocks(now, 'was issued at', iat, self._leeway)}"
            )
        # Against now, not iat: an iat set ahead (inside the clock leeway) must not buy a longer life.
        if exp - now > MAX_TOKEN_LIFETIME_SECONDS:
            raise _unauthenticated("the request token lives too long (at most one hour from now)")
        # Revocation is checked after the signature: only the token's holder learns it was revoked.
        if kid in self._revoked:
            raise AuthError(f"delegate token {key.name!r} has been revoked", status=403, code=Code.TOKEN_REVOKED)
        return Claims(token_name=key.name, token_id=kid, issuer=str(claims["iss"]), expires_at=exp)


def _seconds(claims: dict[str, Any], name: str) -> float:
    """A time claim as a finite number of seconds; anything else (text, NaN, 1e999, true) is refused."""
    value = claims.get(name)
    try:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(name)
        return float(value)
    except (ValueError, OverflowError):  # OverflowError: an integer too large for a float
        raise _unauthenticated(f"the request token's {name} claim must be a number of seconds") from None


def _clocks(now: float, what: str, when: float, leeway: float) -> str:
    """Both clocks and which way they disagree, so whoever reads it knows which host to check."""
    ahead = when > now
    which = (
        "the delegate's clock runs ahead, or the control plane's behind"
        if ahead
        else "the delegate's clock runs behind, or the control plane's ahead"
    )
    return (
        f"the control plane's clock reads {_iso(now)}, the token says it {what} {_iso(when)} by the delegate's "
        f"clock, {abs(when - now):.0f}s {'ahead' if ahead else 'behind'} (leeway {leeway:.0f}s): {which}; "
        "check NTP on the delegate's node and on the control plane's host"
    )


def _iso(seconds: float) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):  # a forged claim far outside any calendar
        return f"{seconds:.6g} (Unix seconds)"


def _unauthenticated(message: str) -> AuthError:
    return AuthError(message, status=401, code=Code.UNAUTHENTICATED)
