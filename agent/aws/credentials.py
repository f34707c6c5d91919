"""Credentials per connector, with aiobotocore's own providers and fetchers, never via ``os.environ``.

- ``ManualConfig``: the access key (plain or a secret reference), the secret key reference and,
  for temporary keys, the session token reference, resolved on the delegate.
- ``Irsa``: ``AWS_ROLE_ARN`` and ``AWS_WEB_IDENTITY_TOKEN_FILE`` as EKS injects them; the token
  file is re-read on every refresh.
- ``InheritFromDelegate``: the delegate's own identity through the default chain: environment,
  web identity, container credentials (ECS, EKS Pod Identity), instance profile over IMDSv2.
- ``OidcAuthentication``: the control plane's short-lived OIDC token for this task, exchanged with
  ``sts:AssumeRoleWithWebIdentity`` for ``iamRoleArn`` at the test region's STS (unsigned, as AWS
  allows); no key is stored anywhere.
- ``crossAccountAccess`` on any of them: STS AssumeRole with the External ID.

The delegate's own identity (IRSA, default chain) is resolved once per region and reused:
refreshable credentials renew themselves. A connector's credentials are never cached.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiobotocore.credentials import (
    AioAssumeRoleCredentialFetcher,
    AioAssumeRoleWithWebIdentityCredentialFetcher,
    AioContainerProvider,
    AioCredentials,
    AioDeferredRefreshableCredentials,
    AioEnvProvider,
    AioInstanceMetadataProvider,
)
from aiobotocore.utils import AioInstanceMetadataFetcher
from botocore.credentials import FileWebIdentityTokenLoader
from botocore.exceptions import CredentialRetrievalError, MetadataRetrievalError

from agent.aws.clients import AwsClients, RetryPolicy
from agent.aws.connector import AwsConnector, CrossAccountAccess
from agent.aws.environment import AwsEnvironment
from agent.aws.secrets import SecretStore

_SESSION_NAME_BAD = re.compile(r"[^\w+=,.@-]")
#: The OIDC role session: long enough for one connection test and its permission check.
OIDC_SESSION_SECONDS = 900


class CredentialProblem(Exception):
    """Credentials could not be put together before AWS had a say; ``kind`` selects the hint."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Resolved:
    credentials: Any = field(repr=False)
    #: A short id for metrics and results: static, web-identity, environment, container, instance-metadata.
    method: str
    #: What a person reads: where these credentials came from.
    source: str
    #: The IAM role behind the credentials when we know its exact ARN (path included).
    role_arn: str | None = None


def session_name(delegate_name: str, task_id: str) -> str:
    """A RoleSessionName that says which delegate ran which task (CloudTrail shows it)."""
    name = _SESSION_NAME_BAD.sub("-", f"{delegate_name}@{task_id}")
    return name[:64] if len(name) >= 2 else "delegate-agent"


