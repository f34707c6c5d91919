"""Security: signed tasks, HTTPS and mutual TLS, the delegate's side of the auth matrix, a canary secret."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from agent.aws.environment import AwsEnvironment
from agent.cli import EXIT_OK, build_handlers, main
from agent.observability.logging import MASK, Redactor, configure_logging
from agent.observability.metrics import AgentMetrics
from agent.protocol.models import AcquireRequest, Task, TestRequest
from agent.protocol.signing import TaskSignatureVerifier, TaskSigningKey
from agent.runtime.agent import Agent
from agent.runtime.settings import AgentSettings, ControlPlaneEndpoint
from agent.runtime.signing import task_check_from_key
from tests.awsfakes import ACCOUNT, MotoIam, assume_role_session
from tests.conftest import (
    API_KEY,
    FAST,
    TOKEN,
    AgentFactory,
    ControlPlaneFactory,
    delegate_client,
    done,
    register_request,
)
from tests.handlers import all_handlers
from tests.helpers import POLL_SECONDS, sample, wait_for
from tests.tls import make_pki


async def start_agent(
    cp_url: str,
    *,
    public_key: str | None = None,
    token: str = TOKEN,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    handlers: list[Any] | None = None,
    tmp: Path | None = None,
    redactor: Redactor | None = None,
    metrics: AgentMetrics | None = None,
    secrets_dir: Path | None = None,
) -> tuple[Agent, Any]:
    settings = AgentSettings(
        control_plane=ControlPlaneEndpoint(
            url=cp_url,
            request_timeout=5,
            ca_file=ca,
            client_cert_file=cert,
            client_key_file=key,
            task_public_key=public_key,
        ),
        token=token,
        name="secure",
        http_host="127.0.0.1",
        http_port=0,
        drain_timeout=2,
        shutdown_grace=3,
        data_dir=tmp,
        secrets_dir=secrets_dir,
    )
    agent = Agent(
        settings,
        handlers=handlers or list(all_handlers().values()),
        watchdog=False,
        task_check=task_check_from_key(public_key),
        redactor=redactor,
        metrics=metrics,
    )
    task = asyncio.create_task(agent.run())
    await asyncio.wait_for(agent.started.wait(), 10)
    return agent, task


async def stop(agent: Agent, task: Any) -> None:
    agent.request_shutdown()
    agent.request_shutdown()
    await asyncio.wait_for(task, 30)


# --- signed tasks ----------------------------------------------------------------------------------


REFUSALS = {
    "unsigned": "refused: the task is not signed",
    "altered": "refused: the task's signature does not match the control plane's key",
    "other-key": "refused: the task's signature does not match the control plane's key",
}


@pytest.mark.parametrize("tamper", ["none", "unsigned", "altered", "other-key"])
async def test_signed_tasks_and_what_is_refused(control_plane_factory: ControlPlaneFactory, tamper: str) -> None:
    """With the control plane's public key, a delegate runs only tasks whose signature checks out."""
    signing = TaskSigningKey.generate()

    def sign(task: Task) -> str:
        if tamper == "unsigned":
            return ""
        if tamper == "altered":  # the signature covers another payload than the one delivered
            return signing.sign(msgspec.structs.replace(task, payload={"message": "run something else"}))
        return signing.sign(task)

    cp = await control_plane_factory(settings=FAST, task_signer=sign, task_public_key=signing.public_key_b64)
    key = TaskSigningKey.generate().public_key_b64 if tamper == "other-key" else signing.public_key_b64
    task = await cp.core.create_task(type="test.echo", payload={"message": "run me"})
    handlers = all_handlers()
    agent, run = await start_agent(cp.url, public_key=key, handlers=list(handlers.values()))
    try:
        result = await done(cp, task.id)
    finally:
        await stop(agent, run)
    if tamper == "none":
        assert result.status == "SUCCESS"
        assert handlers["test.echo"].seen == [task.id]
        return
    assert result.status == "FAILURE"
    assert result.result.failure.step == "verify_signature"
    assert result.result.error_summary.startswith(REFUSALS[tamper])
    assert handlers["test.echo"].seen == []  # never run


