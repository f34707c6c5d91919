"""The control plane as an OIDC identity provider: connectors authenticate to AWS with no stored key.

For an ``OidcAuthentication`` connector the control plane mints a short-lived RS256 token per task
hand-out (:class:`TaskTokens`); the delegate (or the control plane itself, in platform mode)
exchanges it with ``sts:AssumeRoleWithWebIdentity``. AWS verifies the token against what this
module publishes: the discovery document and the JWKS under the issuer URL.

Unlike Harness's AWS tokens, whose ``sub`` names only the account, ``sub`` names the connector
(``connector:<org>/<project>/<identifier>``, ``-`` for an absent level; Harness identifiers never
contain ``-``), so a trust policy can pin one connector, or a project with ``StringLike``.

Keys (docs/oidc.md, "6. Rotating the signing key"): the key file holds RSA keys, each with the time it starts
signing. A rotated-in key is published :data:`PUBLISH_AHEAD_SECONDS` before it signs (longer than
the JWKS's cache lifetime), and a superseded key stays published :data:`RETIRED_KEY_SECONDS` after
(its last token's life plus clock leeway), so no verifier ever meets a token whose key it cannot
find. The file is re-read when it changes (a replica's Secret updated, ``oidc rotate-key`` run).

joserfc signs (imported only when OIDC is configured); tests verify with PyJWT, so the two libraries
cross-check each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

from agent.aws.connector import AwsConnector, ConnectorInvalid, parse_connector
from agent.controlplane.store.base import TaskRow
from agent.protocol.models import TASK_TYPE_AWS_VALIDATE

log = structlog.get_logger("controlplane.oidc")

#: A token's life: long enough for a delegate to pick the task up and start it, short enough to be useless later.
TOKEN_SECONDS = 300
#: A new key is in the JWKS this long before it signs; verifiers cache the JWKS for less (max-age below).
PUBLISH_AHEAD_SECONDS = 600
JWKS_MAX_AGE_SECONDS = 300
#: A superseded key stays in the JWKS this long: its last token's life plus AWS's clock leeway.
RETIRED_KEY_SECONDS = TOKEN_SECONDS + 300
#: Data-dir mode rotates the signing key when it is this old (``--oidc-key-days``).
DEFAULT_KEY_DAYS = 30

CONTEXT_VALIDATION = "CONNECTOR_VALIDATION"
CONTEXT_SCHEDULED = "SCHEDULED_TEST"
ALGORITHM = "RS256"
_FILE_VERSION = 1
_RELOAD_EVERY_SECONDS = 1.0


class OidcConfigError(Exception):
    """The issuer URL or the key file is unusable; the message says which and what to do."""


def check_issuer(url: str) -> str:
    """The issuer URL as tokens carry it (no trailing slash), or :class:`OidcConfigError` saying why not.

    AWS requires https, no query or fragment, and no port. Plain http and a port are allowed on a
    loopback host only (tests and the demo, where a local stand-in plays STS).
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise OidcConfigError(f"--oidc-issuer {url!r} is not a URL") from None
    host = parts.hostname or ""
    loopback = host == "localhost" or _is_loopback_ip(host)
    if parts.scheme not in ("https", "http") or not host:
        raise OidcConfigError(f"--oidc-issuer {url!r} must be an https:// URL (AWS fetches the keys from it)")
    if parts.scheme == "http" and not loopback:
        raise OidcConfigError(f"--oidc-issuer {url!r} must use https: AWS only trusts identity providers over https")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise OidcConfigError(f"--oidc-issuer {url!r} must not have a query, fragment or user: AWS refuses them")
    if port is not None and not loopback:
        raise OidcConfigError(
            f"--oidc-issuer {url!r} has a port: AWS IAM identity providers take none; give the public URL of the "
            "ingress in front of the control plane (port 443)"
        )
    if not parts.netloc.isascii() or parts.netloc != parts.netloc.lower():
        # ``iss`` is compared as a string: one canonical spelling, the same in the IAM provider.
        raise OidcConfigError(
            f"--oidc-issuer {url!r}: write the host in lowercase ASCII ({_canonical_host(host)!r}), "
            "and the same in the IAM identity provider: AWS compares the token's issuer as a string"
        )
    path = parts.path.rstrip("/")
    if path and (not _ISSUER_PATH_RE.fullmatch(path) or any(s in ("", ".", "..") for s in path.split("/")[1:])):
        # A route is made of this path: a brace is a route pattern, and '..', '//' or an escape is
        # normalised by HTTP clients, so AWS would fetch a URL the route does not serve.
        raise OidcConfigError(
            f"--oidc-issuer {url!r}: the path may hold only letters, digits and '-', '.', '_', '~' between "
            "single slashes (no '..', no escapes), e.g. https://cp.example.com/oidc"
        )
    return f"{parts.scheme}://{parts.netloc}{path}"


