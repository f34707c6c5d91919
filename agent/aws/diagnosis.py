"""From an exception at a step to what a person needs: category, AWS code, and the one hint that fits.

Harness answers every failure with the same list of possible causes. Here the hint is chosen by
the step that failed, the AWS error code and the credential type, and it names the things to
change (the principal, the role, the region, the secret reference).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ProxyConnectionError,
    ReadTimeoutError,
    SSLError,
)
from botocore.parsers import ResponseParserError

from agent.aws.credentials import CredentialProblem
from agent.aws.secrets import CONTROL_PLANE_SECRETS, SecretNotFound

CATEGORIES = (
    "invalid_config",
    "secret_not_found",
    "credentials_invalid",
    "permission_denied",
    "assume_role_denied",
    "network",
    "timeout",
    "throttled",
    "internal",
)

THROTTLING = {
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "PriorRequestNotComplete",
    "SlowDown",
    "RequestThrottled",
    "EC2ThrottledException",
    "BandwidthLimitExceeded",
    "LimitExceededException",
}
SERVER_ERRORS = {
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "InternalServerError",
    "Unavailable",
    "RequestTimeout",
    "RequestTimeoutException",
}
BAD_KEY = {
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "AuthFailure",
    "InvalidAccessKeyId",
    "InvalidToken",
    "IncompleteSignature",
}
DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "Forbidden"}


@dataclass(frozen=True)
class OidcContext:
    """An OidcAuthentication test: the role, and the token's issuer, subject and audience (not the token)."""

    role_arn: str
    issuer: str
    subject: str
    audience: str

    @property
    def provider(self) -> str:
        """The issuer as IAM names the identity provider and its condition keys: no scheme."""
        return self.issuer.removeprefix("https://").removeprefix("http://").rstrip("/")

    def provider_arn(self, partition: str) -> str:
        account = self.role_arn.split(":")[4] if self.role_arn.count(":") >= 5 else "ACCOUNT"
        return f"arn:{partition}:iam::{account}:oidc-provider/{self.provider or 'ISSUER'}"


@dataclass(frozen=True)
class Context:
    """What the validator knows when something fails: enough to make the hint concrete."""

    credential_type: str
    region: str
    partition: str
    principal: str | None = None
    role_arn: str | None = None
    external_id_set: bool = False
    secret_ref: str | None = None
    #: The connector's sessionTokenRef: its keys are temporary, and nobody renews them.
    session_token_ref: str | None = None
    #: The endpoint overrides in force, as (variable, URL): AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_<SERVICE>.
    endpoints: tuple[tuple[str, str], ...] = ()
    #: Set for an OidcAuthentication connector.
    oidc: OidcContext | None = None


@dataclass(frozen=True)
class Diagnosis:
    category: str
    message: str
    hint: str
    aws_code: str | None = None


def _who(ctx: Context) -> str:
    return ctx.principal or {
        "ManualConfig": "the IAM user of the access key",
        "Irsa": "the IRSA role",
        "InheritFromDelegate": "the delegate's own role",
        "OidcAuthentication": "the connector's OIDC role",
    }.get(ctx.credential_type, "the caller")


def _bad_key_hint(ctx: Context) -> str:
    if ctx.credential_type == "ManualConfig" and ctx.session_token_ref:
        return (
            f"AWS does not recognise the temporary keys: the session token referenced by sessionTokenRef "
            f"({ctx.session_token_ref}) may belong to other keys, or the session has expired or been revoked: "
            "store the access key, secret key and session token of one fresh session"
        )
    if ctx.credential_type == "ManualConfig":
        return (
            f"AWS does not recognise the access key in the {ctx.partition} partition: it may be deleted or "
            "inactive, mistyped, or belong to another partition (GovCloud and China keys only work in their own "
            "regions; pick a test region in the key's partition); temporary keys (ASIA...) also need their "
            "session token: add sessionTokenRef"
        )
    return (
        "AWS rejected the delegate's temporary credentials: the role session may have been revoked, or the "
        "credentials come from another partition than the test region"
    )


