"""AWS connector validation against moto on 127.0.0.1: every credential type, diagnoses, isolation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.aws.clients import AwsClients
from agent.aws.connector import AwsConnector, parse_connector
from agent.aws.environment import AwsEnvironment
from agent.aws.handler import AwsValidationHandler
from agent.aws.secrets import SecretStore
from agent.aws.validator import AwsValidator, StepObserver
from agent.observability.logging import Redactor
from agent.observability.metrics import AgentMetrics
from agent.taskapi import InvalidTask, TaskContext
from tests.awsfakes import ACCOUNT, FaultProxy, IamSimulator, Key, MotoIam, PodIdentityAgent
from tests.conftest import free_port

Validate = Callable[..., Awaitable[dict[str, Any]]]


def connector(
    cred: dict[str, Any],
    *,
    region: str | None = None,
    selectors: list[str] | None = None,
    cross: dict[str, Any] | None = None,
    **spec: Any,
) -> AwsConnector:
    credential = dict(cred)
    if region:
        credential["region"] = region
    if cross:
        credential["crossAccountAccess"] = cross
    doc = {
        "connector": {
            "name": "test",
            "type": "Aws",
            "spec": {"credential": credential, "delegateSelectors": selectors or ["eks"], **spec},
        }
    }
    return parse_connector(doc)


def manual(key: Key | None = None, **kw: Any) -> AwsConnector:
    ak = key.access_key if key else "AKIAIOSFODNN7EXAMPLE"
    return connector({"type": "ManualConfig", "spec": {"accessKey": ak, "secretKeyRef": "account.sk"}}, **kw)


@pytest.fixture
async def make_validator(moto: str, tmp_path: Path) -> AsyncIterator[Callable[..., AwsValidator]]:
    """Validators on moto; keyword arguments are extra environment variables for the delegate."""
    made: list[AwsValidator] = []

    def make(
        *,
        secrets: dict[str, str] | None = None,
        redactor: Redactor | None = None,
        observer: StepObserver | None = None,
        **env: str,
    ) -> AwsValidator:
        variables = {"AWS_ENDPOINT_URL": moto, "AWS_EC2_METADATA_DISABLED": "true", **env}
        aws_env, problems = AwsEnvironment.from_environ(variables)
        assert problems == []
        secrets_dir = tmp_path / f"secrets-{len(made)}"
        secrets_dir.mkdir()
        for name, value in (secrets or {}).items():
            (secrets_dir / name).write_text(value + "\n")
        redactor = redactor or Redactor()
        v = AwsValidator(
            aws_env,
            AwsClients(aws_env),
            SecretStore(secrets_dir, on_read=redactor.add),
            redact=redactor.value,
            observer=observer,
        )
        made.append(v)
        return v

    yield make
    for v in made:
        await v.close()


async def run(v: AwsValidator, c: AwsConnector, **kw: Any) -> dict[str, Any]:
    """The result as the control plane and the user receive it: the JSON document."""
    result = await v.validate(c, task_id="tsk_test", delegate_id="dlg_1", delegate_name="eks-1", **kw)
    return msgspec.to_builtins(result)  # type: ignore[no-any-return]


def steps(result: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["name"], s["status"]) for s in result["steps"]]


# --- credential types ----------------------------------------------------------------------------


async def test_access_key_with_a_secret_reference(moto: str, make_validator: Any) -> None:
    """ManualConfig: the secret key is read on the delegate; the result says who the key belongs to."""
    key = await MotoIam(moto).user("deployer", ["ec2:DescribeRegions"])
    v = make_validator(secrets={"sk": key.secret_key})
    result = await run(v, manual(key))
    assert result["status"] == "SUCCESS", result
    assert result["identity"] == {"account": ACCOUNT, "arn": key.arn, "userId": result["identity"]["userId"]}
    assert (result["testRegion"], result["partition"]) == ("us-east-1", "aws")
    assert steps(result) == [
        ("resolve_credentials", "SUCCESS"),
        ("get_caller_identity", "SUCCESS"),
        ("describe_regions", "SUCCESS"),
    ]
    assert all(isinstance(s["durationMs"], int) for s in result["steps"])
    assert result["credentialSource"].startswith("access key AKIA")
    assert key.secret_key not in json.dumps(result)


async def test_access_key_from_a_secret_reference_too(moto: str, make_validator: Any) -> None:
    """accessKeyRef resolves like secretKeyRef."""
    key = await MotoIam(moto).user("deployer")
    v = make_validator(secrets={"ak": key.access_key, "sk": key.secret_key})
    c = connector({"type": "ManualConfig", "spec": {"accessKeyRef": "org.ak", "secretKeyRef": "sk"}})
    result = await run(v, c)
    assert result["identity"]["arn"] == key.arn


async def test_irsa_uses_the_injected_role_and_token_file(make_validator: Any, tmp_path: Path) -> None:
    """Irsa: AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE, as EKS injects them."""
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZDpkIn0.sig")
    v = make_validator(
        AWS_ROLE_ARN=f"arn:aws:iam::{ACCOUNT}:role/delegate-irsa", AWS_WEB_IDENTITY_TOKEN_FILE=str(token)
    )
    result = await run(v, connector({"type": "Irsa"}))
    assert result["status"] == "SUCCESS", result
    assert result["identity"]["arn"].startswith(f"arn:aws:sts::{ACCOUNT}:assumed-role/delegate-irsa/")
    assert "IRSA web identity" in result["credentialSource"]


async def test_irsa_without_the_annotation_says_so(make_validator: Any) -> None:
    """No injected variables: the failure points at the service account annotation."""
    result = await run(make_validator(), connector({"type": "Irsa"}))
    assert result["status"] == "FAILURE"
    assert result["failure"]["step"] == "resolve_credentials"
    assert result["failure"]["category"] == "invalid_config"
    assert "eks.amazonaws.com/role-arn" in result["failure"]["hint"]
    assert steps(result)[1:] == [("get_caller_identity", "SKIPPED"), ("describe_regions", "SKIPPED")]


async def test_irsa_with_a_missing_token_file(make_validator: Any, tmp_path: Path) -> None:
    """A token file that is not there fails early with the path named, not late with a traceback."""
    v = make_validator(AWS_ROLE_ARN=f"arn:aws:iam::{ACCOUNT}:role/r", AWS_WEB_IDENTITY_TOKEN_FILE=str(tmp_path / "x"))
    result = await run(v, connector({"type": "Irsa"}))
    assert result["failure"]["category"] == "invalid_config"
    assert str(tmp_path / "x") in result["errorSummary"]


async def test_inherit_from_delegate_via_instance_metadata(moto: str, make_validator: Any) -> None:
    """InheritFromDelegate: the default chain reaches the instance role over IMDSv2 (moto serves IMDS)."""
    v = make_validator(AWS_EC2_METADATA_DISABLED="false", AWS_EC2_METADATA_SERVICE_ENDPOINT=moto)
    result = await run(v, connector({"type": "InheritFromDelegate"}))
    assert result["status"] == "SUCCESS", result
    assert result["credentialSource"].startswith("instance profile via IMDSv2")


async def test_inherit_from_delegate_via_pod_identity(moto: str, make_validator: Any, tmp_path: Path) -> None:
    """EKS Pod Identity: the container provider sends the token file's contents to the agent endpoint."""
    key = await MotoIam(moto).user("pod-role")
    token = tmp_path / "eks-pod-identity-token"
    token.write_text("pod-identity-jwt")
    agent = PodIdentityAgent("pod-identity-jwt", key)
    async with agent.running() as endpoint:
        v = make_validator(
            AWS_CONTAINER_CREDENTIALS_FULL_URI=endpoint, AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=str(token)
        )
        result = await run(v, connector({"type": "InheritFromDelegate"}))
    assert result["status"] == "SUCCESS", result
    assert result["identity"]["arn"] == key.arn
    assert agent.seen_tokens == ["pod-identity-jwt"]


