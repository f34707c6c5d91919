"""What every console response carries, and where a login may send the browser next."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from aiohttp import web

#: Scripts and styles only from files this server serves: no inline script or style runs, no frame holds
#: the console, no form posts elsewhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

HOME = "/console/connectors"


def is_console_path(path: str) -> bool:
    return path in {"/", "/console"} or path.startswith("/console/")


def add_headers(response: web.StreamResponse) -> None:
    for name, value in HEADERS.items():
        response.headers[name] = value


def safe_next(target: str | None, default: str = HOME) -> str:
    """``target`` if it is a path inside the console, else ``default``: a login never redirects off-site.

    Only relative references to ``/console...`` pass: no scheme, no host (``//evil``), no backslash
    (browsers read ``/\\evil`` as ``//evil``), no control characters, no dot segment (even encoded).
    """
    if not target or len(target) > 2048 or not target.isascii():
        return default
    if "\\" in target or any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or target.startswith("//"):
        return default
    # Browsers resolve a percent-encoded dot segment (%2e%2e) as "..": judge the path as they will read it.
    path = unquote(parts.path)
    if not (path == "/console" or path.startswith("/console/")) or "\\" in path:
        return default
    if "/.." in path or path.startswith(("/console/login", "/console/logout")):
        return default
    return target


def see_other(location: str) -> web.Response:
    """A 303 to ``location`` (returned, not raised: the JSON error middleware must not see it)."""
    return web.Response(status=303, headers={"Location": location})


@dataclass(frozen=True)
class ConsoleRefusal(Exception):
    """A request the console refuses with a page saying why (nothing was changed)."""

    status: int
    title: str
    message: str
