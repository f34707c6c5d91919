"""The OIDC STS stand-in (agent/demo/oidc_sts.py) refuses what AWS STS refuses, and only that.

Tokens are minted here with joserfc (the control plane's signer) and checked by the stand-in with
PyJWT; the issuer's discovery document and JWKS are served by a small aiohttp app on 127.0.0.1;
the OIDC provider, roles and the broker live in moto's IAM, with IAM enforcement on.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from aiohttp import web
from botocore import UNSIGNED
from botocore.exceptions import ClientError
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey, RSAKey

from agent._loopback import serve_on_loopback
from agent.demo.oidc_sts import OidcSts, provider_url, trust_allows
from tests.awsfakes import ACCOUNT, ADMIN_KEY, moto_api
from tests.tls import make_pki

AUDIENCE = "sts.amazonaws.com"
SUB = "connector:platform/payments/prod"
BROKER_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": [
                "sts:AssumeRoleWithWebIdentity",
                "iam:GetRole",
                "iam:ListOpenIDConnectProviders",
                "iam:GetOpenIDConnectProvider",
            ],
            "Resource": "*",
        }
    ],
}
ROLE_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "ec2:DescribeRegions", "Resource": "*"}],
}


class Issuer:
    """The control plane's OIDC endpoints, stand-in: discovery and a JWKS this test edits."""

    def __init__(self) -> None:
        self.keys: list[RSAKey | ECKey] = []
        self.jwks_fetches = 0
        self.url = ""

    def new_key(self, kid: str, *, publish: bool = True) -> RSAKey:
        key = RSAKey.generate_key(2048, parameters={"kid": kid}, private=True)
        if publish:
            self.keys.append(key)
        return key

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response({"issuer": self.url, "jwks_uri": f"{self.url}/.well-known/jwks.json"})

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        return web.json_response({"keys": [k.as_dict(private=False) for k in self.keys]})

    @asynccontextmanager
    async def running(self, ssl_context: Any = None) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_get("/oidc/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/oidc/.well-known/jwks.json", self._jwks)
        async with serve_on_loopback(app, ssl_context=ssl_context) as base:
            self.url = f"{base}/oidc"
            yield self.url


