"""The dashboard's content: its rows of panels and every query, as plain data."""

from __future__ import annotations

import dataclasses
from typing import Final

from grafana_foundation_sdk.models import dashboard as model

__all__ = ["DATASOURCE", "ROWS", "SELECTOR", "PanelSpec", "Query"]

DATASOURCE: Final = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
# every query's selector: the broker(s) chosen in the variables
SELECTOR: Final = 'job=~"$job", instance=~"$instance"'
_TOPIC: Final = f'{SELECTOR}, topic=~"$topic"'
_RATE: Final = "[$__rate_interval]"


@dataclasses.dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclasses.dataclass(frozen=True)
class PanelSpec:
    kind: str  # stat, timeseries, table
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    width: int = 12
    height: int = 8


def _q(expr: str, legend: str = "") -> tuple[Query, ...]:
    return (Query(expr, legend),)


def _quantiles(metric: str, by: str, legend: str) -> tuple[Query, ...]:
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{SELECTOR}}}{_RATE})))",
            f"p{round(q * 100)} {legend}",
        )
        for q in (0.5, 0.99)
    )


def _rate(metric: str, selector: str = SELECTOR) -> str:
    return f"rate({metric}{{{selector}}}{_RATE})"


ROWS: Final[tuple[tuple[str, tuple[PanelSpec, ...]], ...]] = (
    (
        "Overview",
        (
            PanelSpec(
                "stat",
                "Brokers up",
                "Brokers Prometheus scrapes successfully (from `up`, so a dead broker counts 0).",
                "short",
                _q(f"sum(up{{{SELECTOR}}})"),
                4,
                4,
            ),
            PanelSpec(
                "stat",
                "Brokers down",
                "Scrape targets of the job that do not answer.",
                "short",
                _q(f"count(up{{{SELECTOR}}} == 0) or vector(0)"),
                4,
                4,
            ),
            PanelSpec(
                "stat",
                "Received",
                "Messages accepted per second.",
                "mps",
                _q(f"sum({_rate('kiteq_messages_received_total', _TOPIC)})"),
                4,
                4,
            ),
            PanelSpec(
                "stat",
                "Acked deliveries",
                "Deliveries acknowledged per second.",
                "mps",
                _q(
                    f"sum({_rate('kiteq_messages_delivered_total', _TOPIC + ', result=' + chr(34) + 'ack' + chr(34))})"
                ),
                4,
                4,
            ),
            PanelSpec(
                "stat",
                "Backlog",
                "Stored messages not yet delivered to every group.",
                "short",
                _q(f"sum(kiteq_store_backlog_messages{{{_TOPIC}}})"),
                4,
                4,
            ),
            PanelSpec(
                "stat",
                "Unresolved transactions",
                "Uncommitted messages whose checks ran out (an admin decides them).",
                "short",
                _q(f"sum(kiteq_transactions_unresolved{{{SELECTOR}}})"),
                4,
                4,
            ),
        ),
    ),
    (
        "Messages",
        (
            PanelSpec(
                "timeseries",
                "Received by topic",
                "Messages accepted per second, by topic.",
                "mps",
                _q(
                    f"sum by (topic) ({_rate('kiteq_messages_received_total', _TOPIC)})",
                    "{{topic}}",
                ),
            ),
            PanelSpec(
                "timeseries",
                "Rejected by reason",
                "Messages refused on arrival per second, by reason.",
                "mps",
                _q(
                    f"sum by (reason) ({_rate('kiteq_messages_rejected_total', _TOPIC)})",
                    "{{reason}}",
                ),
            ),
            PanelSpec(
                "timeseries",
                "Duplicates by topic",
                "Publishes answered duplicate per second: the id was stored, or remembered in "
                "the idempotency window (dedupWindowSeconds); not delivered again.",
                "mps",
                _q(
                    f"sum by (topic) ({_rate('kiteq_messages_duplicate_total', _TOPIC)})",
                    "{{topic}}",
                ),
            ),
            PanelSpec(
                "timeseries",
                "Idempotency window",
                "Ids of settled messages remembered after their delete (dedupWindowSeconds), "
                "the store's estimate: about delete rate x (window + 60 s).",
                "short",
                _q(f"sum by (instance) (kiteq_dedup_remembered_ids{{{SELECTOR}}})", "{{instance}}"),
            ),
            PanelSpec(
                "timeseries",
                "Deliveries by result",
                "Delivery outcomes per second: ack, nack, timeout, disconnected.",
                "mps",
                _q(
                    f"sum by (result) ({_rate('kiteq_messages_delivered_total', _TOPIC)})",
                    "{{result}}",
                ),
            ),
            PanelSpec(
                "timeseries",
                "Redeliveries by topic and group",
                "Deliveries that were retries, per second.",
                "mps",
                _q(
                    f"sum by (topic, group) ({_rate('kiteq_messages_redelivered_total', _TOPIC)})",
                    "{{topic}} / {{group}}",
                ),
            ),
            PanelSpec(
                "timeseries",
                "Ack ratio",
                "Share of delivery attempts that were acked.",
                "percentunit",
                _q(
                    f"sum({_rate('kiteq_messages_delivered_total', _TOPIC + ', result=' + chr(34) + 'ack' + chr(34))})"
                    f" / sum({_rate('kiteq_messages_delivered_total', _TOPIC)})",
                    "acked",
                ),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Backlog by topic",
                "Stored messages not yet delivered to every group, by topic.",
                "short",
                _q(f"sum by (topic) (kiteq_store_backlog_messages{{{_TOPIC}}})", "{{topic}}"),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Bytes in and out",
                "Body bytes accepted from producers and pushed to consumers, per second.",
                "Bps",
                (
                    Query(f"sum({_rate('kiteq_received_bytes_total', _TOPIC)})", "in"),
                    Query(f"sum({_rate('kiteq_delivered_bytes_total')})", "out (all topics)"),
                ),
                8,
            ),
        ),
    ),
    (
        "Groups",
        (
            PanelSpec(
                "timeseries",
                "Unacked by group",
                "Deliveries pushed to the group and waiting for its ack.",
                "short",
                _q(
                    f"sum by (topic, group) (kiteq_group_unacked_messages{{{_TOPIC}}})",
                    "{{topic}} / {{group}}",
                ),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Waiting by group",
                "Messages held in memory by the group's watermark, credits or the worker limit.",
                "short",
                _q(
                    f"sum by (topic, group) (kiteq_group_waiting_messages{{{_TOPIC}}})",
                    "{{topic}} / {{group}}",
                ),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Backlog by group",
                "Messages each group has still to settle, in memory or in the store "
                "(an offline group's included).",
                "short",
                _q(
                    f"sum by (topic, group) (kiteq_group_backlog_messages{{{_TOPIC}}})",
                    "{{topic}} / {{group}}",
                ),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Oldest message by group",
                "Age since publish of the oldest message the group has still to settle.",
                "s",
                _q(
                    f"max by (topic, group) (kiteq_group_oldest_message_age_seconds{{{_TOPIC}}})",
                    "{{topic}} / {{group}}",
                ),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Consumers by group",
                "Open consumer streams of each bound group (0: offline).",
                "short",
                _q(
                    f"sum by (topic, group) (kiteq_group_consumers{{{_TOPIC}}})",
                    "{{topic}} / {{group}}",
                ),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Flow-limited pushes",
                "Pushes held back by the group's watermark per second (they wait, using no attempt).",
                "ops",
                _q(
                    f"sum by (topic, group) ({_rate('kiteq_flow_limited_pushes_total', _TOPIC)})",
                    "{{topic}} / {{group}}",
                ),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Deliveries in flight",
                "Deliveries pushed and waiting for an ack, per broker.",
                "short",
                _q(f"sum by (instance) (kiteq_deliver_inflight{{{SELECTOR}}})", "{{instance}}"),
                8,
            ),
        ),
    ),
    (
        "Latency",
        (
            PanelSpec(
                "timeseries",
                "Publish to store-ack",
                "From a publish batch's arrival to its store-ack (durable).",
                "s",
                _quantiles("kiteq_publish_store_ack_seconds", "topic", "{{topic}}"),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Publish to first delivery",
                "From a message's publish to its first push to a group.",
                "s",
                _quantiles("kiteq_publish_first_delivery_seconds", "group", "{{group}}"),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Delivery to ack",
                "From a push to the consumer's ack (processing time plus the round trip).",
                "s",
                _quantiles("kiteq_delivery_ack_seconds", "group", "{{group}}"),
                8,
            ),
        ),
    ),
    (
        "Webhooks",
        (
            PanelSpec(
                "timeseries",
                "Webhook calls by outcome",
                "Calls to webhook groups per second: 2xx acks; 3xx, 4xx, 5xx, timeout and error "
                "(no answer) are nacks and come back with the usual backoff.",
                "ops",
                _q(
                    f"sum by (group, outcome) ({_rate('kiteq_webhook_calls_total', _TOPIC)})",
                    "{{group}} {{outcome}}",
                ),
                12,
            ),
            PanelSpec(
                "timeseries",
                "Webhook call latency",
                "From a webhook request to its answer (or its timeout).",
                "s",
                _quantiles("kiteq_webhook_call_seconds", "group", "{{group}}"),
                12,
            ),
        ),
    ),
    (
        "Dead letters and transactions",
        (
            PanelSpec(
                "timeseries",
                "Dead letters by topic and group",
                "Dead letters in the store, by topic and group.",
                "short",
                _q(
                    f"sum by (topic, group) (kiteq_dead_letters{{{_TOPIC}}})",
                    "{{topic}} {{group}}",
                ),
            ),
            PanelSpec(
                "timeseries",
                "Dead-lettered by reason",
                "Messages moved to the dead-letter queue per second, by group and reason.",
                "ops",
                _q(
                    f"sum by (group, reason) ({_rate('kiteq_dead_lettered_total', _TOPIC)})",
                    "{{group}} {{reason}}",
                ),
            ),
            PanelSpec(
                "timeseries",
                "Transactions",
                "Uncommitted messages waiting for a decision, and those whose checks ran out.",
                "short",
                (
                    Query(f"sum(kiteq_transactions_pending{{{SELECTOR}}})", "pending"),
                    Query(f"sum(kiteq_transactions_unresolved{{{SELECTOR}}})", "unresolved"),
                ),
            ),
            PanelSpec(
                "timeseries",
                "Transaction checks by result",
                "Checks answered commit, rollback or unknown, or ending unresolved, per second.",
                "ops",
                _q(
                    f"sum by (result) ({_rate('kiteq_transaction_checks_total')})",
                    "{{result}}",
                ),
            ),
        ),
    ),
    (
        "Scheduled delivery",
        (
            PanelSpec(
                "timeseries",
                "Scheduled messages by topic",
                "Stored messages waiting for their delivery time (deliverAt), by topic.",
                "short",
                _q(f"sum by (topic) (kiteq_scheduled_messages{{{_TOPIC}}})", "{{topic}}"),
                24,
            ),
        ),
    ),
    (
        "Ordered delivery",
        (
            PanelSpec(
                "timeseries",
                "Blocked ordering keys by group",
                "Ordering keys with messages waiting behind their head message (one message "
                "of a key is in flight at a time).",
                "short",
                _q(
                    f"sum by (topic, group) (kiteq_ordering_blocked_keys{{{_TOPIC}}})",
                    "{{topic}} / {{group}}",
                ),
                12,
            ),
            PanelSpec(
                "timeseries",
                "Oldest head of an ordering key",
                "Seconds the oldest head message has held its key (redeliveries, backoff "
                "windows and a slow consumer make it grow).",
                "s",
                _q(
                    f"max by (topic, group) (kiteq_ordering_oldest_head_age_seconds{{{_TOPIC}}})",
                    "{{topic}} / {{group}}",
                ),
                12,
            ),
        ),
    ),
    (
        "Store",
        (
            PanelSpec(
                "timeseries",
                "Store call latency",
                "Duration of message-store calls, by operation.",
                "s",
                _quantiles("kiteq_store_operation_duration_seconds", "op", "{{op}}"),
            ),
            PanelSpec(
                "timeseries",
                "Store batch size (mean)",
                "Messages per store call, by operation.",
                "short",
                _q(
                    f"sum by (op) ({_rate('kiteq_store_batch_size_sum')})"
                    f" / sum by (op) ({_rate('kiteq_store_batch_size_count')})",
                    "{{op}}",
                ),
            ),
        ),
    ),
    (
        "Cluster",
        (
            PanelSpec(
                "timeseries",
                "ZooKeeper session",
                "1 for the state each broker's ZooKeeper session is in (all 0: no ZooKeeper).",
                "short",
                _q(
                    f"max by (instance, state) (kiteq_zookeeper_state{{{SELECTOR}}})",
                    "{{instance}} {{state}}",
                ),
                8,
            ),
            PanelSpec(
                "timeseries",
                "ZooKeeper sessions lost and takeovers",
                "Expired ZooKeeper sessions, and dead brokers' backlogs taken over, per second.",
                "ops",
                (
                    Query(
                        f"sum({_rate('kiteq_zookeeper_session_expirations_total')})",
                        "sessions lost",
                    ),
                    Query(f"sum({_rate('kiteq_takeovers_total')})", "takeovers"),
                    Query(f"sum({_rate('kiteq_takeover_messages_total')})", "messages taken over"),
                ),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Sessions closed by reason",
                "Client streams ended per second: client_closed, cancelled, refused, error.",
                "ops",
                _q(
                    f"sum by (reason) ({_rate('kiteq_sessions_closed_total')})",
                    "{{reason}}",
                ),
                8,
            ),
        ),
    ),
    (
        "Process",
        (
            PanelSpec(
                "timeseries",
                "Client connections",
                "Open client streams, by role.",
                "short",
                _q(f"sum by (role) (kiteq_client_connections{{{SELECTOR}}})", "{{role}}"),
                8,
            ),
            PanelSpec(
                "timeseries",
                "Resident memory",
                "Resident set size of each broker process.",
                "bytes",
                _q(f"process_resident_memory_bytes{{{SELECTOR}}}", "{{instance}}"),
                8,
            ),
            PanelSpec(
                "timeseries",
                "CPU",
                "CPU seconds per second of each broker process.",
                "percentunit",
                _q(_rate("process_cpu_seconds_total"), "{{instance}}"),
                8,
            ),
            PanelSpec(
                "table",
                "Brokers",
                "Version, cluster and store of each broker.",
                "short",
                _q(f"kiteq_build_info{{{SELECTOR}}}"),
                16,
                6,
            ),
            PanelSpec(
                "timeseries",
                "Metric label overflow",
                "Label values folded into _other or _invalid by the cardinality caps.",
                "ops",
                _q(
                    f"sum by (label) ({_rate('kiteq_metrics_label_overflow_total')})",
                    "{{label}}",
                ),
                8,
                6,
            ),
        ),
    ),
    (
        "HTTP publish API",
        (
            PanelSpec(
                "timeseries",
                "HTTP requests by endpoint and status",
                "Requests to the HTTP publish API (-hport) per second, by endpoint and status.",
                "reqps",
                _q(
                    f"sum by (endpoint, code) ({_rate('kiteq_http_requests_total')})",
                    "{{endpoint}} {{code}}",
                ),
            ),
            PanelSpec(
                "timeseries",
                "HTTP request duration",
                "From an HTTP publish request's arrival to its answer, sent after the store-ack.",
                "s",
                _quantiles("kiteq_http_request_duration_seconds", "endpoint", "{{endpoint}}"),
            ),
        ),
    ),
    (
        "Security",
        (
            PanelSpec(
                "timeseries",
                "Refused bindings by reason",
                "Binding declarations or registry nodes refused per second (acl or limits).",
                "ops",
                _q(
                    f"sum by (reason) ({_rate('kiteq_bindings_refused_total')})",
                    "{{reason}}",
                ),
            ),
            PanelSpec(
                "timeseries",
                "Refused client frames by reason",
                "Client frames or items refused before any message, per second.",
                "ops",
                _q(
                    f"sum by (reason) ({_rate('kiteq_rejected_frames_total')})",
                    "{{reason}}",
                ),
            ),
        ),
    ),
)
