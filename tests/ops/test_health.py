"""``/healthz`` and ``/readyz``: the answers from a report, and a live broker's."""

from __future__ import annotations

import json
import urllib.request

import pytest

from kiteq.ops.health import Component, HealthReport, healthz, readyz
from tests.ops._prometheus import Prometheus

UP = Component.UP


@pytest.mark.parametrize(
    ("report", "alive", "ready"),
    [
        (HealthReport(UP, UP, UP), 200, 200),
        # ZooKeeper gone: serving with the last bindings, but take it out of rotation
        (HealthReport(UP, UP, Component.DEGRADED), 200, 503),
        (HealthReport(UP, Component.DOWN, UP), 503, 503),
        (HealthReport(Component.DOWN, UP, UP), 503, 503),
        (HealthReport(Component.DRAINING, UP, UP), 200, 503),
        (HealthReport(Component.STARTING, Component.STARTING, UP), 200, 503),
    ],
)
def test_answers(report: HealthReport, alive: int, ready: int) -> None:
    status, body = healthz(report)
    assert status == alive
    assert body["status"] == ("ok" if alive == 200 else "unavailable")
    assert body["checks"] == {
        "broker": report.broker.value,
        "store": report.store.value,
        "registry": report.registry.value,
    }
    assert readyz(report)[0] == ready


def _get(url: str) -> tuple[int, dict[str, object]]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.status, json.load(reply)


def test_a_running_broker_is_alive_and_ready(scraped_broker: Prometheus) -> None:
    base = f"http://{scraped_broker.target}"
    for path in ("/healthz", "/readyz"):
        status, body = _get(base + path)
        assert status == 200, (path, body)
        assert body == {
            "status": "ok",
            "checks": {"broker": "up", "store": "up", "registry": "up"},
        }
