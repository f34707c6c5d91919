"""A small synchronous client for the user API (``/api/v1``), used by the CLI and the demo.

Synchronous on purpose: a CLI command makes one or two calls and exits, so stdlib ``urllib``
keeps start-up fast and needs no event loop.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, TypeVar

import msgspec

from agent.protocol.errors import ProtocolError, error_from_response
from agent.protocol.models import (
    ApplyResult,
    ConnectorHistory,
    ConnectorList,
    ConnectorRecord,
    CreatedToken,
    CreateTaskRequest,
    CreateTokenRequest,
    DelegateList,
    Stats,
    TaskList,
    TaskView,
    TestRequest,
    TokenList,
    TokenView,
)

T = TypeVar("T")


class Unreachable(Exception):
    """The control plane did not answer (refused, DNS, TLS, timeout)."""


class ApiClient:
    def __init__(
        self, base_url: str, api_key: str | None, *, timeout: float = 30.0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.base = base_url.rstrip("/")
        self._key = api_key
        self._timeout = timeout
        self._ssl = ssl_context

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        content_type: str = "application/json",
        query: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        if body is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=body, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=timeout or self._timeout, context=self._ssl) as resp:  # noqa: S310
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            raise error_from_response(exc.code, exc.read(), dict(exc.headers.items())) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"cannot reach the control plane at {self.base}: {reason}") from None

    def _get(self, path: str, kind: type[T], **query: Any) -> T:
        _, data = self._call("GET", path, query=query or None)
        return msgspec.json.decode(data, type=kind)

    # --- connectors --------------------------------------------------------------------------

    def apply_connector(self, document: Any, *, dry_run: bool = False) -> ApplyResult:
        """Create or replace a connector; ``dry_run`` only validates it (and says what applying would do)."""
        query = {"dryRun": "true"} if dry_run else None
        # YAML has dates and times, JSON has not: send them as their ISO text for the server to judge.
        body = json.dumps(document, default=str).encode()
        _, data = self._call("POST", "/api/v1/connectors", body=body, query=query)
        return msgspec.json.decode(data, type=ApplyResult)

    def get_connector(self, identifier: str) -> ConnectorRecord:
        return self._get(f"/api/v1/connectors/{_q(identifier)}", ConnectorRecord)

    def list_connectors(self) -> ConnectorList:
        return self._get("/api/v1/connectors", ConnectorList)

    def connector_history(self, identifier: str, limit: int | None = None) -> ConnectorHistory:
        """The connector's last test results, newest first (the server's default count without ``limit``)."""
        return self._get(f"/api/v1/connectors/{_q(identifier)}/history", ConnectorHistory, limit=limit)

    def delete_connector(self, identifier: str) -> None:
        self._call("DELETE", f"/api/v1/connectors/{_q(identifier)}")

    def test_connector(self, identifier: str, request: TestRequest) -> tuple[int, TaskView]:
        status, data = self._call(
            "POST",
            f"/api/v1/connectors/{_q(identifier)}/test",
            body=msgspec.json.encode(request),
            timeout=request.wait_seconds + self._timeout,
        )
        return status, msgspec.json.decode(data, type=TaskView)

    # --- tasks and delegates -----------------------------------------------------------------

    def get_task(self, task_id: str, wait: float = 0) -> TaskView:
        _, data = self._call(
            "GET", f"/api/v1/tasks/{_q(task_id)}", query={"wait": wait} if wait else None, timeout=wait + self._timeout
        )
        return msgspec.json.decode(data, type=TaskView)

    def list_tasks(self, **query: Any) -> TaskList:
        return self._get("/api/v1/tasks", TaskList, **query)

    def cancel_task(self, task_id: str) -> TaskView:
        _, data = self._call("POST", f"/api/v1/tasks/{_q(task_id)}/cancel")
        return msgspec.json.decode(data, type=TaskView)

    def stats(self) -> Stats:
        return self._get("/api/v1/stats", Stats)

    def create_task(self, request: CreateTaskRequest) -> TaskView:
        _, data = self._call("POST", "/api/v1/tasks", body=msgspec.json.encode(request))
        return msgspec.json.decode(data, type=TaskView)

    def list_delegates(self) -> DelegateList:
        return self._get("/api/v1/delegates", DelegateList)

    def forget_delegate(self, delegate_id: str, *, force: bool = False) -> None:
        self._call("DELETE", f"/api/v1/delegates/{_q(delegate_id)}", query={"force": "true"} if force else None)

    def list_tokens(self) -> TokenList:
        return self._get("/api/v1/delegate-tokens", TokenList)

    def create_token(self, name: str, *, names: list[str] | None = None, tags: list[str] | None = None) -> CreatedToken:
        body = msgspec.json.encode(CreateTokenRequest(name=name, names=names, tags=tags))
        _, data = self._call("POST", "/api/v1/delegate-tokens", body=body)
        return msgspec.json.decode(data, type=CreatedToken)

    def revoke_token(self, name: str, *, force: bool = False) -> TokenView:
        query = {"force": "true"} if force else None
        _, data = self._call("POST", f"/api/v1/delegate-tokens/{_q(name)}/revoke", query=query)
        return msgspec.json.decode(data, type=TokenView)


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


__all__ = ["ApiClient", "ProtocolError", "Unreachable"]