def mint(key: RSAKey | ECKey, issuer: str, **overrides: Any) -> str:
    """A token as the control plane mints it (the contract of issue 18)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": AUDIENCE,
        "sub": SUB,
        "account_id": "acct1",
        "org_id": "platform",
        "project_id": "payments",
        "connector_id": "prod",
        "context": "CONNECTOR_VALIDATION",
        "task_id": "t-1",
        "delegate_id": "d-1",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    alg = "ES256" if isinstance(key, ECKey) else "RS256"
    return jose_jwt.encode({"alg": alg, "kid": key.kid, "typ": "JWT"}, claims, key)


def trust(partition: str, provider: str, *, sub: str = SUB, op: str = "StringEquals") -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Federated": f"arn:{partition}:iam::{ACCOUNT}:oidc-provider/{provider}"},
                "Action": "sts:AssumeRoleWithWebIdentity",
                "Condition": {op: {f"{provider}:sub": sub, f"{provider}:aud": AUDIENCE}},
            }
        ],
    }


@dataclass
class World:
    moto: str
    issuer: Issuer
    iss: str
    brokers: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def provider(self) -> str:
        return provider_url(self.iss)

    def role_arn(self, name: str, partition: str = "aws") -> str:
        return f"arn:{partition}:iam::{ACCOUNT}:role/{name}"

    def iam(self, region: str = "us-east-1") -> Any:
        return AioSession().create_client(
            "iam",
            region_name=region,
            endpoint_url=self.moto,
            aws_access_key_id=ADMIN_KEY[0],
            aws_secret_access_key=ADMIN_KEY[1],
        )

    async def seed_partition(self, region: str, partition: str, *, provider: bool = True) -> None:
        async with self.iam(region) as iam:
            await iam.create_user(UserName="web-identity-broker")
            await iam.put_user_policy(
                UserName="web-identity-broker", PolicyName="broker", PolicyDocument=json.dumps(BROKER_POLICY)
            )
            key = (await iam.create_access_key(UserName="web-identity-broker"))["AccessKey"]
            self.brokers[partition] = (key["AccessKeyId"], key["SecretAccessKey"])
            if provider:
                await iam.create_open_id_connect_provider(Url=self.iss, ClientIDList=[AUDIENCE], ThumbprintList=[])

    async def role(self, name: str, policy: dict[str, Any], region: str = "us-east-1") -> str:
        async with self.iam(region) as iam:
            got = await iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(policy))
            await iam.put_role_policy(RoleName=name, PolicyName="p", PolicyDocument=json.dumps(ROLE_POLICY))
        return str(got["Role"]["Arn"])

    def sts(self, **kwargs: Any) -> OidcSts:
        key, secret = self.brokers["aws"]
        others = {p: k for p, k in self.brokers.items() if p != "aws"}
        return OidcSts(self.moto, key, secret, partition_brokers=others, **kwargs)


@pytest.fixture
async def world(moto: str) -> AsyncIterator[World]:
    issuer = Issuer()
    async with issuer.running() as iss:
        w = World(moto, issuer, iss)
        await w.seed_partition("us-east-1", "aws")
        await w.role("oidc-prod", trust("aws", w.provider))
        await w.role("oidc-project", trust("aws", w.provider, sub="connector:platform/payments/*", op="StringLike"))
        denied = trust("aws", w.provider)
        denied["Statement"].append(
            {
                "Effect": "Deny",
                "Principal": {"Federated": f"arn:aws:iam::{ACCOUNT}:oidc-provider/{w.provider}"},
                "Action": "sts:AssumeRoleWithWebIdentity",
                "Condition": {"StringLike": {f"{w.provider}:sub": "connector:platform/*"}},
            }
        )
        await w.role("oidc-denied", denied)
        await w.seed_partition("us-gov-west-1", "aws-us-gov")
        await w.role("oidc-gov", trust("aws-us-gov", w.provider), region="us-gov-west-1")
        yield w  # IAM enforcement, where a test asks for it, starts after this seeding


async def assume(sts_url: str, role_arn: str, token: str, region: str = "us-east-1") -> dict[str, Any]:
    """AssumeRoleWithWebIdentity unsigned, as botocore's web identity provider calls it."""
    config = AioConfig(signature_version=UNSIGNED, retries={"max_attempts": 1})
    async with AioSession().create_client("sts", region_name=region, endpoint_url=sts_url, config=config) as sts:
        return await sts.assume_role_with_web_identity(  # type: ignore[no-any-return]
            RoleArn=role_arn, RoleSessionName="validate-conn", WebIdentityToken=token
        )


async def caller_arn(sts_url: str, creds: dict[str, Any], region: str = "us-east-1") -> str:
    async with AioSession().create_client(
        "sts",
        region_name=region,
        endpoint_url=sts_url,
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
    ) as sts:
        return str((await sts.get_caller_identity())["Arn"])


async def refused(sts_url: str, role_arn: str, token: str, region: str = "us-east-1") -> tuple[str, str, int]:
    with pytest.raises(ClientError) as caught:
        await assume(sts_url, role_arn, token, region)
    err = caught.value.response
    assert token not in str(caught.value), "the token is never echoed"
    return err["Error"]["Code"], err["Error"]["Message"], err["ResponseMetadata"]["HTTPStatusCode"]


async def test_a_valid_token_gets_the_roles_session(world: World, iam_enforced: None) -> None:
    key = world.issuer.new_key("k1")
    async with world.sts().running() as url:
        got = await assume(url, world.role_arn("oidc-prod"), mint(key, world.iss))
        assert got["AssumedRoleUser"]["Arn"] == f"arn:aws:sts::{ACCOUNT}:assumed-role/oidc-prod/validate-conn"
        assert await caller_arn(url, got["Credentials"]) == got["AssumedRoleUser"]["Arn"]


