"""The delegate's client for protocol v1.

It owns no session and no policy: the caller injects an ``aiohttp.ClientSession`` (so tests can
point it anywhere and the agent controls its lifetime) and decides what to do with each typed
error. Every call is reported to an observer (operation, status, seconds) for metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import aiohttp
import msgspec

from agent.protocol.auth import RequestSigner, TokenUnavailable
from agent.protocol.errors import AuthError, ProtocolError, TransientError, error_from_detail, error_from_response
from agent.protocol.models import (
    AcquireRequest,
    AcquireResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    LeaseResponse,
    RegisterRequest,
    RegisterResponse,
    ResultItem,
    SubmitResultResponse,
    SubmitResultsRequest,
    SubmitResultsResponse,
    TaskResult,
)

T = TypeVar("T")

#: Called after every request: operation name, outcome ("200", "409", "error", "timeout"), seconds.
RequestObserver = Callable[[str, str, float], None]

_encoder = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def _decoder(kind: type[T]) -> msgspec.json.Decoder[T]:
    dec = _decoders.get(kind)
    if dec is None:
        dec = _decoders[kind] = msgspec.json.Decoder(kind)
    return dec


class ControlPlaneClient:
    """Typed calls to the control plane's delegate endpoints (``/v1/...``)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        signer: RequestSigner,
        *,
        observer: RequestObserver | None = None,
        request_timeout: float = 10.0,
        proxy_headers: Mapping[str, str] | None = None,
    ) -> None:
        """``proxy_headers`` (Proxy-Authorization) go to the session's proxy only, never to the control plane:
        in the CONNECT request for https; for http, the request itself goes to the proxy, so they are its headers.
        """
        self._session = session
        self._proxy_headers = dict(proxy_headers) if proxy_headers else None
        self._headers_to_proxy = bool(proxy_headers) and base_url.startswith("http://")
        self._base = base_url.rstrip("/")
        self._signer = signer
        self._observer = observer
        self._timeout = request_timeout

    async def register(self, request: RegisterRequest) -> RegisterResponse:
        return await self._call("register", "POST", "/v1/delegates/register", request, RegisterResponse)

    async def heartbeat(self, delegate_id: str, request: HeartbeatRequest) -> HeartbeatResponse:
        path = f"/v1/delegates/{delegate_id}/heartbeat"
        return await self._call("heartbeat", "POST", path, request, HeartbeatResponse)

    async def acquire(self, delegate_id: str, request: AcquireRequest) -> AcquireResponse:
        # The server may hold a long poll for wait_seconds; allow that plus the usual budget.
        return await self._call(
            "acquire",
            "POST",
            f"/v1/delegates/{delegate_id}/acquire",
            request,
            AcquireResponse,
            timeout=request.wait_seconds + self._timeout,
        )

    async def renew_lease(self, lease_id: str) -> LeaseResponse:
        return await self._call("renew_lease", "POST", f"/v1/leases/{lease_id}/renew", None, LeaseResponse)

    async def release_lease(self, lease_id: str) -> None:
        await self._call("release_lease", "POST", f"/v1/leases/{lease_id}/release", None, None)

    async def submit_result(self, task_id: str, result: TaskResult) -> SubmitResultResponse:
        path = f"/v1/tasks/{task_id}/result"
        return await self._call("submit_result", "PUT", path, result, SubmitResultResponse)

    async def submit_results(self, results: list[tuple[str, TaskResult]]) -> list[SubmitResultResponse | ProtocolError]:
        """Several results in one request (at most ``MAX_RESULTS_PER_BATCH``): for each, in order,
        what :meth:`submit_result` would have returned, or the error it would have raised.

        An error of the request as a whole (unreachable, 503, 401, a control plane without the
        route: ``NotFound``) is raised as usual; every result is then as undelivered as before.
        """
        body = SubmitResultsRequest(results=[ResultItem(task_id=task_id, result=r) for task_id, r in results])
        answer = await self._call("submit_results", "POST", "/v1/results", body, SubmitResultsResponse)
        if len(answer.outcomes) != len(results):
            raise TransientError(f"submit_results: {len(answer.outcomes)} outcomes for {len(results)} results")
        out: list[SubmitResultResponse | ProtocolError] = []
        for (task_id, _), item in zip(results, answer.outcomes, strict=True):
            if item.task_id != task_id:  # an answer for another batch, or out of order: trust none of it
                raise TransientError(f"submit_results: outcome for {item.task_id} where {task_id} was sent")
            if item.status == 200 and item.outcome is not None:
                out.append(SubmitResultResponse(outcome=item.outcome))
            elif item.error is not None:
                out.append(error_from_detail(item.status, item.error))
            else:
                out.append(TransientError(f"submit_results: no outcome for task {item.task_id}", status=item.status))
        return out

    async def deregister(self, delegate_id: str) -> None:
        await self._call("deregister", "POST", f"/v1/delegates/{delegate_id}/deregister", None, None)

    async def _call(
        self,
        operation: str,
        method: str,
        path: str,
        body: msgspec.Struct | None,
        response_type: type[T] | None,
        *,
        timeout: float | None = None,
    ) -> T:
        try:
            auth = self._signer.header()
        except TokenUnavailable as exc:
            self._observe(operation, "no_token", 0.0)
            raise AuthError(str(exc), code="token_unavailable") from None
        headers = {"Authorization": auth, "Accept": "application/json"}
        data = None
        if body is not None:
            data = _encoder.encode(body)
            headers["Content-Type"] = "application/json"
        if self._headers_to_proxy and self._proxy_headers:
            headers |= self._proxy_headers
        started = time.perf_counter()
        status = "error"
        try:
            async with asyncio.timeout(timeout or self._timeout):
                async with self._session.request(
                    method,
                    self._base + path,
                    data=data,
                    headers=headers,
                    proxy_headers=None if self._headers_to_proxy else self._proxy_headers,
                ) as resp:
                    status = str(resp.status)
                    payload = await resp.read()
                    if resp.status >= 400:
                        error = error_from_response(resp.status, payload, resp.headers)
                        if isinstance(error, AuthError):
                            self._signer.invalidate()
                        raise error
                    if response_type is None:
                        return None  # type: ignore[return-value]
                    try:
                        return _decoder(response_type).decode(payload)
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        raise TransientError(f"unexpected answer to {operation}: {exc}", status=resp.status) from None
        except TimeoutError:
            status = "timeout"
            raise TransientError(f"{operation} timed out after {timeout or self._timeout:.0f}s") from None
        except ProtocolError:
            raise
        except (aiohttp.ClientError, OSError) as exc:
            status = "error"
            raise TransientError(f"{operation}: cannot reach the control plane: {_describe(exc)}") from None
        finally:
            self._observe(operation, status, time.perf_counter() - started)

    def _observe(self, operation: str, status: str, seconds: float) -> None:
        if self._observer is not None:
            self._observer(operation, status, seconds)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."
