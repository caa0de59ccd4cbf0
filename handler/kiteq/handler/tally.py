"""Delivery counts and latencies, gathered per message and handed to the metrics per period.

The hot path only adds to counters and list-based histogram series; ``flush`` makes one
metrics update per label set instead of one per message.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiteq.ops.metrics import BrokerMetrics

__all__ = ["DeliveryTally"]

# counts are kept by (topic, group)
_Key = tuple[str, str]


class DeliveryTally:
    def __init__(self, metrics: BrokerMetrics | None) -> None:
        self._metrics = metrics
        # totals since start (stats, admin service, console)
        self.delivered = 0
        self.redelivered = 0
        self.dead_lettered = 0
        self.flow_limited = 0
        # dead letters by "topic/group/reason" since the broker's last log summary
        self.dead_letter_summary: Counter[str] = Counter()
        # (topic, group, result) -> count since the last flush
        self._results: Counter[tuple[str, str, str]] = Counter()
        self._retries: Counter[_Key] = Counter()
        self._held: Counter[_Key] = Counter()
        self._buried: Counter[tuple[str, str, str]] = Counter()
        # body bytes pushed (one int add per push)
        self.bytes_out = 0
        # per-message latencies go straight into the metrics' list-based histograms: the
        # series of each (topic, group) is looked up once, then one bisect and two adds
        self._first = metrics.first_delivery_latency if metrics is not None else None
        self._ack = metrics.ack_latency if metrics is not None else None
        self._first_series: dict[_Key, list[float]] = {}
        self._ack_series: dict[_Key, list[float]] = {}
        self._bounds = metrics.ack_latency.bounds if metrics is not None else ()

    def result(self, topic: str, group: str, result: str) -> None:
        self._results[topic, group, result] += 1

    def pushed(self, topic: str, group: str, attempt: int, waited: float, size: int) -> None:
        """A push of *size* body bytes; *waited* seconds since publish, for a first attempt."""
        self.bytes_out += size
        if attempt > 1:
            self.redelivered += 1
            self._retries[topic, group] += 1
            return
        if self._first is not None:
            key = (topic, group)
            series = self._first_series.get(key)
            if series is None:
                series = self._first_series[key] = self._first.series(key)
            series[bisect_left(self._bounds, waited)] += 1
            series[-1] += waited

    def acked(self, topic: str, group: str, took: float) -> None:
        """A delivery acked *took* seconds after its push."""
        self.delivered += 1
        if self._ack is not None:
            key = (topic, group)
            series = self._ack_series.get(key)
            if series is None:
                series = self._ack_series[key] = self._ack.series(key)
            series[bisect_left(self._bounds, took)] += 1
            series[-1] += took

    def held(self, topic: str, group: str) -> None:
        """A push waited for the (topic, group) watermark."""
        self.flow_limited += 1
        self._held[topic, group] += 1

    def buried(self, topic: str, group: str, reason: str) -> None:
        self.dead_lettered += 1
        self._buried[topic, group, reason] += 1

    def flush(self) -> None:
        """Hand the counts gathered since the last call to the metrics."""
        metrics = self._metrics
        if metrics is not None:
            for (topic, group, result), n in self._results.items():
                metrics.delivered(topic, group, result, n)
            for (topic, group), n in self._retries.items():
                metrics.redelivered(topic, group, n)
            for (topic, group), n in self._held.items():
                metrics.flow_limited(topic, group, n)
            for (topic, group, reason), n in self._buried.items():
                metrics.dead_lettered(topic, group, reason, n)
            if self.bytes_out:
                metrics.delivered_bytes(self.bytes_out)
        for (topic, group, reason), n in self._buried.items():
            self.dead_letter_summary[f"{topic}/{group or '-'}/{reason}"] += n
        self._results.clear()
        self._retries.clear()
        self._held.clear()
        self._buried.clear()
        self.bytes_out = 0