async def test_inherit_from_delegate_with_environment_keys(moto: str, make_validator: Any) -> None:
    """The default chain starts with the delegate's own environment."""
    key = await MotoIam(moto).user("env-user")
    v = make_validator(AWS_ACCESS_KEY_ID=key.access_key, AWS_SECRET_ACCESS_KEY=key.secret_key)
    result = await run(v, connector({"type": "InheritFromDelegate"}))
    assert result["identity"]["arn"] == key.arn
    assert "environment" in result["credentialSource"]


async def test_unreachable_instance_metadata_hints_at_the_hop_limit(make_validator: Any) -> None:
    """From a container, IMDSv2 needs a hop limit of 2: the hint says so."""
    v = make_validator(
        AWS_EC2_METADATA_DISABLED="false", AWS_EC2_METADATA_SERVICE_ENDPOINT=f"http://127.0.0.1:{free_port()}"
    )
    result = await run(v, connector({"type": "InheritFromDelegate"}))
    assert result["failure"]["category"] == "network"
    assert "hop-limit 2" in result["failure"]["hint"]
    assert "no AWS_ACCESS_KEY_ID" in result["errorSummary"]


# --- cross-account -------------------------------------------------------------------------------


@pytest.fixture
async def cross_account(moto: str) -> dict[str, Any]:
    iam = MotoIam(moto)
    limited = await iam.user("limited", ["sts:AssumeRole"])
    role = await iam.role("xacct", trusted=limited.arn, external_id="ext-123")
    return {"key": limited, "role": role}


