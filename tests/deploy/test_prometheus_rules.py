"""``promtool`` checks the Prometheus config and alert rules, and unit-tests every alert."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.tools import ALERTS_FILE, PROMETHEUS_CONFIG, alert_exprs, require_tool

UNIT_TESTS = Path(__file__).with_name("alerts_test.yml")
INSTALLER = "scripts/install-test-servers.sh"


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_tool("promtool", INSTALLER)


def _promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=60)


def test_promtool_check_config(promtool: str) -> None:
    proc = _promtool(promtool, "check", "config", PROMETHEUS_CONFIG)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rule files found" in proc.stdout + proc.stderr  # alerts.yml is found beside it


def test_promtool_check_rules(promtool: str) -> None:
    proc = _promtool(promtool, "check", "rules", ALERTS_FILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(alert_exprs())} rules found" in proc.stdout + proc.stderr


def test_promtool_check_rules_catches_a_bad_expression(promtool: str, tmp_path: Path) -> None:
    # The negative control: promtool parses each expression (an unclosed bracket is an error).
    bad = tmp_path / "alerts.yml"
    bad.write_text(
        ALERTS_FILE.read_text().replace("foveate_queue_depth > 1000", "foveate_queue_depth[5m > 1000")
    )
    proc = _promtool(promtool, "check", "rules", bad)
    assert proc.returncode != 0


def test_alert_unit_tests_pass(promtool: str) -> None:
    proc = _promtool(promtool, "test", "rules", UNIT_TESTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_unit_tests_can_fail(promtool: str, tmp_path: Path) -> None:
    # With the backlog threshold raised above the test's queue depth, its expected alert must not come.
    rules = tmp_path / "alerts.yml"
    rules.write_text(
        ALERTS_FILE.read_text().replace("foveate_queue_depth > 1000", "foveate_queue_depth > 9000")
    )
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(UNIT_TESTS.read_text().replace("../../docker/prometheus/alerts.yml", str(rules)))
    proc = _promtool(promtool, "test", "rules", tests)
    assert proc.returncode != 0
    assert "FoveateQueueBacklog" in proc.stdout + proc.stderr


def test_every_alert_has_firing_and_silent_unit_tests() -> None:
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    fired = {case["alertname"] for case in cases if case.get("exp_alerts")}
    silent = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    alerts = {where.removeprefix("alerts.yml: ") for where, _ in alert_exprs()}
    assert alerts <= fired, f"alerts never shown to fire: {alerts - fired}"
    # Either a silent eval or a healthy series beside the firing one (checked by exp_alerts' exactness).
    assert len(silent) >= 4


def test_alerts_cover_the_issue(promtool: str) -> None:
    # Issue 6: prediction error rising, effective dimensionality collapsing, queue backlog, worker down.
    alerts = {where.removeprefix("alerts.yml: ") for where, _ in alert_exprs()}
    assert {
        "FoveatePredictionErrorRising",
        "FoveateEffectiveDimensionalityCollapse",
        "FoveateQueueBacklog",
        "FoveateWorkerDown",
    } <= alerts
    rules = yaml.safe_load(ALERTS_FILE.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
