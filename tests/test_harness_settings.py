"""A delegate configured as Harness configures its own: the ConfigMap's environment, its proxy and
certificate settings take effect, and what has no meaning here is said once."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from agent.cli import EXIT_OK, build_agent, delegate_config, main, trust_additional_cas
from agent.observability.logging import Redactor, configure_logging
from agent.runtime.agent import Agent
from agent.runtime.settings import HARNESS_UNUSED, environment_report
from tests.awsfakes import FaultProxy
from tests.conftest import API_KEY, TOKEN, manual_connector
from tests.connect_proxy import ConnectProxy
from tests.helpers import wait_for
from tests.tls import make_pki

PROXY_USER = "corp-delegate"
PROXY_PASSWORD = "pr0xy-canary-Pa55word"
BASIC = "Basic " + base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()

#: Harness's ConfigMap (delegate-helm-chart templates/configMap.yaml) and a few variables its code reads.
HARNESS_CONFIGMAP = {
    "ACCOUNT_ID": "px7xd_BFRCi-pfWPYXVjvw",
    "DEPLOY_MODE": "KUBERNETES",
    "DELEGATE_NAME": "harness-delegate-ng",
    "POLL_FOR_TASKS": "false",
    "NEXT_GEN": "true",
    "DELEGATE_TAGS": "eks, prod",
    "DELEGATE_DESCRIPTION": "migrated from Harness",
    "JAVA_OPTS": "-Xms64M",
    "DELEGATE_TYPE": "HELM_DELEGATE",
    "DELEGATE_NAMESPACE": "harness-delegate-ng",
    "INIT_SCRIPT": "microdnf install -y zip",
    "CLIENT_TOOLS_DOWNLOAD_DISABLED": "true",
    "LOG_STREAMING_SERVICE_URL": "https://app.harness.io/log-service/",
    "DELEGATE_TASK_CAPACITY": "4",
    "TRUST_ALL_CERTIFICATES": "false",
    "DESTINATION_CA_PATH": "/etc/ssl/certs/ca-bundle.crt",
    "PROXY_SCHEME": "http",
    "PROXY_USER": PROXY_USER,
    "PROXY_PASSWORD": PROXY_PASSWORD,
    "PROXY_MANAGER": "true",
    # 127.0.0.1 is often in a default NO_PROXY; this one must not let the test's traffic go direct.
    "NO_PROXY": "169.254.169.254,.svc.cluster.local",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AGENT_HTTP_LISTEN": "127.0.0.1:0",
    "LOGGING_LEVEL": "DEBUG",
}


def harness_env(cp_url: str, proxy: tuple[str, int], secrets: Path, aws_endpoint: str, **extra: str) -> dict[str, str]:
    return HARNESS_CONFIGMAP | {
        "MANAGER_HOST_AND_PORT": cp_url,
        "DELEGATE_TOKEN": TOKEN,
        "PROXY_HOST": proxy[0],
        "PROXY_PORT": str(proxy[1]),
        "AGENT_SECRETS_DIR": str(secrets),
        "AWS_ENDPOINT_URL": aws_endpoint,
        **extra,
    }


def test_check_config_says_what_a_harness_configmap_maps_and_ignores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config with Harness's environment: each variable that sets something, one line for those
    that mean nothing here, INIT_SCRIPT on its own line, the proxy route; never the proxy password."""
    for name in [n for n in os.environ if n.upper().endswith("_PROXY")]:
        monkeypatch.delenv(name)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    env = harness_env("https://cp.example:8443", ("127.0.0.1", 3128), secrets, "http://127.0.0.1:5000")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HTTPS_PROXY", "http://other-proxy:8080")

    assert main(["check-config"]) == EXIT_OK
    out, err = capsys.readouterr()
    lines = err.splitlines()
    for name, key in [
        ("MANAGER_HOST_AND_PORT", "controlPlane.url"),
        ("DELEGATE_NAME", "delegate.name"),
        ("DELEGATE_TAGS", "delegate.tags"),
        ("DELEGATE_TASK_CAPACITY", "delegate.capacity"),
        ("DELEGATE_TOKEN", "delegate.token"),
        ("LOGGING_LEVEL", "logging.level"),
        ("PROXY_HOST", "proxy.host"),
        ("PROXY_PORT", "proxy.port"),
        ("PROXY_SCHEME", "proxy.scheme"),
        ("PROXY_USER", "proxy.user"),
        ("PROXY_PASSWORD", "proxy.password"),
        ("PROXY_MANAGER", "proxy.manager"),
        ("NO_PROXY", "proxy.noProxy"),
    ]:
        assert f"delegate-agent: {name} -> {key}" in lines
    ignored = [line for line in lines if "ignored, no meaning here" in line]
    assert ignored == [
        "delegate-agent: ignored, no meaning here: ACCOUNT_ID, DEPLOY_MODE, DELEGATE_TYPE, NEXT_GEN, "
        "DELEGATE_DESCRIPTION, DELEGATE_NAMESPACE, POLL_FOR_TASKS, JAVA_OPTS, CLIENT_TOOLS_DOWNLOAD_DISABLED, "
        "LOG_STREAMING_SERVICE_URL, TRUST_ALL_CERTIFICATES, DESTINATION_CA_PATH"
    ]
    assert "delegate-agent: INIT_SCRIPT is set but not run: install what you need in the image instead" in lines
    assert "delegate-agent: HTTPS_PROXY is overridden by PROXY_HOST" in lines
    assert "delegate-agent: the control plane is reached through the proxy http://127.0.0.1:3128" in lines
    assert lines[-1] == "configuration OK"
    assert "password: (set)" in out and "host: 127.0.0.1" in out
    assert PROXY_PASSWORD not in out + err