async def test_cross_account_with_the_right_external_id(
    make_validator: Any, cross_account: dict[str, Any], iam_enforced: None
) -> None:
    """AssumeRole with the External ID; the identity is the assumed role, the session names delegate and task."""
    key, role = cross_account["key"], cross_account["role"]
    v = make_validator(secrets={"sk": key.secret_key})
    result = await run(v, manual(key, cross={"crossAccountRoleArn": role, "externalId": "ext-123"}))
    assert result["status"] == "SUCCESS", result
    assert result["identity"]["arn"] == f"arn:aws:sts::{ACCOUNT}:assumed-role/xacct/eks-1@tsk_test"
    assert [s for s, _ in steps(result)] == [
        "resolve_credentials",
        "assume_role",
        "get_caller_identity",
        "describe_regions",
    ]
    assert "ext-123" not in json.dumps(result)  # the External ID is treated as a secret too


async def test_cross_account_with_the_wrong_external_id(
    make_validator: Any, cross_account: dict[str, Any], iam_enforced: None
) -> None:
    """A wrong External ID is an assume_role_denied at assume_role, naming the role and the principal."""
    key, role = cross_account["key"], cross_account["role"]
    v = make_validator(secrets={"sk": key.secret_key})
    result = await run(v, manual(key, cross={"crossAccountRoleArn": role, "externalId": "wrong-id"}))
    assert result["status"] == "FAILURE"
    f = result["failure"]
    assert (f["step"], f["category"], f["awsErrorCode"]) == ("assume_role", "assume_role_denied", "AccessDenied")
    assert role in f["hint"] and key.arn in f["hint"]
    assert "sts:ExternalId" in f["hint"]
    assert ("get_caller_identity", "SKIPPED") in steps(result)


async def test_cross_account_lands_in_the_other_account(make_validator: Any) -> None:
    """The role's account is who the test reports (no trust policy needed with enforcement off)."""
    v = make_validator(secrets={"sk": "x"})
    result = await run(v, manual(cross={"crossAccountRoleArn": "arn:aws:iam::210987654321:role/deploy"}))
    assert result["identity"]["account"] == "210987654321"


# --- temporary keys (sessionTokenRef) ------------------------------------------------------------


@pytest.fixture
async def temporary_keys(moto: str) -> dict[str, str]:
    """A session of a role, as sts:AssumeRole hands it out: ASIA... key, secret key and session token."""
    from tests.awsfakes import assume_role_session

    role = await MotoIam(moto).role("temporary", trusted=f"arn:aws:iam::{ACCOUNT}:root")
    creds = await assume_role_session(moto, role, "handed-out")
    return {"ak": creds["AccessKeyId"], "sk": creds["SecretAccessKey"], "st": creds["SessionToken"]}


def temporary(session_token_ref: str | None = "account.st") -> AwsConnector:
    spec = {"accessKeyRef": "account.ak", "secretKeyRef": "account.sk"}
    if session_token_ref:
        spec["sessionTokenRef"] = session_token_ref
    return connector({"type": "ManualConfig", "spec": spec})


async def test_temporary_keys_are_signed_with_their_session_token(
    make_validator: Any, temporary_keys: dict[str, str], iam_enforced: None
) -> None:
    """sessionTokenRef is resolved like the keys and sent with them: moto (enforcing) accepts the session."""
    v = make_validator(secrets=temporary_keys)
    result = await run(v, temporary())
    assert result["status"] == "SUCCESS", result
    assert result["identity"]["arn"] == f"arn:aws:sts::{ACCOUNT}:assumed-role/temporary/handed-out"
    assert result["credentialSource"].endswith("and session token account.st")
    text = json.dumps(result)
    assert temporary_keys["st"] not in text and temporary_keys["sk"] not in text


@pytest.mark.parametrize("token", ["missing", "wrong"])
async def test_temporary_keys_without_their_token_say_so(
    make_validator: Any, temporary_keys: dict[str, str], iam_enforced: None, token: str
) -> None:
    """Without the session token, or with another session's, AWS refuses the keys and the hint says why."""
    secrets = dict(temporary_keys, st="FwoGZXIvYXdzEOtherSessionsToken")
    v = make_validator(secrets=secrets)
    result = await run(v, temporary(None if token == "missing" else "account.st"))
    f = result["failure"]
    assert (f["step"], f["category"]) == ("get_caller_identity", "credentials_invalid"), f
    if token == "missing":
        assert "add sessionTokenRef" in f["hint"]
    else:
        assert "sessionTokenRef (account.st) may belong to other keys" in f["hint"]


