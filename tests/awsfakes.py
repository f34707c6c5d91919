"""AWS stand-ins for tests, all on 127.0.0.1.

- moto's real server (``ThreadedMotoServer``) is the AWS in every test.
- ``IamSimulator`` answers iam:SimulatePrincipalPolicy, which moto does not implement (it answers
  HTTP 500); it speaks the IAM query protocol's XML and decides from a table the test gives it.
- ``PodIdentityAgent`` is the EKS Pod Identity credentials endpoint (a tiny HTTP server that
  checks the Authorization token from the token file and returns credentials).
- ``FaultProxy`` forwards to moto and can inject throttling, 5xx, delays or black holes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import aiohttp
from aiobotocore.session import AioSession
from aiohttp import web

from agent._loopback import serve_on_loopback

logging.getLogger("werkzeug").setLevel(logging.ERROR)

ACCOUNT = "123456789012"
ADMIN_KEY = ("AKIAADMIN00000000000", "admin-secret")


def moto_api(url: str, path: str, body: bytes = b"") -> bytes:
    req = urllib.request.Request(url + path, data=body, method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()  # type: ignore[no-any-return]


@dataclass
class Key:
    user: str
    access_key: str
    secret_key: str = field(repr=False)

    @property
    def arn(self) -> str:
        return f"arn:aws:iam::{ACCOUNT}:user/{self.user}"


async def assume_role_session(moto: str, role_arn: str, session_name: str) -> dict[str, str]:
    """A session of ``role_arn`` as sts:AssumeRole hands it out (AccessKeyId, SecretAccessKey, SessionToken)."""
    async with AioSession().create_client(
        "sts",
        region_name="us-east-1",
        endpoint_url=moto,
        aws_access_key_id=ADMIN_KEY[0],
        aws_secret_access_key=ADMIN_KEY[1],
    ) as sts:
        creds = (await sts.assume_role(RoleArn=role_arn, RoleSessionName=session_name))["Credentials"]
    return {k: str(creds[k]) for k in ("AccessKeyId", "SecretAccessKey", "SessionToken")}


class MotoIam:
    """Seeds users, keys, roles and policies in moto (while enforcement is off)."""

    def __init__(self, url: str) -> None:
        self.url = url

    @asynccontextmanager
    async def _iam(self, region: str = "us-east-1") -> AsyncIterator[Any]:
        async with AioSession().create_client(
            "iam",
            region_name=region,
            endpoint_url=self.url,
            aws_access_key_id=ADMIN_KEY[0],
            aws_secret_access_key=ADMIN_KEY[1],
        ) as iam:
            yield iam

    async def user(self, name: str, actions: list[str] | None = None, region: str = "us-east-1") -> Key:
        async with self._iam(region) as iam:
            await iam.create_user(UserName=name)
            if actions:
                await iam.put_user_policy(
                    UserName=name,
                    PolicyName="p",
                    PolicyDocument=json.dumps(
                        {
                            "Version": "2012-10-17",
                            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
                        }
                    ),
                )
            k = (await iam.create_access_key(UserName=name))["AccessKey"]
        return Key(name, k["AccessKeyId"], k["SecretAccessKey"])

    async def role(
        self, name: str, *, trusted: str, external_id: str | None = None, actions: list[str] | None = None
    ) -> str:
        condition = {"StringEquals": {"sts:ExternalId": external_id}} if external_id else {}
        statement: dict[str, Any] = {"Effect": "Allow", "Principal": {"AWS": trusted}, "Action": "sts:AssumeRole"}
        if condition:
            statement["Condition"] = condition
        async with self._iam() as iam:
            role = await iam.create_role(
                RoleName=name, AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [statement]})
            )
            await iam.put_role_policy(
                RoleName=name,
                PolicyName="p",
                PolicyDocument=json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [{"Effect": "Allow", "Action": actions or ["ec2:Describe*"], "Resource": "*"}],
                    }
                ),
            )
        return str(role["Role"]["Arn"])


class IamSimulator:
    """iam:SimulatePrincipalPolicy over the IAM query protocol (moto lacks this API)."""

    def __init__(self, decisions: dict[str, str], *, deny_caller: bool = False) -> None:
        self.decisions = decisions
        self.deny_caller = deny_caller
        self.calls: list[dict[str, list[str]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        form = parse_qs((await request.read()).decode())
        self.calls.append(form)
        if form.get("Action") != ["SimulatePrincipalPolicy"]:
            return web.Response(status=400, text="only SimulatePrincipalPolicy here")
        if self.deny_caller:
            return web.Response(
                status=403,
                content_type="text/xml",
                text=(
                    '<ErrorResponse xmlns="https://iam.amazonaws.com/doc/2010-05-08/"><Error><Type>Sender</Type>'
                    "<Code>AccessDenied</Code><Message>not authorized to perform: iam:SimulatePrincipalPolicy</Message>"
                    "</Error><RequestId>r</RequestId></ErrorResponse>"
                ),
            )
        actions = [v[0] for k, v in sorted(form.items()) if k.startswith("ActionNames.member.")]
        members = "".join(
            f"<member><EvalActionName>{a}</EvalActionName><EvalResourceName>*</EvalResourceName>"
            f"<EvalDecision>{self.decisions.get(a, 'implicitDeny')}</EvalDecision>"
            "<MatchedStatements/><MissingContextValues/></member>"
            for a in actions
        )
        return web.Response(
            content_type="text/xml",
            text=(
                '<SimulatePrincipalPolicyResponse xmlns="https://iam.amazonaws.com/doc/2010-05-08/">'
                f"<SimulatePrincipalPolicyResult><IsTruncated>false</IsTruncated><EvaluationResults>{members}"
                "</EvaluationResults></SimulatePrincipalPolicyResult><ResponseMetadata><RequestId>r</RequestId>"
                "</ResponseMetadata></SimulatePrincipalPolicyResponse>"
            ),
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_post("/", self.handle)
        async with serve_on_loopback(app) as url:
            yield url


class PodIdentityAgent:
    """The EKS Pod Identity agent's credentials endpoint, on loopback."""

    def __init__(self, token: str, key: Key) -> None:
        self.token = token
        self.key = key
        self.seen_tokens: list[str | None] = []

    async def handle(self, request: web.Request) -> web.Response:
        got = request.headers.get("Authorization")
        self.seen_tokens.append(got)
        if got != self.token:
            return web.json_response({"message": "invalid token"}, status=401)
        expires = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return web.json_response(
            {
                "AccessKeyId": self.key.access_key,
                "SecretAccessKey": self.key.secret_key,
                "Token": "pod-identity-session-token",
                "Expiration": expires,
            }
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_get("/v1/credentials", self.handle)
        async with serve_on_loopback(app) as url:
            yield url + "/v1/credentials"


class FaultProxy:
    """A reverse proxy in front of an upstream that can misbehave on request.

    ``plan`` is consumed one entry per request: an int answers with that HTTP status (503, or
    400 with a Throttling body), "hang" never answers, "pass" forwards. After the plan, forward.
    ``answered`` records each answer: the path, the status and the loop time.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.plan: list[int | str | tuple[int, int]] = []
        self.requests = 0
        self.answered: list[tuple[str, int, float]] = []

    def _record(self, request: web.Request, status: int) -> None:
        self.answered.append((request.path, status, asyncio.get_running_loop().time()))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        step = self.plan.pop(0) if self.plan else "pass"
        if step == "hang":  # never answer: the client's own timeout must end the request
            await asyncio.Event().wait()
        if isinstance(step, tuple):  # (status, Retry-After seconds)
            self._record(request, step[0])
            return web.Response(status=step[0], headers={"Retry-After": str(step[1])}, text="slow down")
        if isinstance(step, int):
            self._record(request, step)
            if step == 400:
                body = (
                    "<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded"
                    "</Message></Error><RequestId>r</RequestId></ErrorResponse>"
                )
                return web.Response(status=400, text=body, content_type="text/xml")
            return web.Response(
                status=step, text="<Error><Code>ServiceUnavailable</Code></Error>", content_type="text/xml"
            )
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with (
            aiohttp.ClientSession() as session,
            session.request(request.method, self.upstream + request.path_qs, data=body, headers=headers) as resp,
        ):
            data = await resp.read()
            self._record(request, resp.status)
            return web.Response(status=resp.status, body=data, content_type=resp.content_type)

    @asynccontextmanager
    async def running(self, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        async with serve_on_loopback(
            app, ssl_context=ssl_context, host="localhost" if ssl_context else "127.0.0.1"
        ) as url:
            yield url


class ForwardProxy:
    """A plain HTTP forward proxy (absolute-form requests) that records what went through it."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        target = str(request.url)
        self.seen.append(target)
        body = await request.read()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("host", "content-length", "proxy-connection", "proxy-authorization")
        }
        async with (
            aiohttp.ClientSession() as session,
            session.request(request.method, target, data=body, headers=headers) as resp,
        ):
            return web.Response(status=resp.status, body=await resp.read(), content_type=resp.content_type)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        async with serve_on_loopback(app) as url:
            yield url
