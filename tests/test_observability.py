"""Metrics (checked by promtool), log redaction, backoff, settings and token files."""

from __future__ import annotations

import io
import json
import logging
import shutil
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import msgspec
import pytest
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

from agent.observability.logging import MASK, Redactor, configure_logging
from agent.observability.metrics import MetricsRegistry
from agent.protocol.auth import TokenSource, TokenUnavailable
from agent.protocol.results import Identity, Step, ValidationResult, failure_result
from agent.runtime.backoff import MAX_RETRY_AFTER, Backoff
from agent.runtime.settings import ConfigError, load_settings
from tests.conftest import FAST, AgentFactory, ControlPlaneFactory, done
from tests.helpers import wait_for

EXPECTED_FAMILIES = [
    "delegate_agent_info",
    "delegate_registered",
    "delegate_draining",
    "delegate_control_plane_auth_refused",
    "delegate_task_slots",
    "delegate_task_slots_busy",
    "delegate_task_slots_free",
    "delegate_task_slots_reserved",
    "delegate_tasks_running",
    "delegate_tasks_started_total",
    "delegate_tasks_completed_total",
    "delegate_task_duration_seconds",
    "delegate_task_pickup_latency_seconds",
    "delegate_control_plane_requests_total",
    "delegate_control_plane_request_duration_seconds",
    "delegate_outbox_depth",
    "delegate_last_heartbeat_timestamp_seconds",
    "process_resident_memory_bytes",
    "python_info",
]