async def test_the_public_key_is_published(
    control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession
) -> None:
    """/v1/info and the data dir give operators the key; it verifies the lease hand-out a delegate gets."""
    cp = await control_plane_factory()
    async with http.get(cp.url + "/v1/info") as resp:
        info = await resp.json()
    assert info["taskPublicKey"] == cp.signing_key.public_key_b64
    assert cp.config.data_dir is not None
    assert (cp.config.data_dir / "task-signing-key.pub").read_text().strip() == info["taskPublicKey"]
    client = delegate_client(http, cp.url)
    delegate_id = (await client.register(register_request())).delegate_id
    await cp.core.create_task(type="test.echo", payload={"message": "signed for one delegate"})
    (task,) = (await client.acquire(delegate_id, AcquireRequest(max_tasks=1, wait_seconds=0))).tasks
    assert TaskSignatureVerifier(info["taskPublicKey"])(task) is None
    # The signature covers the hand-out: this delegate, this lease, and a start-by time (the first lease's end).
    assert task.delegate_id == delegate_id
    assert task.signature_expires_at == task.lease_expires_at


# --- HTTPS and mutual TLS --------------------------------------------------------------------------


async def test_https_with_a_custom_ca_and_mutual_tls(
    control_plane_factory: ControlPlaneFactory, tmp_path: Path
) -> None:
    """The delegate trusts the control plane through a CA file and presents its client certificate."""
    pki = make_pki(tmp_path / "pki")
    cp = await control_plane_factory(
        settings=FAST, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca
    )
    assert cp.url.startswith("https://")
    agent, run = await start_agent(cp.url, ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    try:
        await wait_for(lambda: agent.state.registered, "registration over mutual TLS")
        task = await cp.core.create_task(type="test.echo", payload={"message": "tls"})
        assert (await done(cp, task.id)).status == "SUCCESS"
    finally:
        await stop(agent, run)
    # Without a client certificate the handshake fails: the delegate keeps trying, and is never registered.
    agent, run = await start_agent(cp.url, ca=pki.ca)
    try:
        await wait_for(
            lambda: (
                sample(agent.metrics, "delegate_control_plane_requests_total", operation="register", status="error")
                >= 1
            ),
            "a refused handshake",
        )
        assert not agent.state.registered
    finally:
        await stop(agent, run)


async def test_the_cli_trusts_a_custom_ca(
    control_plane_factory: ControlPlaneFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--ca-file lets the CLI talk to an HTTPS control plane with a private CA; without it, exit 3."""
    pki = make_pki(tmp_path / "pki")
    cp = await control_plane_factory(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    common = ["--control-plane", cp.url, "--api-key", API_KEY]
    assert await asyncio.to_thread(main, ["delegates", "list", *common, "--ca-file", str(pki.ca)]) == EXIT_OK
    assert await asyncio.to_thread(main, ["delegates", "list", *common]) == 3
    assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err


# --- the delegate's side of authentication ---------------------------------------------------------


@pytest.mark.looptime
async def test_a_token_revoked_while_running_is_noticed_and_survived(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Revocation mid-run: 403 on the next heartbeat (within one interval), readiness and metrics say so,
    the process stays up. On virtual time: the heartbeats take no real time."""
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp)
    await a.registered()
    loop = asyncio.get_running_loop()
    revoked = loop.time()
    async with http.post(
        cp.url + "/api/v1/delegate-tokens/default/revoke?force=true", headers={"X-API-Key": API_KEY}
    ) as resp:
        assert resp.status == 200
    await wait_for(lambda: a.agent.state.auth_error, "the revocation to be noticed")
    assert loop.time() - revoked <= FAST.heartbeat_seconds + POLL_SECONDS  # looked at every POLL_SECONDS
    assert "revoked" in (a.agent.state.auth_error or "")
    async with http.get(a.agent.http_url + "/readyz") as resp:
        assert resp.status == 503
    assert sample(a.agent.metrics, "delegate_control_plane_auth_refused") == 1
    assert not a.task.done()


# --- a canary secret, everywhere -------------------------------------------------------------------

#: Random-looking, so that no eight of their characters occur in any text by chance.
CANARY = "CANARY-9d1b2e7f-4c3a8b5e6f70a1d2e3c4b5a6"
#: The delegate token, in the delegate's token file and the control plane's.
TOKEN_FILE_CANARY = "TOKENFILE-3b9c2d1e-8a7f6e5d4c3b2a1f0e9d8c7b"
#: The projected service account token IRSA sends to AssumeRoleWithWebIdentity (botocore's debug log shows it).
WEB_IDENTITY_CANARY = "eyJhbGciOiJSUzI1NiJ9.eyJjYW5hcnkiOiI0ZTVmNmE3YiJ9.c2lnLThkN2U2ZjVh"
#: A connector's session token (sessionTokenRef): a value of its own, so its own redaction is what is tested.
TOKEN_CANARY = "TOKENCANARY-5e0c41aa-7f6e5d4c3b2a19087766"
#: How long a piece of a secret may not appear anywhere (the review found eight characters of one).
FRAGMENT = 8


class _Tee(Redactor):
    """A redactor that also tells another one every secret it learns."""

    def __init__(self, also: Redactor) -> None:
        super().__init__()
        self._also = also

    def add(self, *values: str | None) -> None:
        super().add(*values)
        self._also.add(*values)


#: Every session token moto hands out starts so (AWS's start alike, "FwoGZXIvYXdz..."): not a secret.
SESSION_TOKEN_PREFIX = "FQoGZXIvYXdzEBYaD"


def _fragments(secret: str) -> set[str]:
    """Every eight characters of ``secret`` (after a session token's fixed prefix)."""
    own = secret.removeprefix(SESSION_TOKEN_PREFIX)
    return {own[i : i + FRAGMENT] for i in range(len(own) - FRAGMENT + 1)}


async def test_a_canary_secret_never_appears_anywhere(
    moto: str, control_plane_factory: ControlPlaneFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Canaries travel every way a secret enters: the delegate token (from its file, and the control
    plane's token file), a connector's accessKeyRef, secretKeyRef and sessionTokenRef, the delegate's
    environment credentials (a session moto's STS handed out), the IRSA web identity token and the
    sessions AssumeRole and AssumeRoleWithWebIdentity fetch on the delegate. None of them, nor any
    eight characters of one, is in any log line (debug included), metric, /status, result,
    exception, database or outbox; a missing secret's result names the reference, not the directory."""
    # Seeded before the logs are captured: these calls are the test's, not the delegate's.
    iam = MotoIam(moto)
    key = await iam.user("canary-user", ["ec2:DescribeRegions"])
    node = await iam.role("canary-node", trusted=f"arn:aws:iam::{ACCOUNT}:root")
    target = await iam.role("canary-target", trusted=node)
    env_session = await assume_role_session(moto, node, "i-canary")  # what the node's metadata would give
    log = io.StringIO()
    redactor = Redactor()
    configure_logging(fmt="json", level="debug", redactor=redactor, stream=log)
    # All levels of every library too: botocore's debug lines dump requests, headers and signing steps.
    for name in ("", "botocore", "aiobotocore", "botocore.credentials", "aiobotocore.credentials", "aiohttp"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    # The control plane registers its tokens itself, as `delegate-agent control-plane` wires it.
    cp = await control_plane_factory(settings=FAST, tokens=f"canary:{TOKEN_FILE_CANARY}", on_secret=redactor.add)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "ak").write_text(key.access_key)  # accessKeyRef: an access key kept secret is one
    (secrets / "sk").write_text(CANARY)  # the connector's secret key, read on the delegate
    (secrets / "st").write_text(TOKEN_CANARY)  # its session token (moto does not check it without enforcement)
    web_identity = tmp_path / "web-identity-token"  # as EKS projects it for IRSA: the pod's proof of identity
    web_identity.write_text(WEB_IDENTITY_CANARY)
    token_file = tmp_path / "delegate-token"
    token_file.write_text(TOKEN_FILE_CANARY + "\n")
    aws, _ = AwsEnvironment.from_environ(
        {
            "AWS_ENDPOINT_URL": moto,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ACCESS_KEY_ID": env_session["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": env_session["SecretAccessKey"],
            "AWS_SESSION_TOKEN": env_session["SessionToken"],
            "AWS_ROLE_ARN": target,
            "AWS_WEB_IDENTITY_TOKEN_FILE": str(web_identity),
        }
    )
    metrics = AgentMetrics(name="secure")
    # `delegate-agent run` gives its logs and its handlers one Redactor; here the delegate's own tells
    # the log's what it learns (the secrets it reads), and only the log's knows the control plane's tokens.
    agent_redactor = _Tee(redactor)
    handlers = build_handlers(aws, agent_redactor, metrics, secrets_dir=secrets)
    settings = AgentSettings(
        control_plane=ControlPlaneEndpoint(url=cp.url, request_timeout=5),
        token_file=token_file,
        name="secure",
        http_host="127.0.0.1",
        http_port=0,
        drain_timeout=2,
        shutdown_grace=3,
        data_dir=tmp_path / "agent-data",
        secrets_dir=secrets,
    )
    agent = Agent(
        settings,
        handlers=[*handlers, *all_handlers().values()],
        watchdog=False,
        redactor=agent_redactor,
        metrics=metrics,
    )
    run = asyncio.create_task(agent.run())
    await asyncio.wait_for(agent.started.wait(), 10)
    try:
        await wait_for(lambda: agent.state.registered, "registration with the canary token file")
        credential: dict[str, Any] = {
            "type": "ManualConfig",
            "spec": {"accessKeyRef": "account.ak", "secretKeyRef": "account.sk", "sessionTokenRef": "account.st"},
        }
        manual = {"connector": {"name": "canary manual", "type": "Aws", "spec": {"credential": credential}}}
        inherit = {
            "connector": {
                "name": "canary inherit",
                "type": "Aws",
                "spec": {
                    "credential": {
                        "type": "InheritFromDelegate",
                        "crossAccountAccess": {"crossAccountRoleArn": target},
                    },
                    "delegateSelectors": ["secure"],
                },
            }
        }
        irsa = {
            "connector": {
                "name": "canary irsa",
                "type": "Aws",
                "spec": {"credential": {"type": "Irsa"}, "delegateSelectors": ["secure"]},
            }
        }
        missing = {
            "connector": {
                "name": "canary missing",
                "type": "Aws",
                "spec": {"credential": {**credential, "spec": {**credential["spec"], "secretKeyRef": "account.nope"}}},
            }
        }
        results = []
        for doc in (manual, inherit, irsa, missing):
            applied = await cp.core.apply_connector(doc)
            results.append(await cp.core.test_connector(applied.identifier, TestRequest(wait_seconds=30)))
        crash = await cp.core.create_task(type="test.crash", payload={"secret": "no-secret-here"})
        await done(cp, crash.id)
        async with http.get(agent.http_url + "/metrics") as resp:
            metrics_text = await resp.text()
        async with http.get(agent.http_url + "/status") as resp:
            status_text = await resp.text()
        async with http.get(cp.url + "/api/v1/tasks", headers={"X-API-Key": API_KEY}) as resp:
            tasks_text = await resp.text()
        async with http.get(cp.url + "/metrics") as resp:
            cp_metrics_text = await resp.text()
    finally:
        agent.request_shutdown()
        await asyncio.wait_for(run, 30)
        await cp.stop()
    # All ran on the delegate with the canaries in hand (moto checks signatures only under enforcement).
    assert [r.delegate_name for r in results] == ["secure"] * 4
    assert results[0].result.identity.arn == key.arn
    assert results[1].result.identity.arn.startswith(f"arn:aws:sts::{ACCOUNT}:assumed-role/canary-target/")
    assert results[2].result.credential_source == f"IRSA web identity for {target}"
    # What the delegate's AssumeRole fetched, as moto handed it out (and the environment's session).
    sessions = json.loads(urllib.request.urlopen(moto + "/moto-api/data.json", timeout=10).read())
    ours = (results[1].result.identity.arn, results[2].result.identity.arn)
    fetched = [s for s in sessions["sts"]["AssumedRole"] if s.get("arn") in ours]
    assert len(fetched) == 2, sessions["sts"]["AssumedRole"]
    assert cp.config.data_dir is not None
    database = b"".join(p.read_bytes() for p in cp.config.data_dir.glob("controlplane.sqlite3*"))
    outbox = b"".join(p.read_bytes() for p in (tmp_path / "agent-data").glob("outbox.sqlite3*"))
    texts = {
        "logs": log.getvalue(),
        "metrics": metrics_text,
        "control plane metrics": cp_metrics_text,
        "status": status_text,
        "tasks and exceptions": tasks_text,
        "results": msgspec.json.encode([r.result for r in results]).decode(),
    }
    # The logs were really captured, at debug level, botocore's own request dumps included.
    assert '"level":"debug"' in texts["logs"] and "task.finished" in texts["logs"]
    assert "botocore" in texts["logs"]
    assert results[0].result.credential_source == (
        "access key from secret account.ak with secret account.sk and session token account.st"
    )
    assert results[3].result.error_summary.startswith("secret account.nope not found")
    assert str(secrets) not in texts["results"] and str(secrets) not in texts["tasks and exceptions"]
    assert str(secrets / "nope") in texts["logs"]  # the delegate's own log keeps where it looked
    canaries = {
        "delegate token": TOKEN_FILE_CANARY,
        "secret key (secretKeyRef)": CANARY,
        "session token (sessionTokenRef)": TOKEN_CANARY,
        # An access key ID encodes its account in characters 5-12 (as AWS's do), shared by every key and
        # session of the account: only its last eight characters are its own.
        "access key (accessKeyRef)": key.access_key[-FRAGMENT:],
        "environment secret key": env_session["SecretAccessKey"],
        "environment session token": env_session["SessionToken"],
        "web identity token (IRSA)": WEB_IDENTITY_CANARY,
        **{f"fetched secret key {i}": s["secret_access_key"] for i, s in enumerate(fetched)},
        **{f"fetched session token {i}": s["session_token"] for i, s in enumerate(fetched)},
    }
    # Each process registered what it read itself: the delegate its token file, the control plane its
    # tokens, and again when its token file changes (rotation).
    assert Redactor.text(agent_redactor, TOKEN_FILE_CANARY) == MASK
    rotated = "ROTATED-7e6d5c4b-3a2f1e0d-9c8b7a6f5e4d3c2b"
    assert cp.config.delegate_token_file is not None
    cp.config.delegate_token_file.write_text(f"canary:{TOKEN_FILE_CANARY}\nnext:{rotated}\n")
    assert cp.reload_tokens()
    assert redactor.text(rotated) == MASK
    for what, canary in canaries.items():
        for fragment in _fragments(canary):
            for where, text in texts.items():
                assert fragment not in text, (what, fragment, where)
            assert fragment.encode() not in database, (what, fragment)
            assert fragment.encode() not in outbox, (what, fragment)