async def test_an_es256_token_verifies_too(world: World, iam_enforced: None) -> None:
    key = ECKey.generate_key("P-256", parameters={"kid": "e1"}, private=True)
    world.issuer.keys.append(key)
    async with world.sts().running() as url:
        got = await assume(url, world.role_arn("oidc-prod"), mint(key, world.iss))
        assert got["AssumedRoleUser"]["Arn"].endswith(":assumed-role/oidc-prod/validate-conn")


async def test_an_audience_that_is_no_client_id_is_refused(world: World, iam_enforced: None) -> None:
    key = world.issuer.new_key("k1")
    async with world.sts().running() as url:
        code, message, status = await refused(url, world.role_arn("oidc-prod"), mint(key, world.iss, aud="other"))
    assert (code, message, status) == ("InvalidIdentityToken", "Incorrect token audience", 400)


async def test_a_subject_the_trust_policy_does_not_name_is_denied(world: World, iam_enforced: None) -> None:
    key = world.issuer.new_key("k1")
    token = mint(key, world.iss, sub="connector:platform/payments/staging")
    async with world.sts().running() as url:
        code, message, status = await refused(url, world.role_arn("oidc-prod"), token)
    assert (code, message, status) == ("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity", 403)


async def test_an_expired_token_says_so_with_both_times(world: World, iam_enforced: None) -> None:
    key = world.issuer.new_key("k1")
    token = mint(key, world.iss)
    later = time.time() + 301 + OidcSts.LEEWAY
    async with world.sts(clock=lambda: later).running() as url:
        code, message, _ = await refused(url, world.role_arn("oidc-prod"), token)
    assert code == "ExpiredTokenException"
    assert message.startswith(f"Token expired: current date/time {int(later)} must be before the expiration date/time")


async def test_a_token_within_the_clock_leeway_is_accepted(world: World, iam_enforced: None) -> None:
    key = world.issuer.new_key("k1")
    token = mint(key, world.iss)
    slightly_fast = time.time() + 300 + OidcSts.LEEWAY / 2
    async with world.sts(clock=lambda: slightly_fast).running() as url:
        await assume(url, world.role_arn("oidc-prod"), token)


async def test_an_issuer_without_a_provider_in_the_account_is_refused(world: World, iam_enforced: None) -> None:
    key = world.issuer.new_key("k1")
    other = world.iss.replace("/oidc", "/other")
    async with world.sts().running() as url:
        code, message, _ = await refused(url, world.role_arn("oidc-prod"), mint(key, other))
    assert (code, message) == ("InvalidIdentityToken", f"No OpenIDConnect provider found in your account for {other}")


async def test_a_missing_role_is_denied_as_aws_denies_it(world: World, iam_enforced: None) -> None:
    key = world.issuer.new_key("k1")
    async with world.sts().running() as url:
        code, _, status = await refused(url, world.role_arn("no-such-role"), mint(key, world.iss))
    assert (code, status) == ("AccessDenied", 403)


async def test_a_rotated_key_is_fetched_when_its_kid_is_unknown(world: World, iam_enforced: None) -> None:
    old = world.issuer.new_key("k1")
    async with world.sts().running() as url:
        await assume(url, world.role_arn("oidc-prod"), mint(old, world.iss))
        fetches = world.issuer.jwks_fetches
        await assume(url, world.role_arn("oidc-prod"), mint(old, world.iss))
        assert world.issuer.jwks_fetches == fetches, "a known kid is served from the cache"

        new = world.issuer.new_key("k2", publish=False)
        code, message, _ = await refused(url, world.role_arn("oidc-prod"), mint(new, world.iss))
        assert code == "InvalidIdentityToken"
        assert message.startswith("Couldn't retrieve verification key from your identity provider")

        world.issuer.keys.append(new)  # the control plane publishes the rotated key
        await assume(url, world.role_arn("oidc-prod"), mint(new, world.iss))
        await assume(url, world.role_arn("oidc-prod"), mint(old, world.iss))  # old key kept until its tokens expire


async def test_a_token_signed_by_another_key_with_a_known_kid_is_refused(world: World, iam_enforced: None) -> None:
    world.issuer.new_key("k1")
    forger = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)
    async with world.sts().running() as url:
        code, _, _ = await refused(url, world.role_arn("oidc-prod"), mint(forger, world.iss))
    assert code == "InvalidIdentityToken"