def diagnose(exc: BaseException, *, step: str, ctx: Context) -> Diagnosis:
    if isinstance(exc, SecretNotFound):
        return Diagnosis("secret_not_found", str(exc), _secret_hint(exc))
    if isinstance(exc, CredentialProblem):
        return _credential_problem(exc)
    if isinstance(exc, ClientError):
        return _client_error(exc, step, ctx)
    if isinstance(exc, TimeoutError | ReadTimeoutError):
        return Diagnosis(
            "timeout",
            f"{step} did not finish in time: {_text(exc) or 'no answer'}",
            "AWS (or the proxy in between) did not answer; check network egress from the delegate, and "
            "retry: a slow moment is not a broken connector",
        )
    if isinstance(exc, SSLError):
        return Diagnosis(
            "network",
            f"TLS to AWS failed at {step}: {_text(exc)}",
            "if a proxy intercepts TLS, give the delegate its CA with AWS_CA_BUNDLE",
        )
    if isinstance(exc, ProxyConnectionError):
        return Diagnosis(
            "network",
            f"the proxy failed at {step}: {_text(exc)}",
            "check HTTPS_PROXY, and NO_PROXY for endpoints that must bypass it",
        )
    if isinstance(exc, ConnectTimeoutError | EndpointConnectionError):
        custom = _custom_endpoint(exc, ctx)
        if custom is not None:
            return _custom_endpoint_unreachable(exc, step, *custom)
        return Diagnosis(
            "network",
            f"cannot connect to AWS in {ctx.region} at {step}: {_text(exc)}",
            "allow HTTPS egress from the delegate to AWS (NetworkPolicy, security groups, NAT), set "
            "HTTPS_PROXY if a proxy is required, or add a VPC endpoint for the service",
        )
    if isinstance(exc, NoCredentialsError):
        return Diagnosis(
            "credentials_invalid",
            "no credentials were available to sign the request",
            "this is a bug in credential resolution; report it with the delegate's log",
        )
    if isinstance(exc, ParamValidationError):
        return Diagnosis(
            "invalid_config",
            f"AWS would refuse these parameters: {_text(exc)}",
            "check crossAccountAccess (role ARN, externalId at least 2 characters, durationSeconds)",
        )
    if isinstance(exc, ResponseParserError):
        return Diagnosis(
            "network",
            f"the answer at {step} was not an AWS API response",
            "something other than AWS answered: check AWS_ENDPOINT_URL and any proxy in between",
        )
    if isinstance(exc, BotoCoreError):
        return Diagnosis("internal", f"{type(exc).__name__} at {step}: {_text(exc)}", "see the delegate's log")
    return Diagnosis("internal", f"unexpected {type(exc).__name__} at {step}", "see the delegate's log; this is a bug")


def _credential_problem(exc: CredentialProblem) -> Diagnosis:
    hints = {
        "irsa_not_configured": (
            "invalid_config",
            "the delegate's service account lacks the eks.amazonaws.com/role-arn "
            "annotation: set it (helm: serviceAccount.roleArn) and restart the pod so EKS injects "
            "AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE",
        ),
        "token_file_missing": (
            "invalid_config",
            "the projected service account token is not mounted where "
            "AWS_WEB_IDENTITY_TOKEN_FILE says: check the pod's aws-iam-token volume (EKS adds it "
            "when the service account has the eks.amazonaws.com/role-arn annotation)",
        ),
        "container_failed": (
            "network",
            "the EKS Pod Identity agent (or ECS agent) did not answer: check the "
            "eks-pod-identity-agent add-on and that a pod identity association exists for the "
            "delegate's service account",
        ),
        "imds_unreachable": (
            "network",
            "from a container, IMDSv2 needs a hop limit of 2 (aws ec2 "
            "modify-instance-metadata-options --http-put-response-hop-limit 2 --http-tokens required); "
            "on EKS, prefer IRSA or EKS Pod Identity for the delegate",
        ),
        "oidc_token_missing": (
            "invalid_config",
            "start the control plane with --oidc-issuer https://<its public URL> (the URL AWS fetches the "
            "keys from; see docs/oidc.md), or use another credential type for this connector",
        ),
        "no_credentials": (
            "credentials_invalid",
            "give the delegate an identity: IRSA (serviceAccount.roleArn), EKS "
            "Pod Identity, or an instance profile on the node",
        ),
    }
    category, hint = hints.get(exc.kind, ("credentials_invalid", "see the delegate's log"))
    return Diagnosis(category, str(exc), hint)


