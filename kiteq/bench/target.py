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
    """A run's figures and where it ran (*store* empty: a broker the bench did not start)."""

    result: RunResult
    target: str
    store: str

    def as_dict(self) -> dict[str, Any]:
        return {**self.result.as_dict(), "target": self.target, "store": self.store}


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
        return KiteqRun(result, target, "")
    with OwnBroker(store, extra_config=extra_config) as broker:
        result = run(
            workload,
            child_command(broker.address),
            progress=progress,
            drain_timeout=drain_timeout,
            broker_cpu=broker.cpu_seconds,
        )
        return KiteqRun(result, broker.address, broker.store_label)
