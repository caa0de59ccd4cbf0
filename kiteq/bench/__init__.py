"""``kiteq-bench``: load generator and latency meter for a KiteQ broker (issue #12).

P producer and C consumer processes run one workload (message size, count or duration,
maximum or target rate, transactional share) against a broker the bench starts on a free
loopback port or one already running; it prints publish and end-to-end rates and
publish→store-ack and publish→delivery latency percentiles from HDR histograms.

The orchestration (``run``), the child-side meters (``tally``) and the workload
(``workload``) do not depend on KiteQ's client: ``tests/bench/peers.py`` drives RabbitMQ
and NATS JetStream through the same code. Only ``roles`` speaks to a KiteQ broker, through
``kiteq.client``; the broker itself runs as a separate process (``broker``).
"""

from __future__ import annotations
