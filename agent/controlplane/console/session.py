"""Console sessions: a signed cookie instead of the API key in the browser, and the CSRF token it carries.

The cookie holds a session id, its CSRF token and its expiry, signed with HMAC-SHA256 under a key
*derived from* the API key the person logged in with (the key itself never reaches the browser).
So removing or rotating that API key ends every session made with it, with no session table to
clean: a cookie whose key is gone no longer verifies. Logging out adds the session id to a small
in-memory list of ended sessions, kept until their expiry (one process: another replica still
accepts the cookie until it expires; the cookie is deleted in the browser either way).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: What the session key is derived for: a key derived for something else cannot sign a session.
SESSION_LABEL = b"delegate-agent console session v1"
#: How long a session lasts after logging in.
SESSION_SECONDS = 12 * 3600.0
COOKIE = "console_session"
#: The login form's own double-submit token (there is no session yet to hold one).
LOGIN_COOKIE = "console_login"


@dataclass(frozen=True)
class Session:
    """A logged-in browser: who it is (an opaque id), its CSRF token, when it ends."""

    sid: str
    csrf: str
    expires: float


class Sessions:
    """Issues and checks session cookies; told the derived keys (one per API key) and the clock."""

    def __init__(self, keys: Callable[[], Sequence[bytes]], clock: Callable[[], float], *, max_ended: int = 10_000):
        self._keys = keys
        self._clock = clock
        self._max_ended = max_ended
        #: sid -> expiry, for sessions logged out before their expiry.
        self._ended: OrderedDict[str, float] = OrderedDict()

    def issue(self, key_index: int) -> tuple[Session, str]:
        """A new session signed with the ``key_index``-th key, and its cookie value."""
        session = Session(
            sid=secrets.token_urlsafe(18), csrf=secrets.token_urlsafe(24), expires=self._clock() + SESSION_SECONDS
        )
        payload = _b64(json.dumps({"s": session.sid, "c": session.csrf, "e": session.expires}).encode())
        return session, f"{payload}.{_b64(_sign(self._keys()[key_index], payload))}"

    def check(self, cookie: str | None) -> Session | None:
        """The session of a cookie, or None when it is absent, forged, expired, logged out or its key is gone."""
        if not cookie or len(cookie) > 512 or not cookie.isascii():
            return None
        payload, _, signature = cookie.partition(".")
        try:
            given = _unb64(signature)
        except ValueError:
            return None
        if not any(hmac.compare_digest(_sign(key, payload), given) for key in self._keys()):
            return None
        try:
            data = json.loads(_unb64(payload))
            session = Session(sid=str(data["s"]), csrf=str(data["c"]), expires=float(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        if session.expires <= self._clock() or session.sid in self._ended:
            return None
        return session

    def end(self, session: Session) -> None:
        """Log a session out: its cookie is refused from now on (by this process) until it would expire."""
        now = self._clock()
        self._ended[session.sid] = session.expires
        for sid, expires in list(self._ended.items()):
            if expires <= now:
                del self._ended[sid]
        while len(self._ended) > self._max_ended:
            self._ended.popitem(last=False)


def same_token(expected: str, given: str | None) -> bool:
    """Whether a submitted CSRF token is the expected one (constant time; absent is never the same)."""
    return given is not None and given.isascii() and hmac.compare_digest(expected.encode(), given.encode())


def _sign(key: bytes, payload: str) -> bytes:
    return hmac.new(key, payload.encode(), hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("not base64") from exc