async def test_an_unreachable_jwks_is_a_verification_key_error(moto: str) -> None:
    issuer = Issuer()
    async with issuer.running() as iss:
        world = World(moto, issuer, iss)
        await world.seed_partition("us-east-1", "aws")
        await world.role("oidc-prod", trust("aws", world.provider))
        key = issuer.new_key("k1")
    async with world.sts().running() as url:  # the issuer is gone
        code, message, _ = await refused(url, world.role_arn("oidc-prod"), mint(key, iss))
    assert code == "InvalidIdentityToken"
    assert message.startswith("Couldn't retrieve verification key")


async def test_an_explicit_deny_wins_over_an_allow(world: World, iam_enforced: None) -> None:
    """oidc-denied trusts SUB like oidc-prod, and denies connector:platform/* in a second statement."""
    key = world.issuer.new_key("k1")
    async with world.sts().running() as url:
        code, _, status = await refused(url, world.role_arn("oidc-denied"), mint(key, world.iss))
    assert (code, status) == ("AccessDenied", 403)


async def test_a_stringlike_wildcard_on_sub_admits_every_connector_of_a_project(
    world: World, iam_enforced: None
) -> None:
    key = world.issuer.new_key("k1")
    async with world.sts().running() as url:
        for connector in ("prod", "staging"):
            await assume(
                url,
                world.role_arn("oidc-project"),
                mint(key, world.iss, sub=f"connector:platform/payments/{connector}"),
            )
        code, _, _ = await refused(
            url, world.role_arn("oidc-project"), mint(key, world.iss, sub="connector:platform/other/prod")
        )
    assert code == "AccessDenied"


async def test_a_govcloud_role_is_assumed_in_its_partition(world: World, iam_enforced: None) -> None:
    arn = world.role_arn("oidc-gov", "aws-us-gov")
    key = world.issuer.new_key("k1")
    async with world.sts().running() as url:
        got = await assume(url, arn, mint(key, world.iss), region="us-gov-west-1")
        assert got["AssumedRoleUser"]["Arn"] == f"arn:aws-us-gov:sts::{ACCOUNT}:assumed-role/oidc-gov/validate-conn"
        assert await caller_arn(url, got["Credentials"], region="us-gov-west-1") == got["AssumedRoleUser"]["Arn"]
        # A partition without the provider (here: one the stand-in holds no IAM of) vouches for nothing.
        code, _, _ = await refused(url, world.role_arn("oidc-gov", "aws-cn"), mint(key, world.iss))
    assert code == "InvalidIdentityToken"


