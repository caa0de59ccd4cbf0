from __future__ import annotations

import shutil

import pytest

from kiteq.ops.metrics import CONNECTION_ROLES, DELIVERY_RESULTS, REJECT_REASONS, BrokerMetrics
from tests._servers import unavailable


def touch_everything(metrics: BrokerMetrics) -> None:
    """Call every reporting method with every enumerated label value."""
    metrics.received("trade", 3)
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
    metrics.set_dead_letters({("trade", "pay-svc"): 2})
    metrics.set_info("0.1.0", "rocksdb_dev", "rocksdb")


@pytest.fixture
def metrics() -> BrokerMetrics:
    return BrokerMetrics()


@pytest.fixture
def touched_metrics(metrics: BrokerMetrics) -> BrokerMetrics:
    touch_everything(metrics)
    return metrics


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of ``promtool`` (Debian package ``prometheus``; scripts/test.sh installs it)."""
    path = shutil.which("promtool")
    if path is None:
        unavailable("promtool (apt-get install prometheus)")
    return path


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """Path of the ``prometheus`` server (Debian package ``prometheus``)."""
    path = shutil.which("prometheus")
    if path is None:
        unavailable("prometheus (apt-get install prometheus)")
    return path
