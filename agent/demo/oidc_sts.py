"""A stand-in for AWS STS that checks web identity tokens the way AWS does, in front of moto.

moto's AssumeRoleWithWebIdentity never reads the token: any string gets the role's credentials.
That proves wiring only. :class:`OidcSts` checks what real STS checks before it forwards the call
to moto (signed by a broker, as :class:`~agent.demo.standin.WebIdentitySts` does):

1. the role's account has an IAM OIDC identity provider for the token's ``iss``
   (read with moto's IAM API), else ``InvalidIdentityToken`` "No OpenIDConnect provider found ...";
2. the signature verifies against the issuer's JWKS, found through
   ``{iss}/.well-known/openid-configuration`` (RS256 or ES256, by ``kid``; verified with PyJWT,
   another library than the control plane's signer, so each checks the other), else
   ``InvalidIdentityToken`` "Couldn't retrieve verification key ..." (JWKS unreachable, unknown kid);
3. ``exp``/``nbf`` against the clock (``ExpiredTokenException``);
4. ``aud`` is one of the provider's client IDs, else ``InvalidIdentityToken`` "Incorrect token audience";
5. the role exists and its trust policy allows ``sts:AssumeRoleWithWebIdentity`` for the provider's
   ``Federated`` principal, with ``StringEquals``/``StringLike`` (and ``ForAnyValue:`` forms) on
   ``<provider>:sub`` and ``<provider>:aud``; an explicit Deny wins; else ``AccessDenied``.

Errors come back in STS's own XML shape, so botocore raises ``ClientError`` with AWS's codes.

Where it is looser than AWS, on purpose, and only here:
- AWS wants an ``https`` issuer without a port. moto stores a provider URL as host[:port]/path and
  accepts ``http``, so this front accepts ``http`` and ports, but ``http`` only for a loopback host
  (the tests' and the demo's control plane). The provider is ``127.0.0.1:PORT/oidc`` then, and so
  are the condition keys (``127.0.0.1:PORT/oidc:sub``).
- It sees the IAM of one account per partition: the broker's. A role in another account finds
  no provider (AWS answers the same for an account without one).
- Issuers named in ``unverified_issuers`` pass through unchecked, as moto would take them: the
  demo's IRSA token is a fake whose EKS issuer cannot be reached. That is a fidelity gap, kept
  explicit by name, not a fallback: any other issuer is checked.
- Condition operators other than the ones above make an Allow statement not apply and a Deny
  statement apply (it errs towards refusing); policy variables are not expanded.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

import aiohttp
import jwt
from aiobotocore.session import AioSession
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from agent._loopback import serve_on_loopback
from agent.demo.standin import WebIdentitySts

#: The region each partition's STS call is signed for: moto picks its partition from it.
PARTITION_REGIONS = {"aws": "us-east-1", "aws-us-gov": "us-gov-west-1", "aws-cn": "cn-north-1"}
_ROLE_ARN = re.compile(r"^arn:(aws|aws-us-gov|aws-cn):iam::(\d{12}):role/(?:[\w+=,.@/-]*/)?([\w+=,.@-]{1,64})$")
_ALGORITHMS = ["RS256", "ES256"]
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_ACTION = "sts:assumerolewithwebidentity"
_NOT_AUTHORIZED = "Not authorized to perform sts:AssumeRoleWithWebIdentity"
_NO_KEY = (
    "Couldn't retrieve verification key from your identity provider, "
    "please reference AssumeRoleWithWebIdentity documentation for requirements"
)


class StsError(Exception):
    """An answer of STS's: ``code`` and ``message`` as AWS words them, ``status`` as AWS sends it."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status

    def response(self) -> web.Response:
        body = (
            '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            f"<Error><Type>Sender</Type><Code>{escape(self.code)}</Code><Message>{escape(self.message)}</Message>"
            f"</Error><RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
        )
        return web.Response(status=self.status, body=body.encode(), content_type="text/xml")


def _invalid(message: str) -> StsError:
    return StsError("InvalidIdentityToken", message)


def _denied() -> StsError:
    return StsError("AccessDenied", _NOT_AUTHORIZED, 403)


@dataclass(frozen=True)
class _Role:
    partition: str
    account: str
    name: str
    arn: str


