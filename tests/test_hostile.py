"""Hostile input: the OpenAPI contract fuzzed, parsers fed anything, the delegate's port abused."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from agent.aws.connector import ConnectorInvalid, parse_connector
from agent.aws.environment import AwsEnvironment
from agent.aws.handler import AwsValidationHandler
from agent.cli import build_handlers
from agent.controlplane.app import ControlPlaneConfig, ControlPlaneService
from agent.controlplane.core import ControlPlaneSettings
from agent.controlplane.openapi import build_openapi
from agent.observability.logging import Redactor
from agent.observability.metrics import AgentMetrics
from agent.protocol.auth import RequestSigner, TokenSource
from agent.runtime.settings import ConfigError, load_settings
from agent.taskapi import InvalidTask, TaskContext
from tests.conftest import API_KEY, FAST, TOKEN, AgentFactory, ControlPlaneFactory, done, manual_connector

# --- the control plane's API, fuzzed from its own OpenAPI document ---------------------------------

schema = schemathesis.openapi.from_dict(build_openapi())
#: Harness's cross-field rules for connectors are stricter than any JSON Schema can say; these
#: operations may refuse schema-valid documents (every refusal still names its field).
SEMANTIC = {("POST", "/api/v1/connectors"), ("PUT", "/api/v1/connectors/{identifier}")}


@pytest.fixture(scope="module")
def control_plane_in_a_thread() -> Iterator[str]:
    """A real control plane on its own loop in a thread (schemathesis calls it synchronously)."""
    loop = asyncio.new_event_loop()
    service = ControlPlaneService(
        ControlPlaneConfig(
            port=0,
            data_dir=Path(tempfile.mkdtemp(prefix="fuzz-cp-")),
            api_key=API_KEY,
            delegate_tokens=f"default:{TOKEN}",
            settings=ControlPlaneSettings(poll_wait_seconds=0.2, pickup_timeout_seconds=0.5),
        )
    )
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(service.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    asyncio.run_coroutine_threadsafe(service.core.apply_connector(manual_connector("Existing")), loop).result(10)
    yield service.url
    asyncio.run_coroutine_threadsafe(service.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


_signer = RequestSigner(TokenSource(value=TOKEN), issuer="fuzzer")


@pytest.mark.hostile
@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_holds_its_contract_under_fuzzing(case: Any, control_plane_in_a_thread: str) -> None:
    """No 5xx, no hang, only documented statuses, bodies that match their schemas, bad input refused."""
    headers = {"Authorization": _signer.header()} if case.path.startswith("/v1/") else {"X-API-Key": API_KEY}
    excluded = [positive_data_acceptance] if (case.method.upper(), case.path) in SEMANTIC else []
    response = case.call_and_validate(
        base_url=control_plane_in_a_thread, headers=headers, excluded_checks=excluded, timeout=30
    )
    if response.status_code >= 400:
        body = response.json()
        assert body["error"]["code"] and body["error"]["message"]  # every 4xx explains itself


# --- parsers fed anything ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=15), children, max_size=5),
    max_leaves=25,
)
connector_like = st.fixed_dictionaries(
    {
        "connector": st.fixed_dictionaries(
            {
                "name": st.one_of(st.text(max_size=20), json_values),
                "type": st.sampled_from(["Aws", "aws", 3, None]),
                "spec": st.fixed_dictionaries(
                    {
                        "credential": st.fixed_dictionaries(
                            {
                                "type": st.sampled_from(["ManualConfig", "Irsa", "InheritFromDelegate", "Oidc", 7]),
                                "spec": json_values,
                                "region": st.one_of(st.sampled_from(["us-east-1", "us-gov-west-1", "xx"]), json_values),
                                "crossAccountAccess": json_values,
                            }
                        ),
                        "delegateSelectors": json_values,
                        "executeOnDelegate": json_values,
                    }
                ),
            },
            optional={"identifier": json_values, "tags": json_values, "extra": json_values},
        )
    }
)


@pytest.mark.hostile
@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, connector_like))
def test_connector_parsing_never_crashes(document: Any) -> None:
    """Any document: a connector, or ConnectorInvalid with at least one problem naming a field."""
    try:
        parse_connector(document)
    except ConnectorInvalid as exc:
        assert exc.problems and all(p.field and p.message for p in exc.problems)


settings_env = st.dictionaries(
    st.sampled_from(
        [
            "MANAGER_HOST_AND_PORT",
            "DELEGATE_TOKEN",
            "DELEGATE_NAME",
            "DELEGATE_TAGS",
            "DELEGATE_TASK_CAPACITY",
            "AGENT_HTTP_LISTEN",
            "AGENT_LOG_FORMAT",
            "AGENT_LOG_LEVEL",
            "AGENT_DRAIN_TIMEOUT_SECONDS",
            "AWS_MAX_ATTEMPTS",
            "AWS_RETRY_MODE",
            "AWS_ENDPOINT_URL",
            "AGENT_CONTROL_PLANE_TIMEOUT_SECONDS",
            "AWS_STS_REGIONAL_ENDPOINTS",
        ]
    ),
    st.text(max_size=30),
    max_size=10,
)


@pytest.mark.hostile
@settings(max_examples=300, deadline=None)
@given(settings_env)
def test_settings_parsing_never_crashes(environ: dict[str, str]) -> None:
    """Any environment: settings, or a ConfigError whose problems each name a variable."""
    try:
        load_settings(environ)
    except ConfigError as exc:
        assert exc.problems and all(p.field for p in exc.problems)


secret_text = st.text(alphabet="ab-c", min_size=6, max_size=12)


@pytest.mark.hostile
@settings(max_examples=500, deadline=None)
@given(secrets=st.lists(secret_text, min_size=1, max_size=6), filler=st.lists(st.text(alphabet="ab-c x", max_size=8)))
def test_no_secret_survives_the_redactor(secrets: list[str], filler: list[str]) -> None:
    """Secrets that overlap, nest or repeat, in any surroundings: none is left readable."""
    r = Redactor()
    r.add(*secrets)
    pieces = [p for pair in zip(filler, secrets * len(filler), strict=False) for p in pair] + secrets
    out = r.text("".join(pieces))
    assert not any(s in out for s in secrets), out


@pytest.mark.hostile
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.dictionaries(st.sampled_from(["connector", "permissions", "other"]), json_values, max_size=3))
async def test_the_aws_handler_never_crashes_on_a_payload(payload: dict[str, Any]) -> None:
    """Any payload: an outcome, or InvalidTask naming the field; never another exception."""
    from agent.aws.clients import AwsClients
    from agent.aws.secrets import SecretStore
    from agent.aws.validator import AwsValidator

    env, _ = AwsEnvironment.from_environ(
        {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1", "AWS_EC2_METADATA_DISABLED": "true"}
    )
    validator = AwsValidator(env, AwsClients(env), SecretStore(None))
    try:
        outcome = await AwsValidationHandler(validator)(
            TaskContext("t", "aws.validate-connector", payload, "d", "n", 5)
        )
        assert outcome.status in ("SUCCESS", "FAILURE")
    except InvalidTask as exc:
        assert exc.field.startswith("payload.")
    finally:
        await validator.close()


# --- the delegate: its own port, and tasks that make no sense -------------------------------------


@pytest.mark.hostile
@pytest.mark.looptime  # the 2 s given to the request that never ends its headers is virtual
async def test_the_delegates_port_shrugs_off_garbage(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, http: aiohttp.ClientSession
) -> None:
    """Garbage bytes, huge headers, an oversized body, odd methods: answered or dropped, never a crash."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp)
    await a.registered()
    host, port = a.agent.http_url.removeprefix("http://").split(":")
    attacks = [
        b"\x00\xff\x13garbage\r\n\r\n",
        b"GET /status HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n" + b"z" * 65536,
        b"BREW /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /" + b"../" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /status HTTP/1.1\r\n",
    ]  # and one that never finishes its headers
    for payload in attacks:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(payload)
        await writer.drain()
        try:
            async with asyncio.timeout(2):
                await reader.read(4096)
        except TimeoutError:
            pass
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    async with http.post(a.agent.http_url + "/status", data=b"x" * 200_000) as resp:
        assert resp.status in (405, 413)
    async with http.get(a.agent.http_url + "/healthz") as resp:
        assert resp.status == 200
    assert a.agent.state.registered


