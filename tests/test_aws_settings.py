"""The standard AWS settings are honoured, the models stay in sync, and `delegate-agent validate` works."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from agent.aws.clients import MODELS_DIR, AwsClients, HarnessBackoff
from agent.aws.connector import BackoffStrategy, parse_connector
from agent.aws.environment import AwsEnvironment
from agent.aws.models_gen import ENDPOINT_SERVICES, render
from agent.aws.secrets import SecretStore
from agent.aws.validator import AwsValidator
from agent.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from tests.awsfakes import FaultProxy, ForwardProxy, MotoIam
from tests.tls import make_pki


def manual_doc(access_key: str = "AKIAIOSFODNN7EXAMPLE", **cred: Any) -> dict[str, Any]:
    return {
        "connector": {
            "name": "t",
            "type": "Aws",
            "spec": {
                "credential": {"type": "ManualConfig", "spec": {"accessKey": access_key, "secretKeyRef": "sk"}, **cred}
            },
        }
    }


async def validate_with(env_vars: dict[str, str], tmp_path: Path, doc: dict[str, Any] | None = None) -> dict[str, Any]:
    env, problems = AwsEnvironment.from_environ({"AWS_EC2_METADATA_DISABLED": "true", **env_vars})
    assert problems == []
    (tmp_path / "sk").write_text("secret")
    clients = AwsClients(env)
    try:
        v = AwsValidator(env, clients, SecretStore(tmp_path))
        result = await v.validate(
            parse_connector(doc or manual_doc()), task_id="t", delegate_id=None, delegate_name="d", timeout=20
        )
        return msgspec.to_builtins(result)  # type: ignore[no-any-return]
    finally:
        await clients.close()


async def test_a_custom_ca_bundle_is_used_for_aws_endpoints(moto: str, tmp_path: Path) -> None:
    """AWS_CA_BUNDLE: TLS through an intercepting endpoint works with its CA and fails clearly without."""
    pki = make_pki(tmp_path / "pki")
    async with FaultProxy(moto).running(ssl_context=pki.server_context()) as https_url:
        ok = await validate_with({"AWS_ENDPOINT_URL": https_url, "AWS_CA_BUNDLE": str(pki.ca)}, tmp_path)
        assert ok["status"] == "SUCCESS", ok
        bad = await validate_with({"AWS_ENDPOINT_URL": https_url, "AWS_MAX_ATTEMPTS": "1"}, tmp_path)
    assert bad["failure"]["category"] == "network"
    assert "AWS_CA_BUNDLE" in bad["failure"]["hint"]


async def test_https_proxy_is_used_and_no_proxy_bypasses_it(moto: str, tmp_path: Path) -> None:
    """HTTP(S)_PROXY carries the calls; NO_PROXY lists hosts that go direct."""
    proxy = ForwardProxy()
    async with proxy.running() as proxy_url:
        via = await validate_with({"AWS_ENDPOINT_URL": moto, "HTTP_PROXY": proxy_url}, tmp_path)
        assert via["status"] == "SUCCESS", via
        assert len(proxy.seen) == 2 and all(url.startswith(moto) for url in proxy.seen)
        direct = await validate_with(
            {"AWS_ENDPOINT_URL": moto, "HTTP_PROXY": proxy_url, "NO_PROXY": "127.0.0.1"}, tmp_path
        )
        assert direct["status"] == "SUCCESS"
        assert len(proxy.seen) == 2


def test_settings_are_parsed_and_bad_ones_named() -> None:
    """Numbers, modes and URLs are checked; every problem names its variable."""
    env, problems = AwsEnvironment.from_environ(
        {
            "AWS_MAX_ATTEMPTS": "5",
            "AWS_RETRY_MODE": "adaptive",
            "AWS_STS_REGIONAL_ENDPOINTS": "legacy",
            "AWS_ENDPOINT_URL_STS": "http://sts.local",
            "AWS_ENDPOINT_URL": "http://all.local",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://imds.local",
            "HOME": "/root",
        }
    )
    assert problems == []
    assert (env.max_attempts, env.retry_mode, env.sts_regional_endpoints) == (5, "adaptive", "legacy")
    assert (env.endpoint_for("sts"), env.endpoint_for("ec2")) == ("http://sts.local", "http://all.local")
    assert "HOME" not in env.variables
    _, problems = AwsEnvironment.from_environ(
        {
            "AWS_MAX_ATTEMPTS": "many",
            "AWS_RETRY_MODE": "eager",
            "AWS_ENDPOINT_URL_EC2": "ftp://x",
            "AWS_STS_REGIONAL_ENDPOINTS": "x",
        }
    )
    assert {p.field for p in problems} == {
        "AWS_MAX_ATTEMPTS",
        "AWS_RETRY_MODE",
        "AWS_ENDPOINT_URL_EC2",
        "AWS_STS_REGIONAL_ENDPOINTS",
    }


def test_no_proxy_matching() -> None:
    """NO_PROXY suffixes and hosts bypass the proxy; everything else uses it."""
    env, _ = AwsEnvironment.from_environ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": ".internal,169.254.169.254"})
    assert env.proxies_for("https://sts.us-east-1.amazonaws.com") == {"https": "http://proxy:3128"}
    assert env.proxies_for("https://vpce.internal/") == {}


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("FixedDelayBackoffStrategy", [0.2, 0.2, 0.2, 0.2, 0.2]),
        # ceiling = min(max, base * 2**(n-1)) = 0.1, 0.2, 0.4, 0.8, then capped at 1.0; random() = 0.5
        ("EqualJitterBackoffStrategy", [0.075, 0.15, 0.3, 0.6, 0.75]),
        ("FullJitterBackoffStrategy", [0.05, 0.1, 0.2, 0.4, 0.5]),
    ],
)
def test_harness_backoff_strategies(kind: str, expected: list[float]) -> None:
    """The three Harness strategies: base doubles per retry up to the maximum, jittered as named."""
    s = BackoffStrategy(
        kind,
        retry_count=4,
        base_delay_ms=100 if kind != "FixedDelayBackoffStrategy" else 200,  # type: ignore[arg-type]
        max_backoff_ms=1000 if kind != "FixedDelayBackoffStrategy" else 200,
    )
    b = HarnessBackoff(s, rand=lambda: 0.5)
    assert [round(b.delay(n), 4) for n in range(1, 6)] == expected


def test_pruned_models_match_the_pinned_botocore() -> None:
    """The shipped models are exactly what `make models` produces from the installed botocore."""
    for rel, text in render().items():
        path = MODELS_DIR / rel
        assert path.exists(), f"{path} is missing: run make models"
        assert path.read_text() == text, f"{path} is out of date: run make models"


@pytest.mark.parametrize(
    ("service", "region", "fips"),
    [
        ("sts", "us-east-1", False),
        ("sts", "eu-west-1", False),
        ("sts", "us-gov-west-1", True),
        ("sts", "cn-north-1", False),
        ("ec2", "ap-southeast-4", False),
        ("ec2", "us-east-1", True),
        ("ec2", "cn-northwest-1", False),
        ("iam", "us-east-1", False),
        ("iam", "cn-north-1", False),
        ("iam", "us-gov-east-1", False),
        ("sso", "eu-central-1", False),
        ("sso-oidc", "us-west-2", False),
    ],
)
async def test_pruned_endpoints_resolve_as_botocore_does(service: str, region: str, fips: bool) -> None:
    """The pruned endpoints.json (6.8 MiB less memory) sends each client where stock botocore would."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import AioSession

    env, _ = AwsEnvironment.from_environ({"AWS_USE_FIPS_ENDPOINT": "true"} if fips else {})
    ours = AwsClients(env)
    stock = AioSession()
    config = AioConfig(use_fips_endpoint=fips)
    creds = {"aws_access_key_id": "AKIAEXAMPLE", "aws_secret_access_key": "example"}
    try:
        async with ours.client(service, region) as client:
            endpoint = client.meta.endpoint_url
        async with stock.create_client(service, region_name=region, config=config, **creds) as client:
            assert endpoint == client.meta.endpoint_url
    finally:
        await ours.close()
    assert ours.loader.load_data("endpoints")["partitions"][0]["services"].keys() <= set(ENDPOINT_SERVICES)


