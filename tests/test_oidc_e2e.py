"""OidcAuthentication end to end: the real control plane issues the token, a real delegate (or the
platform) exchanges it, and the STS stand-in (agent/demo/oidc_sts.py) checks it as AWS does: the
issuer's discovery document and JWKS fetched over HTTP, the signature verified with PyJWT (the
control plane signs with joserfc), ``iss``/``aud``/``exp``, and the role's trust policy read from
moto's IAM. moto's own AssumeRoleWithWebIdentity reads no token, so it alone would prove wiring only.

Each failure AWS can give has its own hint; and the token, a bearer secret for five minutes, is in
no log, result, metric or database (the canary check at the end of the module's longest test).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiobotocore.session import AioSession

from agent.aws.clients import AwsClients
from agent.aws.environment import AwsEnvironment
from agent.aws.handler import AwsValidationHandler
from agent.aws.secrets import SecretStore
from agent.aws.validator import AwsValidator
from agent.controlplane.oidc import rotate_key_file
from agent.controlplane.platform import PlatformValidation
from agent.controlplane.store.base import TaskRow
from agent.demo.oidc_sts import OidcSts, provider_url
from agent.observability.logging import Redactor
from agent.protocol.models import TestRequest
from tests.awsfakes import ACCOUNT, ADMIN_KEY
from tests.conftest import API_KEY, AgentFactory, ControlPlaneFactory, free_port
from tests.helpers import wait_until
from tests.test_oidc_sts_standin import BROKER_POLICY, trust

AUDIENCE = "sts.amazonaws.com"
ROLE_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["ec2:DescribeRegions", "sts:AssumeRole"], "Resource": "*"}],
}


def connector(name: str, role_arn: str, *, region: str = "us-east-1", **spec: Any) -> dict[str, Any]:
    credential: dict[str, Any] = {"type": "OidcAuthentication", "spec": {"iamRoleArn": role_arn}, "region": region}
    for key in ("audience",):
        if key in spec:
            credential["spec"][key] = spec.pop(key)
    if "crossAccountAccess" in spec:
        credential["crossAccountAccess"] = spec.pop("crossAccountAccess")
    return {"connector": {"name": name, "type": "Aws", "spec": {"credential": credential, **spec}}}


@dataclass
class Cloud:
    """moto seeded like an account that trusts the control plane's issuer, and the STS stand-in before it."""

    moto: str
    issuer: str
    brokers: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def provider(self) -> str:
        return provider_url(self.issuer)

    def iam(self, region: str = "us-east-1") -> Any:
        kw = {"aws_access_key_id": ADMIN_KEY[0], "aws_secret_access_key": ADMIN_KEY[1]}
        return AioSession().create_client("iam", region_name=region, endpoint_url=self.moto, **kw)

    async def seed(self, region: str, partition: str) -> None:
        async with self.iam(region) as iam:
            await iam.create_user(UserName="web-identity-broker")
            await iam.put_user_policy(
                UserName="web-identity-broker", PolicyName="broker", PolicyDocument=json.dumps(BROKER_POLICY)
            )
            key = (await iam.create_access_key(UserName="web-identity-broker"))["AccessKey"]
            self.brokers[partition] = (key["AccessKeyId"], key["SecretAccessKey"])
            await iam.create_open_id_connect_provider(Url=self.issuer, ClientIDList=[AUDIENCE], ThumbprintList=[])

    async def role(self, name: str, policy: dict[str, Any], region: str = "us-east-1") -> str:
        async with self.iam(region) as iam:
            got = await iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(policy))
            await iam.put_role_policy(RoleName=name, PolicyName="p", PolicyDocument=json.dumps(ROLE_POLICY))
        return str(got["Role"]["Arn"])

    def sts(self, clock: Callable[[], float] = time.time) -> OidcSts:
        key, secret = self.brokers["aws"]
        others = {p: k for p, k in self.brokers.items() if p != "aws"}
        return OidcSts(self.moto, key, secret, partition_brokers=others, clock=clock)


@dataclass
class World:
    cloud: Cloud
    cp: Any
    sts_url: str
    minted: list[str]
    redactor: Redactor

    async def test(self, identifier: str) -> dict[str, Any]:
        """``connector test`` through the API, as a user runs it; the task view it answers."""
        async with aiohttp.ClientSession() as http:
            url = f"{self.cp.url}/api/v1/connectors/{identifier}/test"
            async with http.post(url, headers={"X-API-Key": API_KEY}, json={"waitSeconds": 60}) as resp:
                assert resp.status == 200, await resp.text()
                return dict(await resp.json())