# --- partitions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("region", "partition"), [("us-gov-west-1", "aws-us-gov"), ("cn-north-1", "aws-cn")])
async def test_govcloud_and_china_test_regions(make_validator: Any, region: str, partition: str) -> None:
    """The test region's partition decides the endpoints and signing; the identity is in that partition."""
    v = make_validator(secrets={"sk": "x"})
    result = await run(v, manual(region=region))
    assert result["status"] == "SUCCESS", result
    assert (result["testRegion"], result["partition"]) == (region, partition)
    assert result["identity"]["arn"].startswith(f"arn:{partition}:")


async def test_endpoints_follow_the_partition_without_overrides() -> None:
    """Without AWS_ENDPOINT_URL, STS is regional and each partition has its own DNS suffix.

    The clients are only built, never called: nothing here leaves the machine (the suite's
    ``loopback_only`` guard would fail the test on any lookup of these hosts).
    """
    env, _ = AwsEnvironment.from_environ({})
    clients = AwsClients(env)
    try:
        expected = {
            ("sts", "us-gov-west-1"): "https://sts.us-gov-west-1.amazonaws.com",
            ("sts", "cn-north-1"): "https://sts.cn-north-1.amazonaws.com.cn",
            ("ec2", "cn-north-1"): "https://ec2.cn-north-1.amazonaws.com.cn",
            ("sts", "eu-west-1"): "https://sts.eu-west-1.amazonaws.com",
            ("iam", "us-gov-west-1"): "https://iam.us-gov.amazonaws.com",
        }
        for (service, region), url in expected.items():
            async with clients.client(service, region) as client:
                assert client.meta.endpoint_url == url
    finally:
        await clients.close()
    legacy_env, _ = AwsEnvironment.from_environ({"AWS_STS_REGIONAL_ENDPOINTS": "legacy"})
    legacy = AwsClients(legacy_env)
    try:
        async with legacy.client("sts", "us-east-1") as client:
            assert client.meta.endpoint_url == "https://sts.amazonaws.com"
    finally:
        await legacy.close()


async def test_a_partition_mismatch_is_a_configuration_error_before_any_call(make_validator: Any) -> None:
    """A commercial role tested from a GovCloud region fails on the delegate without an AWS call."""
    handler = AwsValidationHandler(make_validator())
    doc = {
        "connector": {
            "name": "x",
            "type": "Aws",
            "spec": {
                "credential": {
                    "type": "Irsa",
                    "region": "us-gov-west-1",
                    "crossAccountAccess": {"crossAccountRoleArn": "arn:aws:iam::123456789012:role/x"},
                },
                "delegateSelectors": ["gov"],
            },
        }
    }
    outcome = await handler(TaskContext("t", "aws.validate-connector", {"connector": doc}, "d", "n", 30))
    assert outcome.status == "FAILURE"
    assert outcome.failure is not None and outcome.failure.category == "invalid_config"
    assert outcome.errors[0].message.startswith("connector.spec.credential.crossAccountAccess.crossAccountRoleArn:")
    assert "never cross partitions" in (outcome.error_summary or "")


# --- failures and hints --------------------------------------------------------------------------


async def test_a_user_without_describe_regions(moto: str, make_validator: Any, iam_enforced: None) -> None:
    """Identity succeeds, DescribeRegions is denied: permission_denied with the grant to add."""
    key = await _seeded_user(moto, "nodescribe", ["s3:ListBucket"])
    v = make_validator(secrets={"sk": key.secret_key})
    result = await run(v, manual(key))
    assert result["identity"]["arn"] == key.arn
    f = result["failure"]
    assert (f["step"], f["category"]) == ("describe_regions", "permission_denied")
    assert f["awsErrorCode"] in ("AccessDenied", "UnauthorizedOperation")
    assert "ec2:DescribeRegions" in f["hint"] and key.arn in f["hint"]


async def _seeded_user(moto: str, name: str, actions: list[str]) -> Key:
    # Users must exist before enforcement; the fixture order (iam_enforced last) does not allow
    # that here, so switch enforcement off briefly while seeding.
    from tests.awsfakes import moto_api

    moto_api(moto, "/moto-api/reset-auth", b"inf")
    try:
        return await MotoIam(moto).user(name, actions)
    finally:
        moto_api(moto, "/moto-api/reset-auth", b"0")


