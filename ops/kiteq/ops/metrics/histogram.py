"""A Prometheus histogram cheap enough to observe once per delivered message."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client.core import HistogramMetricFamily, Metric

from kiteq.ops.metrics.labels import LabelCap

__all__ = ["FastHistogram"]


class FastHistogram:
    """A histogram for per-message observations on the event loop.

    ``prometheus_client.Histogram`` takes a lock and a labelled child lookup per
    ``observe``; the dispatcher observes once per delivery, so this one keeps plain lists
    (one bisect and two additions per observation) and builds the exposition at scrape
    time. Label values go through the broker's caps when scraped. ``observe`` is for the
    event loop only; ``collect`` may run on the scrape thread (it copies under a lock).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...],
        caps: tuple[LabelCap, ...],
    ) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = labelnames
        self._bounds = buckets
        self._caps = caps
        self._lock = threading.Lock()
        # label values -> counts per bucket (the last one is +Inf), then the sum
        self._series: dict[tuple[str, ...], list[float]] = {}

    @property
    def bounds(self) -> tuple[float, ...]:
        """The buckets' upper bounds, without +Inf (for callers that fill a ``series``)."""
        return self._bounds

    def series(self, key: tuple[str, ...]) -> list[float]:
        """The counts of *key*'s label values, for a hot path that observes by itself.

        ``series[bisect_left(bounds, v)] += 1`` and ``series[-1] += v`` is one
        observation of *v* (the dispatcher keeps the list per (topic, group)).
        """
        series = self._series.get(key)
        if series is None:
            series = [0.0] * (len(self._bounds) + 2)
            with self._lock:
                series = self._series.setdefault(key, series)
        return series

    def observe(self, key: tuple[str, ...], value: float, n: int = 1) -> None:
        """Add *n* observations of *value* under the label values *key*."""
        series = self._series.get(key)
        if series is None:
            series = [0.0] * (len(self._bounds) + 2)
            with self._lock:
                self._series[key] = series
        series[bisect_left(self._bounds, value)] += n
        series[-1] += value * n

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            items = [(key, list(series)) for key, series in self._series.items()]
        merged: dict[tuple[str, ...], list[float]] = {}
        for key, series in items:
            labels = tuple(cap(v) for cap, v in zip(self._caps, key, strict=True))
            into = merged.get(labels)
            if into is None:
                merged[labels] = series
            else:
                merged[labels] = [a + b for a, b in zip(into, series, strict=True)]
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        for labels, series in merged.items():
            buckets = []
            total = 0.0
            for bound, count in zip((*self._bounds, float("inf")), series, strict=False):
                total += count
                buckets.append((_bound_text(bound), total))
            family.add_metric(list(labels), buckets, series[-1])
        yield family


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))
