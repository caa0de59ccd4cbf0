"""``BrokerMetrics``: every metric of one broker, on a registry of its own."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from kiteq.ops.metrics.histogram import FastHistogram
from kiteq.ops.metrics.labels import (
    BINDING_REFUSAL_REASONS,
    CONNECTION_ROLES,
    DEAD_LETTER_REASONS,
    DELIVERY_RESULTS,
    FRAME_REJECT_REASONS,
    HTTP_CODES,
    HTTP_ENDPOINTS,
    NO_GROUP_LABEL,
    REJECT_REASONS,
    SESSION_CLOSE_REASONS,
    TX_CHECK_RESULTS,
    WEBHOOK_OUTCOMES,
    ZK_STATES,
    LabelCap,
    check,
)

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "BrokerMetrics"]


CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
"""Content type of ``BrokerMetrics.render()`` (Prometheus text format 0.0.4)."""

DEFAULT_MAX_TOPICS: Final = 200
DEFAULT_MAX_GROUPS: Final = 200
DEFAULT_MAX_OPS: Final = 32


def _one_two_five(first: float, last: float) -> tuple[float, ...]:
    """Bucket bounds 1, 2.5 and 5 times a power of ten, from *first* to *last* (included)."""
    bounds: list[float] = []
    exponent = -12
    while True:
        for step in (1, 2.5, 5):
            bound = round(step * 10.0**exponent, 12)
            if bound > last:
                return tuple(bounds)
            if bound >= first:
                bounds.append(bound)
        exponent += 1


# Store calls: from a cached get (~10 us) to a fsync'ed group commit under load (~1 s).
_DURATION_BUCKETS: Final = _one_two_five(0.0001, 5.0)
# Message latencies: a loopback publish acked in ~1 ms up to a consumer that takes minutes.
LATENCY_BUCKETS: Final = (*_one_two_five(0.0005, 10.0), 30.0, 60.0, 300.0)
_BATCH_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class BrokerMetrics:
    """The broker's metrics; ``render()`` is what ``/metrics`` serves.

    Args:
        max_topics: Distinct ``topic`` label values before ``"_other"``.
        max_groups: Distinct ``group`` label values before ``"_other"``.
        max_ops: Distinct store ``op`` label values before ``"_other"``.
        process: Also export the standard ``process_*`` metrics (CPU, memory, fds).
    """

    def __init__(
        self,
        *,
        max_topics: int = DEFAULT_MAX_TOPICS,
        max_groups: int = DEFAULT_MAX_GROUPS,
        max_ops: int = DEFAULT_MAX_OPS,
        process: bool = True,
    ) -> None:
        self._registry = CollectorRegistry(auto_describe=True)
        reg = self._registry
        # every metric registers on this broker's own registry
        counter = functools.partial(Counter, registry=reg)
        gauge = functools.partial(Gauge, registry=reg)
        histogram = functools.partial(Histogram, registry=reg)
        overflow = counter(
            "kiteq_metrics_label_overflow_total",
            "Label values folded into _other or _invalid because of the cardinality cap.",
            ["label"],
        )
        self._topic = LabelCap("topic", max_topics, overflow)
        self._group = LabelCap("group", max_groups, overflow)
        self._op = LabelCap("op", max_ops, overflow)

        self._received = counter(
            "kiteq_messages_received_total",
            "Messages accepted from producers (stored, or fly).",
            ["topic"],
        )
        self._duplicates = counter(
            "kiteq_messages_duplicate_total",
            "Publishes answered duplicate: the id is stored, or in the idempotency window "
            "after its delete (dedupWindowSeconds); not stored or delivered again.",
            ["topic"],
        )
        self._remembered = gauge(
            "kiteq_dedup_remembered_ids",
            "Ids of deleted messages in the idempotency window (the store's estimate).",
        )
        self._rejected = counter(
            "kiteq_messages_rejected_total",
            "Messages refused on arrival, by reason.",
            ["topic", "reason"],
        )
        self._rejected_frames = counter(
            "kiteq_rejected_frames_total",
            "Client frames (or items of one) refused before any message, by reason.",
            ["reason"],
        )
        self._bindings_refused = counter(
            "kiteq_bindings_refused_total",
            "Binding declarations or registry nodes refused, by reason (acl or limits).",
            ["reason"],
        )
        self._delivered = counter(
            "kiteq_messages_delivered_total",
            "Delivery attempts to a consumer group, by outcome.",
            ["topic", "group", "result"],
        )
        self._redelivered = counter(
            "kiteq_messages_redelivered_total",
            "Deliveries that were retries (attempt > 1).",
            ["topic", "group"],
        )
        self._store_duration = histogram(
            "kiteq_store_operation_duration_seconds",
            "Duration of one message-store call.",
            ["op"],
            buckets=_DURATION_BUCKETS,
        )
        self._store_batch = histogram(
            "kiteq_store_batch_size",
            "Messages handled by one message-store call.",
            ["op"],
            buckets=_BATCH_BUCKETS,
        )
        self._connections = gauge(
            "kiteq_client_connections",
            "Open client streams, by role.",
            ["role"],
        )
        self._inflight = gauge(
            "kiteq_deliver_inflight",
            "Deliveries pushed and waiting for the consumer's ack.",
        )
        self._backlog = gauge(
            "kiteq_store_backlog_messages",
            "Messages in the store not yet delivered to every group, by topic.",
            ["topic"],
        )
        self._scheduled = gauge(
            "kiteq_scheduled_messages",
            "Stored messages waiting for their delivery time (scheduled delivery), by topic.",
            ["topic"],
        )
        self._dead_letters = gauge(
            "kiteq_dead_letters",
            f"Dead letters in the store, by topic and the group they were dead-lettered for "
            f"({NO_GROUP_LABEL}: no group was bound).",
            ["topic", "group"],
        )
        self._dead_lettered = counter(
            "kiteq_dead_lettered_total",
            "Messages moved to the dead-letter queue, by topic, group and reason.",
            ["topic", "group", "reason"],
        )
        self._group_unacked = gauge(
            "kiteq_group_unacked_messages",
            "Deliveries pushed to the group and not yet acknowledged.",
            ["topic", "group"],
        )
        self._group_waiting = gauge(
            "kiteq_group_waiting_messages",
            "Messages held in memory for the group by its watermark, credits or workers.",
            ["topic", "group"],
        )
        self._group_backlog = gauge(
            "kiteq_group_backlog_messages",
            "Messages the group has still to settle: in memory (waiting or unacknowledged) "
            "or in the store (parked while the group is offline, in a backoff window).",
            ["topic", "group"],
        )
        self._group_oldest = gauge(
            "kiteq_group_oldest_message_age_seconds",
            "Age (since publish) of the oldest message the group has still to settle; "
            "one in the store to 10 s; 0 when none.",
            ["topic", "group"],
        )
        self._ordering_blocked = gauge(
            "kiteq_ordering_blocked_keys",
            "Ordering keys (issue #16) with messages waiting behind their head message.",
            ["topic", "group"],
        )
        self._ordering_head_age = gauge(
            "kiteq_ordering_oldest_head_age_seconds",
            "Seconds since the oldest head message of an ordering key became its head; "
            "0 when no key is busy.",
            ["topic", "group"],
        )
        self._group_consumers = gauge(
            "kiteq_group_consumers",
            "Open consumer streams of the group, for each topic the group is bound to.",
            ["topic", "group"],
        )
        self._flow_limited = counter(
            "kiteq_flow_limited_pushes_total",
            "Times a push found its (topic, group) watermark used up; it waits, using no attempt.",
            ["topic", "group"],
        )
        self._bytes_in = counter(
            "kiteq_received_bytes_total",
            "Body bytes of messages accepted from producers.",
            ["topic"],
        )
        # no topic label: counted per push, where a labelled update would cost more than
        # the count is worth
        self._bytes_out = counter(
            "kiteq_delivered_bytes_total",
            "Body bytes pushed to consumers (every attempt).",
        )
        self._tx_pending = gauge(
            "kiteq_transactions_pending",
            "Uncommitted messages waiting for their producer's decision or a check.",
        )
        self._tx_unresolved = gauge(
            "kiteq_transactions_unresolved",
            "Uncommitted messages whose checks ran out: kept for an admin to decide.",
        )
        self._tx_checks = counter(
            "kiteq_transaction_checks_total",
            "Transaction checks by outcome: the producer's answer, or unresolved.",
            ["result"],
        )
        self._zk_state = gauge(
            "kiteq_zookeeper_state",
            "1 for the ZooKeeper session's current state, 0 for the others.",
            ["state"],
        )
        self._zk_expirations = counter(
            "kiteq_zookeeper_session_expirations_total",
            "ZooKeeper sessions lost (expired); the broker re-registers on the next one.",
        )
        self._takeovers = counter(
            "kiteq_takeovers_total",
            "Backlogs of dead brokers taken over (shared MySQL store).",
        )
        self._takeover_rows = counter(
            "kiteq_takeover_messages_total",
            "Stored messages adopted from dead brokers.",
        )
        self._sessions_closed = counter(
            "kiteq_sessions_closed_total",
            "Client streams closed, by reason.",
            ["reason"],
        )
        self._http_requests = counter(
            "kiteq_http_requests_total",
            "Requests to the HTTP publish API, by endpoint and status code.",
            ["endpoint", "code"],
        )
        self._http_duration = histogram(
            "kiteq_http_request_duration_seconds",
            "From an HTTP publish request's arrival to its answer (after the store-ack).",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
        )
        self.store_ack_latency = FastHistogram(
            "kiteq_publish_store_ack_seconds",
            "From a publish batch's arrival to its store-ack, per message.",
            ("topic",),
            LATENCY_BUCKETS,
            (self._topic,),
        )
        self.first_delivery_latency = FastHistogram(
            "kiteq_publish_first_delivery_seconds",
            "From a message's publish to its first push to a group.",
            ("topic", "group"),
            LATENCY_BUCKETS,
            (self._topic, self._group),
        )
        self.ack_latency = FastHistogram(
            "kiteq_delivery_ack_seconds",
            "From a push to the consumer's ack.",
            ("topic", "group"),
            LATENCY_BUCKETS,
            (self._topic, self._group),
        )
        self._webhook_calls = counter(
            "kiteq_webhook_calls_total",
            "HTTP calls to webhook groups, by outcome: the status class (2xx acks), timeout or "
            "error (no answer: refused, reset, DNS).",
            ["topic", "group", "outcome"],
        )
        self.webhook_latency = FastHistogram(
            "kiteq_webhook_call_seconds",
            "Duration of one webhook call, from the request to the answer (or the timeout).",
            ("topic", "group"),
            LATENCY_BUCKETS,
            (self._topic, self._group),
        )
        for fast in (
            self.store_ack_latency,
            self.first_delivery_latency,
            self.ack_latency,
            self.webhook_latency,
        ):
            reg.register(fast)
        self._group_labels: set[tuple[str, str]] = set()
        self._ordering_labels: set[tuple[str, str]] = set()
        self._zk_losses = 0
        self._build = Info("kiteq_build", "Version and configuration of this broker.", registry=reg)
        if process:
            ProcessCollector(registry=reg)
        self._backlog_topics: set[str] = set()
        self._scheduled_topics: set[str] = set()
        self._dead_letter_labels: set[tuple[str, str]] = set()
        # Zero series for the fixed label sets so rate() and dashboards see them at once.
        for role in sorted(CONNECTION_ROLES):
            self._connections.labels(role).set(0)
        for reason in sorted(FRAME_REJECT_REASONS):
            self._rejected_frames.labels(reason)
        for reason in sorted(BINDING_REFUSAL_REASONS):
            self._bindings_refused.labels(reason)
        for result in sorted(TX_CHECK_RESULTS):
            self._tx_checks.labels(result)
        for state in sorted(ZK_STATES):
            self._zk_state.labels(state).set(0)
        for reason in sorted(SESSION_CLOSE_REASONS):
            self._sessions_closed.labels(reason)
        for endpoint in sorted(HTTP_ENDPOINTS):
            self._http_requests.labels(endpoint, "200")

    @property
    def registry(self) -> CollectorRegistry:
        """The private registry, for extra collectors (e.g. a gRPC interceptor's)."""
        return self._registry

    def received(self, topic: str, n: int = 1) -> None:
        """Count *n* messages of *topic* accepted."""
        self._received.labels(self._topic(topic)).inc(n)

    def duplicates(self, topic: str, n: int = 1) -> None:
        """Count *n* publishes of *topic* answered duplicate."""
        self._duplicates.labels(self._topic(topic)).inc(n)

    def set_remembered(self, n: int) -> None:
        """The store's estimate of the ids in the idempotency window."""
        self._remembered.set(n)

    def rejected(self, topic: str, reason: str, n: int = 1) -> None:
        """Count *n* messages refused; *reason* is one of ``REJECT_REASONS``."""
        reason = check("reject reason", reason, REJECT_REASONS)
        self._rejected.labels(self._topic(topic), reason).inc(n)

    def bindings_refused(self, reason: str) -> None:
        """Count one refused binding list; *reason* is in ``BINDING_REFUSAL_REASONS``."""
        reason = check("binding refusal reason", reason, BINDING_REFUSAL_REASONS)
        self._bindings_refused.labels(reason).inc()

    def rejected_frames(self, reason: str, n: int = 1) -> None:
        """Count *n* refused client frames or items; *reason* is in ``FRAME_REJECT_REASONS``."""
        self._rejected_frames.labels(
            check("frame reject reason", reason, FRAME_REJECT_REASONS)
        ).inc(n)

    def delivered(self, topic: str, group: str, result: str, n: int = 1) -> None:
        """Count *n* delivery outcomes; *result* is one of ``DELIVERY_RESULTS``."""
        result = check("delivery result", result, DELIVERY_RESULTS)
        self._delivered.labels(self._topic(topic), self._group(group), result).inc(n)

    def webhook_called(self, topic: str, group: str, outcome: str, seconds: float) -> None:
        """Count one webhook call; *outcome* is one of ``WEBHOOK_OUTCOMES``."""
        outcome = check("webhook outcome", outcome, WEBHOOK_OUTCOMES)
        self._webhook_calls.labels(self._topic(topic), self._group(group), outcome).inc()
        self.webhook_latency.observe((topic, group), seconds)

    def redelivered(self, topic: str, group: str, n: int = 1) -> None:
        """Count *n* deliveries that were retries."""
        self._redelivered.labels(self._topic(topic), self._group(group)).inc(n)

    def observe_store(self, op: str, seconds: float, batch: int) -> None:
        """Record one store call: its duration and how many messages it covered."""
        label = self._op(op)
        self._store_duration.labels(label).observe(seconds)
        self._store_batch.labels(label).observe(batch)

    def set_connections(self, role: str, n: int) -> None:
        """Set the number of open streams of *role* (``producer`` or ``consumer``)."""
        self._connections.labels(check("connection role", role, CONNECTION_ROLES)).set(n)

    def set_inflight(self, n: int) -> None:
        """Set the number of deliveries waiting for an ack."""
        self._inflight.set(n)

    def set_backlog(self, backlog: Mapping[str, int]) -> None:
        """Replace the per-topic backlog; topics absent from *backlog* lose their series."""
        totals: dict[str, int] = {}
        for topic, count in backlog.items():
            label = self._topic(topic)
            totals[label] = totals.get(label, 0) + count
        for label, count in totals.items():
            self._backlog.labels(label).set(count)
        for gone in self._backlog_topics - totals.keys():
            self._backlog.remove(gone)
        self._backlog_topics = set(totals)

    def set_scheduled(self, counts: Mapping[str, int]) -> None:
        """Replace the per-topic count of scheduled messages; absent topics read 0."""
        totals: dict[str, int] = {}
        for topic, count in counts.items():
            label = self._topic(topic)
            totals[label] = totals.get(label, 0) + count
        for label, count in totals.items():
            self._scheduled.labels(label).set(count)
        # a topic whose scheduled messages all came due reads 0 rather than vanishing
        for gone in self._scheduled_topics - totals.keys():
            self._scheduled.labels(gone).set(0)
        self._scheduled_topics |= set(totals)

    def set_dead_letters(self, sizes: Mapping[tuple[str, str], int]) -> None:
        """Replace the dead-letter counts per (topic, group); absent pairs lose their series."""
        totals: dict[tuple[str, str], int] = {}
        for (topic, group), count in sizes.items():
            label = (self._topic(topic), self._group(group) if group else NO_GROUP_LABEL)
            totals[label] = totals.get(label, 0) + count
        for label, count in totals.items():
            self._dead_letters.labels(*label).set(count)
        for gone in self._dead_letter_labels - totals.keys():
            self._dead_letters.remove(*gone)
        self._dead_letter_labels = set(totals)

    def dead_lettered(self, topic: str, group: str, reason: str, n: int = 1) -> None:
        """Count *n* dead letters; *reason* is in ``DEAD_LETTER_REASONS``."""
        reason = check("dead-letter reason", reason, DEAD_LETTER_REASONS)
        label = self._group(group) if group else NO_GROUP_LABEL
        self._dead_lettered.labels(self._topic(topic), label, reason).inc(n)

    def flow_limited(self, topic: str, group: str, n: int = 1) -> None:
        """Count *n* pushes held back by the watermark."""
        self._flow_limited.labels(self._topic(topic), self._group(group)).inc(n)

    def received_bytes(self, topic: str, n: int) -> None:
        self._bytes_in.labels(self._topic(topic)).inc(n)

    def delivered_bytes(self, n: int) -> None:
        self._bytes_out.inc(n)

    def set_groups(
        self,
        unacked: Mapping[tuple[str, str], int],
        waiting: Mapping[tuple[str, str], int],
        backlog: Mapping[tuple[str, str], int],
        oldest_age: Mapping[tuple[str, str], float],
        consumers: Mapping[tuple[str, str], int],
    ) -> None:
        """Replace the per-(topic, group) gauges; pairs in none of the maps lose their series.

        A pair missing from one map but present in another reads 0 there.
        """
        keys = unacked.keys() | waiting.keys() | backlog.keys() | oldest_age.keys()
        rows: dict[tuple[str, str], list[float]] = {}
        for topic, group in keys | consumers.keys():
            label = (self._topic(topic), self._group(group))
            row = rows.setdefault(label, [0, 0, 0, 0.0, 0])
            key = (topic, group)
            row[0] += unacked.get(key, 0)
            row[1] += waiting.get(key, 0)
            row[2] += backlog.get(key, 0)
            row[3] = max(row[3], oldest_age.get(key, 0.0))
            row[4] += consumers.get(key, 0)
        gauges = (
            self._group_unacked,
            self._group_waiting,
            self._group_backlog,
            self._group_oldest,
        )
        for label, row in rows.items():
            for gauge, value in zip((*gauges, self._group_consumers), row, strict=True):
                gauge.labels(*label).set(value)
        for gone in self._group_labels - rows.keys():
            for gauge in (*gauges, self._group_consumers):
                gauge.remove(*gone)
        self._group_labels = set(rows)

    def set_ordering(
        self,
        blocked: Mapping[tuple[str, str], int],
        oldest_head_age: Mapping[tuple[str, str], float],
    ) -> None:
        """Replace the ordered-delivery gauges per (topic, group) with a busy key.

        A pair that had one and has none now reads 0 (an idle key is the good news).
        """
        rows: dict[tuple[str, str], list[float]] = {}
        for topic, group in blocked.keys() | oldest_head_age.keys():
            row = rows.setdefault((self._topic(topic), self._group(group)), [0, 0.0])
            row[0] += blocked.get((topic, group), 0)
            row[1] = max(row[1], oldest_head_age.get((topic, group), 0.0))
        for label in self._ordering_labels - rows.keys():
            rows[label] = [0, 0.0]
        for label, (count, age) in rows.items():
            self._ordering_blocked.labels(*label).set(count)
            self._ordering_head_age.labels(*label).set(age)
        self._ordering_labels |= set(rows)

    def set_transactions(self, pending: int, unresolved: int) -> None:
        self._tx_pending.set(pending)
        self._tx_unresolved.set(unresolved)

    def tx_checked(self, result: str, n: int = 1) -> None:
        """Count *n* transaction checks ended in *result* (``TX_CHECK_RESULTS``)."""
        self._tx_checks.labels(check("tx check result", result, TX_CHECK_RESULTS)).inc(n)

    def set_zookeeper(self, state: str, session_losses: int) -> None:
        """The session is in *state* (``ZK_STATES``) and was lost *session_losses* times."""
        state = check("zookeeper state", state, ZK_STATES)
        for other in ZK_STATES:
            self._zk_state.labels(other).set(1 if other == state else 0)
        if session_losses > self._zk_losses:
            self._zk_expirations.inc(session_losses - self._zk_losses)
            self._zk_losses = session_losses

    def taken_over(self, messages: int) -> None:
        """Count one takeover of a dead broker's backlog of *messages* stored messages."""
        self._takeovers.inc()
        self._takeover_rows.inc(messages)

    def session_closed(self, reason: str) -> None:
        """Count one closed client stream; *reason* is in ``SESSION_CLOSE_REASONS``."""
        self._sessions_closed.labels(check("close reason", reason, SESSION_CLOSE_REASONS)).inc()

    def http_request(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one HTTP publish API request; *endpoint* is in ``HTTP_ENDPOINTS``."""
        endpoint = check("http endpoint", endpoint, HTTP_ENDPOINTS)
        code = str(status)
        self._http_requests.labels(endpoint, code if code in HTTP_CODES else "other").inc()
        self._http_duration.labels(endpoint).observe(seconds)

    def set_info(self, version: str, cluster: str, store: str) -> None:
        """Publish ``kiteq_build_info{version,cluster,store} 1``.

        *store* is the backend's name (``rocksdb``); a store URL is cut to its scheme so
        credentials never reach a label.
        """
        scheme = store.split("://", 1)[0]
        self._build.info({"version": version, "cluster": cluster, "store": scheme})

    def render(self) -> bytes:
        """The Prometheus text exposition (``CONTENT_TYPE``) of every metric."""
        return generate_latest(self._registry)