def test_proxy_manager_false_and_no_proxy_take_the_control_plane_off_the_proxy() -> None:
    """As Harness's proxy_setup.sh: PROXY_MANAGER=false, or the manager's host in NO_PROXY, goes direct."""
    base = {"MANAGER_HOST_AND_PORT": "https://cp.example", "DELEGATE_TOKEN": TOKEN, "DELEGATE_NAME": "d"}
    base |= {"PROXY_HOST": "proxy.corp", "PROXY_PORT": "3128"}
    settings, aws = delegate_config(base)
    assert settings.control_plane_proxy() == "http://proxy.corp:3128"
    assert aws.proxies_for("https://sts.us-east-1.amazonaws.com") == {
        "https": "http://proxy.corp:3128",
        "http": "http://proxy.corp:3128",
    }
    assert delegate_config(base | {"PROXY_MANAGER": "false"})[0].control_plane_proxy() is None
    settings, aws = delegate_config(base | {"no_proxy": ".example,.amazonaws.com"})
    assert settings.control_plane_proxy() is None
    assert aws.proxies_for("https://sts.us-east-1.amazonaws.com") == {}


def test_proxy_settings_that_cannot_work_are_named() -> None:
    """A proxy without a port, credentials without a proxy: each is a problem, all reported at once."""
    from agent.runtime.settings import ConfigError

    base = {"MANAGER_HOST_AND_PORT": "https://cp", "DELEGATE_TOKEN": TOKEN, "DELEGATE_NAME": "d"}
    with pytest.raises(ConfigError) as err:
        delegate_config(base | {"PROXY_HOST": "http://proxy:3128", "PROXY_SCHEME": "socks5", "PROXY_MANAGER": "maybe"})
    assert sorted(p.field for p in err.value.problems) == ["PROXY_HOST", "PROXY_MANAGER", "PROXY_PORT", "PROXY_SCHEME"]
    with pytest.raises(ConfigError) as err:
        delegate_config(base | {"PROXY_USER": "u", "PROXY_PASSWORD": PROXY_PASSWORD})
    assert [(p.field, p.message) for p in err.value.problems] == [
        ("PROXY_USER", "has no effect without PROXY_HOST"),
        ("PROXY_PASSWORD", "has no effect without PROXY_HOST"),
    ]
    assert PROXY_PASSWORD not in str(err.value.problems)


def test_additional_certs_that_are_not_certificates_are_named(tmp_path: Path) -> None:
    """ADDITIONAL_CERTS_PATH is checked when the settings are read, not when the first TLS handshake fails."""
    from agent.runtime.settings import ConfigError

    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "README").write_text("not a certificate")
    base = {"MANAGER_HOST_AND_PORT": "https://cp", "DELEGATE_TOKEN": TOKEN, "DELEGATE_NAME": "d"}
    for path, message in [
        (certs, f"{certs / 'README'} is not a PEM CA certificate"),
        (tmp_path / "absent", "does not exist"),
        (tmp_path / "empty", "holds no certificate files"),
    ]:
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(ConfigError) as err:
            delegate_config(base | {"ADDITIONAL_CERTS_PATH": str(path)})
        [problem] = err.value.problems
        assert problem.field == "ADDITIONAL_CERTS_PATH" and message in problem.message


