"""The delegate's settings: one table for file keys, environment names, describe() and the
reference config file; parsing that leaves the disk alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.cli import main
from agent.runtime import settings_doc
from agent.runtime.outbox import DataDirUnusable, open_outbox
from agent.runtime.settings import SETTINGS, AgentSettings, ConfigError, ControlPlaneEndpoint, load_settings
from tests.tls import make_pki

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {"MANAGER_HOST_AND_PORT": "https://cp", "DELEGATE_TOKEN": "t" * 20, "DELEGATE_NAME": "d"}
ROWS = {row.key: row for row in SETTINGS}


def _samples(tmp: Path) -> dict[str, tuple[str, Any, Any]]:
    """For every setting: a value as the environment gives it, as the file gives it, and as describe() shows it.

    A new setting needs a line here (the first test says so).
    """
    for name in ("ca.pem", "tls.crt", "tls.key"):
        (tmp / name).write_text("pem")
    (tmp / "token").write_text("file-token-0123456789\n")
    (tmp / "secrets").mkdir()
    same = {
        "controlPlane.audience": "aud-1",
        "controlPlane.caFile": str(tmp / "ca.pem"),
        "controlPlane.clientCertFile": str(tmp / "tls.crt"),
        "controlPlane.clientKeyFile": str(tmp / "tls.key"),
        "controlPlane.taskPublicKey": "cHVibGljLWtleQ==",
        "delegate.name": "eks-delegate-0",
        "delegate.tokenFile": str(tmp / "token"),
        "http.listen": "127.0.0.1:9999",
        "dataDir": str(tmp / "data" / "not-yet"),
        "secretsDir": str(tmp / "secrets"),
        "logging.format": "console",
        "tls.additionalCaPath": str(make_pki(tmp / "pki").ca),
        "proxy.host": "proxy.corp.example",
        "proxy.user": "delegate",
        "proxy.noProxy": "169.254.169.254,.svc.cluster.local",
    }
    return {key: (value, value, value) for key, value in same.items()} | {
        "controlPlane.url": ("https://cp.example:8443/", "https://cp.example:8443/", "https://cp.example:8443"),
        "controlPlane.requestTimeoutSeconds": ("2.5", 2.5, 2.5),
        "delegate.tags": (" eks, prod,,gov ", ["eks", "prod", "gov"], ["eks", "prod", "gov"]),
        "delegate.capacity": ("8", 8, 8),
        "delegate.token": ("env-token-0123456789", None, "(set)"),  # the environment only
        "logging.level": ("WARN", "warn", "warning"),
        "shutdown.drainTimeoutSeconds": ("12", 12, 12.0),
        "shutdown.graceSeconds": ("3", 3, 3.0),
        "aws.connectTimeoutSeconds": ("1.5", 1.5, 1.5),
        "aws.readTimeoutSeconds": ("7", 7, 7.0),
        "proxy.port": ("3128", 3128, 3128),
        "proxy.scheme": ("https", "https", "https"),
        "proxy.password": ("proxy-password-0123", None, "(set)"),  # the environment only
        "proxy.manager": ("false", False, False),
        "controlPlane.allowInsecure": ("true", True, True),
        "http.headerTimeoutSeconds": ("4", 4, 4.0),
        "http.keepAliveTimeoutSeconds": ("30", 30, 30.0),
        "http.maxConnections": ("16", 16, 16),
    }


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *groups, leaf = key.split(".")
        node = tree
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = value
    return tree


def test_every_setting_has_a_sample_here(tmp_path: Path) -> None:
    """Adding a row to the table means adding its sample to this file, so the tests below cover it."""
    assert set(_samples(tmp_path)) == set(ROWS)


@pytest.mark.parametrize("preference", [0, -1], ids=["first-name", "last-name"])
def test_every_environment_name_sets_its_setting(tmp_path: Path, preference: int) -> None:
    """Each row's environment names, Harness's and ours, all work; describe() shows what was set."""
    samples = _samples(tmp_path)
    without_token = {row.env[preference]: samples[key][0] for key, row in ROWS.items() if key != "delegate.token"}
    described = _flat(load_settings(without_token).describe())
    assert described == {key: shown for key, (_, _, shown) in samples.items()} | {"delegate.token": None}
    with_token = {k: v for k, v in without_token.items() if k != "DELEGATE_TOKEN_FILE"}
    with_token["DELEGATE_TOKEN"] = samples["delegate.token"][0]
    described = _flat(load_settings(with_token).describe())
    assert (described["delegate.token"], described["delegate.tokenFile"]) == ("(set)", None)


def test_every_file_key_sets_its_setting_and_the_environment_wins(tmp_path: Path) -> None:
    """The file takes every row but the environment-only ones; the environment overrides it, row by row."""
    samples = _samples(tmp_path)
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump(_nested({k: file for k, (_, file, _) in samples.items() if ROWS[k].in_file})))
    described = _flat(load_settings({}, config).describe())
    env_only = {key: None for key, row in ROWS.items() if not row.in_file}
    assert described == {key: shown for key, (_, _, shown) in samples.items()} | env_only
    overridden = load_settings({"DELEGATE_TASK_CAPACITY": "3", "LOGGING_LEVEL": "error"}, config)
    assert (overridden.capacity, overridden.log_level, overridden.name) == (3, "error", "eks-delegate-0")


def test_the_first_environment_name_is_preferred() -> None:
    """Harness's name wins over ours when both are set."""
    s = load_settings(
        {**REQUIRED, "AGENT_CONTROL_PLANE_URL": "https://ours", "AGENT_LOG_LEVEL": "debug", "LOGGING_LEVEL": "error"}
    )
    assert (s.control_plane.url, s.log_level) == ("https://cp", "debug")