async def test_an_https_issuer_is_verified_with_the_given_ca(moto: str, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    issuer = Issuer()
    async with issuer.running(ssl_context=pki.server_context()) as iss:
        assert iss.startswith("https://127.0.0.1:")
        world = World(moto, issuer, iss)
        await world.seed_partition("us-east-1", "aws")
        await world.role("oidc-prod", trust("aws", world.provider))
        key = issuer.new_key("k1")
        async with world.sts(ca_bundle=str(pki.ca)).running() as url:
            await assume(url, world.role_arn("oidc-prod"), mint(key, iss))
        async with world.sts().running() as url:  # without the CA the JWKS is not trusted
            code, _, _ = await refused(url, world.role_arn("oidc-prod"), mint(key, iss))
    assert code == "InvalidIdentityToken"


async def test_an_unverified_issuer_passes_through_by_name_only(world: World, iam_enforced: None) -> None:
    """The demo's IRSA token: a fake whose issuer is named as unchecked; a forged one otherwise fails."""
    eks = "https://oidc.eks.us-east-1.amazonaws.com/id/DEMO"
    unsigned_fake = jose_jwt.encode(
        {"alg": "RS256", "kid": "x"},
        {"iss": eks, "sub": "system:serviceaccount:d:d", "aud": AUDIENCE},
        RSAKey.generate_key(2048, private=True),
    )
    async with world.sts(unverified_issuers=[eks]).running() as url:
        await assume(url, world.role_arn("oidc-prod"), unsigned_fake)
    async with world.sts().running() as url:
        code, _, _ = await refused(url, world.role_arn("oidc-prod"), unsigned_fake)
    assert code == "InvalidIdentityToken"


async def test_garbage_is_not_a_token(world: World, iam_enforced: None) -> None:
    async with world.sts().running() as url:
        code, message, _ = await refused(url, world.role_arn("oidc-prod"), "not-a-jwt")
    assert code == "InvalidIdentityToken"
    assert "not a valid JWT" in message


@pytest.mark.parametrize(
    ("condition", "allowed"),
    [
        ({"StringEquals": {"P:sub": ["a", "b"]}}, True),
        ({"stringequals": {"p:SUB": "b"}}, True),  # operators and keys are case-insensitive
        ({"StringEquals": {"P:sub": "B"}}, False),  # values are not
        ({"ForAnyValue:StringLike": {"P:aud": "sts.*"}}, True),
        ({"StringEquals": {"P:sub": "b", "P:aud": "nope"}}, False),  # keys are ANDed
        ({"NumericLessThan": {"P:sub": "1"}}, False),  # an operator we do not know makes an Allow not apply
        ({"StringEquals": {"P:amr": "x"}}, False),  # a key absent from the token does not match
    ],
)
def test_trust_policy_conditions(condition: dict[str, Any], allowed: bool) -> None:
    policy = {
        "Statement": [{"Effect": "Allow", "Principal": {"Federated": "F"}, "Action": ["sts:*"], "Condition": condition}]
    }
    assert trust_allows(policy, "F", {"P:sub": ["b"], "P:aud": ["sts.amazonaws.com"]}) is allowed
    assert not trust_allows(policy, "other-provider", {"P:sub": ["b"], "P:aud": ["sts.amazonaws.com"]})


def _statement(effect: str, **more: Any) -> dict[str, Any]:
    return {"Effect": effect, "Principal": {"Federated": "F"}, "Action": "sts:AssumeRoleWithWebIdentity", **more}


def test_an_unknown_operator_makes_a_deny_apply() -> None:
    deny = _statement("Deny", Condition={"DateGreaterThan": {"aws:CurrentTime": "2020-01-01T00:00:00Z"}})
    assert trust_allows({"Statement": [_statement("Allow")]}, "F", {})
    assert not trust_allows({"Statement": [_statement("Allow"), deny]}, "F", {})


async def test_the_demos_aws_checks_a_registered_issuer_and_lets_the_fake_irsa_token_through(
    moto: str, tmp_path: Path
) -> None:
    """The demo's seeded broker may read what OidcSts checks; its IRSA token passes by issuer name only.

    The demo's moto server shares moto's state with the tests' (one process): ``moto`` empties it
    before, and it is emptied again after.
    """
    from agent.demo.standin import IRSA_ISSUER, AwsStandIn, write_irsa_token

    aws = AwsStandIn()
    aws.start()
    try:
        seeded = await aws.seed()  # IAM enforced from here on
        issuer = Issuer()
        async with issuer.running() as iss:
            role = await aws.trust_oidc_issuer(iss, "oidc-connectors", "connector:-/-/*")
            key = issuer.new_key("k1")
            sts = OidcSts(aws.url, seeded.broker_key, seeded.broker_secret, unverified_issuers=[IRSA_ISSUER])
            async with sts.running() as url:
                got = await assume(url, role, mint(key, iss, sub="connector:-/-/prod_account"))
                assert await caller_arn(url, got["Credentials"]) == got["AssumedRoleUser"]["Arn"]
                code, _, _ = await refused(url, role, mint(key, iss, sub="connector:platform/-/prod"))
                assert code == "AccessDenied"
                irsa = write_irsa_token(tmp_path).read_text()
                got = await assume(url, seeded.irsa_role, irsa)
                assert got["AssumedRoleUser"]["Arn"].endswith(":assumed-role/eks-delegate-irsa/validate-conn")
    finally:
        aws.stop()
        moto_api(moto, "/moto-api/reset")