def provider_url(issuer: str) -> str:
    """The IAM provider URL of an issuer (host[:port]/path, no scheme), as IAM stores and ARNs name it."""
    parts = urlsplit(issuer)
    return (parts.netloc + parts.path).rstrip("/")


def _like(pattern: str, value: str) -> bool:
    """IAM's StringLike: ``*`` any run, ``?`` one character, everything else literal, case-sensitive."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


_MATCHERS: dict[str, Callable[[str, str], bool]] = {
    "stringequals": lambda want, got: want == got,
    "stringlike": _like,
}


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _conditions_hold(conditions: Mapping[str, Any], context: Mapping[str, list[str]], *, unknown: bool) -> bool:
    """Every operator, every key in it, holds (values of one key are alternatives), as IAM evaluates.

    ``unknown`` is what an operator this stand-in does not implement counts as.
    """
    lowered = {k.lower(): v for k, v in context.items()}  # condition keys are case-insensitive
    for operator, block in conditions.items():
        qualifier, _, name = operator.lower().rpartition(":")
        match = _MATCHERS.get(name)
        if match is None or qualifier not in ("", "foranyvalue") or not isinstance(block, dict):
            if not unknown:
                return False
            continue
        for key, wanted in block.items():
            got = lowered.get(key.lower(), [])
            if not any(match(w, g) for w in _strings(wanted) for g in got):
                return False
    return True


def trust_allows(policy: Mapping[str, Any], federated: str, context: Mapping[str, list[str]]) -> bool:
    """Whether a role trust policy lets ``federated`` call AssumeRoleWithWebIdentity with these claims."""
    statements = policy.get("Statement", [])
    if isinstance(statements, dict):
        statements = [statements]
    allowed = False
    for st in statements if isinstance(statements, list) else []:
        if not isinstance(st, dict):
            continue
        principal = st.get("Principal")
        federated_ok = principal == "*" or (
            isinstance(principal, dict) and federated in _strings(principal.get("Federated"))
        )
        action_ok = any(_like(a.lower(), _ACTION) for a in _strings(st.get("Action")))
        if not (federated_ok and action_ok):
            continue
        deny = st.get("Effect") == "Deny"
        if not _conditions_hold(st.get("Condition") or {}, context, unknown=deny):
            continue
        if deny:
            return False
        allowed = allowed or st.get("Effect") == "Allow"
    return allowed


class OidcSts(WebIdentitySts):
    """STS with AssumeRoleWithWebIdentity checked like AWS; every other call is forwarded to moto.

    ``broker_key``/``broker_secret`` sign forwarded calls in the ``aws`` partition and read its IAM
    (they need iam:ListOpenIDConnectProviders, iam:GetOpenIDConnectProvider, iam:GetRole and
    sts:AssumeRoleWithWebIdentity); ``partition_brokers`` holds the keys of other partitions
    (moto keeps one IAM per partition). ``ca_bundle`` verifies an https issuer; ``clock`` is the
    time expiry is judged by (seconds since the epoch).
    """

    JWKS_TTL = 60.0
    LEEWAY = 5.0

    def __init__(
        self,
        moto_url: str,
        broker_key: str,
        broker_secret: str,
        *,
        partition_brokers: Mapping[str, tuple[str, str]] | None = None,
        ca_bundle: str | None = None,
        clock: Callable[[], float] = time.time,
        unverified_issuers: Collection[str] = (),
    ) -> None:
        super().__init__(moto_url, broker_key, broker_secret)
        self._brokers = {"aws": self._broker} | {
            p: Credentials(k, s) for p, (k, s) in (partition_brokers or {}).items()
        }
        self._ssl = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else None
        self._clock = clock
        self._unverified = frozenset(unverified_issuers)
        self._jwks: dict[str, tuple[float, dict[str, Any]]] = {}
        self._jwks_lock = asyncio.Lock()
        self._iam: dict[str, Any] = {}
        self._stack: AsyncExitStack | None = None
        self._idp: aiohttp.ClientSession | None = None

    # --- the request ------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        form |= {k: v for k, v in request.query.items() if k not in form}
        if "Authorization" in request.headers or form.get("Action") != "AssumeRoleWithWebIdentity":
            return await self._forward(request, body, self._pass_headers(request))
        try:
            role = await self._check(form.get("RoleArn", ""), form.get("WebIdentityToken", ""))
        except StsError as err:
            return err.response()
        except ClientError as err:  # the broker cannot read IAM: the set-up's fault, said as such
            code = err.response.get("Error", {}).get("Code", "?")
            return StsError("InternalFailure", f"the STS stand-in could not read IAM ({code})", 500).response()
        if role is None:  # an unverified issuer: as moto would
            return await self._forward(request, body, self._signed(request, body, "aws"))
        return await self._forward(request, body, self._signed(request, body, role.partition))

    def _pass_headers(self, request: web.Request) -> dict[str, str]:
        return {k: v for k, v in request.headers.items() if k.lower() not in self._HOP_BY_HOP}

    def _signed(self, request: web.Request, body: bytes, partition: str) -> dict[str, str]:
        creds = self._brokers.get(partition, self._broker)
        signed = AWSRequest(
            method=request.method,
            url=self._moto + request.path_qs,
            data=body,
            headers={"Content-Type": request.headers.get("Content-Type", "application/x-www-form-urlencoded")},
        )
        SigV4Auth(creds, "sts", PARTITION_REGIONS[partition]).add_auth(signed)
        return dict(signed.headers.items())

    async def _forward(self, request: web.Request, body: bytes, headers: dict[str, str]) -> web.Response:
        assert self._session is not None
        async with self._session.request(
            request.method, self._moto + request.path_qs, data=body, headers=headers
        ) as resp:
            return web.Response(
                status=resp.status,
                body=await resp.read(),
                headers={"Content-Type": resp.headers.get("Content-Type", "text/xml")},
            )

    # --- the checks, in AWS's order ---------------------------------------------------------------

    async def _check(self, role_arn: str, token: str) -> _Role | None:
        """The role to forward for, None to pass through unchecked; raises StsError as STS answers."""
        match = _ROLE_ARN.match(role_arn)
        if match is None:
            raise StsError("ValidationError", f"{role_arn!r} is not a valid role ARN")
        role = _Role(match[1], match[2], match[3], role_arn)
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _invalid("The ID Token provided is not a valid JWT") from None  # never echo the token
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or not issuer:
            raise _invalid("The ID Token provided has no issuer (iss)")
        if issuer in self._unverified:
            return None
        self._check_issuer_url(issuer)
        provider = provider_url(issuer)
        federated = f"arn:{role.partition}:iam::{role.account}:oidc-provider/{provider}"
        client_ids = await self._client_ids(role, federated)
        if client_ids is None:
            raise _invalid(f"No OpenIDConnect provider found in your account for {issuer}")
        claims = await self._verify(token, header, issuer)
        self._check_times(claims)
        audience = _strings(claims.get("azp") or claims.get("aud"))
        matched = [a for a in audience if a in client_ids]
        if not matched:
            raise _invalid("Incorrect token audience")
        subject = _strings(claims.get("sub"))
        policy = await self._trust_policy(role)
        context = {f"{provider}:sub": subject, f"{provider}:aud": matched}
        if policy is None or not trust_allows(policy, federated, context):
            raise _denied()
        return role

    @staticmethod
    def _check_issuer_url(issuer: str) -> None:
        parts = urlsplit(issuer)
        loopback_http = parts.scheme == "http" and parts.hostname in _LOOPBACK
        if parts.scheme != "https" and not loopback_http:
            raise _invalid(f"The issuer {issuer} must be an https URL")

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now = self._clock()
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, int | float):
            raise _invalid("The ID Token provided has no expiry (exp)")
        if now > exp + self.LEEWAY:
            raise StsError(
                "ExpiredTokenException",
                f"Token expired: current date/time {int(now)} must be before the expiration date/time {int(exp)}",
            )
        if isinstance(nbf, int | float) and now + self.LEEWAY < nbf:
            raise _invalid("The ID Token provided is not valid yet (nbf)")

    async def _verify(self, token: str, header: Mapping[str, Any], issuer: str) -> dict[str, Any]:
        if header.get("alg") not in _ALGORITHMS:
            raise _invalid(f"The ID Token is signed with {header.get('alg')!r}; STS accepts {', '.join(_ALGORITHMS)}")
        key = await self._key(issuer, header.get("kid"))
        try:
            # Times are judged by our clock (PyJWT reads the system's), after the signature.
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=_ALGORITHMS,
                issuer=issuer,
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False},
            )
        except jwt.InvalidIssuerError:
            raise _invalid("The ID Token's issuer does not match its provider") from None
        except jwt.PyJWTError:
            raise _invalid("The ID Token's signature does not verify") from None
        return claims

    async def _key(self, issuer: str, kid: Any) -> Any:
        """The verification key for ``kid``: from the cached JWKS, else from a fresh fetch (key rotation)."""
        async with self._jwks_lock:
            cached = self._jwks.get(issuer)
            if cached is None or self._clock() - cached[0] > self.JWKS_TTL or _find(cached[1], kid) is None:
                try:
                    jwks = await self._fetch_jwks(issuer)
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
                    raise _invalid(_NO_KEY) from None
                self._jwks[issuer] = (self._clock(), jwks)
            jwk = _find(self._jwks[issuer][1], kid)
        if jwk is None:
            raise _invalid(_NO_KEY)
        try:
            return jwt.PyJWK(jwk).key
        except jwt.PyJWTError:
            raise _invalid(_NO_KEY) from None

    async def _fetch_jwks(self, issuer: str) -> dict[str, Any]:
        assert self._idp is not None
        timeout = aiohttp.ClientTimeout(total=5)
        async with self._idp.get(f"{issuer.rstrip('/')}/.well-known/openid-configuration", timeout=timeout) as r:
            r.raise_for_status()
            discovery = await r.json(content_type=None)
        async with self._idp.get(discovery["jwks_uri"], timeout=timeout) as r:
            r.raise_for_status()
            jwks = await r.json(content_type=None)
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise ValueError("not a JWKS")
        return jwks

    # --- IAM, read through moto's API ------------------------------------------------------------

    async def _iam_client(self, partition: str) -> Any:
        if partition not in self._iam:
            assert self._stack is not None
            creds = self._brokers.get(partition, self._broker)
            self._iam[partition] = await self._stack.enter_async_context(
                AioSession().create_client(
                    "iam",
                    region_name=PARTITION_REGIONS[partition],
                    endpoint_url=self._moto,
                    aws_access_key_id=creds.access_key,
                    aws_secret_access_key=creds.secret_key,
                )
            )
        return self._iam[partition]

    async def _client_ids(self, role: _Role, provider_arn: str) -> list[str] | None:
        if role.partition not in self._brokers:  # a partition this front has no IAM of: no provider there
            return None
        iam = await self._iam_client(role.partition)
        listed = await iam.list_open_id_connect_providers()
        if provider_arn not in {p["Arn"] for p in listed.get("OpenIDConnectProviderList", [])}:
            return None
        got = await iam.get_open_id_connect_provider(OpenIDConnectProviderArn=provider_arn)
        return list(got.get("ClientIDList", []))

    async def _trust_policy(self, role: _Role) -> dict[str, Any] | None:
        iam = await self._iam_client(role.partition)
        try:
            found = (await iam.get_role(RoleName=role.name))["Role"]
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") == "NoSuchEntity":
                return None
            raise
        if found.get("Arn") != role.arn:  # same name, other path: not this role
            return None
        doc = found.get("AssumeRolePolicyDocument")
        parsed = json.loads(doc) if isinstance(doc, str) else doc  # botocore decodes it already
        return parsed if isinstance(parsed, dict) else None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._iam.clear()  # clients of an earlier run closed with its exit stack
        connector = aiohttp.TCPConnector(ssl=self._ssl) if self._ssl else None
        async with (
            AsyncExitStack() as self._stack,
            aiohttp.ClientSession(auto_decompress=False) as self._session,
            aiohttp.ClientSession(connector=connector) as self._idp,
            serve_on_loopback(app) as url,
        ):
            yield url


def _find(jwks: Mapping[str, Any], kid: Any) -> dict[str, Any] | None:
    for jwk in jwks.get("keys", []):
        if isinstance(jwk, dict) and jwk.get("kid") == kid:
            return jwk
    return None