class CredentialResolver:
    def __init__(self, env: AwsEnvironment, clients: AwsClients, secrets: SecretStore) -> None:
        self._env = env
        self._clients = clients
        self._secrets = secrets
        self._ambient: dict[tuple[str, str], Resolved] = {}
        self._ambient_lock = asyncio.Lock()

    async def base(
        self,
        connector: AwsConnector,
        *,
        region: str,
        delegate_name: str,
        task_id: str = "task",
        oidc_token: str | None = None,
    ) -> Resolved:
        """The connector's own credentials (before any cross-account role)."""
        if connector.credential_type == "ManualConfig":
            return self._static(connector)
        if connector.credential_type == "OidcAuthentication":
            return self._oidc(connector, oidc_token, region, session_name(delegate_name, task_id))
        if connector.credential_type == "Irsa":
            return await self._ambient_cached("irsa", region, lambda: self._irsa(region, delegate_name))
        return await self._ambient_cached("chain", region, lambda: self._default_chain(region, delegate_name))

    def _static(self, connector: AwsConnector) -> Resolved:
        # What a person reads names where each part came from, never a character of a secret's value:
        # an access key kept in a secret is as secret as its secret key.
        access_key = connector.access_key
        source = f"access key {access_key}"
        if connector.access_key_ref is not None:
            access_key = self._secrets.resolve(connector.access_key_ref)
            source = f"access key from secret {connector.access_key_ref}"
        assert connector.secret_key_ref is not None and access_key is not None
        secret_key = self._secrets.resolve(connector.secret_key_ref)
        source += f" with secret {connector.secret_key_ref}"
        token = None
        if connector.session_token_ref is not None:
            token = self._secrets.resolve(connector.session_token_ref)
            source += f" and session token {connector.session_token_ref}"
        return Resolved(
            AioCredentials(access_key, secret_key, token, method="explicit"), method="static", source=source
        )

    def _oidc(self, connector: AwsConnector, token: str | None, region: str, name: str) -> Resolved:
        """The task's OIDC token, exchanged for ``iamRoleArn``; never cached (it is this task's alone)."""
        if not token:
            raise CredentialProblem(
                "oidc_token_missing",
                "the control plane sent no OIDC token with this task: it issues them only when started with "
                "--oidc-issuer",
            )
        self._secrets.remember(token)
        role_arn = connector.oidc_role_arn
        assert role_arn is not None
        fetcher = AioAssumeRoleWithWebIdentityCredentialFetcher(
            client_creator=self._clients.sts_creator(region),
            web_identity_token_loader=lambda: token,
            role_arn=role_arn,
            extra_args={"RoleSessionName": name, "DurationSeconds": OIDC_SESSION_SECONDS},
        )
        creds = AioDeferredRefreshableCredentials(
            refresh_using=self._remembered(fetcher.fetch_credentials), method="assume-role-with-web-identity"
        )
        issuer = oidc_claims(token).get("iss")
        source = f"OIDC token from {issuer} for {role_arn}" if isinstance(issuer, str) else f"OIDC for {role_arn}"
        return Resolved(creds, method="oidc", source=source, role_arn=role_arn)

    async def _ambient_cached(self, kind: str, region: str, make: Any) -> Resolved:
        key = (kind, region)
        hit = self._ambient.get(key)
        if hit is not None:
            return hit
        async with self._ambient_lock:
            hit = self._ambient.get(key)
            if hit is None:
                hit = await make()
                # Only a resolution that produced working credentials is kept (checked by the caller first).
                self._ambient[key] = hit
            return hit

    def _remembered(self, fetch: Callable[[], Awaitable[dict[str, Any]]]) -> Callable[[], Awaitable[dict[str, Any]]]:
        """``fetch`` (an STS call) whose every answer is handed to the redactor before anyone uses it."""

        async def fetch_and_remember() -> dict[str, Any]:
            answer = await fetch()
            self._secrets.remember(answer.get("secret_key"), answer.get("token"))
            return answer

        return fetch_and_remember

    def _remembered_token(self, load: Callable[[], str]) -> Callable[[], str]:
        def load_and_remember() -> str:
            token = load()
            self._secrets.remember(token)
            return token

        return load_and_remember

    async def remember(self, credentials: Any) -> Any:
        """The frozen keys of ``credentials``; the secret key and session token go to the redactor first.

        Access key IDs are identifiers (AWS prints them), so they stay readable in logs unless they
        came from a secret reference, which the secret store has registered already.
        """
        frozen = await credentials.get_frozen_credentials()
        self._secrets.remember(frozen.secret_key, frozen.token)
        return frozen

    def forget(self, resolved: Resolved) -> None:
        """Drop a cached delegate identity that failed, so the next task resolves it afresh."""
        for key, value in list(self._ambient.items()):
            if value is resolved:
                del self._ambient[key]

    async def _irsa(self, region: str, delegate_name: str) -> Resolved:
        v = self._env.variables
        role_arn, token_file = v.get("AWS_ROLE_ARN"), v.get("AWS_WEB_IDENTITY_TOKEN_FILE")
        if not role_arn or not token_file:
            missing = [n for n, x in (("AWS_ROLE_ARN", role_arn), ("AWS_WEB_IDENTITY_TOKEN_FILE", token_file)) if not x]
            raise CredentialProblem(
                "irsa_not_configured",
                f"IRSA is not set up on this delegate: {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set",
            )
        return self._web_identity(
            role_arn,
            token_file,
            region,
            v.get("AWS_ROLE_SESSION_NAME") or session_name(delegate_name, "irsa"),
            method="web-identity",
            label="IRSA",
        )

    def _web_identity(
        self, role_arn: str, token_file: str, region: str, name: str, *, method: str, label: str
    ) -> Resolved:
        if not Path(token_file).is_file():
            raise CredentialProblem("token_file_missing", f"the web identity token file {token_file} does not exist")
        web_fetcher = AioAssumeRoleWithWebIdentityCredentialFetcher(
            client_creator=self._clients.sts_creator(region),
            # Re-read on every refresh; the token (a JWT that proves the pod's identity) is a secret too.
            web_identity_token_loader=self._remembered_token(FileWebIdentityTokenLoader(token_file)),
            role_arn=role_arn,
            extra_args={"RoleSessionName": name},
        )
        creds = AioDeferredRefreshableCredentials(
            refresh_using=self._remembered(web_fetcher.fetch_credentials), method="assume-role-with-web-identity"
        )
        return Resolved(creds, method=method, source=f"{label} web identity for {role_arn}", role_arn=role_arn)

    async def _default_chain(self, region: str, delegate_name: str) -> Resolved:
        """The pod's own identity, in the SDK's order; what was tried is said when nothing works."""
        v = dict(self._env.variables)
        tried: list[str] = []
        env_creds = await AioEnvProvider(environ=v).load()
        if env_creds is not None:
            await self.remember(env_creds)
            return Resolved(env_creds, method="environment", source="AWS_ACCESS_KEY_ID in the delegate's environment")
        tried.append("no AWS_ACCESS_KEY_ID")
        if v.get("AWS_ROLE_ARN") and v.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
            return self._web_identity(
                v["AWS_ROLE_ARN"],
                v["AWS_WEB_IDENTITY_TOKEN_FILE"],
                region,
                v.get("AWS_ROLE_SESSION_NAME") or session_name(delegate_name, "pod"),
                method="web-identity",
                label="web identity (IRSA)",
            )
        tried.append("no web identity (AWS_ROLE_ARN)")
        container = AioContainerProvider(environ=v)
        if "AWS_CONTAINER_CREDENTIALS_FULL_URI" in v or "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI" in v:
            self._secrets.remember(v.get("AWS_CONTAINER_AUTHORIZATION_TOKEN"))  # the file's is sent unlogged
            where = v.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") or v.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
            try:
                creds = await container.load()
            except (CredentialRetrievalError, MetadataRetrievalError, OSError) as exc:
                raise CredentialProblem(
                    "container_failed", f"the container credentials endpoint {where} failed: {_short(exc)}"
                ) from None
            if creds is not None:
                await self.remember(creds)
                label = "EKS Pod Identity" if "169.254.170.23" in str(where) else "container credentials"
                return Resolved(creds, method="container", source=f"{label} ({where})")
        tried.append("no container credentials endpoint")
        if self._env.metadata_disabled:
            tried.append("instance metadata disabled (AWS_EC2_METADATA_DISABLED)")
        else:
            endpoint = self._env.metadata_endpoint or "http://169.254.169.254"
            config = {
                "ec2_metadata_v1_disabled": self._env.metadata_v1_disabled,
                "ec2_metadata_service_endpoint": endpoint,
            }
            fetcher = AioInstanceMetadataFetcher(
                timeout=self._env.metadata_timeout, num_attempts=self._env.metadata_attempts, env=v, config=config
            )
            try:
                creds = await AioInstanceMetadataProvider(iam_role_fetcher=fetcher).load()
            except (MetadataRetrievalError, CredentialRetrievalError, OSError) as exc:
                raise CredentialProblem(
                    "imds_unreachable",
                    f"no credentials found on the delegate ({', '.join(tried)});"
                    f" instance metadata at {endpoint} did not answer: {_short(exc)}",
                ) from None
            if creds is not None:
                await self.remember(creds)
                return Resolved(creds, method="instance-metadata", source=f"instance profile via IMDSv2 ({endpoint})")
            tried.append(f"instance metadata at {endpoint} has no role")
        raise CredentialProblem("no_credentials", f"no credentials found on the delegate: {', '.join(tried)}")

    def assume(
        self, base: Resolved, xa: CrossAccountAccess, *, region: str, policy: RetryPolicy, name: str
    ) -> Resolved:
        """Cross-account access: the base credentials assume the connector's role (with its External ID)."""
        extra: dict[str, Any] = {"RoleSessionName": name, "DurationSeconds": xa.duration_seconds}
        if xa.external_id:
            extra["ExternalId"] = xa.external_id
        fetcher = AioAssumeRoleCredentialFetcher(
            client_creator=self._clients.sts_creator(region, policy),
            source_credentials=base.credentials,
            role_arn=xa.role_arn,
            extra_args=extra,
        )
        creds = AioDeferredRefreshableCredentials(
            refresh_using=self._remembered(fetcher.fetch_credentials), method="assume-role"
        )
        return Resolved(
            creds,
            method=f"{base.method}+assume-role",
            source=f"{base.source}, then role {xa.role_arn}",
            role_arn=xa.role_arn,
        )


def oidc_claims(token: str | None) -> dict[str, Any]:
    """The claims of a JWT, *unverified*: only to name its issuer, subject and audience in a hint.

    The token is the control plane's and AWS verifies it; reading it here trusts nothing in it.
    """
    try:
        payload = (token or "").split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
