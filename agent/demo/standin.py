"""The demo's AWS: moto's server on 127.0.0.1, seeded like a small real account, IAM enforced.

Seeded with: a deployer user (access keys; may call ec2:DescribeRegions and assume the
cross-account role), an auditor user without ec2:DescribeRegions, a cross-account role whose
trust policy requires an External ID, an IRSA role and a projected token file, an EC2 node role
served through an instance metadata endpoint (IMDSv2), and a GovCloud user.

Two fidelity gaps of moto are bridged here, and only here (never in the delegate), with moto's
public interfaces only (its server, ``/moto-api/``, the environment):
- moto's IAM enforcement crashes on unsigned STS calls; real AWS accepts
  AssumeRoleWithWebIdentity unsigned, so the IRSA delegate reaches STS through a small front
  (:class:`WebIdentitySts`) that signs that one call for it;
- moto's own instance metadata hands out fixed keys that map to no identity, so the demo serves
  IMDSv2 itself, with session credentials of the node role assumed at set-up.

A third is bridged next door: moto never reads a web identity token, so
:class:`agent.demo.oidc_sts.OidcSts` (built on :class:`WebIdentitySts`) checks tokens as STS does.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from aiobotocore.session import AioSession
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from agent._loopback import serve_on_loopback

ACCOUNT = "123456789012"
#: The issuer of the demo's fake IRSA token: no such cluster exists, so the STS front lets this one
#: issuer through unchecked, by name (see agent/demo/oidc_sts.py), as moto would.
IRSA_ISSUER = "https://oidc.eks.us-east-1.amazonaws.com/id/DEMO"
EXTERNAL_ID = "demo-external-id-7f3a"
_ADMIN = {"aws_access_key_id": "AKIADEMOADMIN0000000", "aws_secret_access_key": "demo-admin-secret"}


class DemoExtraMissing(Exception):
    """moto is not installed (it is the demo extra, not a runtime dependency)."""


def _policy(*actions: str) -> str:
    return json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": list(actions), "Resource": "*"}]}
    )


def _trust(principal: dict[str, Any], *, external_id: str | None = None) -> str:
    statement: dict[str, Any] = {
        "Effect": "Allow",
        "Principal": principal,
        "Action": ["sts:AssumeRole", "sts:AssumeRoleWithWebIdentity"],
    }
    if external_id:
        statement["Condition"] = {"StringEquals": {"sts:ExternalId": external_id}}
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})


@dataclass
class Seeded:
    """What the demo created in its AWS, for connectors and delegate environments."""

    deployer_key: str = ""
    deployer_secret: str = field(default="", repr=False)
    auditor_key: str = ""
    auditor_secret: str = field(default="", repr=False)
    gov_key: str = ""
    gov_secret: str = field(default="", repr=False)
    #: Signs the unsigned AssumeRoleWithWebIdentity calls on their way to moto (see WebIdentitySts).
    broker_key: str = ""
    broker_secret: str = field(default="", repr=False)
    cross_account_role: str = f"arn:aws:iam::{ACCOUNT}:role/cross-account-deploy"
    irsa_role: str = f"arn:aws:iam::{ACCOUNT}:role/eks-delegate-irsa"
    node_role: str = f"arn:aws:iam::{ACCOUNT}:role/ec2-node-role"
    node_credentials: dict[str, str] = field(default_factory=dict, repr=False)
    #: The role OidcAuthentication connectors assume with the control plane's tokens (made once it listens).
    oidc_role: str = f"arn:aws:iam::{ACCOUNT}:role/oidc-connectors"


class AwsStandIn:
    def __init__(self) -> None:
        try:
            # moto is the demo extra, not a runtime dependency: imported only when the demo runs.
            from moto.server import ThreadedMotoServer  # noqa: PLC0415
        except ImportError:  # pragma: no cover - depends on the install
            raise DemoExtraMissing("the demo needs moto: pip install 'delegate-agent[demo]' (make demo does)") from None
        os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.url = ""
        self.seeded = Seeded()

    def start(self) -> str:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        return self.url

    def stop(self) -> None:
        self._moto_api("/moto-api/reset-auth", b"inf")
        self._server.stop()

    def _moto_api(self, path: str, body: bytes = b"") -> None:
        # http to the loopback stand-in only: self.url is the moto server this object started.
        req = urllib.request.Request(  # noqa: S310
            self.url + path, data=body, method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(req, timeout=30):  # noqa: S310
            pass

    async def seed(self) -> Seeded:
        """Create users, keys, roles; warm EC2 up; then switch IAM enforcement on."""
        s, session = self.seeded, AioSession()
        kw = {"endpoint_url": self.url, **_ADMIN}
        async with session.create_client("iam", region_name="us-east-1", **kw) as iam:
            s.deployer_key, s.deployer_secret = await _user(
                iam, "deployer", _policy("ec2:DescribeRegions", "sts:AssumeRole")
            )
            s.auditor_key, s.auditor_secret = await _user(iam, "auditor", _policy("s3:ListAllMyBuckets"))
            s.broker_key, s.broker_secret = await _user(
                iam,
                "web-identity-broker",
                # The STS front reads the OIDC providers and trust policies it checks tokens against.
                _policy(
                    "sts:AssumeRoleWithWebIdentity",
                    "iam:GetRole",
                    "iam:ListOpenIDConnectProviders",
                    "iam:GetOpenIDConnectProvider",
                ),
            )
            deployer_arn = f"arn:aws:iam::{ACCOUNT}:user/deployer"
            await _role(iam, "cross-account-deploy", _trust({"AWS": deployer_arn}, external_id=EXTERNAL_ID))
            await _role(
                iam,
                "eks-delegate-irsa",
                _trust({"Federated": f"arn:aws:iam::{ACCOUNT}:oidc-provider/oidc.eks.us-east-1.amazonaws.com/id/DEMO"}),
            )
            await _role(iam, "ec2-node-role", _trust({"Service": "ec2.amazonaws.com"}))
        async with session.create_client("iam", region_name="us-gov-west-1", **kw) as iam:
            s.gov_key, s.gov_secret = await _user(iam, "gov-deployer", _policy("ec2:DescribeRegions"))
        async with session.create_client("sts", region_name="us-east-1", **kw) as sts:
            creds = (
                await sts.assume_role(
                    RoleArn=s.node_role,
                    RoleSessionName="i-0d3m0c0ffee",
                    DurationSeconds=43200,
                )
            )["Credentials"]
            s.node_credentials = {
                "AccessKeyId": creds["AccessKeyId"],
                "SecretAccessKey": creds["SecretAccessKey"],
                "Token": creds["SessionToken"],
            }
        # moto builds its EC2 backend on the first call per region (seconds); do it before the clock starts.
        for region in ("us-east-1", "us-gov-west-1"):
            async with session.create_client("ec2", region_name=region, **kw) as ec2:
                await ec2.describe_regions(RegionNames=[region])
        self._moto_api("/moto-api/reset-auth", b"0")
        return s

    async def trust_oidc_issuer(
        self, issuer: str, role_name: str, sub: str, *, audience: str = "sts.amazonaws.com"
    ) -> str:
        """Register ``issuer`` as an IAM OIDC provider; create a role its tokens whose ``sub`` matches may assume.

        For the control plane's issuer, whose URL is known only once it listens, so after
        :meth:`seed`: IAM enforcement pauses for these admin calls (the admin is no IAM user).
        ``sub`` is a StringLike pattern (``connector:-/-/*``). Returns the role's ARN.
        """
        provider = f"{urlsplit(issuer).netloc}{urlsplit(issuer).path}".rstrip("/")
        statement = {
            "Effect": "Allow",
            "Principal": {"Federated": f"arn:aws:iam::{ACCOUNT}:oidc-provider/{provider}"},
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": {
                "StringEquals": {f"{provider}:aud": audience},
                "StringLike": {f"{provider}:sub": sub},
            },
        }
        self._moto_api("/moto-api/reset-auth", b"inf")
        try:
            kw = {"endpoint_url": self.url, **_ADMIN}
            async with AioSession().create_client("iam", region_name="us-east-1", **kw) as iam:
                await iam.create_open_id_connect_provider(Url=issuer, ClientIDList=[audience])
                trust = json.dumps({"Version": "2012-10-17", "Statement": [statement]})
                await _role(iam, role_name, trust)
        finally:
            self._moto_api("/moto-api/reset-auth", b"0")
        return f"arn:aws:iam::{ACCOUNT}:role/{role_name}"


async def _user(iam: Any, name: str, policy: str) -> tuple[str, str]:
    await iam.create_user(UserName=name)
    await iam.put_user_policy(UserName=name, PolicyName="demo", PolicyDocument=policy)
    key = (await iam.create_access_key(UserName=name))["AccessKey"]
    return str(key["AccessKeyId"]), str(key["SecretAccessKey"])


async def _role(iam: Any, name: str, trust: str) -> None:
    await iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust, MaxSessionDuration=43200)
    await iam.put_role_policy(
        RoleName=name, PolicyName="demo", PolicyDocument=_policy("ec2:DescribeRegions", "ec2:DescribeInstances")
    )


class WebIdentitySts:
    """STS as the IRSA delegate sees it: AssumeRoleWithWebIdentity is accepted unsigned, as AWS does.

    With IAM enforced, moto checks the signature of every request, and its only public switch
    (``/moto-api/reset-auth``) is all or nothing: it has no per-action exemption, so the unsigned
    call, which is how real STS is meant to be called (the web identity token is the credential),
    fails there. This front forwards every request to moto unchanged, except that it signs an
    unsigned AssumeRoleWithWebIdentity with the keys of a broker user that may do nothing else, as
    real STS vouches for the caller itself. moto then checks the broker's permission and mints the
    role's session credentials as usual. Signed requests (GetCallerIdentity, AssumeRole) pass
    byte for byte, Host header included, so moto verifies the delegate's own signatures.
    """

    _HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade"})

    def __init__(self, moto_url: str, broker_key: str, broker_secret: str) -> None:
        self._moto = moto_url
        self._broker = Credentials(broker_key, broker_secret)
        self._session: aiohttp.ClientSession | None = None

    def _headers(self, request: web.Request, body: bytes) -> dict[str, str]:
        form = parse_qs(body.decode("utf-8", "replace"))
        if "Authorization" in request.headers or form.get("Action") != ["AssumeRoleWithWebIdentity"]:
            return {k: v for k, v in request.headers.items() if k.lower() not in self._HOP_BY_HOP}
        signed = AWSRequest(
            method=request.method,
            url=self._moto + request.path_qs,
            data=body,
            headers={"Content-Type": request.headers.get("Content-Type", "application/x-www-form-urlencoded")},
        )
        SigV4Auth(self._broker, "sts", "us-east-1").add_auth(signed)
        return dict(signed.headers.items())

    async def handle(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        async with self._session.request(
            request.method, self._moto + request.path_qs, data=body, headers=self._headers(request, body)
        ) as resp:
            return web.Response(
                status=resp.status,
                body=await resp.read(),
                headers={"Content-Type": resp.headers.get("Content-Type", "text/xml")},
            )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        async with aiohttp.ClientSession(auto_decompress=False) as self._session, serve_on_loopback(app) as url:
            yield url


class InstanceMetadata:
    """IMDSv2 for the demo's "EC2" delegate: a session token first, then the node role's credentials."""

    def __init__(self, role_name: str, credentials: dict[str, str]) -> None:
        self._role = role_name
        self._creds = credentials
        self._tokens: set[str] = set()

    async def token(self, request: web.Request) -> web.Response:
        if "X-aws-ec2-metadata-token-ttl-seconds" not in request.headers:
            return web.Response(status=400)
        token = secrets.token_urlsafe(24)
        self._tokens.add(token)
        return web.Response(text=token)

    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("X-aws-ec2-metadata-token") in self._tokens

    async def roles(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.Response(status=401)
        return web.Response(text=self._role)

    async def credentials(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.Response(status=401)
        if request.match_info["role"] != self._role:
            return web.Response(status=404)
        now = datetime.now(UTC)
        return web.json_response(
            {
                "Code": "Success",
                "Type": "AWS-HMAC",
                **self._creds,
                "LastUpdated": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "Expiration": (now + timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_put("/latest/api/token", self.token)
        app.router.add_get("/latest/meta-data/iam/security-credentials/", self.roles)
        app.router.add_get("/latest/meta-data/iam/security-credentials/{role}", self.credentials)
        async with serve_on_loopback(app) as url:
            yield url


def write_irsa_token(directory: Path) -> Path:
    """A projected service account token, unsigned: the STS front passes its issuer unchecked (IRSA_ISSUER)."""
    path = directory / "eks.amazonaws.com" / "serviceaccount" / "token"
    path.parent.mkdir(parents=True, exist_ok=True)
    claims = {"iss": IRSA_ISSUER, "sub": "system:serviceaccount:delegate:delegate-agent", "aud": ["sts.amazonaws.com"]}
    signature = base64.urlsafe_b64encode(b"not signed: a demo stand-in").rstrip(b"=").decode()
    path.write_text(f"{_segment({'alg': 'RS256', 'kid': 'demo'})}.{_segment(claims)}.{signature}")
    return path


def _segment(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