async def test_metrics_pass_promtool_and_say_what_happened(
    control_plane_factory: ControlPlaneFactory, agent_factory: AgentFactory, http: aiohttp.ClientSession
) -> None:
    """The live /metrics of a delegate that ran tasks is clean for promtool and carries every family."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run tools/install-test-tools.sh (make test does)"
    cp = await control_plane_factory(settings=FAST)
    a = await agent_factory(cp, capacity=3)
    await a.registered()
    ok = await cp.core.create_task(type="test.echo", payload={"message": "x"})
    bad = await cp.core.create_task(type="test.echo", payload={})
    await done(cp, ok.id)
    await done(cp, bad.id)
    await wait_for(lambda: a.agent.state.last_heartbeat, "a heartbeat")
    async with http.get(a.agent.http_url + "/metrics") as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    for family in EXPECTED_FAMILIES:
        assert f"\n{family}" in text or text.startswith(family), family
    assert 'delegate_tasks_completed_total{outcome="success",type="test.echo"} 1.0' in text
    assert 'delegate_tasks_completed_total{outcome="invalid",type="test.echo"} 1.0' in text
    assert "delegate_task_slots 3.0" in text
    assert "delegate_registered 1.0" in text
    assert "_created" not in text  # one series per counter or histogram child, not two
    registry = a.agent.metrics.registry
    assert registry.get_sample_value("delegate_tasks_running") == 0
    assert registry.get_sample_value("delegate_task_slots_busy") == 0  # a waiting poll holds slots, runs none
    assert registry.get_sample_value("delegate_task_slots_free") == 3
    heartbeat = registry.get_sample_value("delegate_last_heartbeat_timestamp_seconds")
    assert heartbeat is not None and abs(time.time() - heartbeat) < 60


def test_created_series_are_left_out_of_our_registries_only() -> None:
    """MetricsRegistry drops _created; the process-wide switch stays on for every other registry."""
    ours, theirs = MetricsRegistry(), CollectorRegistry()
    for registry in (ours, theirs):
        Counter("x", "x", registry=registry).inc()
        Histogram("h", "h", registry=registry).observe(1)
    assert ours.get_sample_value("x_created") is None and ours.get_sample_value("h_created") is None
    assert ours.get_sample_value("x_total") == 1 and ours.get_sample_value("h_count") == 1
    assert theirs.get_sample_value("x_created") is not None and theirs.get_sample_value("h_created") is not None


def test_the_redactor_masks_values_and_secret_keys() -> None:
    """Known secret values are masked anywhere in a string; secret-looking keys are masked whole."""
    r = Redactor()
    r.add("hunter2-very-secret", None, "abc")  # too short values are ignored (they would mask everything)
    event = {
        "event": "x hunter2-very-secret y",
        "nested": {"password": "pw-value", "token_file": "/run/t", "list": ["hunter2-very-secret"]},
        "authorization": "Bearer abc",
        "count": 3,
    }
    out = r(None, "info", dict(event))
    assert out["event"] == f"x {MASK} y"
    assert out["nested"] == {"password": MASK, "token_file": "/run/t", "list": [MASK]}
    assert out["authorization"] == MASK
    assert out["count"] == 3


def test_stdlib_logs_and_tracebacks_are_redacted_too() -> None:
    """botocore and aiohttp log through stdlib logging; those lines go through the redactor as well."""
    stream = io.StringIO()
    r = Redactor()
    r.add("canary-secret-0123456789")
    configure_logging(fmt="json", level="info", redactor=r, stream=stream)
    logging.getLogger("botocore.endpoint").warning("refresh failed for canary-secret-0123456789")
    try:
        raise ValueError("bad canary-secret-0123456789")
    except ValueError:
        structlog.get_logger("t").exception("oops")
    text = stream.getvalue()
    assert "canary-secret-0123456789" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["event"] == f"refresh failed for {MASK}"
    assert "ValueError" in lines[1]["exception"]


def test_a_secret_learnt_after_logging_is_configured_is_masked() -> None:
    """`delegate-agent run` configures logging with an empty Redactor and its handlers add the secrets
    they read later: the logs must use that very Redactor (an empty one is falsy, so `or` swapped it)."""
    stream = io.StringIO()
    r = Redactor()
    configure_logging(fmt="json", level="info", redactor=r, stream=stream)
    r.add("session-token-read-later-0123456789")
    logging.getLogger("botocore.endpoint").warning("x-amz-security-token:session-token-read-later-0123456789")
    assert json.loads(stream.getvalue())["event"] == f"x-amz-security-token:{MASK}"


def test_backoff_is_full_jitter_capped_and_honours_retry_after() -> None:
    """Exponential ceilings, a uniform draw below them, a cap, and Retry-After as a floor."""
    high = Backoff(base=0.5, cap=4.0, rand=lambda: 1.0)
    assert [high.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    low = Backoff(base=0.5, cap=4.0, rand=lambda: 0.0)
    assert low.next() == 0.0
    assert low.next(retry_after=7) == 7
    assert low.next(retry_after=10_000) == MAX_RETRY_AFTER
    low.reset()
    assert low.attempt == 0


def test_settings_from_file_and_environment(tmp_path: Path) -> None:
    """The environment wins over the file; Harness's names work; tags parse as Harness parses them."""
    token = tmp_path / "token"
    token.write_text("file-token-0123456789\n")
    config = tmp_path / "agent.yaml"
    config.write_text(f"""
controlPlane: {{url: "http://file-cp:8080"}}
delegate: {{name: from-file, tags: [a, b], capacity: 4, tokenFile: {token}}}
http: {{listen: "127.0.0.1:9999"}}
shutdown: {{drainTimeoutSeconds: 12}}
""")
    s = load_settings(
        {
            "MANAGER_HOST_AND_PORT": "https://env-cp:8443/",
            "DELEGATE_TAGS": " eks, prod,,gov ",
            "DELEGATE_TASK_CAPACITY": "8",
        },
        config,
    )
    assert s.control_plane.url == "https://env-cp:8443"
    assert (s.name, s.tags, s.capacity) == ("from-file", ("eks", "prod", "gov"), 8)
    assert (s.http_host, s.http_port, s.drain_timeout, s.token_file) == ("127.0.0.1", 9999, 12.0, token)
    defaults = load_settings({"MANAGER_HOST_AND_PORT": "https://cp", "DELEGATE_TOKEN": "t" * 20})
    assert defaults.name == socket.gethostname()
    assert (defaults.capacity, defaults.http_listen, defaults.data_dir) == (16, "0.0.0.0:3460", None)