def _client_error(exc: ClientError, step: str, ctx: Context) -> Diagnosis:
    err: dict[str, Any] = exc.response.get("Error", {})
    code = str(err.get("Code") or "Unknown")
    message = _text(err.get("Message") or exc)
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    summary = f"{code}: {message}" if message else code

    if code in THROTTLING:
        return Diagnosis(
            "throttled",
            f"AWS throttled {step} ({summary})",
            "the request was retried and still throttled; try again shortly, or lower how many "
            "connectors are tested at once",
            code,
        )
    if code in SERVER_ERRORS or status >= 500:
        return Diagnosis(
            "network",
            f"AWS failed at {step} ({summary})",
            "a server-side error at AWS; it is usually transient, so test again",
            code,
        )
    if step == "resolve_credentials" and ctx.oidc is not None:
        return _oidc_error(code, message, summary, ctx.oidc, ctx.partition)
    if step == "resolve_credentials":
        return _web_identity_error(code, summary, ctx)
    if step == "assume_role":
        if code in DENIED:
            ext = (
                "the trust policy's sts:ExternalId condition must equal the connector's externalId"
                if ctx.external_id_set
                else "if the trust policy requires an External ID, set crossAccountAccess.externalId"
            )
            return Diagnosis(
                "assume_role_denied",
                f"AssumeRole of {ctx.role_arn} was denied ({summary})",
                f"the trust policy of {ctx.role_arn} must allow {_who(ctx)} to call sts:AssumeRole; "
                f"{ext}; and {_who(ctx)} needs sts:AssumeRole on that role in its own policy",
                code,
            )
        if code == "RegionDisabledException":
            return Diagnosis(
                "invalid_config",
                f"STS is not active in {ctx.region} ({summary})",
                f"activate STS in {ctx.region} (IAM > Account settings) or pick another test region",
                code,
            )
        if code == "ValidationError":
            return Diagnosis(
                "invalid_config",
                f"AssumeRole refused the request ({summary})",
                "check the role ARN, and that durationSeconds is within the role's maximum session duration",
                code,
            )
    if code in BAD_KEY:
        return Diagnosis(
            "credentials_invalid", f"{step} rejected the credentials ({summary})", _bad_key_hint(ctx), code
        )
    if code == "SignatureDoesNotMatch":
        ref = f" referenced by secretKeyRef ({ctx.secret_ref})" if ctx.secret_ref else ""
        hint = (
            f"the secret key does not belong to the access key: check the secret{ref}"
            if ctx.credential_type == "ManualConfig"
            else "the delegate's credentials are malformed"
        )
        return Diagnosis("credentials_invalid", f"{step}: the signature did not match ({code})", hint, code)
    if code in ("ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired"):
        hint = (
            "temporary credentials expired; they are renewed automatically, so test again, and check "
            "the delegate's clock"
        )
        if ctx.credential_type == "ManualConfig" and ctx.session_token_ref:
            hint = (
                f"the temporary keys have expired and nobody renews them: store a fresh session's keys and "
                f"token in the secrets (sessionTokenRef {ctx.session_token_ref}), or use long-term keys"
            )
        return Diagnosis("credentials_invalid", f"{step}: the session token has expired ({summary})", hint, code)
    if code in ("RequestExpired", "SignatureExpired", "RequestTimeTooSkewed"):
        return Diagnosis(
            "credentials_invalid",
            f"{step}: the request's time was refused ({summary})",
            "the delegate's clock is off by more than 5 minutes: fix time sync (NTP) on its node",
            code,
        )
    if code in ("OptInRequired", "InvalidRegion"):
        return Diagnosis(
            "invalid_config",
            f"{ctx.region} is not available to this account ({summary})",
            f"enable {ctx.region} for the account (Account > AWS Regions) or pick another test region",
            code,
        )
    if step == "describe_regions" and code in DENIED:
        return Diagnosis(
            "permission_denied",
            f"{_who(ctx)} may not call ec2:DescribeRegions ({code})",
            f'grant ec2:DescribeRegions (Resource "*") to {_who(ctx)}: every AWS connector needs it, as in Harness',
            code,
        )
    if step == "simulate_permissions":
        if code in DENIED:
            return Diagnosis(
                "permission_denied",
                f"the permission check was refused ({code})",
                f"grant iam:SimulatePrincipalPolicy on {_who(ctx)} to {_who(ctx)}, or remove "
                "permissionCheck from the connector",
                code,
            )
        if code in ("NoSuchEntity", "InvalidInput"):
            return Diagnosis(
                "invalid_config",
                f"IAM cannot simulate {_who(ctx)} ({summary})",
                "the permission check needs an IAM user or role; it cannot simulate the account root "
                "or a federated user",
                code,
            )
    if code in DENIED:
        return Diagnosis(
            "permission_denied", f"{step} was denied ({summary})", f"grant {_who(ctx)} what {step} needs", code
        )
    return Diagnosis(
        "internal" if status == 0 else "invalid_config",
        f"{step} failed ({summary})",
        "see the AWS error message above",
        code,
    )