_ISSUER_PATH_RE = re.compile(r"(?:/[A-Za-z0-9._~-]*)+")


def _canonical_host(host: str) -> str:
    try:
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return host.lower()


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connector_subject(connector: AwsConnector) -> str:
    """``sub`` of a connector's tokens: what a trust policy's ``<provider>:sub`` condition names."""
    return f"connector:{connector.org_identifier or '-'}/{connector.project_identifier or '-'}/{connector.identifier}"


# --- keys -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    """One RSA key as the key file keeps it: the private JWK, and when it starts signing."""

    jwk: dict[str, Any]
    active_from: float

    @property
    def kid(self) -> str:
        return str(self.jwk["kid"])

    def public(self) -> dict[str, Any]:
        pub: dict[str, Any] = {k: self.jwk[k] for k in ("kty", "n", "e") if k in self.jwk}
        return {**pub, "kid": self.kid, "use": "sig", "alg": ALGORITHM}


@dataclass(frozen=True)
class KeyRing:
    """The keys, oldest first; which signs and which are published follows from the time alone."""

    keys: tuple[SigningKey, ...]

    def signing(self, now: float) -> SigningKey:
        ready = [k for k in self.keys if k.active_from <= now]
        # Before any key is due (a clock set back), the earliest one signs rather than none.
        return ready[-1] if ready else self.keys[0]

    def published(self, now: float) -> list[SigningKey]:
        """Upcoming keys, the signing key, and superseded keys whose last tokens may still be checked."""
        current = self.signing(now)
        out = []
        for i, key in enumerate(self.keys):
            successor = self.keys[i + 1].active_from if i + 1 < len(self.keys) else None
            superseded_long_ago = successor is not None and successor + RETIRED_KEY_SECONDS <= now
            if key is current or key.active_from > now or not superseded_long_ago:
                out.append(key)
        return out

    def rotated(self, now: float, *, immediately: bool = False) -> KeyRing:
        """A new key (signing after :data:`PUBLISH_AHEAD_SECONDS`, or at once), keys long superseded dropped."""
        new = generate_key(now if immediately else now + PUBLISH_AHEAD_SECONDS)
        return KeyRing((*self.published(now), new))

    def newest_age(self, now: float) -> float:
        return now - self.keys[-1].active_from

    def to_json(self) -> str:
        body = {"version": _FILE_VERSION, "keys": [{"jwk": k.jwk, "activeFrom": k.active_from} for k in self.keys]}
        return json.dumps(body, indent=1) + "\n"


def generate_key(active_from: float) -> SigningKey:
    key = RSAKey.generate_key(2048, parameters={"use": "sig", "alg": ALGORITHM}, private=True)
    jwk = dict(key.as_dict(private=True))
    jwk["kid"] = key.thumbprint()  # RFC 7638: stable, and says nothing but which key
    return SigningKey(jwk=jwk, active_from=active_from)


def parse_key_file(text: str, source: str) -> KeyRing:
    """The key ring in ``text``; :class:`OidcConfigError` naming ``source`` when it is damaged."""
    try:
        body = json.loads(text)
        if not isinstance(body, dict) or body.get("version") != _FILE_VERSION:
            raise ValueError(f"not a version {_FILE_VERSION} OIDC key file")
        keys = []
        for entry in body["keys"]:
            jwk, active_from = entry["jwk"], float(entry["activeFrom"])
            if not isinstance(jwk, dict) or jwk.get("kty") != "RSA" or "d" not in jwk or not jwk.get("kid"):
                raise ValueError("each key must be a private RSA JWK with a kid")
            if not math.isfinite(active_from):
                raise ValueError(f"key {jwk['kid']}: activeFrom must be a time in seconds")
            try:
                # Imported now, not at the first hand-out: a damaged key would fail every OIDC task instead.
                RSAKey.import_key(jwk)
            except (ValueError, JoseError) as exc:
                raise ValueError(
                    f"key {jwk['kid']} is not a usable RSA key: {str(exc) or type(exc).__name__}"
                ) from None
            keys.append(SigningKey(jwk=jwk, active_from=active_from))
    except (ValueError, KeyError, TypeError) as exc:
        raise OidcConfigError(f"{source}: the OIDC key file is damaged ({exc}); restore it from a backup") from None
    if not keys:
        raise OidcConfigError(f"{source}: the OIDC key file holds no key")
    return KeyRing(tuple(sorted(keys, key=lambda k: k.active_from)))