def test_settings_problems_are_all_reported(tmp_path: Path) -> None:
    """One ConfigError with every problem: each setting's in table order, then the rules across settings."""
    with pytest.raises(ConfigError) as err:
        load_settings(
            {
                "DELEGATE_TOKEN": "x" * 20,
                "DELEGATE_TOKEN_FILE": str(tmp_path / "missing"),
                "DELEGATE_NAME": "bad name",
                "AGENT_DRAIN_TIMEOUT_SECONDS": "-1",
                "AGENT_CONTROL_PLANE_CLIENT_CERT_FILE": str(tmp_path),
            }
        )
    fields = [p.field for p in err.value.problems]
    assert fields == [
        "MANAGER_HOST_AND_PORT",
        "AGENT_CONTROL_PLANE_CLIENT_CERT_FILE",
        "DELEGATE_NAME",
        "DELEGATE_TOKEN_FILE",
        "AGENT_DRAIN_TIMEOUT_SECONDS",
        "DELEGATE_TOKEN",
        "DELEGATE_CLIENT_CERTIFICATE_PATH",  # the pair rule names Harness's variable, and its message all three
    ]
    assert "AGENT_CONTROL_PLANE_CLIENT_CERT_FILE" in err.value.problems[-1].message


def test_a_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    """Rotation needs no restart: the next read sees the new token; an empty file is an error."""
    path = tmp_path / "token"
    path.write_text("first-token-0123456789\n")
    source = TokenSource(path=path)
    assert source.current() == "first-token-0123456789"
    path.write_text("second-token-0123456789-longer\n")
    assert source.current() == "second-token-0123456789-longer"
    path.write_text("")
    with pytest.raises(TokenUnavailable, match="is empty"):
        source.current()
    assert "second-token" not in repr(source)


def test_the_documented_config_file_is_valid(tmp_path: Path) -> None:
    """config/agent.yaml, the reference users copy, parses (with its token file present)."""
    text = (Path(__file__).parent.parent / "config" / "agent.yaml").read_text()
    token = tmp_path / "token"
    token.write_text("t" * 24)
    text = text.replace("/var/run/secrets/delegate-agent/token", str(token)).replace(
        "/var/lib/delegate-agent", str(tmp_path / "data")
    )
    config = tmp_path / "agent.yaml"
    config.write_text(text)
    s = load_settings({}, config)
    assert (s.tags, s.capacity, s.drain_timeout, s.log_format) == (("eks", "prod"), 16, 20.0, "json")


def test_the_redactor_masks_overlapping_and_many_secrets_and_forgets_the_oldest() -> None:
    """A secret inside a longer one is masked whole, adjacent ones both, and the bound holds."""
    r = Redactor(max_values=3)
    r.add("abcdef-1", "abcdef-1-and-more", "zzzzzz")
    assert r.text("[abcdef-1-and-more][abcdef-1]zzzzzzabcdef-1") == f"[{MASK}][{MASK}]{MASK}{MASK}"
    assert r.text("abcdef-2 abcde") == "abcdef-2 abcde"
    r.add("yyyyyy-new")  # evicts the oldest ("abcdef-1"); the longer one with its prefix stays
    assert len(r) == 3
    assert r.text("abcdef-1 abcdef-1-and-more yyyyyy-new") == f"abcdef-1 {MASK} {MASK}"
    many = Redactor()
    values = [f"canary-{i:06d}-secret" for i in range(5000)]
    many.add(*values)
    assert len(many) == 4096
    assert many.text(f"x {values[-1]} y {values[0]}") == f"x {MASK} y {values[0]}"


def test_a_pinned_secret_outlives_any_number_of_session_keys() -> None:
    """The delegate token is pinned when read: thousands of fetched session keys later it is still masked."""
    r = Redactor(max_values=3)
    r.pin("the-delegate-token-value")
    r.add(*(f"session-{i:04d}-key" for i in range(100)))
    assert r.text("token the-delegate-token-value and session-0099-key") == f"token {MASK} and {MASK}"
    r.add("the-delegate-token-value")  # added again as a plain value: still pinned, never evicted
    r.add(*(f"other-{i:04d}-key" for i in range(10)))
    assert r.text("the-delegate-token-value") == MASK


def test_a_silent_control_plane_readiness_reason_carries_the_last_error() -> None:
    """503s that name a full disk are not "no answer" without a word: the last error comes along."""
    from agent.runtime.health import HealthPolicy
    from agent.runtime.state import AgentState

    now = [1000.0]
    state = AgentState(name="d1", tags=(), capacity=1, instance_id="i1", registered=True)
    state.contact(now[0], 0.0)
    state.last_error = "HTTP 503 unavailable: the control plane cannot record this now (disk full)"
    policy = HealthPolicy(
        state=state,
        now=lambda: now[0],
        busy=lambda: 0,
        outbox_depth=lambda: 0,
        outbox_durable=True,
        control_plane="https://cp",
    )
    assert policy.readiness_problems() == []
    now[0] += 45
    assert policy.readiness_problems() == [
        "no answer from the control plane for 45s (last: HTTP 503 unavailable: the control plane cannot record "
        "this now (disk full))"
    ]
    state.contact(now[0], 0.0)
    assert policy.readiness_problems() == [] and state.last_error is None


