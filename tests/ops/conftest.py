from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from kiteq.ops.metrics import BrokerMetrics
from kiteq.ops.metrics.labels import (
    CONNECTION_ROLES,
    DEAD_LETTER_REASONS,
    DELIVERY_RESULTS,
    HTTP_ENDPOINTS,
    REJECT_REASONS,
    SESSION_CLOSE_REASONS,
    TX_CHECK_RESULTS,
    WEBHOOK_OUTCOMES,
)
from tests._servers import unavailable
from tests.ops._prometheus import Prometheus, broker_under_load


def touch_everything(metrics: BrokerMetrics) -> None:
    """Call every reporting method with every enumerated label value."""
    metrics.received("trade", 3)
    metrics.duplicates("trade", 2)
    metrics.set_remembered(5)
    for reason in sorted(REJECT_REASONS):
        metrics.rejected("trade", reason)
    for result in sorted(DELIVERY_RESULTS):
        metrics.delivered("trade", "pay-svc", result, 2)
    metrics.redelivered("trade", "pay-svc")
    for op in ("save", "get", "delete"):
        metrics.observe_store(op, 0.002, 50)
    for role in sorted(CONNECTION_ROLES):
        metrics.set_connections(role, 2)
    metrics.set_inflight(4)
    metrics.set_backlog({"trade": 7, "user-profile": 1})
    metrics.set_scheduled({"trade": 2})
    metrics.set_ordering({("trade", "g"): 1}, {("trade", "g"): 3.0})
    metrics.set_dead_letters({("trade", "pay-svc"): 2})
    metrics.set_info("0.1.0", "rocksdb_dev", "rocksdb")
    for reason in sorted(DEAD_LETTER_REASONS):
        metrics.dead_lettered("trade", "pay-svc", reason, 2)
    metrics.flow_limited("trade", "pay-svc", 3)
    metrics.received_bytes("trade", 3000)
    metrics.delivered_bytes(2000)
    metrics.set_groups(
        {("trade", "pay-svc"): 2},
        {("trade", "pay-svc"): 5},
        {("trade", "pay-svc"): 9, ("trade", "audit"): 4},
        {("trade", "pay-svc"): 1.5},
        {("trade", "pay-svc"): 2, ("trade", "audit"): 0},
    )
    metrics.set_transactions(3, 1)
    for result in sorted(TX_CHECK_RESULTS):
        metrics.tx_checked(result)
    metrics.set_zookeeper("connected", 1)
    metrics.taken_over(12)
    for reason in sorted(SESSION_CLOSE_REASONS):
        metrics.session_closed(reason)
    for endpoint in sorted(HTTP_ENDPOINTS):
        metrics.http_request(endpoint, 200, 0.003)
    metrics.store_ack_latency.observe(("trade",), 0.002, 50)
    metrics.first_delivery_latency.observe(("trade", "pay-svc"), 0.004)
    metrics.ack_latency.observe(("trade", "pay-svc"), 0.03)
    for outcome in sorted(WEBHOOK_OUTCOMES):
        metrics.webhook_called("trade", "mail-hook", outcome, 0.01)


@pytest.fixture
def metrics() -> BrokerMetrics:
    return BrokerMetrics()


@pytest.fixture
def touched_metrics(metrics: BrokerMetrics) -> BrokerMetrics:
    touch_everything(metrics)
    return metrics


def _prometheus_package_binary(name: str) -> str:
    """Path of *name* from the Debian package ``prometheus`` (scripts/test.sh installs it)."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} (apt-get install prometheus)")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return _prometheus_package_binary("promtool")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """Path of the ``prometheus`` server."""
    return _prometheus_package_binary("prometheus")


@pytest.fixture(scope="session")
def scraped_broker(
    tmp_path_factory: pytest.TempPathFactory, prometheus_binary: str
) -> Iterator[Prometheus]:
    """A real Prometheus scraping a broker process under load, with the alert rules loaded."""
    with broker_under_load(tmp_path_factory.mktemp("scraped"), prometheus_binary) as prometheus:
        yield prometheus