def _oidc_error(code: str, message: str, summary: str, oidc: OidcContext, partition: str) -> Diagnosis:
    """AssumeRoleWithWebIdentity refused the control plane's token: which of AWS's checks failed, and the fix."""
    provider_arn = oidc.provider_arn(partition)
    text = message.lower()
    if code == "InvalidIdentityToken" and "no openidconnect provider" in text:
        return Diagnosis(
            "invalid_config",
            f"the role's account has no IAM identity provider for {oidc.issuer} ({summary})",
            f"create it in the account of {oidc.role_arn}: aws iam create-open-id-connect-provider --url "
            f"{oidc.issuer} --client-id-list {oidc.audience} (docs/oidc.md has the Terraform)",
            code,
        )
    if code == "InvalidIdentityToken" and "audience" in text:
        return Diagnosis(
            "invalid_config",
            f"the identity provider {oidc.provider} does not list the token's audience {oidc.audience} ({summary})",
            f"add it: aws iam add-client-id-to-open-id-connect-provider --open-id-connect-provider-arn "
            f"{provider_arn} --client-id {oidc.audience}; or set the connector's audience to a client ID the "
            "provider lists",
            code,
        )
    if code == "IDPCommunicationError" or (code == "InvalidIdentityToken" and "verification key" in text):
        return Diagnosis(
            "network",
            f"AWS could not fetch the signing keys of {oidc.issuer} ({summary})",
            f"AWS must reach {oidc.issuer}/.well-known/openid-configuration and its jwks_uri from the internet "
            "over https, with a certificate from a public CA, on port 443: check the ingress in front of the "
            "control plane and that --oidc-issuer is its public URL",
            code,
        )
    if code in ("ExpiredTokenException", "ExpiredToken"):
        return Diagnosis(
            "credentials_invalid",
            f"the control plane's OIDC token had expired when AWS checked it ({summary})",
            "tokens live 5 minutes from the task's hand-out: check the control plane's clock (NTP), and that "
            "the delegate started the task promptly; test again",
            code,
        )
    if code == "InvalidIdentityToken":
        return Diagnosis(
            "credentials_invalid",
            f"AWS refused the control plane's OIDC token ({summary})",
            f"the provider's URL must equal the token's issuer exactly ({oidc.issuer}), and its keys must be "
            "the ones the control plane publishes now: after restoring or replacing the OIDC key file, "
            "give AWS a few minutes to fetch the new keys, then test again",
            code,
        )
    if code in DENIED:
        return Diagnosis(
            "assume_role_denied",
            f"AssumeRoleWithWebIdentity into {oidc.role_arn} was denied ({summary})",
            f"either the role does not exist (check the connector's iamRoleArn), or its trust policy does not "
            f"allow this token: it must allow Principal {{Federated: {provider_arn}}}, Action "
            f'sts:AssumeRoleWithWebIdentity, with StringEquals "{oidc.provider}:sub": "{oidc.subject}" and '
            f'"{oidc.provider}:aud": "{oidc.audience}"',
            code,
        )
    if code == "ValidationError":
        return Diagnosis(
            "invalid_config",
            f"AssumeRoleWithWebIdentity refused the request ({summary})",
            "check the connector's iamRoleArn, and that the role's maximum session duration is at least 15 minutes",
            code,
        )
    return Diagnosis(
        "credentials_invalid", f"exchanging the OIDC token failed ({summary})", "see the AWS error message", code
    )