def test_a_string_found_clean_is_scanned_again_once_a_secret_it_holds_is_learnt() -> None:
    """The redactor remembers strings it found clean (result documents repeat theirs task after
    task); learning a secret, added or pinned, must make every remembered string count again."""
    r = Redactor()
    r.add("unrelated-secret-1")
    text = "arn:aws:iam::123456789012:role/canary-9f8e7d6c5b4a"
    assert r.text(text) == text and r.text(text) == text  # scanned, then remembered as clean
    r.add("canary-9f8e7d6c5b4a")
    assert "canary-9f8e7d6c5b4a" not in r.text(text)
    other = "token tail: pinned-canary-0a1b2c3d"
    assert r.text(other) == other
    r.pin("pinned-canary-0a1b2c3d")
    assert "pinned-canary-0a1b2c3d" not in r.text(other)
    # Walked documents take the same path: a dict seen clean before is masked after.
    doc = {"message": "assumed canary-ffff0000eeee", "nested": [{"detail": "canary-ffff0000eeee"}]}
    assert r.value(doc) == doc
    r.add("canary-ffff0000eeee")
    assert "canary-ffff0000eeee" not in repr(r.value(doc))


def test_a_result_document_is_masked_field_by_field_and_kept_whole_when_clean() -> None:
    """Results are redacted twice per task (handler and executor): a clean one comes back as the very
    object, a dirty one as a copy with only the secret masked, its types and timestamps intact."""
    r = Redactor()
    r.add("canary-5e4d3c2b1a09")
    clean = ValidationResult(
        status="SUCCESS",
        tested_at=datetime(2026, 12, 3, 12, 0, tzinfo=UTC),
        delegate_name="d1",
        connector_identifier="prod",
        credential_source="access key AKIAEXAMPLE with secret aws_sk",
        identity=Identity(account="123456789012", arn="arn:aws:iam::123456789012:user/ci"),
        steps=[Step(name="get_caller_identity", status="SUCCESS", duration_ms=3)],
    )
    assert r.value(clean) is clean and r.value(clean) is clean  # scanned, then remembered clean
    dirty = failure_result(
        "permission_denied",
        "AccessDenied for canary-5e4d3c2b1a09",
        step="assume_role",
        hint="check canary-5e4d3c2b1a09",
        delegate_id=None,
        delegate_name="d1",
    )
    masked = r.value(dirty)
    assert type(masked) is ValidationResult and masked is not dirty
    assert "canary-5e4d3c2b1a09" not in msgspec.json.encode(masked).decode()
    assert masked.error_summary == f"AccessDenied for {MASK}" and masked.errors[0].message == masked.error_summary
    assert masked.failure is not None and masked.failure.hint == f"check {MASK}"
    assert masked.tested_at == dirty.tested_at and masked.steps == dirty.steps
    assert "canary-5e4d3c2b1a09" in dirty.error_summary  # the original is left as it was

    class Carrier(msgspec.Struct, rename="camel"):
        session_token: str | None = None
        session_token_ref: str | None = None
        note: list[str] = []

    carried = r.value(Carrier(session_token="plain", session_token_ref="aws_st", note=["canary-5e4d3c2b1a09"]))
    assert carried == Carrier(session_token=MASK, session_token_ref="aws_st", note=[MASK])


def test_a_string_remembered_clean_long_ago_is_masked_once_its_secret_is_learnt() -> None:
    """The clean strings live in two generations (one-off strings push out the oldest, not the ones
    every task repeats); learning a secret must empty both."""
    r = Redactor()
    r.add("unrelated-secret-1")
    text = "arn:aws:iam::123456789012:role/canary-0f1e2d3c4b5a"
    assert r.text(text) == text
    for i in range(5_000):  # more one-off strings than a generation holds: `text` is in the older one
        assert r.text(f"one-off-{i}") == f"one-off-{i}"
    r.add("canary-0f1e2d3c4b5a")
    assert r.text(text) == f"arn:aws:iam::123456789012:role/{MASK}"