def _env(moto: str, sts_url: str) -> AwsEnvironment:
    env, problems = AwsEnvironment.from_environ(
        {"AWS_ENDPOINT_URL": moto, "AWS_ENDPOINT_URL_STS": sts_url, "AWS_EC2_METADATA_DISABLED": "true"}
    )
    assert problems == []
    return env


@pytest.fixture
def sts_clock() -> list[float]:
    """Seconds the STS stand-in's clock runs ahead of the control plane's (a test sets it)."""
    return [0.0]


@pytest.fixture
async def world(
    moto: str,
    control_plane_factory: ControlPlaneFactory,
    agent_factory: AgentFactory,
    iam_enforced: None,
    sts_clock: list[float],
    tmp_path: Path,
) -> AsyncIterator[World]:
    port = free_port()
    cloud = Cloud(moto, f"http://127.0.0.1:{port}/oidc")
    from tests.awsfakes import moto_api

    moto_api(moto, "/moto-api/reset-auth", b"inf")  # seeding is the admin's, as in the real account
    await cloud.seed("us-east-1", "aws")
    await cloud.seed("us-gov-west-1", "aws-us-gov")
    await cloud.role("oidc-prod", trust("aws", cloud.provider, sub="connector:-/-/Prod"))
    await cloud.role("oidc-project", trust("aws", cloud.provider, sub="connector:platform/payments/*", op="StringLike"))
    await cloud.role("oidc-gov", trust("aws-us-gov", cloud.provider, sub="connector:-/-/Gov"), region="us-gov-west-1")
    xa_trust = {
        "Effect": "Allow",
        "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},  # moto matches no role ARN to its sessions
        "Action": "sts:AssumeRole",
        "Condition": {"StringEquals": {"sts:ExternalId": "ext-1234"}},
    }
    await cloud.role("deploy-target", {"Version": "2012-10-17", "Statement": [xa_trust]})
    moto_api(moto, "/moto-api/reset-auth", b"0")
    redactor = Redactor()
    async with cloud.sts(clock=lambda: time.time() + sts_clock[0]).running() as sts_url:
        platform = PlatformValidation(
            AwsValidator(
                _env(moto, sts_url),
                AwsClients(_env(moto, sts_url)),
                SecretStore(None, on_read=redactor.add),
                redact=redactor.value,
            )
        )
        cp = await control_plane_factory(port=port, oidc_issuer=cloud.issuer, platform_validator=platform)
        minted: list[str] = []
        mint = cp.core.queue.task_tokens

        def recording(row: TaskRow, delegate_id: str) -> str | None:
            token = mint(row, delegate_id)
            if token is not None:
                minted.append(token)
            return token

        cp.core.queue.task_tokens = recording
        env = _env(moto, sts_url)
        handler = AwsValidationHandler(
            AwsValidator(env, AwsClients(env), SecretStore(None, on_read=redactor.add), redact=redactor.value)
        )
        delegate = await agent_factory(cp, name="eks-prod", extra_handlers=(handler,), data_dir=tmp_path / "d1")
        await delegate.registered()
        yield World(cloud, cp, sts_url, minted, redactor)