@pytest.mark.parametrize(
    ("which", "code"), [("unknown", "InvalidClientTokenId"), ("wrong-secret", "SignatureDoesNotMatch")]
)
async def test_bad_keys(moto: str, make_validator: Any, iam_enforced: None, which: str, code: str) -> None:
    """An unknown key and a wrong secret get different codes and different hints."""
    key = await _seeded_user(moto, "someone", ["ec2:DescribeRegions"])
    if which == "unknown":
        key = Key("ghost", "AKIAUNKNOWN000000000", key.secret_key)
    v = make_validator(secrets={"sk": "definitely-not-the-secret" if which == "wrong-secret" else key.secret_key})
    result = await run(v, manual(key))
    f = result["failure"]
    assert (f["step"], f["category"], f["awsErrorCode"]) == ("get_caller_identity", "credentials_invalid", code)
    if code == "SignatureDoesNotMatch":
        assert "account.sk" in f["hint"]
    else:
        assert "does not recognise the access key" in f["hint"]


async def test_a_missing_secret_names_the_reference_and_calls_nobody(make_validator: Any) -> None:
    """secret_not_found names the reference and the directory; no AWS call is made."""
    v = make_validator()
    result = await run(v, manual())
    f = result["failure"]
    assert (f["step"], f["category"]) == ("resolve_credentials", "secret_not_found")
    assert "account.sk" in result["errorSummary"]
    assert steps(result) == [
        ("resolve_credentials", "FAILURE"),
        ("get_caller_identity", "SKIPPED"),
        ("describe_regions", "SKIPPED"),
    ]


async def test_unreachable_endpoint_is_a_network_failure(make_validator: Any) -> None:
    """A closed port is a network failure naming the endpoint that refused (and retries are bounded)."""
    closed = f"http://127.0.0.1:{free_port()}"
    v = make_validator(secrets={"sk": "x"}, AWS_ENDPOINT_URL_EC2=closed, AWS_MAX_ATTEMPTS="1")
    result = await run(v, manual())
    f = result["failure"]
    assert (f["step"], f["category"]) == ("describe_regions", "network")
    assert closed in f["hint"] and "AWS_ENDPOINT_URL_EC2" in f["hint"]
    assert result["identity"] is not None  # STS still went to moto: per-service endpoints are honoured


async def test_a_hanging_endpoint_times_out_within_the_budget(moto: str, make_validator: Any) -> None:
    """A black hole costs the test its bound, not forever; the failure says timeout at that step."""
    proxy = FaultProxy(moto)
    proxy.plan = ["pass", "hang", "hang", "hang"]
    async with proxy.running() as url:
        v = make_validator(secrets={"sk": "x"}, AWS_ENDPOINT_URL=url, AWS_MAX_ATTEMPTS="1")
        result = await run(v, manual(), timeout=1.5)
    f = result["failure"]
    assert (f["step"], f["category"]) == ("describe_regions", "timeout")


# --- every failed step is a failed step in the metrics -----------------------------------------


def step_counts(m: AgentMetrics, step: str) -> tuple[float | None, float | None]:
    """How many times ``step`` was recorded as a success and as a failure."""
    name = "delegate_aws_validation_step_duration_seconds_count"
    get = m.registry.get_sample_value
    return get(name, {"step": step, "status": "success"}), get(name, {"step": step, "status": "failure"})


async def test_a_region_not_opted_in_is_a_failed_step_in_the_metrics(moto: str, make_validator: Any) -> None:
    """DescribeRegions answers, but the region is not enabled: the step fails, and metrics say so once."""
    key = await MotoIam(moto).user("deployer")
    m = AgentMetrics(name="optin")
    v = make_validator(secrets={"sk": key.secret_key}, observer=m.observe_aws_step)
    result = await run(v, manual(key, region="ap-east-1"))  # moto: an opt-in region this account lacks
    f = result["failure"]
    assert (f["step"], f["category"], f["awsErrorCode"]) == ("describe_regions", "invalid_config", "OptInRequired")
    assert steps(result)[-1] == ("describe_regions", "FAILURE")
    assert step_counts(m, "describe_regions") == (None, 1)
    assert step_counts(m, "get_caller_identity") == (1, None)
    labels = {"step": "describe_regions", "category": "invalid_config", "credential_type": "manualconfig"}
    assert m.registry.get_sample_value("delegate_aws_validation_failures_total", labels) == 1