async def test_warm_up_loads_the_pruned_models_before_the_first_task() -> None:
    """After warm(), the clients exist and the loader served our pruned ec2 model."""
    env, _ = AwsEnvironment.from_environ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    clients = AwsClients(env)
    try:
        await clients.warm()
        assert len(clients) == 3
        model = clients.loader.load_service_model("ec2", "service-2")
        assert list(model["operations"]) == ["DescribeRegions"]
    finally:
        await clients.close()


async def test_validate_command_exit_codes(
    moto: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`delegate-agent validate` runs the same test here: 0 on SUCCESS, 1 on FAILURE, 2 on bad input."""
    key = await MotoIam(moto).user("local-user")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto)
    (tmp_path / "sk").write_text(key.secret_key)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(manual_doc(key.access_key)))
    code = await asyncio.to_thread(main, ["validate", "-f", str(good), "--secrets-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    assert "SUCCESS" in out and key.arn in out
    code = await asyncio.to_thread(main, ["validate", "-f", str(good), "-o", "json"])  # no secrets dir
    result = json.loads(capsys.readouterr().out)
    assert code == EXIT_FAILED
    assert result["failure"]["category"] == "secret_not_found"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(manual_doc(region="mars-1")))
    code = await asyncio.to_thread(main, ["validate", "-f", str(bad)])
    assert code == EXIT_USAGE
    assert "unknown region 'mars-1'" in capsys.readouterr().err


def test_clients_share_one_tls_context_unless_a_certificate_or_proxy_makes_theirs_differ(tmp_path: Path) -> None:
    """aiobotocore loads the CA bundle into a context per client (2 MiB each); ours load it once."""
    from agent.aws.clients import _SharedTlsSession

    a, b = _SharedTlsSession(verify=True), _SharedTlsSession(verify=True)
    ctx_a, proxy_a = a._build_ssl_contexts(None)
    ctx_b, _ = b._build_ssl_contexts(None)
    assert ctx_a is ctx_b and proxy_a is None
    unverified, _ = _SharedTlsSession(verify=False)._build_ssl_contexts(None)
    assert unverified is not ctx_a and unverified.verify_mode == ssl.CERT_NONE
    # A proxy's context gets the proxy's own CA loaded into it: never the shared one.
    _, proxy = _SharedTlsSession(verify=True, proxies={"https": "http://127.0.0.1:9"})._build_ssl_contexts(
        "http://127.0.0.1:9"
    )
    assert proxy is not None and proxy is not ctx_a