def test_the_file_refuses_keys_the_table_does_not_have(tmp_path: Path) -> None:
    """Unknown keys, and the token (environment only), are each named as unknown."""
    config = tmp_path / "agent.yaml"
    config.write_text("delegate: {token: secret-in-a-file, colour: blue}\nextra: 1\nhttp: 8080\n")
    with pytest.raises(ConfigError) as err:
        load_settings(REQUIRED, config)
    assert [(p.field, p.message) for p in err.value.problems] == [
        (f"{config}: delegate.token", "unknown setting"),
        (f"{config}: delegate.colour", "unknown setting"),
        (f"{config}: extra", "unknown setting"),
        (f"{config}: http", "must be a mapping"),
    ]


def test_the_field_defaults_are_the_tables_defaults() -> None:
    """Settings built in code (tests, embedders) get the same defaults as parsed ones."""
    parsed = load_settings(REQUIRED)
    assert parsed == AgentSettings(control_plane=ControlPlaneEndpoint(url="https://cp"), token="t" * 20, name="d")


def test_each_settings_field_is_filled_by_exactly_one_row() -> None:
    """A field without a row could never be set; a row without a field would be lost."""
    attrs = [attr for row in SETTINGS for attr in row.attrs]
    field_names = [f"control_plane.{f.name}" for f in fields(ControlPlaneEndpoint)]
    field_names += [f.name for f in fields(AgentSettings) if f.name != "control_plane"]
    assert sorted(attrs) == sorted(field_names)


def test_secrets_are_never_described() -> None:
    """describe() feeds check-config and the startup log: a secret shows only as set."""
    canary = "canary-token-0123456789"
    described = load_settings({**REQUIRED, "DELEGATE_TOKEN": canary}).describe()
    assert canary not in yaml.safe_dump(described)
    assert all(_flat(described)[row.key] in (None, "(set)") for row in SETTINGS if row.secret)


def test_the_reference_config_file_is_generated_from_the_table() -> None:
    """config/agent.yaml documents exactly the table's settings, each as the table says."""
    text = (ROOT / settings_doc.REFERENCE).read_text()
    assert settings_doc.generated_block(text) == settings_doc.render(), (
        "config/agent.yaml is out of date: run python -m agent.runtime.settings_doc"
    )
    documented = set(re.findall(r"^\s*(?:# )?(\w+):", settings_doc.render(), re.MULTILINE))
    assert documented >= {row.key.rpartition(".")[2] for row in SETTINGS if row.in_file}
    assert all(row.env[0] in text for row in SETTINGS)