def _web_identity_error(code: str, summary: str, ctx: Context) -> Diagnosis:
    if code in ("InvalidIdentityToken", "IDPRejectedClaim"):
        return Diagnosis(
            "credentials_invalid",
            f"STS rejected the service account token ({summary})",
            "register the cluster's OIDC provider in IAM (eksctl utils associate-iam-oidc-provider) and "
            "make sure the token audience is sts.amazonaws.com",
            code,
        )
    if code in ("ExpiredTokenException", "ExpiredToken"):
        return Diagnosis(
            "credentials_invalid",
            f"the service account token has expired ({summary})",
            "kubelet renews the projected token; check AWS_WEB_IDENTITY_TOKEN_FILE points at it and the "
            "node's clock is right",
            code,
        )
    if code in DENIED:
        return Diagnosis(
            "assume_role_denied",
            f"AssumeRoleWithWebIdentity for {ctx.role_arn} was denied ({summary})",
            f"the trust policy of {ctx.role_arn} must allow sts:AssumeRoleWithWebIdentity from the "
            "cluster's OIDC provider, with the condition sub = system:serviceaccount:<namespace>:"
            "<service account> of this delegate",
            code,
        )
    if code in BAD_KEY or code == "SignatureDoesNotMatch":
        return Diagnosis(
            "credentials_invalid", f"the delegate's own credentials were rejected ({summary})", _bad_key_hint(ctx), code
        )
    return Diagnosis(
        "credentials_invalid", f"resolving credentials failed ({summary})", "see the AWS error message", code
    )


def _secret_hint(exc: SecretNotFound) -> str:
    name, place = exc.ref.name, exc.place
    on_control_plane = place == CONTROL_PLANE_SECRETS
    if exc.problem == "no_directory":
        if on_control_plane:
            return (
                f"start the control plane with --secrets-dir DIR holding the file {name!r}, or set "
                "executeOnDelegate: true so a delegate resolves the reference from its own Secret"
            )
        return f"set {place.setting} to the directory where the connectors' Secret is mounted, with the key {name!r}"
    if exc.problem == "empty":
        return (
            f"put the value into the key {name!r} of {place.store}: the key exists but holds nothing "
            "(an empty file given to kubectl create secret --from-file, or an unset template value)"
        )
    if exc.problem == "unreadable":
        return f"make the file {name!r} in {place.store} a regular file that {place.owner} may read"
    if exc.problem == "invalid":
        return "fix the reference in the connector, or the value of the secret it names"
    if on_control_plane:
        return (
            f"create the file {name!r} in the control plane's --secrets-dir, fix the reference "
            "in the connector, or set executeOnDelegate: true so a delegate resolves it"
        )
    return f"create the key {name!r} in {place.store}, or fix the reference in the connector"


def _custom_endpoint(exc: BotoCoreError, ctx: Context) -> tuple[str, str] | None:
    """(variable, URL) of the endpoint override the failing call went to, or None for AWS itself."""
    url = str(getattr(exc, "kwargs", {}).get("endpoint_url") or "")
    for variable, base in ctx.endpoints:
        if url.rstrip("/").startswith(base.rstrip("/")):
            return variable, base
    return None


def _custom_endpoint_unreachable(exc: BotoCoreError, step: str, variable: str, url: str) -> Diagnosis:
    error = getattr(exc, "kwargs", {}).get("error")
    refused = isinstance(error, ConnectionRefusedError) or getattr(error, "errno", None) == errno.ECONNREFUSED
    if refused:
        return Diagnosis(
            "network",
            f"the endpoint {url} (from {variable}) refused the connection at {step}",
            f"nothing is listening at {url}: start the service there, or fix or unset {variable} "
            "so the delegate calls AWS itself",
        )
    return Diagnosis(
        "network",
        f"cannot connect to the endpoint {url} (from {variable}) at {step}: {_text(exc)}",
        f"check that {url} is reachable from the delegate (host, port, proxy, NO_PROXY), or fix or unset {variable}",
    )


def _text(value: Any) -> str:
    return " ".join(str(value).split())[:400]