def test_every_unused_harness_variable_has_a_reason() -> None:
    """The list the startup warning draws from says why for each name, and maps none the table reads."""
    from agent.runtime.settings import SETTINGS

    read = {name for row in SETTINGS for name in row.env}
    assert all(why.strip() for why in HARNESS_UNUSED.values())
    assert not read & set(HARNESS_UNUSED)
    assert environment_report({"JAVA_OPTS": "", "ACCOUNT_ID": "a"}).ignored == (
        ("ACCOUNT_ID", HARNESS_UNUSED["ACCOUNT_ID"]),
    )


async def _run_delegate(env: dict[str, str], logs: io.StringIO) -> tuple[Agent, asyncio.Task[int]]:
    """The delegate as ``delegate-agent run`` wires it from ``env`` (without its signal handling)."""
    settings, aws = delegate_config(env)
    aws = trust_additional_cas(settings, aws, Path(env["AGENT_SECRETS_DIR"]).parent)
    redactor = Redactor()
    configure_logging(fmt="json", level=settings.log_level, redactor=redactor, stream=logs)
    agent = build_agent(settings, aws, env, redactor=redactor, watchdog=False)
    task = asyncio.create_task(agent.run())
    started = asyncio.create_task(agent.started.wait())
    await asyncio.wait({task, started}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    if task.done():
        task.result()
    assert agent.started.is_set(), "the delegate did not start"
    return agent, task


async def _test_connector(cp_url: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(cp_url + "/api/v1/connectors/proxied/test", headers={"X-API-Key": API_KEY}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]


def _secrets(tmp_path: Path) -> Path:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "aws_secret_key").write_text("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    return secrets


async def test_a_harness_configured_delegate_sends_aws_and_control_plane_calls_through_the_proxy(
    moto: str, control_plane_factory: Any, tmp_path: Path
) -> None:
    """With Harness's ConfigMap and PROXY_* set, STS and EC2 calls and the control-plane connection go
    through an authenticating proxy (which refuses anyone else), the test succeeds, the password goes
    only to the proxy as Proxy-Authorization, and neither logs nor the result hold it."""
    cp = await control_plane_factory()
    await cp.core.apply_connector(manual_connector("proxied", delegateSelectors=["eks"]))
    proxy = ConnectProxy(credentials=(PROXY_USER, PROXY_PASSWORD))
    logs = io.StringIO()
    async with proxy.running() as address:
        agent, task = await _run_delegate(harness_env(cp.url, address, _secrets(tmp_path), moto), logs)
        try:
            view = await _test_connector(cp.url)
        finally:
            agent.request_shutdown()
            assert await asyncio.wait_for(task, 30) == 0

    assert view["status"] == "SUCCESS", view
    aws_calls = [f for f in proxy.forwarded if f.url.startswith(moto)]
    assert any(b"Action=GetCallerIdentity" in f.body for f in aws_calls), aws_calls
    assert any(b"Action=DescribeRegions" in f.body for f in aws_calls), aws_calls
    cp_calls = [f.url.removeprefix(cp.url) for f in proxy.forwarded if f.url.startswith(cp.url)]
    assert any(path.endswith("/register") for path in cp_calls), cp_calls
    assert proxy.refused == 0 and set(proxy.authorizations) == {BASIC}
    assert len(proxy.authorizations) == len(proxy.forwarded)

    text = logs.getvalue()
    events = [json.loads(line) for line in text.splitlines()]
    warnings = [e for e in events if e.get("event", "").startswith(("agent.harness_", "agent.init_script"))]
    assert [e["event"] for e in warnings] == ["agent.init_script_not_run", "agent.harness_variables_ignored"]
    assert "JAVA_OPTS" in warnings[1]["names"] and "INIT_SCRIPT" not in warnings[1]["names"]
    for secret in (PROXY_PASSWORD, BASIC.removeprefix("Basic ")):
        assert secret not in text
        assert secret not in json.dumps(view)


async def test_https_aws_endpoints_are_reached_through_connect_tunnels_trusting_additional_certs(
    moto: str, control_plane_factory: Any, tmp_path: Path
) -> None:
    """An https AWS endpoint with a private CA: the delegate opens CONNECT tunnels through the proxy
    (Proxy-Authorization on each) and trusts the CA from ADDITIONAL_CERTS_PATH, as a Harness delegate
    with custom certificates does."""
    pki = make_pki(tmp_path / "pki")
    certs = tmp_path / "ca-bundle"
    certs.mkdir()
    (certs / "corp-root.pem").write_bytes(pki.ca.read_bytes())
    cp = await control_plane_factory()
    await cp.core.apply_connector(manual_connector("proxied", delegateSelectors=["eks"]))
    proxy = ConnectProxy(credentials=(PROXY_USER, PROXY_PASSWORD))
    logs = io.StringIO()
    async with (
        FaultProxy(moto).running(ssl_context=pki.server_context()) as https_aws,
        proxy.running() as address,
    ):
        env = harness_env(cp.url, address, _secrets(tmp_path), https_aws, ADDITIONAL_CERTS_PATH=str(certs))
        agent, task = await _run_delegate(env, logs)
        try:
            view = await _test_connector(cp.url)
        finally:
            agent.request_shutdown()
            assert await asyncio.wait_for(task, 30) == 0

    assert view["status"] == "SUCCESS", view
    host_port = https_aws.removeprefix("https://")
    assert proxy.tunnels and set(proxy.tunnels) == {host_port}
    assert proxy.refused == 0 and set(proxy.authorizations) == {BASIC}
    assert PROXY_PASSWORD not in logs.getvalue() + json.dumps(view)


async def test_an_https_control_plane_is_reached_through_a_tunnel_with_harness_mtls_and_ca_names(
    moto: str, control_plane_factory: Any, tmp_path: Path
) -> None:
    """DELEGATE_CLIENT_CERTIFICATE_PATH/_KEY_PATH are the client certificate, ADDITIONAL_CERTS_PATH the
    private CA: the delegate registers with a mutual-TLS control plane through a CONNECT tunnel, the
    proxy credentials in the CONNECT only."""
    pki = make_pki(tmp_path / "pki")
    cp = await control_plane_factory(
        tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca
    )
    assert cp.url.startswith("https://")
    proxy = ConnectProxy(credentials=(PROXY_USER, PROXY_PASSWORD))
    logs = io.StringIO()
    async with proxy.running() as address:
        env = harness_env(
            cp.url,
            address,
            _secrets(tmp_path),
            moto,
            DELEGATE_CLIENT_CERTIFICATE_PATH=str(pki.client_cert),
            DELEGATE_CLIENT_CERTIFICATE_KEY_PATH=str(pki.client_key),
            ADDITIONAL_CERTS_PATH=str(pki.ca),
        )
        agent, task = await _run_delegate(env, logs)
        try:
            await wait_for(lambda: agent.state.registered, "registration through the tunnel")
        finally:
            agent.request_shutdown()
            assert await asyncio.wait_for(task, 30) == 0

    assert cp.url.removeprefix("https://") in proxy.tunnels
    assert proxy.forwarded == [] and proxy.refused == 0 and set(proxy.authorizations) == {BASIC}
    assert PROXY_PASSWORD not in logs.getvalue()


async def test_validate_takes_the_delegates_proxy_too(
    moto: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`delegate-agent validate` run in a delegate's pod goes the delegate's way: through PROXY_*."""
    secrets = _secrets(tmp_path)
    doc = tmp_path / "connector.yaml"
    doc.write_text(yaml.safe_dump(manual_connector("proxied")))
    proxy = ConnectProxy(credentials=(PROXY_USER, PROXY_PASSWORD))
    async with proxy.running() as (host, port):
        for name, value in {
            "AWS_ENDPOINT_URL": moto,
            "PROXY_HOST": host,
            "PROXY_PORT": str(port),
            "PROXY_USER": PROXY_USER,
            "PROXY_PASSWORD": PROXY_PASSWORD,
            "NO_PROXY": "169.254.169.254",
        }.items():
            monkeypatch.setenv(name, value)
        code = await asyncio.to_thread(main, ["validate", "-f", str(doc), "--secrets-dir", str(secrets)])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, out + err
    assert any(b"Action=GetCallerIdentity" in f.body for f in proxy.forwarded)
    assert proxy.refused == 0 and set(proxy.authorizations) == {BASIC}
    assert PROXY_PASSWORD not in out + err