async def test_denied_permissions_are_a_failed_step_in_the_metrics(moto: str, make_validator: Any) -> None:
    """The simulation answers with a denial: simulate_permissions is counted as failed, not succeeded."""
    key = await MotoIam(moto).user("ci")
    m = AgentMetrics(name="denied")
    async with IamSimulator({"s3:GetObject": "implicitDeny"}).running() as iam_url:
        v = make_validator(secrets={"sk": key.secret_key}, AWS_ENDPOINT_URL_IAM=iam_url, observer=m.observe_aws_step)
        result = await run(v, manual(key), permissions=("s3:GetObject",))
    assert result["failure"]["category"] == "permission_denied"
    assert step_counts(m, "simulate_permissions") == (None, 1)
    labels = {"step": "simulate_permissions", "category": "permission_denied", "credential_type": "manualconfig"}
    assert m.registry.get_sample_value("delegate_aws_validation_failures_total", labels) == 1


async def test_a_step_cut_short_by_the_bound_is_a_failed_step_in_the_metrics(moto: str, make_validator: Any) -> None:
    """The test's own timeout ends a hanging call: that step is counted as failed with category timeout."""
    proxy = FaultProxy(moto)
    proxy.plan = ["pass", "hang", "hang", "hang"]
    m = AgentMetrics(name="bound")
    async with proxy.running() as url:
        v = make_validator(secrets={"sk": "x"}, AWS_ENDPOINT_URL=url, AWS_MAX_ATTEMPTS="1", observer=m.observe_aws_step)
        result = await run(v, manual(), timeout=1.5)
    assert result["failure"]["category"] == "timeout"
    assert step_counts(m, "describe_regions") == (None, 1)
    labels = {"step": "describe_regions", "category": "timeout", "credential_type": "manualconfig"}
    assert m.registry.get_sample_value("delegate_aws_validation_failures_total", labels) == 1


async def test_throttling_is_retried_then_reported(moto: str, make_validator: Any) -> None:
    """Throttling is retried AWS_MAX_ATTEMPTS times in all, then reported as throttled."""
    proxy = FaultProxy(moto)
    proxy.plan = [400, 400, 400]
    async with proxy.running() as url:
        v = make_validator(secrets={"sk": "x"}, AWS_ENDPOINT_URL=url, AWS_MAX_ATTEMPTS="3")
        result = await run(v, manual())
    assert result["failure"]["category"] == "throttled"
    assert result["failure"]["awsErrorCode"] == "Throttling"
    assert proxy.requests == 3


async def test_the_connectors_backoff_override_sets_the_attempts(moto: str, make_validator: Any) -> None:
    """awsSdkClientBackOffStrategyOverride.retryCount maps onto botocore's attempts (retries + 1)."""
    proxy = FaultProxy(moto)
    proxy.plan = [503, 503, "pass", 503, 503, 503]
    backoff = {"type": "FixedDelayBackoffStrategy", "spec": {"fixedBackoff": 10, "retryCount": 2}}
    async with proxy.running() as url:
        v = make_validator(secrets={"sk": "x"}, AWS_ENDPOINT_URL=url, AWS_MAX_ATTEMPTS="1")
        result = await run(v, manual(awsSdkClientBackOffStrategyOverride=backoff))
    # GetCallerIdentity succeeded on the 3rd try; DescribeRegions failed after its 3 tries.
    assert result["identity"] is not None
    assert result["failure"]["step"] == "describe_regions"
    assert result["failure"]["category"] == "network"
    assert proxy.requests == 6


# --- the permission check ------------------------------------------------------------------------


async def test_the_permission_check_reports_denied_actions(moto: str, make_validator: Any) -> None:
    """iam:SimulatePrincipalPolicy (a local stub: moto lacks this API) lists what a pipeline would miss."""
    key = await MotoIam(moto).user("ci")
    sim = IamSimulator({"s3:GetObject": "allowed", "ecs:UpdateService": "implicitDeny", "iam:PassRole": "explicitDeny"})
    async with sim.running() as iam_url:
        v = make_validator(secrets={"sk": key.secret_key}, AWS_ENDPOINT_URL_IAM=iam_url)
        c = manual(key, permissionCheck={"actions": ["s3:GetObject", "ecs:UpdateService"]})
        result = await run(v, c, permissions=("iam:PassRole",))
    check = result["permissionCheck"]
    assert check["principal"] == key.arn
    assert check["allowed"] == ["s3:GetObject"]
    assert check["denied"] == [
        {"action": "ecs:UpdateService", "decision": "implicitDeny"},
        {"action": "iam:PassRole", "decision": "explicitDeny"},
    ]
    f = result["failure"]
    assert (f["step"], f["category"]) == ("simulate_permissions", "permission_denied")
    assert "explicit Deny" in f["hint"]
    assert sim.calls[0]["PolicySourceArn"] == [key.arn]


