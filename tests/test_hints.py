"""Hints that fit: each makes the mistake, runs the real validator against moto, and reads the hint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiobotocore.session import AioSession

from agent.aws.environment import AwsEnvironment
from agent.controlplane.app import ControlPlaneConfig, ControlPlaneService
from agent.controlplane.platform import platform_validator_from_env
from agent.observability.logging import Redactor
from tests.awsfakes import ACCOUNT, ADMIN_KEY, MotoIam, assume_role_session, moto_api
from tests.conftest import API_KEY, TOKEN, ControlPlaneFactory, free_port
from tests.test_aws_validation import connector, make_validator, manual, run

__all__ = ["make_validator"]  # the fixture, shared with tests/test_aws_validation.py


async def _role_with_path(moto: str, name: str, path: str, *, trusted: str, actions: list[str]) -> str:
    """A role under an IAM path (the path is in its ARN but never in a session ARN)."""
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": trusted}, "Action": "sts:AssumeRole"}],
    }
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
    async with AioSession().create_client(
        "iam",
        region_name="us-east-1",
        endpoint_url=moto,
        aws_access_key_id=ADMIN_KEY[0],
        aws_secret_access_key=ADMIN_KEY[1],
    ) as iam:
        role = await iam.create_role(RoleName=name, Path=path, AssumeRolePolicyDocument=json.dumps(trust))
        await iam.put_role_policy(RoleName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
    return str(role["Role"]["Arn"])


async def _session_of(moto: str, role_arn: str) -> dict[str, str]:
    """Temporary credentials of ``role_arn`` (as a node's instance profile would hand out)."""
    creds = await assume_role_session(moto, role_arn, "i-0123456789")
    return {
        "AWS_ACCESS_KEY_ID": creds["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"],
        "AWS_SESSION_TOKEN": creds["SessionToken"],
    }


async def test_a_policy_hint_for_an_assumed_role_names_the_role_not_the_session(moto: str, make_validator: Any) -> None:
    """DescribeRegions denied to an assumed role: the grant names arn:aws:iam::ACCOUNT:role/PATH/NAME."""
    user = await MotoIam(moto).user("hopper", ["sts:AssumeRole"])
    role = await _role_with_path(moto, "deploy-ro", "/team/", trusted=user.arn, actions=["s3:ListBucket"])
    assert role == f"arn:aws:iam::{ACCOUNT}:role/team/deploy-ro"
    moto_api(moto, "/moto-api/reset-auth", b"0")  # enforcement on, after seeding (the fixture turns it off)
    v = make_validator(secrets={"sk": user.secret_key})
    result = await run(v, manual(user, cross={"crossAccountRoleArn": role}))
    f = result["failure"]
    assert (f["step"], f["category"]) == ("describe_regions", "permission_denied"), result
    assert result["identity"]["arn"].startswith(f"arn:aws:sts::{ACCOUNT}:assumed-role/deploy-ro/")
    assert f'grant ec2:DescribeRegions (Resource "*") to {role}:' in f["hint"]
    assert "assumed-role" not in f["hint"] and "assumed-role" not in result["errorSummary"]


async def test_a_trust_hint_for_a_delegate_on_a_role_names_that_role(moto: str, make_validator: Any) -> None:
    """The delegate's own identity is a role session; the refused AssumeRole's hint names its role ARN."""
    iam = MotoIam(moto)
    node = await iam.role("node-role", trusted=f"arn:aws:iam::{ACCOUNT}:root", actions=["ec2:Describe*"])
    target = await iam.role("deploy", trusted=f"arn:aws:iam::{ACCOUNT}:user/someone-else")
    session = await _session_of(moto, node)
    moto_api(moto, "/moto-api/reset-auth", b"0")
    v = make_validator(**session)
    result = await run(v, connector({"type": "InheritFromDelegate"}, cross={"crossAccountRoleArn": target}))
    f = result["failure"]
    assert (f["step"], f["category"]) == ("assume_role", "assume_role_denied"), result
    assert f"must allow {node} to call sts:AssumeRole" in f["hint"]
    assert "assumed-role" not in f["hint"]


async def test_an_empty_secret_file_says_it_is_empty(make_validator: Any, tmp_path: Path) -> None:
    """A key that exists but holds nothing is not "not found": the message and hint say it is empty."""
    v = make_validator(secrets={"sk": ""})
    assert v.secrets.directory is not None
    for content in (b"", b"  \n"):
        (v.secrets.directory / "sk").write_bytes(content)
        result = await run(v, manual())
        f = result["failure"]
        assert (f["step"], f["category"]) == ("resolve_credentials", "secret_not_found")
        assert "secret account.sk is empty" in result["errorSummary"]
        assert "not found" not in result["errorSummary"]
        assert "holds nothing" in f["hint"] and "'sk'" in f["hint"]


async def test_a_secret_with_a_line_break_inside_is_named_not_an_internal_error(make_validator: Any) -> None:
    """A session token pasted with a line break in its middle: the failure names the secret and why."""
    v = make_validator(secrets={"sk": "first-half\nsecond-half"})
    result = await run(v, manual())
    f = result["failure"]
    assert (f["step"], f["category"]) == ("resolve_credentials", "secret_not_found"), result
    assert "secret account.sk holds a line break or another control character" in result["errorSummary"]
    assert "first-half" not in str(result)


async def test_a_refused_custom_endpoint_is_named_as_the_one_that_refused(make_validator: Any) -> None:
    """AWS_ENDPOINT_URL at a closed port: the message names that endpoint and its variable, not AWS egress."""
    closed = f"http://127.0.0.1:{free_port()}"
    v = make_validator(secrets={"sk": "x"}, AWS_ENDPOINT_URL=closed, AWS_MAX_ATTEMPTS="1")
    result = await run(v, manual())
    f = result["failure"]
    assert (f["step"], f["category"]) == ("get_caller_identity", "network")
    assert f"the endpoint {closed} (from AWS_ENDPOINT_URL) refused the connection" in result["errorSummary"]
    assert closed in f["hint"] and "AWS_ENDPOINT_URL" in f["hint"]
    assert "egress" not in f["hint"]


async def test_a_refused_per_service_endpoint_names_its_own_variable(make_validator: Any) -> None:
    """AWS_ENDPOINT_URL_EC2 wins over AWS_ENDPOINT_URL for EC2, and the message names it."""
    closed = f"http://127.0.0.1:{free_port()}"
    v = make_validator(secrets={"sk": "x"}, AWS_ENDPOINT_URL_EC2=closed, AWS_MAX_ATTEMPTS="1")
    result = await run(v, manual())
    assert result["failure"]["step"] == "describe_regions"
    assert f"{closed} (from AWS_ENDPOINT_URL_EC2) refused" in result["errorSummary"]


async def test_the_platform_secrets_hint_names_the_control_planes_secrets_dir(
    moto: str, control_plane_factory: ControlPlaneFactory, tmp_path: Path
) -> None:
    """executeOnDelegate: false resolves secrets in the control plane: the hint is about its --secrets-dir."""
    secrets = tmp_path / "cp-secrets"
    secrets.mkdir()
    environ = {"AWS_ENDPOINT_URL": moto, "AWS_EC2_METADATA_DISABLED": "true"}
    validation = platform_validator_from_env(environ, secrets_dir=secrets, redactor=Redactor())
    cp = await control_plane_factory(platform_validator=validation)
    doc = manual().to_document()
    doc["connector"]["spec"]["executeOnDelegate"] = False
    await cp.core.apply_connector(doc)
    async with (
        aiohttp.ClientSession() as http,
        http.post(cp.url + "/api/v1/connectors/test/test", headers={"X-API-Key": API_KEY}) as resp,
    ):
        view = await resp.json()
    failure = view["result"]["failure"]
    assert (view["delegateName"], failure["category"]) == ("platform", "secret_not_found")
    assert "the control plane has no file 'sk' in --secrets-dir" in view["result"]["errorSummary"]
    assert str(secrets) not in str(view["result"])  # the path stays in the control plane's log
    assert "--secrets-dir" in failure["hint"] and "AGENT_SECRETS_DIR" not in failure["hint"]


async def test_the_platform_without_a_secrets_dir_says_to_start_it_with_one(moto: str) -> None:
    """No --secrets-dir at all: start the control plane with one, or let a delegate test the connector."""
    env = {"AWS_ENDPOINT_URL": moto, "AWS_EC2_METADATA_DISABLED": "true"}
    assert AwsEnvironment.from_environ(env)[1] == []
    validation = platform_validator_from_env(env, secrets_dir=None, redactor=Redactor())
    try:
        result = await validation(manual(), "tsk_platform", ())
    finally:
        await validation.aclose()
    assert result.failure is not None and result.failure.category == "secret_not_found"
    assert "--secrets-dir is not set on the control plane" in (result.error_summary or "")
    assert "start the control plane with --secrets-dir" in (result.failure.hint or "")
    assert "executeOnDelegate: true" in (result.failure.hint or "")


async def test_the_generated_credentials_line_names_only_what_was_generated(tmp_path: Path) -> None:
    """Tokens given, API key generated: one warning, about the API key; the signing key has its own line."""
    config = ControlPlaneConfig(host="127.0.0.1", port=0, data_dir=tmp_path, delegate_tokens=f"default:{TOKEN}")
    with structlog.testing.capture_logs() as logs:
        async with ControlPlaneService(config):
            pass
    generated = [e for e in logs if e["event"] == "controlplane.credentials_generated"]
    assert [Path(e["path"]).name for e in generated] == ["api-key"]
    assert generated[0]["log_level"] == "warning"
    assert generated[0]["hint"].startswith("no API key was configured")
    assert "token" not in generated[0]["hint"]
    signing = [e for e in logs if e["event"] == "controlplane.task_signing_key_generated"]
    assert [Path(e["path"]).name for e in signing] == ["task-signing-key"]
    assert "AGENT_TASK_PUBLIC_KEY" in signing[0]["hint"] and signing[0]["log_level"] == "info"


async def test_nothing_given_generates_both_and_says_so_for_each(tmp_path: Path) -> None:
    """Neither tokens nor an API key: two lines, one naming the delegate token, one the API key."""
    config = ControlPlaneConfig(host="127.0.0.1", port=0, data_dir=tmp_path)
    with structlog.testing.capture_logs() as logs:
        async with ControlPlaneService(config):
            pass
    hints = {Path(e["path"]).name: e["hint"] for e in logs if e["event"] == "controlplane.credentials_generated"}
    assert sorted(hints) == ["api-key", "delegate-token"]
    assert hints["delegate-token"].startswith("no delegate token was configured")
    assert hints["api-key"].startswith("no API key was configured")