# --- the issuer -------------------------------------------------------------------------------


class OidcIssuer:
    """Publishes the discovery document and JWKS, and signs tokens with the current key.

    ``writable``: the key file is the control plane's own (data-dir mode): it is created on first start
    and rotated when older than ``key_days``. Otherwise (a Secret mounted on several replicas) it is
    only read, and re-read when it changes; rotation is ``delegate-agent control-plane oidc rotate-key``.
    """

    def __init__(
        self,
        issuer: str,
        key_file: Path | None,
        *,
        writable: bool,
        key_days: float = DEFAULT_KEY_DAYS,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = check_issuer(issuer)
        self.key_file = key_file
        self._writable = writable
        self._key_seconds = key_days * 86400
        self._wall = wall
        self._ring: KeyRing | None = None
        self._signers: dict[str, Any] = {}
        self._file_stamp: tuple[float, int] | None = None
        self._checked_at = 0.0
        self._retry_rotation_at = 0.0

    @property
    def path(self) -> str:
        """The issuer's path, under which the two documents are served."""
        return urlsplit(self.issuer).path

    def load(self) -> list[Path]:
        """Read (or create) the key ring; the files it generated. :class:`OidcConfigError` if unusable."""
        now = self._wall()
        if self.key_file is None:
            self._ring = KeyRing((generate_key(now),))
            return []
        if not self.key_file.exists():
            if not self._writable:
                raise OidcConfigError(
                    f"{self.key_file}: no OIDC key file: create one with `delegate-agent oidc rotate-key "
                    f"--key-file {self.key_file}` and mount it on every replica"
                )
            self._write_or_say(KeyRing((generate_key(now),)))
            return [self.key_file]
        self._read()
        mode = self.key_file.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning(
                "controlplane.oidc_key_file_readable_by_others",
                path=str(self.key_file),
                mode=oct(mode),
                hint=f"the file holds private keys: chmod 600 {self.key_file} (a Secret: defaultMode 0400)",
            )
        self._rotate_if_due(now)
        return []

    def _write_or_say(self, ring: KeyRing) -> None:
        """Write at start: a directory that cannot take the file is one line naming the file, not the data dir."""
        try:
            self._write(ring)
        except OSError as exc:
            raise OidcConfigError(f"{self.key_file}: cannot write the OIDC key file: {exc.strerror or exc}") from None

    def _read(self) -> None:
        assert self.key_file is not None
        try:
            stat = self.key_file.stat()
            text = self.key_file.read_text()
        except OSError as exc:
            raise OidcConfigError(f"{self.key_file}: cannot read the OIDC key file: {exc.strerror}") from None
        self._ring = parse_key_file(text, str(self.key_file))
        self._file_stamp = (stat.st_mtime, stat.st_size)

    def _write(self, ring: KeyRing) -> None:
        assert self.key_file is not None
        _write_private(self.key_file, ring.to_json())
        self._ring = ring
        stat = self.key_file.stat()
        self._file_stamp = (stat.st_mtime, stat.st_size)

    def _rotate_if_due(self, now: float) -> None:
        assert self._ring is not None
        if not self._writable or self._ring.newest_age(now) < self._key_seconds or now < self._retry_rotation_at:
            return
        assert self.key_file is not None
        try:
            with _exclusive(self.key_file):
                # Under the lock, from the file as it is now: `oidc rotate-key` may have just rotated it.
                if self.key_file.exists():
                    self._read()
                assert self._ring is not None
                if self._ring.newest_age(now) < self._key_seconds:
                    return
                self._write(self._ring.rotated(now))
        except OSError as exc:
            # The current key signs on; said once an hour, not each second a token is minted.
            self._retry_rotation_at = now + 3600
            log.error(
                "controlplane.oidc_key_rotation_failed",
                path=str(self.key_file),
                problem=exc.strerror or str(exc),
                keeping="the current key, which signs on; retried in an hour",
            )
            return
        log.info("controlplane.oidc_key_rotated", signs_from=self._ring.keys[-1].active_from)

    def refresh(self) -> None:
        """Follow the key file (another replica's rotation, an updated Secret); at most once a second.

        A file that turns unreadable or damaged keeps the keys already loaded, said once in the log.
        """
        now = self._wall()
        if self.key_file is None or now - self._checked_at < _RELOAD_EVERY_SECONDS:
            return
        self._checked_at = now
        try:
            stat = self.key_file.stat()
            if (stat.st_mtime, stat.st_size) != self._file_stamp:
                self._read()
                log.info("controlplane.oidc_keys_reloaded", keys=len(self._ring.keys) if self._ring else 0)
            self._rotate_if_due(now)
        except (OSError, OidcConfigError) as exc:
            stamp = (-1.0, -1)
            if self._file_stamp != stamp:
                log.error("controlplane.oidc_keys_unreadable", problem=str(exc), keeping="the keys already loaded")
                self._file_stamp = stamp

    def _keys(self) -> KeyRing:
        if self._ring is None:
            raise RuntimeError("OidcIssuer.load() was not called")
        return self._ring

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/.well-known/jwks.json",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "scopes_supported": ["openid"],
            "claims_supported": [
                "iss",
                "sub",
                "aud",
                "iat",
                "nbf",
                "exp",
                "jti",
                "account_id",
                "org_id",
                "project_id",
                "connector_id",
                "context",
                "task_id",
                "delegate_id",
            ],
        }

    def jwks(self) -> dict[str, Any]:
        self.refresh()
        return {"keys": [k.public() for k in self._keys().published(self._wall())]}

    def mint(self, claims: dict[str, Any]) -> str:
        """A signed token with ``claims`` plus iss, iat, nbf, exp and jti."""
        self.refresh()
        wall = self._wall()
        key = self._keys().signing(wall)
        now = int(wall)
        signer = self._signers.get(key.kid)
        if signer is None:
            signer = self._signers[key.kid] = RSAKey.import_key(key.jwk)
        body = {
            "iss": self.issuer,
            **claims,
            "iat": now,
            "nbf": now,
            "exp": now + TOKEN_SECONDS,
            "jti": uuid.uuid4().hex,
        }
        return str(jwt.encode({"alg": ALGORITHM, "kid": key.kid, "typ": "JWT"}, body, signer))

    def connector_token(self, connector: AwsConnector, *, task_id: str, delegate_id: str, context: str) -> str:
        claims: dict[str, Any] = {
            "sub": connector_subject(connector),
            "aud": connector.oidc_audience,
            "connector_id": connector.identifier,
            "context": context,
            "task_id": task_id,
            "delegate_id": delegate_id,
        }
        for name, value in (
            ("account_id", connector.account_identifier),
            ("org_id", connector.org_identifier),
            ("project_id", connector.project_identifier),
        ):
            if value is not None:
                claims[name] = value
        return self.mint(claims)


