"""The Grafana dashboard and the Prometheus config only use what the broker exports.

Checked three ways: metric names in every query against a rendered ``BrokerMetrics``;
PromQL syntax with ``promtool check rules``; and every query evaluated by a real Prometheus
that scrapes a real ``OpsServer``, which must return data (so label values such as
``result="ack"`` are right too).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiteq.ops.http import OpsServer
from kiteq.ops.metrics import BrokerMetrics
from tests._servers import free_port

OPS = Path(__file__).resolve().parents[2] / "ops"
DASHBOARD: Final = OPS / "grafana" / "dashboards" / "kiteq-overview.json"
PROMETHEUS_CONFIG: Final = OPS / "prometheus" / "prometheus.yml"

# Grafana variables -> values a plain Prometheus accepts.
SUBSTITUTIONS: Final = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$job": ".+",
    "$instance": ".+",
    "$topic": ".*",
}
PROMQL_WORDS: Final = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
    | {"unless", "offset", "inf", "nan", "le"}
)


def load_dashboard() -> dict[str, Any]:
    with DASHBOARD.open() as fh:
        document: dict[str, Any] = json.load(fh)
    return document


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    return [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def substitute(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names used in a PromQL expression (not functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        name, call = match.groups()
        if call is None and name not in PROMQL_WORDS:
            names.add(name)
    return names


def label_values_metric(query: str) -> str:
    match = re.fullmatch(r"label_values\((\w+)(?:\{[^}]*\})?,\s*\w+\)", query)
    assert match is not None, query
    return match.group(1)


def exported_samples(metrics: BrokerMetrics) -> set[str]:
    text = metrics.render().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


# --- the extractor itself -------------------------------------------------------------


def test_metric_names_extraction() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, op) (rate(a_bucket{job=~"$job", x="y(z)"}'
        "[$__rate_interval]))) / on (op) group_left sum(b_total offset 5m) > bool 0"
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}
    assert label_values_metric('label_values(kiteq_build_info{job=~"$job"}, instance)') == (
        "kiteq_build_info"
    )


# --- the dashboard's shape (grafana/dashboard-linter's rules) ---------------------------


def test_dashboard_identity() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "kiteq-overview"
    assert dashboard["id"] is None
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard["title"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_dashboard_variables() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance"} <= set(variables)
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_every_query_uses_the_datasource_variable() -> None:
    text = DASHBOARD.read_text()
    for panel in panels(load_dashboard()):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', text))
    assert uids == {"kiteq-overview", "${datasource}", "-- Grafana --"}


def test_every_panel_has_a_unit_and_description() -> None:
    for panel in panels(load_dashboard()):
        if panel["type"] != "row":
            assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
            assert panel["description"], panel["title"]


def test_rates_use_the_rate_interval() -> None:
    for expr in exprs(load_dashboard()):
        for window in re.findall(r"\[([^\]]*)\]", expr):
            assert window == "$__rate_interval", expr
        assert re.search(r'job=~"\$job"', expr), f"not filtered by $job: {expr}"


# --- names against the broker's exposition --------------------------------------------


def test_every_referenced_metric_is_exported(touched_metrics: BrokerMetrics) -> None:
    dashboard = load_dashboard()
    exported = exported_samples(touched_metrics)
    referenced: set[str] = set()
    for expr in exprs(dashboard):
        names = metric_names(expr)
        assert names, f"no metric in {expr}"
        referenced |= names
    referenced |= {label_values_metric(q) for q in variable_queries(dashboard)}
    assert referenced - exported == set()
    # The dashboard covers every kiteq family the broker exports.
    bases = {re.sub(r"_(bucket|sum|count|created|total)$", "", n) for n in exported}
    used = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in referenced}
    assert {b for b in bases if b.startswith("kiteq_")} - used == set()


def test_promql_syntax(tmp_path: Path, promtool: str) -> None:
    dashboard = load_dashboard()
    queries = [substitute(e) for e in exprs(dashboard)]
    rules = {
        "groups": [
            {
                "name": "kiteq-dashboard",
                "rules": [
                    {"record": f"kiteq_dashboard:query{i}", "expr": expr}
                    for i, expr in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_prometheus_config_is_valid(promtool: str) -> None:
    text = PROMETHEUS_CONFIG.read_text()
    assert re.search(r"job_name:\s*kiteq\b", text)
    assert "metrics_path: /metrics" in text
    result = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_files() -> None:
    provisioning = OPS / "grafana" / "provisioning"
    dashboards = (provisioning / "dashboards" / "kiteq.yaml").read_text()
    datasources = (provisioning / "datasources" / "prometheus.yaml").read_text()
    assert dashboards.startswith("#")
    assert "apiVersion: 1" in dashboards
    assert "type: file" in dashboards
    assert "path: /var/lib/grafana/dashboards/kiteq" in dashboards
    assert "apiVersion: 1" in datasources
    assert "type: prometheus" in datasources
    for text in (dashboards, datasources):
        assert "\t" not in text


# --- against a real Prometheus ---------------------------------------------------------


class Prometheus:
    """A throwaway Prometheus server that scrapes one target twice a second."""

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "500ms", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": "kiteq", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        self._log = (workdir / "prometheus.log").open("wb")
        self._process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://127.0.0.1:{self.port}{path}{query}"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.load(reply) if path.startswith("/api/") else reply.read()

    def query(self, expr: str) -> list[Any]:
        reply = self.get("/api/v1/query", query=expr)
        assert reply["status"] == "success", reply
        result: list[Any] = reply["data"]["result"]
        return result

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            assert self._process.poll() is None, "prometheus exited"
            try:
                self.get("/-/ready")
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
            else:
                return
        pytest.fail("prometheus did not become ready")

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._log.close()


async def test_every_query_returns_data_from_a_real_prometheus(
    tmp_path: Path, touched_metrics: BrokerMetrics, prometheus_binary: str
) -> None:
    dashboard = load_dashboard()
    queries = [substitute(e) for e in exprs(dashboard)]
    queries += [label_values_metric(q) for q in variable_queries(dashboard)]
    async with OpsServer("127.0.0.1", 0, touched_metrics, _EmptySource()) as ops:
        prometheus = Prometheus(prometheus_binary, tmp_path, f"127.0.0.1:{ops.port}")
        try:
            # Blocking calls run in threads so that the server answers the scrapes meanwhile.
            await asyncio.to_thread(prometheus.wait_ready, time.monotonic() + 30)
            deadline = time.monotonic() + 30
            # rate() needs two samples in its window: wait for the third scrape.
            while not await asyncio.to_thread(
                prometheus.query, 'count_over_time(up{job="kiteq"}[1m]) >= 3'
            ):
                assert time.monotonic() < deadline, "prometheus did not scrape the broker"
                await asyncio.sleep(0.2)
            assert await asyncio.to_thread(prometheus.query, 'up{job="kiteq"} == 1')
            empty = [q for q in queries if not await asyncio.to_thread(prometheus.query, q)]
            assert empty == [], "queries without data"
        finally:
            prometheus.stop()


class _EmptySource:
    def stat_snapshot(self) -> dict[str, Any]:
        return {}

    def binds_snapshot(self) -> dict[str, Any]:
        return {}
