"""The alerting rules in ``ops/prometheus/``: unit-tested with promtool, evaluated live.

``promtool test rules`` runs the fixtures in ``ops/prometheus/tests/`` (each alert fires on
one series and stays quiet on another); a real Prometheus scraping a broker under load
loads the same file and must evaluate every rule without error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final

from kiteq.ops.metrics import BrokerMetrics
from tests.ops._prometheus import ALERT_RULES, Prometheus, promtool_run
from tests.ops.test_dashboard import exported_samples, metric_names
from tests.waiting import wait_until

UNIT_TESTS: Final = ALERT_RULES.parent / "tests" / "kiteq-alerts.test.yml"
EXPECTED_ALERTS: Final = {
    "KiteQBrokerDown",
    "KiteQBacklogGrowing",
    "KiteQOldestMessageTooOld",
    "KiteQDeadLettersGrowing",
    "KiteQUnresolvedTransactions",
    "KiteQPublishLatencyHigh",
    "KiteQZooKeeperDisconnected",
}


def alert_names(text: str) -> set[str]:
    return set(re.findall(r"^\s*- alert:\s*(\w+)\s*$", text, re.MULTILINE))


def rule_exprs(text: str) -> list[str]:
    """The expr of each rule: inline, or a folded (>-) block."""
    exprs = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if match is None:
            continue
        indent, value = match.groups()
        if value != ">-":
            exprs.append(value)
            continue
        block = []
        for following in lines[i + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= len(indent):
                break
            block.append(following.strip())
        exprs.append(" ".join(b for b in block if b))
    return exprs


def test_the_rules_cover_what_the_issue_asks_for() -> None:
    assert alert_names(ALERT_RULES.read_text()) == EXPECTED_ALERTS


def test_every_alert_has_a_unit_test() -> None:
    tested = set(re.findall(r"alertname:\s*(\w+)", UNIT_TESTS.read_text()))
    assert tested == EXPECTED_ALERTS


def test_promtool_checks_the_rules(promtool: str) -> None:
    result = promtool_run(promtool, "check", "rules", str(ALERT_RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_pass(promtool: str) -> None:
    result = promtool_run(promtool, "test", "rules", str(UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_can_fail(promtool: str, tmp_path: Path) -> None:
    """The fixture is not vacuous: a wrong expectation makes promtool fail."""
    broken = tmp_path / "broken.test.yml"
    text = UNIT_TESTS.read_text().replace("- ../kiteq-alerts.yml", f"- {ALERT_RULES}")
    broken.write_text(text.replace("is down", "is fine", 1))
    result = promtool_run(promtool, "test", "rules", str(broken))
    assert result.returncode != 0
    assert "KiteQBrokerDown" in result.stdout + result.stderr


def test_rules_use_only_exported_metrics(touched_metrics: BrokerMetrics) -> None:
    exported = exported_samples(touched_metrics) | {"up"}
    exprs = rule_exprs(ALERT_RULES.read_text())
    assert len(exprs) == len(EXPECTED_ALERTS)
    for expr in exprs:
        assert metric_names(expr), expr
        assert metric_names(expr) <= exported, expr


def test_a_real_prometheus_evaluates_every_rule(scraped_broker: Prometheus) -> None:
    def evaluated() -> list[dict[str, Any]]:
        groups = scraped_broker.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        # a rule not evaluated yet reports the zero time, 0001-01-01T00:00:00Z
        done = rules and all(not r["lastEvaluation"].startswith("0001") for r in rules)
        return rules if done else []

    wait_until(evaluated, 60, "prometheus to evaluate every rule")
    rules = evaluated()
    assert {r["name"] for r in rules} == EXPECTED_ALERTS
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        # the expression also runs as a plain query against the scraped broker
        scraped_broker.query(rule["query"])
    # the broker answers its scrapes: the down alert stays quiet
    firing = [r["name"] for r in rules if r["state"] == "firing"]
    assert "KiteQBrokerDown" not in firing