async def test_an_oidc_connector_from_harness_yaml_tests_success_through_a_delegate(
    world: World, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The done-when of issue 18, with the canary: the token is nowhere but on its way to STS."""
    yaml_doc = f"""
connector:
  name: Prod
  identifier: Prod
  type: Aws
  spec:
    credential:
      type: OidcAuthentication
      spec:
        iamRoleArn: arn:aws:iam::{ACCOUNT}:role/oidc-prod
      region: us-east-1
    delegateSelectors: []
    executeOnDelegate: true
"""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            world.cp.url + "/api/v1/connectors",
            data=yaml_doc,
            headers={"X-API-Key": API_KEY, "Content-Type": "application/yaml"},
        ) as resp,
    ):
        assert resp.status in (200, 201), await resp.text()
    view = await world.test("Prod")
    result = view["result"]
    assert (view["status"], view["delegateName"]) == ("SUCCESS", "eks-prod"), result.get("errorSummary")
    assert result["identity"]["arn"].startswith(f"arn:aws:sts::{ACCOUNT}:assumed-role/oidc-prod/")
    assert (
        result["credentialSource"] == f"OIDC token from {world.cloud.issuer} for arn:aws:iam::{ACCOUNT}:role/oidc-prod"
    )

    # The canary: every token minted, looked for everywhere a secret could leak.
    assert world.minted
    async with aiohttp.ClientSession() as http:
        async with http.get(world.cp.url + "/metrics") as resp:
            metrics = await resp.text()
        async with http.get(world.cp.url + "/api/v1/tasks/" + view["taskId"], headers={"X-API-Key": API_KEY}) as resp:
            task_view = await resp.text()
        async with http.get(world.cp.url + "/api/v1/connectors/Prod/history", headers={"X-API-Key": API_KEY}) as resp:
            history = await resp.text()
    logs = capfd.readouterr()  # the JSON logs go to the process's stderr (fd 2), not sys.stderr
    assert '"event":"task.finished"' in logs.err  # the check below would pass on no logs at all
    key_files = set(tmp_path.rglob("oidc-keys.json"))
    files = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p not in key_files)
    for token in world.minted:
        signature = token.rsplit(".", 1)[1]
        for where, text in (
            ("result", json.dumps(view)),
            ("task view", task_view),
            ("history", history),
            ("metrics", metrics),
            ("logs", logs.out + logs.err),
        ):
            assert signature not in text, f"a token's signature leaked into the {where}"
        assert signature.encode() not in files, "a token's signature was written to disk"


async def test_platform_mode_exchanges_the_token_in_the_control_plane(world: World) -> None:
    await world.cp.core.apply_connector(
        connector("Prod", f"arn:aws:iam::{ACCOUNT}:role/oidc-prod", executeOnDelegate=False)
    )
    view = await world.test("Prod")
    assert (view["status"], view["delegateName"]) == ("SUCCESS", "platform"), view["result"].get("errorSummary")
    assert "assumed-role/oidc-prod/" in view["result"]["identity"]["arn"]


async def test_a_project_wide_trust_policy_admits_its_connectors(world: World) -> None:
    doc = connector("Payments prod", f"arn:aws:iam::{ACCOUNT}:role/oidc-project")
    doc["connector"].update(orgIdentifier="platform", projectIdentifier="payments")
    await world.cp.core.apply_connector(doc)
    view = await world.test("Payments_prod")
    assert view["status"] == "SUCCESS", view["result"].get("errorSummary")


async def test_cross_account_access_works_on_top_of_oidc(world: World) -> None:
    """Harness does not map crossAccountAccess for OIDC; here the OIDC role assumes the target role.

    moto's IAM enforcement cannot evaluate an AssumeRole made by a role session (it answers AccessDenied
    through the stand-in, a parse error directly), so enforcement is off for this one test: the OIDC
    exchange is still verified by the stand-in, which reads IAM whether or not moto enforces it.
    """
    from tests.awsfakes import moto_api

    moto_api(world.cloud.moto, "/moto-api/reset-auth", b"inf")
    target = f"arn:aws:iam::{ACCOUNT}:role/deploy-target"
    doc = connector(
        "Prod",
        f"arn:aws:iam::{ACCOUNT}:role/oidc-prod",
        crossAccountAccess={"crossAccountRoleArn": target, "externalId": "ext-1234"},
    )
    await world.cp.core.apply_connector(doc)
    view = await world.test("Prod")
    result = view["result"]
    assert view["status"] == "SUCCESS", result.get("errorSummary")
    assert [s["name"] for s in result["steps"]][:2] == ["resolve_credentials", "assume_role"]
    assert "assumed-role/deploy-target/" in result["identity"]["arn"]


async def test_a_govcloud_connector_exchanges_its_token_in_its_partition(world: World) -> None:
    await world.cp.core.apply_connector(
        connector("Gov", f"arn:aws-us-gov:iam::{ACCOUNT}:role/oidc-gov", region="us-gov-west-1")
    )
    view = await world.test("Gov")
    assert view["status"] == "SUCCESS", view["result"].get("errorSummary")
    assert view["result"]["identity"]["arn"].startswith(f"arn:aws-us-gov:sts::{ACCOUNT}:assumed-role/oidc-gov/")


async def test_a_rotated_key_keeps_tokens_verifying(world: World) -> None:
    """Rotate (at once, the harshest case): the stand-in meets an unknown kid, refetches the JWKS, verifies."""
    await world.cp.core.apply_connector(connector("Prod", f"arn:aws:iam::{ACCOUNT}:role/oidc-prod"))
    assert (await world.test("Prod"))["status"] == "SUCCESS"
    issuer = world.cp.oidc
    assert issuer is not None and issuer.key_file is not None
    new = rotate_key_file(issuer.key_file, immediately=True)

    async def published() -> bool:
        async with (
            aiohttp.ClientSession() as http,
            http.get(world.cloud.issuer + "/.well-known/jwks.json") as resp,
        ):
            return new.kid in {k["kid"] for k in (await resp.json())["keys"]}

    await wait_until(published, "the control plane to publish the rotated key")
    view = await world.test("Prod")
    assert view["status"] == "SUCCESS", view["result"].get("errorSummary")
    import jwt

    assert jwt.get_unverified_header(world.minted[-1])["kid"] == new.kid


def _failure(view: dict[str, Any]) -> tuple[str, str, str, str]:
    assert view["status"] == "FAILURE"
    r = view["result"]
    failure = r["failure"]
    return failure["step"], failure.get("awsErrorCode") or "", r["errorSummary"], failure["hint"]


async def test_a_sub_the_trust_policy_does_not_allow_names_the_exact_sub(world: World) -> None:
    await world.cp.core.apply_connector(connector("Staging", f"arn:aws:iam::{ACCOUNT}:role/oidc-prod"))
    step, code, _, hint = _failure(await world.test("Staging"))
    assert (step, code) == ("resolve_credentials", "AccessDenied")
    provider = world.cloud.provider
    assert f'"{provider}:sub": "connector:-/-/Staging"' in hint
    assert f"oidc-provider/{provider}" in hint and f'"{provider}:aud": "sts.amazonaws.com"' in hint


async def test_a_role_that_does_not_exist_is_named_in_the_hint(world: World) -> None:
    await world.cp.core.apply_connector(connector("Prod", f"arn:aws:iam::{ACCOUNT}:role/no-such-role"))
    _, code, _, hint = _failure(await world.test("Prod"))
    assert code == "AccessDenied"
    assert "the role does not exist" in hint and "iamRoleArn" in hint


async def test_an_audience_the_provider_does_not_list_says_how_to_add_it(world: World) -> None:
    await world.cp.core.apply_connector(
        connector("Prod", f"arn:aws:iam::{ACCOUNT}:role/oidc-prod", audience="my-audience")
    )
    _, code, _, hint = _failure(await world.test("Prod"))
    assert code == "InvalidIdentityToken"
    assert "add-client-id-to-open-id-connect-provider" in hint and "--client-id my-audience" in hint


async def test_an_account_without_the_identity_provider_says_how_to_create_it(world: World) -> None:
    from tests.awsfakes import moto_api

    moto_api(world.cloud.moto, "/moto-api/reset-auth", b"inf")
    async with world.cloud.iam() as iam:
        arn = f"arn:aws:iam::{ACCOUNT}:oidc-provider/{world.cloud.provider}"
        await iam.delete_open_id_connect_provider(OpenIDConnectProviderArn=arn)
    moto_api(world.cloud.moto, "/moto-api/reset-auth", b"0")
    await world.cp.core.apply_connector(connector("Prod", f"arn:aws:iam::{ACCOUNT}:role/oidc-prod"))
    _, code, _, hint = _failure(await world.test("Prod"))
    assert code == "InvalidIdentityToken"
    assert f"create-open-id-connect-provider --url {world.cloud.issuer}" in hint


async def test_an_expired_token_blames_the_clock(world: World, sts_clock: list[float]) -> None:
    sts_clock[0] = 400  # AWS's clock 400 s ahead: the 5-minute token is already expired there
    await world.cp.core.apply_connector(connector("Prod", f"arn:aws:iam::{ACCOUNT}:role/oidc-prod"))
    _, code, _, hint = _failure(await world.test("Prod"))
    assert code == "ExpiredTokenException"
    assert "5 minutes" in hint and "clock" in hint


async def test_without_an_issuer_the_result_says_how_to_configure_one(
    moto: str, control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory
) -> None:
    cp = await control_plane_factory()
    env = _env(moto, moto)
    handler = AwsValidationHandler(AwsValidator(env, AwsClients(env), SecretStore(None)))
    await (await agent_factory(cp, extra_handlers=(handler,))).registered()
    await cp.core.apply_connector(connector("Prod", f"arn:aws:iam::{ACCOUNT}:role/oidc-prod"))
    task = await cp.core.test_connector("Prod", TestRequest(wait_seconds=30))
    assert task.status == "FAILURE"
    assert task.result is not None and task.result.failure is not None
    assert task.result.failure.step == "resolve_credentials"
    assert "--oidc-issuer" in (task.result.failure.hint or "")
