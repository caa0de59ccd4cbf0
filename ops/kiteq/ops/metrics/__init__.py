"""Prometheus metrics of one broker, on a registry of its own.

``BrokerMetrics`` is created by the broker and handed to whoever reports (pipeline
stages, stores, the connection manager); nothing here is global and importing the
module registers nothing. Names follow the Prometheus conventions: ``kiteq_`` prefix,
base units, counters ending in ``_total``.

Label cardinality is bounded. Development clusters accept any valid topic, so the first
``max_topics`` distinct topics (and ``max_groups`` groups, ``max_ops`` store operations)
get their own series and later ones are counted under ``"_other"``; names that are not
valid topic/group names (a rejected message may carry anything) become ``"_invalid"``.
Every overflow is counted in ``kiteq_metrics_label_overflow_total{label}``. The label
values (the bounded sets and those markers) live in ``kiteq.ops.metrics.labels``.
"""

from __future__ import annotations

from kiteq.ops.metrics.broker import CONTENT_TYPE, LATENCY_BUCKETS, BrokerMetrics
from kiteq.ops.metrics.histogram import FastHistogram

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "BrokerMetrics", "FastHistogram"]