async def test_the_permission_check_simulates_the_role_not_the_session(make_validator: Any) -> None:
    """For an assumed role, the simulated principal is the role ARN (with its path), not the session."""
    sim = IamSimulator({"s3:GetObject": "allowed"})
    role = "arn:aws:iam::210987654321:role/team/deploy"
    async with sim.running() as iam_url:
        v = make_validator(secrets={"sk": "x"}, AWS_ENDPOINT_URL_IAM=iam_url)
        result = await run(v, manual(cross={"crossAccountRoleArn": role}), permissions=("s3:GetObject",))
    assert result["status"] == "SUCCESS", result
    assert sim.calls[0]["PolicySourceArn"] == [role]


async def test_a_refused_permission_check_says_what_to_grant(moto: str, make_validator: Any) -> None:
    """Without iam:SimulatePrincipalPolicy the check itself fails, and says so."""
    key = await MotoIam(moto).user("ci")
    sim = IamSimulator({}, deny_caller=True)
    async with sim.running() as iam_url:
        v = make_validator(secrets={"sk": key.secret_key}, AWS_ENDPOINT_URL_IAM=iam_url)
        result = await run(v, manual(key), permissions=("s3:GetObject",))
    assert result["failure"]["category"] == "permission_denied"
    assert "iam:SimulatePrincipalPolicy" in result["failure"]["hint"]


# --- the handler, isolation and secrets ----------------------------------------------------------


async def test_the_handler_refuses_a_payload_without_a_connector(make_validator: Any) -> None:
    """An invalid task names the field; the executor turns it into a FAILURE."""
    handler = AwsValidationHandler(make_validator())
    with pytest.raises(InvalidTask) as err:
        await handler(TaskContext("t", "aws.validate-connector", {}, "d", "n", 30))
    assert err.value.field == "payload.connector"
    with pytest.raises(InvalidTask) as err2:
        await handler(
            TaskContext(
                "t",
                "aws.validate-connector",
                {"connector": manual().to_document(), "permissions": ["nonsense"]},
                "d",
                "n",
                30,
            )
        )
    assert err2.value.field == "payload.permissions[0]"


async def test_fifty_connectors_at_once_never_cross_credentials(moto: str, make_validator: Any) -> None:
    """50 concurrent validations on shared clients, each with its own credentials, each sees itself."""
    iam = MotoIam(moto)
    users = await asyncio.gather(*(iam.user(f"user{i}") for i in range(25)))
    v = make_validator(secrets={f"sk{i}": u.secret_key for i, u in enumerate(users)})
    jobs: list[tuple[str, AwsConnector]] = []
    for i, u in enumerate(users):
        c = connector({"type": "ManualConfig", "spec": {"accessKey": u.access_key, "secretKeyRef": f"sk{i}"}})
        jobs.append((u.arn, c))
    for i in range(25):
        account = f"{200000000000 + i}"
        c = connector(
            {"type": "ManualConfig", "spec": {"accessKey": users[i].access_key, "secretKeyRef": f"sk{i}"}},
            cross={"crossAccountRoleArn": f"arn:aws:iam::{account}:role/r{i}"},
        )
        jobs.append((f"arn:aws:sts::{account}:assumed-role/r{i}/eks-1@t{25 + i}", c))
    results = await asyncio.gather(
        *(v.validate(c, task_id=f"t{i}", delegate_id="d", delegate_name="eks-1") for i, (_, c) in enumerate(jobs))
    )
    assert [r.identity.arn for r in results if r.identity] == [arn for arn, _ in jobs]
    assert len(v.clients) <= 3  # shared: one client per service for the region, not one per connector


