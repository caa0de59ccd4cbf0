"""One bench run against KiteQ: on a broker of the bench's own, or on a running one."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from kiteq.bench.broker import OwnBroker
from kiteq.bench.run import ChildCommand, ProgressLine, Role, RunResult, run
from kiteq.bench.workload import Workload

__all__ = ["KiteqRun", "bench_kiteq", "child_command"]


@dataclasses.dataclass(frozen=True, slots=True)
class KiteqRun:
    """A run's figures, where it ran, and the broker's CPU when the bench started it."""

    result: RunResult
    target: str
    store: str
    broker_cpu_seconds: float | None

    @property
    def broker_cpu_us_per_message(self) -> float | None:
        if self.broker_cpu_seconds is None or not self.result.acked:
            return None
        return round(self.broker_cpu_seconds / self.result.acked * 1e6, 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.result.as_dict(),
            "target": self.target,
            "store": self.store,
            "broker_cpu_seconds": self.broker_cpu_seconds,
            "broker_cpu_us_per_message": self.broker_cpu_us_per_message,
        }


def child_command(target: str) -> ChildCommand:
    """Children that produce to and consume from *target* (``kiteq.bench.roles``)."""

    def command(role: Role, index: int) -> list[str]:
        return [sys.executable, "-m", "kiteq.bench.roles", target]

    return command


def bench_kiteq(
    workload: Workload,
    *,
    store: str = "rocksdb",
    target: str | None = None,
    progress: ProgressLine | None = None,
    drain_timeout: float = 30.0,
    extra_config: str = "",
) -> KiteqRun:
    """Run *workload* on *target* (an address or registry), or on an own broker on *store*.

    Raises:
        KiteQError: The broker did not start, or the run failed (``BenchError``).
    """
    if target is not None:
        result = run(
            workload, child_command(target), progress=progress, drain_timeout=drain_timeout
        )
        return KiteqRun(result, target, "", None)
    with OwnBroker(store, extra_config=extra_config) as broker:
        cpu0 = broker.cpu_seconds()
        result = run(
            workload,
            child_command(broker.address),
            progress=progress,
            drain_timeout=drain_timeout,
        )
        cpu1 = broker.cpu_seconds()
        cpu = None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 3)
        return KiteqRun(result, broker.address, broker.store_label, cpu)
