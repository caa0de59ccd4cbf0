"""What ``/healthz`` and ``/readyz`` answer, from a broker's ``HealthReport``.

- ``/healthz`` (liveness): 200 while the broker can do its work: the store answers and no
  background loop has failed. A registry that lost ZooKeeper is reported but keeps 200:
  the broker still serves with its last known bindings, and restarting it would not
  bring ZooKeeper back.
- ``/readyz`` (readiness, for load balancers and rollouts): 200 only when the broker
  should get traffic: started, registered, accepting publishes (not draining), store up
  and the registry connected.

Both answer JSON ``{"status": "ok"|"unavailable", "checks": {name: state}}`` so that a
probe can use the code and a person the body. The HTTP layer (``kiteq.ops.http``) calls
``healthz``/``readyz``; the broker fills in the report (``kiteq.broker.server``).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Protocol

__all__ = ["Component", "HealthReport", "HealthSource", "healthz", "readyz"]


class Component(enum.Enum):
    """The state of one part of the broker."""

    UP = "up"
    DEGRADED = "degraded"  # working with less: a ZooKeeper session suspended or lost
    DOWN = "down"
    STARTING = "starting"
    DRAINING = "draining"


@dataclasses.dataclass(frozen=True)
class HealthReport:
    """The broker's parts as the last periodic check saw them (never a store call)."""

    broker: Component
    store: Component
    registry: Component


class HealthSource(Protocol):
    def health_report(self) -> HealthReport: ...


def _answer(ok: bool, report: HealthReport) -> tuple[int, dict[str, Any]]:
    checks = {f.name: getattr(report, f.name).value for f in dataclasses.fields(report)}
    return (200 if ok else 503), {"status": "ok" if ok else "unavailable", "checks": checks}


def healthz(report: HealthReport) -> tuple[int, dict[str, Any]]:
    """Status code and body of ``/healthz``."""
    alive = report.broker is not Component.DOWN and report.store is not Component.DOWN
    return _answer(alive, report)


def readyz(report: HealthReport) -> tuple[int, dict[str, Any]]:
    """Status code and body of ``/readyz``."""
    ready = all(getattr(report, f.name) is Component.UP for f in dataclasses.fields(report))
    return _answer(ready, report)
