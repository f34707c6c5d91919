"""The canned AWS stand-in the benchmark measures throughput against (bench/canned_aws.py).

A stand-in, not a fake of AWS's behaviour: moto is AWS in every other test. What matters here is
that the delegate's real validator reads its two answers as AWS's (SUCCESS, identity filled in),
that it keeps connections alive as AWS does, and that anything else fails loudly.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiobotocore.session import AioSession
from botocore.exceptions import ClientError

from agent.aws.clients import AwsClients
from agent.aws.connector import parse_connector
from agent.aws.environment import AwsEnvironment
from agent.aws.secrets import SecretStore
from agent.aws.validator import AwsValidator
from bench import canned_aws
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def canned() -> Iterator[str]:
    """The canned AWS as the benchmark runs it: its own process on 127.0.0.1."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.canned_aws", str(port)], cwd=ROOT)
    try:
        canned_aws.wait_ready(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0  # SIGTERM ends it cleanly


async def test_the_delegates_validation_against_the_canned_stand_in_succeeds_with_an_identity(
    canned: str, tmp_path: Path
) -> None:
    """The delegate's own validator (real aiobotocore clients) reads both canned answers as AWS's."""
    env, problems = AwsEnvironment.from_environ({"AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": canned})
    assert problems == []
    (tmp_path / "sk").write_text("secret")
    clients = AwsClients(env)
    doc = {
        "connector": {
            "name": "bench",
            "type": "Aws",
            "spec": {
                "credential": {
                    "type": "ManualConfig",
                    "spec": {"accessKey": "AKIABENCH00000000042", "secretKeyRef": "sk"},
                    "region": "eu-west-3",
                }
            },
        }
    }
    try:
        validator = AwsValidator(env, clients, SecretStore(tmp_path))
        result = msgspec.to_builtins(
            await validator.validate(parse_connector(doc), task_id="t", delegate_id=None, delegate_name="d", timeout=20)
        )
    finally:
        await clients.close()
    assert result["status"] == "SUCCESS", result
    assert result["identity"] == {
        "account": canned_aws.ACCOUNT,
        "arn": f"arn:aws:iam::{canned_aws.ACCOUNT}:user/bench-00000042",
        "userId": "AIDABENCH00000000042",
    }
    assert [s["name"] for s in result["steps"]] == ["resolve_credentials", "get_caller_identity", "describe_regions"]


async def test_anything_else_is_a_loud_aws_error(canned: str) -> None:
    """A call the stand-in does not answer fails as AWS fails it (HTTP 400, a code), never a fake success."""
    kw: dict[str, Any] = {
        "region_name": "us-east-1",
        "endpoint_url": canned,
        "aws_access_key_id": "AKIABENCH00000000001",
        "aws_secret_access_key": "x",
    }
    async with AioSession().create_client("ec2", **kw) as ec2, AioSession().create_client("sts", **kw) as sts:
        with pytest.raises(ClientError) as described:
            await ec2.describe_instances()
        with pytest.raises(ClientError) as session:
            await sts.get_session_token()
        with pytest.raises(ClientError) as two:
            await ec2.describe_regions(RegionNames=["us-east-1", "eu-west-1"])
    for raised, code in ((described, "InvalidAction"), (session, "InvalidAction"), (two, "InvalidParameterValue")):
        assert raised.value.response["Error"]["Code"] == code
        assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


async def test_connections_are_kept_alive_and_an_unsigned_request_is_refused(canned: str) -> None:
    """Two requests on one connection get two answers (keep-alive, as AWS); no SigV4 header: a 400."""
    host, port = canned.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b"Action=GetCallerIdentity&Version=2011-06-15"
    signed = (
        b"Authorization: AWS4-HMAC-SHA256 Credential=AKIABENCH00000000007/20261203/us-east-1/sts/aws4_request, "
        b"SignedHeaders=host, Signature=00\r\n"
    )
    for auth in (signed, b""):
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n%s" % (auth, len(body), body))
    await writer.drain()
    answers = []
    for _ in range(2):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        answers.append((head.split(b" ")[1], await reader.readexactly(length)))
    writer.close()
    assert answers[0][0] == b"200" and b"user/bench-00000007" in answers[0][1]
    assert answers[1][0] == b"400" and b"<Code>MissingAuthenticationToken</Code>" in answers[1][1]


@pytest.mark.parametrize("layer", ["handler", "executor"])
def test_the_instruction_counters_layers_run_the_real_path_against_the_stand_in(
    canned: str, tmp_path: Path, layer: str
) -> None:
    """`make bench-instructions` counts what these processes execute under valgrind; here they run
    plain, and must finish: a handler layer that failed a validation stops with an error."""
    from bench.decompose import bench_keys

    for i, (_, secret) in enumerate(bench_keys()):
        (tmp_path / f"sk{i}").write_text(secret)
    argv = [sys.executable, "-m", "bench.instructions", "--run", layer, "--count", "20", "--url", canned]
    argv += ["--secrets", str(tmp_path)]
    done = subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