class TaskTokens:
    """The token a task hand-out carries: minted for an ``OidcAuthentication`` connector's test, else none.

    Minted per hand-out (not stored with the task): it never reaches the database, a retry gets a
    fresh one, and the lease hand-out is already the authenticated, signed moment a delegate is
    given work (the task signature covers the token's hash). Without an issuer configured nothing is
    minted, and the delegate's result says how to configure one.
    """

    def __init__(self, issuer: OidcIssuer | None) -> None:
        self.issuer = issuer

    def __call__(self, row: TaskRow, delegate_id: str) -> str | None:
        # Only the validation exchanges it: any other task type (``POST /api/v1/tasks`` queues any) whose
        # payload carries an OIDC connector would hand a bearer token to a handler that has no use for it.
        if self.issuer is None or row.type != TASK_TYPE_AWS_VALIDATE or not _is_oidc(row.payload.get("connector")):
            return None
        try:
            connector = parse_connector(row.payload["connector"])
        except ConnectorInvalid:
            return None  # the delegate's parse reports every problem
        context = CONTEXT_SCHEDULED if row.trigger == "scheduled" else CONTEXT_VALIDATION
        return self.issuer.connector_token(connector, task_id=row.id, delegate_id=delegate_id, context=context)


def _is_oidc(document: Any) -> bool:
    """A cheap look before parsing: only OIDC connectors cost a parse at hand-out."""
    try:
        return bool(document["connector"]["spec"]["credential"]["type"] == "OidcAuthentication")
    except (KeyError, TypeError):
        return False


def rotate_key_file(path: Path, *, immediately: bool, wall: Callable[[], float] = time.time) -> SigningKey:
    """``oidc rotate-key``: add a key to ``path`` (creating it), dropping keys long superseded; the new key."""
    with _exclusive(path):
        now = wall()
        if path.exists():
            ring = parse_key_file(path.read_text(), str(path)).rotated(now, immediately=immediately)
        else:
            ring = KeyRing((generate_key(now),))
        _write_private(path, ring.to_json())
    return ring.keys[-1]


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """One rotation of ``path`` at a time, across processes: two at once would each drop the other's key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` whole (a reader never sees half a key file), readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