def test_the_chart_and_the_image_set_only_settings_the_table_has() -> None:
    """A renamed setting cannot leave the Helm chart or the Dockerfile setting a name nobody reads."""
    names = {name for row in SETTINGS for name in row.env}
    sources = [*sorted((ROOT / "helm" / "delegate-agent" / "templates").iterdir()), ROOT / "Dockerfile"]
    used = {m for path in sources for m in re.findall(r"\b(?:AGENT|DELEGATE|MANAGER)_[A-Z_]+\b", path.read_text())}
    assert used and used <= names


def test_check_config_lists_settings_and_aws_problems_together(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI parses the AWS environment beside the settings: one list, exit 2."""
    for name in list(os.environ):
        if name.startswith(("AGENT_", "AWS_", "DELEGATE_", "MANAGER_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MANAGER_HOST_AND_PORT", "ftp://cp")
    monkeypatch.setenv("DELEGATE_TOKEN", "t" * 20)
    monkeypatch.setenv("DELEGATE_NAME", "d")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "lots")
    with pytest.raises(SystemExit) as exit_:
        main(["check-config"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "delegate-agent: the configuration has 2 problem(s):",
        "  MANAGER_HOST_AND_PORT: must be an http(s) URL with a host, not 'ftp://cp'",
        "  AWS_MAX_ATTEMPTS: must be a whole number from 1 to 20, not 'lots'",
    ]


def test_parsing_settings_creates_no_directory(tmp_path: Path) -> None:
    """check-config and load_settings leave the disk alone; the outbox creates the data dir when it opens."""
    data = tmp_path / "not" / "yet" / "there"
    settings = load_settings({**REQUIRED, "AGENT_DATA_DIR": str(data)})
    assert settings.data_dir == data
    assert list(tmp_path.iterdir()) == []
    outbox = open_outbox(settings.data_dir)
    try:
        assert outbox.durable and (data / "outbox.sqlite3").is_file()
    finally:
        outbox.close()


def test_a_data_dir_that_cannot_be_created_is_a_settings_problem(tmp_path: Path) -> None:
    """Judged without writing: a path under a file, or the file itself, is refused with the reason."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for data, message in (
        (blocker / "sub", f"cannot create {blocker / 'sub'}: {blocker} is not a directory"),
        (blocker, f"{blocker} is not a directory"),
    ):
        with pytest.raises(ConfigError) as err:
            load_settings({**REQUIRED, "AGENT_DATA_DIR": str(data)})
        assert [(p.field, p.message) for p in err.value.problems] == [("AGENT_DATA_DIR", message)]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_parent_of_the_data_dir_is_a_settings_problem(tmp_path: Path) -> None:
    """A data dir the delegate's user could not create is refused before the delegate starts."""
    parent = tmp_path / "read-only"
    parent.mkdir(mode=0o500)
    with pytest.raises(ConfigError) as err:
        load_settings({**REQUIRED, "AGENT_DATA_DIR": str(parent / "data")})
    assert err.value.problems[0].message == f"cannot create {parent / 'data'}: {parent} is not writable by this user"


def test_an_outbox_that_cannot_open_names_the_data_dir(tmp_path: Path) -> None:
    """What the settings could not foresee (here the database path is a directory) is one clear line."""
    (tmp_path / "outbox.sqlite3").mkdir()
    with pytest.raises(DataDirUnusable, match=rf"^cannot use the data dir {tmp_path} \(AGENT_DATA_DIR\): "):
        open_outbox(tmp_path)


def test_run_with_an_unusable_data_dir_exits_2_in_one_line(tmp_path: Path) -> None:
    """The delegate refuses to start without a traceback; nothing is contacted first."""
    (tmp_path / "outbox.sqlite3").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AGENT_", "DELEGATE_", "MANAGER_"))}
    env.update(
        {
            **REQUIRED,
            "MANAGER_HOST_AND_PORT": "http://127.0.0.1:9",
            "AGENT_DATA_DIR": str(tmp_path),
            "AGENT_HTTP_LISTEN": "127.0.0.1:0",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    out = subprocess.run(
        [sys.executable, "-m", "agent", "run"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"delegate-agent: cannot use the data dir {tmp_path} (AGENT_DATA_DIR): "), out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr
