"""The user API over HTTP: connectors, tests, tasks, restart durability, and the OpenAPI contract."""

from __future__ import annotations

import asyncio
import io
import json
import re
from datetime import UTC, datetime
from typing import Any

import aiohttp
import msgspec
import pytest
import yaml

from agent.aws.connector import AwsConnector
from agent.controlplane.core import ControlPlaneSettings
from agent.controlplane.routes import ROUTES
from agent.protocol.auth import RequestSigner, TokenSource
from agent.protocol.models import (
    AcquireRequest,
    ApplyResult,
    ConnectorList,
    ConnectorRecord,
    CreateTaskRequest,
    HeartbeatRequest,
    ResultItem,
    TaskResult,
    TaskView,
    TestRequest,
)
from agent.protocol.results import Identity, ValidationResult
from tests.conftest import (
    API_KEY,
    TOKEN,
    ControlPlaneFactory,
    ManualClock,
    delegate_client,
    manual_connector,
    register_request,
)

H = {"X-API-Key": API_KEY}


async def apply(http: aiohttp.ClientSession, url: str, doc: Any, *, as_yaml: bool = False) -> tuple[int, Any]:
    if as_yaml:
        kw: dict[str, Any] = {"data": yaml.safe_dump(doc), "headers": {**H, "Content-Type": "application/yaml"}}
    else:
        kw = {"json": doc, "headers": H}
    async with http.post(url + "/api/v1/connectors", **kw) as resp:
        return resp.status, await resp.json()


async def test_connector_lifecycle(control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession) -> None:
    """Create (YAML), read, list, replace (updated/unchanged), delete."""
    cp = await control_plane_factory()
    status, body = await apply(http, cp.url, manual_connector("Prod account"), as_yaml=True)
    assert status == 201
    created = msgspec.convert(body, ApplyResult)
    assert (created.identifier, created.outcome) == ("Prod_account", "created")
    assert (await apply(http, cp.url, manual_connector("Prod account")))[1]["outcome"] == "unchanged"
    changed = manual_connector("Prod account", delegateSelectors=["eks"])
    assert (await apply(http, cp.url, changed))[0] == 200
    async with http.get(cp.url + "/api/v1/connectors/Prod_account", headers=H) as resp:
        record = msgspec.convert(await resp.json(), ConnectorRecord)
    assert record.connector["connector"]["spec"]["delegateSelectors"] == ["eks"]
    async with http.get(cp.url + "/api/v1/connectors", headers=H) as resp:
        assert [c.identifier for c in msgspec.convert(await resp.json(), ConnectorList).connectors] == ["Prod_account"]
    async with http.delete(cp.url + "/api/v1/connectors/Prod_account", headers=H) as resp:
        assert resp.status == 204
    async with http.get(cp.url + "/api/v1/connectors/Prod_account", headers=H) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"


