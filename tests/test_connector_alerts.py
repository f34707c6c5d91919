"""The connector-health alert rules: valid for promtool, and their unit tests pass (they fire and stay quiet)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS = Path(__file__).resolve().parent.parent / "config" / "prometheus"
RULES = PROMETHEUS / "connector-alerts.yaml"
RULE_TESTS = PROMETHEUS / "tests" / "connector-alerts.yaml"

pytestmark = pytest.mark.tooling


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: run tools/install-test-tools.sh (make test does)"
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False)


def test_the_connector_alert_rules_are_valid() -> None:
    """config/prometheus/connector-alerts.yaml passes promtool check rules, with both rules."""
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 2 rules found" in out.stdout


def test_the_connector_alert_rules_fire_and_stay_quiet_as_their_unit_tests_say() -> None:
    """promtool test rules: each alert fires on the series it should, and not on the ones nearby."""
    out = promtool("test", "rules", str(RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_connector_alert_is_unit_tested_firing_and_quiet() -> None:
    """A rule added without a promtool test fails here: each alert is expected to fire once and not to once."""
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {"ConnectorFailingForAnHour", "ConnectorNotTestedFor3Intervals"}
    unit = yaml.safe_load(RULE_TESTS.read_text())
    checks = [c for t in unit["tests"] for c in t.get("alert_rule_test", [])]
    fired = {c["alertname"] for c in checks if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in checks if not c.get("exp_alerts")}
    assert fired == alerts, "every alert has a test where it fires"
    assert quiet == alerts, "every alert has a test where it does not"


def test_the_rule_file_is_loadable_next_to_the_delegate_rules() -> None:
    """Both shipped rule files load together in one promtool run (no clashing group names)."""
    out = promtool("check", "rules", str(PROMETHEUS / "alerts.yaml"), str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    names = [
        g["name"] for f in ("alerts.yaml", RULES.name) for g in yaml.safe_load((PROMETHEUS / f).read_text())["groups"]
    ]
    assert len(names) == len(set(names)), names