async def test_a_canary_secret_never_appears_in_results_or_logs(
    moto: str, make_validator: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The secret key's value is not in any result, success or failure, nor in any log line."""
    canary = "CANARY-s3cr3t-value-9f8e7d6c5b4a"
    redactor = Redactor()
    v = make_validator(secrets={"sk": canary}, redactor=redactor)
    outcomes = [
        await run(v, manual()),
        await run(
            v, manual(cross={"crossAccountRoleArn": "arn:aws:iam::210987654321:role/x", "externalId": "ext-canary-123"})
        ),
    ]
    handler = AwsValidationHandler(v)
    outcome = await handler(
        TaskContext("t", "aws.validate-connector", {"connector": manual().to_document()}, "d", "n", 30)
    )
    text = json.dumps([*outcomes, msgspec.to_builtins(outcome)]) + capsys.readouterr().err
    assert canary not in text
    assert canary in redactor.text(f"x{canary}y") or redactor.text(canary) == "[REDACTED]"


async def test_platform_mode_runs_the_same_validator_in_the_control_plane(
    moto: str, control_plane_factory: Any, http: Any, tmp_path: Path
) -> None:
    """executeOnDelegate: false is tested by the control plane itself, with secrets from its own dir."""
    from agent.controlplane.platform import PlatformValidation
    from tests.conftest import API_KEY

    key = await MotoIam(moto).user("platform-user")
    secrets = tmp_path / "cp-secrets"
    secrets.mkdir()
    (secrets / "sk").write_text(key.secret_key)
    env, _ = AwsEnvironment.from_environ({"AWS_ENDPOINT_URL": moto, "AWS_EC2_METADATA_DISABLED": "true"})
    validation = PlatformValidation(AwsValidator(env, AwsClients(env), SecretStore(secrets)))
    cp = await control_plane_factory(platform_validator=validation)
    doc = manual(key).to_document()
    doc["connector"]["spec"]["executeOnDelegate"] = False
    await cp.core.apply_connector(doc)
    async with http.post(cp.url + "/api/v1/connectors/test/test", headers={"X-API-Key": API_KEY}) as resp:
        view = await resp.json()
    assert (view["status"], view["delegateName"]) == ("SUCCESS", "platform")
    assert view["result"]["identity"]["arn"] == key.arn
    # Harness's shape too: run by the platform, so no delegate; epoch milliseconds; no errors.
    harness = view["harness"]
    assert (harness["status"], harness["delegateId"], harness["errors"], harness["taskId"]) == (
        "SUCCESS",
        None,
        [],
        view["taskId"],
    )
    assert isinstance(harness["testedAt"], int)


def test_the_secret_store_reads_mounted_keys_and_refuses_paths(tmp_path: Path) -> None:
    """Kubernetes mounts keys as symlinks into ..data/ (followed); a name with a path in it is refused
    even if a parser upstream let it through, and the error names the reference, not a value."""
    from agent.aws.connector import SecretRef
    from agent.aws.secrets import SecretNotFound

    data = tmp_path / "..2026_11_30"
    data.mkdir()
    (data / "sk").write_text("mounted-secret-value\n")
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / "sk").symlink_to("..data/sk")
    (tmp_path.parent / "outside").write_text("not-yours")
    seen: list[str] = []
    store = SecretStore(tmp_path, on_read=seen.append)
    assert store.resolve(SecretRef(raw="account.sk", scope="account", name="sk")) == "mounted-secret-value"
    assert seen == ["mounted-secret-value"]
    for name in ("../outside", "..", "a/b"):
        with pytest.raises(SecretNotFound, match="not a plain file name") as info:
            store.resolve(SecretRef(raw=name, scope="project", name=name))
        assert "not-yours" not in str(info.value)


def test_a_secret_that_is_not_a_readable_file_is_named_with_why(tmp_path: Path) -> None:
    """Each way a mounted key can fail to read gives its own problem and message, never a value."""
    import os

    from agent.aws.connector import SecretRef
    from agent.aws.secrets import MAX_SECRET_BYTES, SecretNotFound

    (tmp_path / "adir").mkdir()
    (tmp_path / "huge").write_text("x" * (MAX_SECRET_BYTES + 1))
    (tmp_path / "nul").write_bytes(b"abc\0def")
    (tmp_path / "latin").write_bytes(b"caf\xe9-secret")
    locked = tmp_path / "locked"
    locked.write_text("locked-secret-value")
    locked.chmod(0)
    store = SecretStore(tmp_path)
    cases = [
        ("adir", "unreadable", "it is a directory"),
        ("absent", "missing", "has no file 'absent'"),
        ("huge", "invalid", f"larger than {MAX_SECRET_BYTES} bytes"),
        ("nul", "invalid", "control character"),
        ("latin", "invalid", "not UTF-8"),
    ]
    if os.geteuid() != 0:  # root reads a mode-0 file
        cases.append(("locked", "unreadable", "may not read the file 'locked'"))
    for name, problem, message in cases:
        with pytest.raises(SecretNotFound, match=message) as info:
            store.resolve(SecretRef(raw=f"account.{name}", scope="account", name=name))
        assert info.value.problem == problem and f"account.{name}" in str(info.value)
        assert "secret-value" not in str(info.value) and "abc" not in str(info.value)