async def test_an_invalid_connector_gets_400_with_every_problem(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """The API answers 400 with one entry per problem, each naming its field."""
    cp = await control_plane_factory()
    doc = {"connector": {"name": "x", "type": "Aws", "spec": {"credential": {"type": "Irsa", "region": "mars-1"}}}}
    status, body = await apply(http, cp.url, doc)
    assert status == 400
    assert body["error"]["code"] == "invalid_connector"
    fields = {p["field"] for p in body["error"]["problems"]}
    assert fields == {"connector.spec.credential.region", "connector.spec.delegateSelectors"}


@pytest.mark.parametrize(
    ("data", "ctype", "status", "code"),
    [
        ("connector: [unclosed", "application/yaml", 400, "invalid_connector"),
        ("{not json", "application/json", 400, "invalid_connector"),
        ("", "application/json", 400, "invalid_connector"),
        ("<xml/>", "application/xml", 415, "unsupported_media_type"),
        ("x" * (1024 * 1024 + 10), "application/yaml", 413, "payload_too_large"),
    ],
    ids=["bad-yaml", "bad-json", "empty", "xml", "too-large"],
)
async def test_malformed_bodies_are_refused_clearly(
    control_plane_factory: ControlPlaneFactory,
    http: aiohttp.ClientSession,
    data: str,
    ctype: str,
    status: int,
    code: str,
) -> None:
    """Garbage in gets a precise 4xx with a code, never a 500."""
    cp = await control_plane_factory()
    payload = io.BytesIO(data.encode())
    async with http.post(cp.url + "/api/v1/connectors", data=payload, headers={**H, "Content-Type": ctype}) as resp:
        assert resp.status == status
        assert (await resp.json())["error"]["code"] == code


async def test_put_uses_the_identifier_in_the_path(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """PUT /connectors/ID fills a missing identifier and refuses a contradicting one."""
    cp = await control_plane_factory()
    async with http.put(cp.url + "/api/v1/connectors/main", json=manual_connector("Main"), headers=H) as resp:
        assert resp.status == 201
        assert (await resp.json())["identifier"] == "main"
    doc = manual_connector("Main")
    doc["connector"]["identifier"] = "other"
    async with http.put(cp.url + "/api/v1/connectors/main", json=doc, headers=H) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["problems"][0]["field"] == "connector.identifier"


async def test_testing_a_connector_runs_on_a_selected_delegate_and_keeps_the_result(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """The test queues a validation for the connector's selectors; the result is kept with the connector."""
    cp = await control_plane_factory()
    await apply(http, cp.url, manual_connector("Prod", delegateSelectors=["prod"]))
    client = delegate_client(http, cp.url)
    wrong = await client.register(register_request("wrong", ["dev"]))
    right = await client.register(register_request("right", ["prod"]))

    async def fake_delegate() -> str:
        assert (await client.acquire(wrong.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))).tasks == []
        got = await client.acquire(right.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=10))
        [task] = got.tasks
        assert task.payload["connector"]["connector"]["identifier"] == "Prod"
        assert task.payload["permissions"] == ["s3:GetObject"]

        now = datetime.now(UTC)
        await client.submit_result(
            task.task_id,
            TaskResult(
                lease_id=task.lease_id,
                status="SUCCESS",
                output=ValidationResult(
                    status="SUCCESS", tested_at=now, identity=Identity(arn="arn:aws:iam::1:user/x")
                ),
                started_at=now,
                finished_at=now,
            ),
        )
        return task.task_id

    runner = asyncio.create_task(fake_delegate())
    async with http.post(
        cp.url + "/api/v1/connectors/Prod/test", json={"waitSeconds": 10, "permissions": ["s3:GetObject"]}, headers=H
    ) as resp:
        assert resp.status == 200
        view = msgspec.convert(await resp.json(), TaskView)
    assert view.task_id == await runner
    assert (view.state, view.status, view.delegate_name) == ("done", "SUCCESS", "right")
    async with http.get(cp.url + "/api/v1/connectors/Prod", headers=H) as resp:
        last = (await resp.json())["lastTest"]
    assert (last["taskId"], last["status"], last["delegateName"]) == (view.task_id, "SUCCESS", "right")


async def test_a_slow_test_answers_202_and_can_be_polled(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, clock: ManualClock
) -> None:
    """When the result is not there in time the caller gets the task id to poll."""
    cp = await control_plane_factory(clock=clock)
    await apply(http, cp.url, manual_connector("Prod", delegateSelectors=["gov", "prod"]))
    async with http.post(
        cp.url + "/api/v1/connectors/Prod/test", json={"waitSeconds": 0, "pickupTimeoutSeconds": 5}, headers=H
    ) as resp:
        assert resp.status == 202
        view = msgspec.convert(await resp.json(), TaskView)
    assert view.state == "queued"
    clock.advance(6)
    await cp.core.sweep()
    async with http.get(cp.url + f"/api/v1/tasks/{view.task_id}", params={"wait": "1"}, headers=H) as resp:
        done = msgspec.convert(await resp.json(), TaskView)
    assert (done.state, done.status, done.failure_reason) == ("done", "FAILURE", "no_eligible_delegate")
    assert done.result is not None
    assert "No delegate is connected" in done.result.error_summary


async def test_platform_mode_runs_the_validator_in_the_control_plane(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """executeOnDelegate: false validates inside the control plane, through the platform seam."""
    seen: list[tuple[str, str]] = []

    class Validator:
        async def __call__(
            self,
            connector: AwsConnector,
            task_id: str,
            permissions: tuple[str, ...],
            *,
            oidc_token: str | None = None,
        ) -> ValidationResult:
            seen.append((connector.identifier, task_id))
            return ValidationResult(status="SUCCESS", tested_at=datetime.now(UTC), delegate_name="platform")

        async def aclose(self) -> None:
            return None

    cp = await control_plane_factory(platform_validator=Validator())
    await apply(http, cp.url, manual_connector("Plat", executeOnDelegate=False))
    async with http.post(cp.url + "/api/v1/connectors/Plat/test", headers=H) as resp:
        view = msgspec.convert(await resp.json(), TaskView)
    assert (view.status, view.delegate_name) == ("SUCCESS", "platform")
    assert seen == [("Plat", view.task_id)]


async def test_inherit_from_delegate_cannot_be_tested_through_the_platform(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """As in Harness: credentials that only exist on a delegate cannot be tested anywhere else."""
    cp = await control_plane_factory()
    doc = {
        "connector": {
            "name": "x",
            "type": "Aws",
            "spec": {
                "credential": {"type": "InheritFromDelegate"},
                "delegateSelectors": ["eks"],
                "executeOnDelegate": False,
            },
        }
    }
    status, body = await apply(http, cp.url, doc)
    assert status == 400
    assert "does not support validation through harness" in body["error"]["problems"][0]["message"]


async def test_a_restart_keeps_connectors_tasks_and_leases(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, clock: ManualClock
) -> None:
    """State lives in SQLite: connectors, queued tasks and running leases survive a restart."""
    cp = await control_plane_factory(clock=clock)
    await apply(http, cp.url, manual_connector("Keep"))
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("a"))
    running = await cp.core.create_task(type="test.echo", payload={"n": 1})
    [lease] = (await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))).tasks
    queued = await cp.core.create_task(type="test.echo", payload={"n": 2})
    data_dir = cp.config.data_dir
    await cp.stop()
    clock.advance(25)  # downtime close to the lease length: leases get a fresh allowance on restart
    cp2 = await control_plane_factory(data_dir=data_dir, clock=clock)
    await cp2.core.sweep()
    async with http.get(cp2.url + "/api/v1/connectors/Keep", headers=H) as resp:
        assert resp.status == 200
    assert (await cp2.core.get_task(queued.id)).state == "queued"
    assert (await cp2.core.get_task(running.id)).state == "running"
    client2 = delegate_client(http, cp2.url)

    now = datetime.now(UTC)
    accepted = await client2.submit_result(
        running.id,
        TaskResult(
            lease_id=lease.lease_id,
            status="SUCCESS",
            output=ValidationResult(status="SUCCESS", tested_at=now),
            started_at=now,
            finished_at=now,
        ),
    )
    assert accepted.outcome == "accepted"
    got = await client2.acquire(d.delegate_id, AcquireRequest(max_tasks=5, wait_seconds=0))
    assert [t.task_id for t in got.tasks] == [queued.id]  # same delegate id is still known


async def test_unknown_routes_and_methods_answer_in_json(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """Even mistakes in the URL get a JSON error with a code."""
    cp = await control_plane_factory()
    async with http.get(cp.url + "/nope") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
    async with http.delete(cp.url + "/v1/delegates/register") as resp:
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]


async def test_bad_query_parameters_are_named(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """Query parameters are validated like bodies."""
    cp = await control_plane_factory()
    async with http.get(cp.url + "/api/v1/tasks", params={"limit": "zero"}, headers=H) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["problems"][0]["field"] == "limit"


async def test_a_validation_error_in_a_protocol_body_names_the_field(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """msgspec's path ends up in the problem list."""
    cp = await control_plane_factory()
    auth = RequestSigner(TokenSource(value=TOKEN), issuer="t").header()
    body = {"name": "x", "instanceId": "i", "version": "1", "taskTypes": [], "capacity": 0}
    async with http.post(cp.url + "/v1/delegates/register", json=body, headers={"Authorization": auth}) as resp:
        assert resp.status == 400
        problem = (await resp.json())["error"]["problems"][0]
    assert problem["field"] == "capacity"
    assert ">= 1" in problem["message"]


# --- OpenAPI -------------------------------------------------------------------------------------


def _aiohttp_routes(app: Any) -> set[tuple[str, str]]:
    """The API's routes: the console's HTML pages (``/``, ``/console/...``) are not in the OpenAPI document."""
    from agent.controlplane.console.security import is_console_path

    found = set()
    for resource in app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter")
        if is_console_path(path):
            continue
        for route in resource:
            if route.method != "HEAD":
                found.add((route.method, path))
    return found


async def test_openapi_lists_exactly_the_routes_the_server_has(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """The served document and the router agree route for route."""
    cp = await control_plane_factory()
    async with http.get(cp.url + "/openapi.json") as resp:
        doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == _aiohttp_routes(cp.app)
    for path, ops in doc["paths"].items():
        names = set(re.findall(r"{(\w+)}", path))
        for op in ops.values():
            assert names == {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}, path
            for status, response in op["responses"].items():
                for media in response.get("content", {}).values():
                    ref = media["schema"].get("$ref")
                    if ref:
                        assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"], (path, status)


async def test_every_documented_route_answers_with_a_documented_status(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """Call every operation (without credentials, then with them) and check the status is documented."""
    cp = await control_plane_factory(settings=ControlPlaneSettings(poll_wait_seconds=0.1, pickup_timeout_seconds=1))
    await apply(http, cp.url, manual_connector("Doc"))
    auth = delegate_client(http, cp.url)._signer.header()
    for route in ROUTES:
        path = route.path
        for name, value in {
            "delegateId": "dlg_missing",
            "leaseId": "lse_missing",
            "taskId": "tsk_missing",
            "identifier": "Doc",
            "name": "default",
        }.items():
            path = path.replace("{" + name + "}", value)
        headers = {"Authorization": auth} if route.auth == "delegate" else dict(H)
        body: Any = None
        if route.body_kind == "connector":
            body = manual_connector("Doc")
        elif route.request is not None:
            body = json.loads(msgspec.json.encode(_example(route.request)))
        kwargs: dict[str, Any] = {"headers": headers}
        if body is not None:
            kwargs["json"] = body
        if route.handler == "test_connector":
            kwargs["json"] = {"waitSeconds": 0}
        async with http.request(route.method, cp.url + path, **kwargs) as resp:
            documented = set(route.responses) | ({401, 403} if route.auth != "none" else set()) | {400}
            assert resp.status in documented, (route.method, route.path, resp.status, await resp.text())
            if resp.status >= 400:
                assert (await resp.json())["error"]["code"]
            else:
                model = route.responses[resp.status][1]
                if model is not None:
                    msgspec.json.decode(await resp.read(), type=model)  # the body matches its schema
        if route.auth != "none":
            async with http.request(route.method, cp.url + path) as resp:
                assert resp.status == 401, (route.method, route.path)


def _example(kind: type[Any]) -> Any:
    examples: dict[type[Any], Any] = {
        AcquireRequest: AcquireRequest(max_tasks=1, wait_seconds=0),
        HeartbeatRequest: HeartbeatRequest(state="running"),
        TestRequest: TestRequest(wait_seconds=0),
        CreateTaskRequest: CreateTaskRequest(type="test.echo", payload={}),
    }
    if kind in examples:
        return examples[kind]
    if kind.__name__ == "CreateTokenRequest":
        return kind(name="doc-token")
    if kind.__name__ == "RegisterRequest":
        return register_request("doc")
    if kind.__name__ == "TaskResult":
        now = datetime.now(UTC)
        output = ValidationResult(status="SUCCESS", tested_at=now)
        return TaskResult(lease_id="lse_missing", status="SUCCESS", output=output, started_at=now, finished_at=now)
    if kind.__name__ == "SubmitResultsRequest":
        return kind(results=[ResultItem(task_id="tsk_missing", result=_example(TaskResult))])
    raise AssertionError(f"no example for {kind}")


async def test_the_control_plane_wakes_waiters_on_delegate_registration(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """Tasks queued before any delegate existed are picked up as soon as one registers and polls."""
    cp = await control_plane_factory()
    task = await cp.core.create_task(type="test.echo", payload={}, selectors=["late"])
    client = delegate_client(http, cp.url)
    d = await client.register(register_request("latecomer", ["late"]))
    got = await client.acquire(d.delegate_id, AcquireRequest(max_tasks=1, wait_seconds=1))
    assert [t.task_id for t in got.tasks] == [task.id]