@pytest.mark.hostile
async def test_nonsense_tasks_each_fail_and_the_delegate_carries_on(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    """Random payloads for the AWS task type: each gets a FAILURE naming the problem; the delegate lives."""
    cp = await control_plane_factory(settings=FAST)
    # The real AWS handler, pointed at a closed port: nothing leaves the machine.
    env, _ = AwsEnvironment.from_environ(
        {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1", "AWS_EC2_METADATA_DISABLED": "true"}
    )
    [handler] = build_handlers(env, Redactor(), AgentMetrics(name="x"))
    a = await agent_factory(cp, extra_handlers=(handler,))
    await a.registered()
    payloads: list[Any] = [
        {},
        {"connector": None},
        {"connector": "x"},
        {"connector": {"connector": []}},
        {"connector": manual_connector("ok").get("connector")},
        {"connector": {}, "permissions": 7},
        {"connector": manual_connector("p"), "permissions": ["not an action"]},
        {"connector": manual_connector("unreachable")},
    ]
    tasks = [await cp.core.create_task(type="aws.validate-connector", payload=p) for p in payloads]
    summaries = []
    for t in tasks:
        result = await done(cp, t.id)
        assert result.status == "FAILURE", result.result
        assert result.result.errors[0].message
        summaries.append(result.result.error_summary)
    assert not any("cannot run tasks of type" in s for s in summaries)  # the AWS handler really ran them
    assert "payload.connector: is required" in summaries[0]
    assert "payload.permissions[0]" in summaries[6]
    assert tasks and "secret" in summaries[7]  # a well-formed connector got as far as its secret reference
    echo = await cp.core.create_task(type="test.echo", payload={"message": "still here"})
    assert (await done(cp, echo.id)).status == "SUCCESS"
    assert a.agent.state.registered
