from __future__ import annotations

import logging
import subprocess
from concurrent.futures import ThreadPoolExecutor

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiteq.ops.metrics import CONTENT_TYPE, LATENCY_BUCKETS, BrokerMetrics
from kiteq.ops.metrics.labels import (
    FRAME_REJECT_REASONS,
    INVALID_LABEL,
    NO_GROUP_LABEL,
    OTHER_LABEL,
)

KITEQ_FAMILIES = {
    # family name as the text-format parser reports it (counters without _total; info and
    # the *_created series as gauges) -> type
    "kiteq_messages_received": "counter",
    "kiteq_messages_rejected": "counter",
    "kiteq_messages_duplicate": "counter",
    "kiteq_dedup_remembered_ids": "gauge",
    "kiteq_messages_delivered": "counter",
    "kiteq_messages_redelivered": "counter",
    "kiteq_rejected_frames": "counter",
    "kiteq_bindings_refused": "counter",
    "kiteq_http_requests": "counter",
    "kiteq_http_request_duration_seconds": "histogram",
    "kiteq_metrics_label_overflow": "counter",
    "kiteq_store_operation_duration_seconds": "histogram",
    "kiteq_store_batch_size": "histogram",
    "kiteq_client_connections": "gauge",
    "kiteq_deliver_inflight": "gauge",
    "kiteq_store_backlog_messages": "gauge",
    "kiteq_dead_letters": "gauge",
    "kiteq_build_info": "gauge",
    "kiteq_dead_lettered": "counter",
    "kiteq_flow_limited_pushes": "counter",
    "kiteq_received_bytes": "counter",
    "kiteq_delivered_bytes": "counter",
    "kiteq_group_unacked_messages": "gauge",
    "kiteq_group_waiting_messages": "gauge",
    "kiteq_group_backlog_messages": "gauge",
    "kiteq_group_oldest_message_age_seconds": "gauge",
    "kiteq_group_consumers": "gauge",
    "kiteq_scheduled_messages": "gauge",
    "kiteq_ordering_blocked_keys": "gauge",
    "kiteq_ordering_oldest_head_age_seconds": "gauge",
    "kiteq_transactions_pending": "gauge",
    "kiteq_transactions_unresolved": "gauge",
    "kiteq_transaction_checks": "counter",
    "kiteq_zookeeper_state": "gauge",
    "kiteq_zookeeper_session_expirations": "counter",
    "kiteq_takeovers": "counter",
    "kiteq_takeover_messages": "counter",
    "kiteq_sessions_closed": "counter",
    "kiteq_publish_store_ack_seconds": "histogram",
    "kiteq_publish_first_delivery_seconds": "histogram",
    "kiteq_delivery_ack_seconds": "histogram",
    "kiteq_webhook_calls": "counter",
    "kiteq_webhook_call_seconds": "histogram",
}


def families(metrics: BrokerMetrics) -> dict[str, prometheus_client.Metric]:
    text = metrics.render().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(metrics: BrokerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_render_parses_and_has_every_family(touched_metrics: BrokerMetrics) -> None:
    parsed = families(touched_metrics)
    kiteq = {
        name: family.type
        for name, family in parsed.items()
        if name.startswith("kiteq_") and not name.endswith("_created")
    }
    assert kiteq == KITEQ_FAMILIES
    assert all(name.startswith(("kiteq_", "process_")) for name in parsed)
    assert "process_resident_memory_bytes" in parsed


def test_names_follow_prometheus_conventions(touched_metrics: BrokerMetrics) -> None:
    for family in families(touched_metrics).values():
        names = {sample.name for sample in family.samples}
        if family.type == "counter":
            assert all(n.endswith(("_total", "_created")) for n in names), names
        if family.name.startswith("kiteq_"):
            assert not any(part in family.name for part in ("_ms", "milli", "micro")), family.name


def test_http_requests_are_counted_by_endpoint_and_code() -> None:
    m = BrokerMetrics(process=False)
    m.http_request("publish", 200, 0.01)
    m.http_request("publish", 429, 0.01)
    m.http_request("batch", 418, 0.01)  # a status the API never answers: "other"
    assert value(m, "kiteq_http_requests_total", endpoint="publish", code="200") == 1
    assert value(m, "kiteq_http_requests_total", endpoint="publish", code="429") == 1
    assert value(m, "kiteq_http_requests_total", endpoint="batch", code="other") == 1
    assert value(m, "kiteq_http_request_duration_seconds_count", endpoint="publish") == 2
    with pytest.raises(ValueError, match="http endpoint"):
        m.http_request("nope", 200, 0.01)


def test_content_type_is_text_format_0_0_4() -> None:
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_values_are_recorded(touched_metrics: BrokerMetrics) -> None:
    m = touched_metrics
    assert value(m, "kiteq_messages_received_total", topic="trade") == 3
    assert value(m, "kiteq_messages_rejected_total", topic="trade", reason="expired") == 1
    assert (
        value(m, "kiteq_messages_delivered_total", topic="trade", group="pay-svc", result="ack")
        == 2
    )
    assert value(m, "kiteq_messages_redelivered_total", topic="trade", group="pay-svc") == 1
    assert value(m, "kiteq_store_operation_duration_seconds_count", op="save") == 1
    assert value(m, "kiteq_store_operation_duration_seconds_sum", op="save") == 0.002
    assert value(m, "kiteq_store_batch_size_sum", op="save") == 50
    assert value(m, "kiteq_client_connections", role="consumer") == 2
    assert value(m, "kiteq_deliver_inflight") == 4
    assert value(m, "kiteq_store_backlog_messages", topic="user-profile") == 1
    assert (
        value(m, "kiteq_build_info", version="0.1.0", cluster="rocksdb_dev", store="rocksdb") == 1
    )


def test_fixed_label_sets_start_at_zero(metrics: BrokerMetrics) -> None:
    assert value(metrics, "kiteq_client_connections", role="producer") == 0
    assert value(metrics, "kiteq_client_connections", role="consumer") == 0
    assert value(metrics, "kiteq_deliver_inflight") == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.rejected("trade", "bogus"), "unknown reject reason 'bogus'"),
        (lambda m: m.delivered("trade", "g", "success"), "unknown delivery result 'success'"),
        (lambda m: m.set_connections("admin", 1), "unknown connection role 'admin'"),
        (lambda m: m.dead_lettered("t", "g", "boom"), "unknown dead-letter reason 'boom'"),
        (lambda m: m.tx_checked("maybe"), "unknown tx check result 'maybe'"),
        (lambda m: m.set_zookeeper("dizzy", 0), "unknown zookeeper state 'dizzy'"),
        (lambda m: m.session_closed("bored"), "unknown close reason 'bored'"),
    ],
)
def test_fixed_label_values_are_enforced(
    metrics: BrokerMetrics, call: object, message: str
) -> None:
    assert callable(call)
    with pytest.raises(ValueError, match=message):
        call(metrics)


def test_topic_label_is_capped() -> None:
    metrics = BrokerMetrics(max_topics=3)
    for i in range(10):
        metrics.received(f"t{i}")
    metrics.received("t0", 5)
    parsed = families(metrics)["kiteq_messages_received"]
    topics = {s.labels["topic"] for s in parsed.samples if s.name.endswith("_total")}
    assert topics == {"t0", "t1", "t2", OTHER_LABEL}
    assert value(metrics, "kiteq_messages_received_total", topic="t0") == 6
    assert value(metrics, "kiteq_messages_received_total", topic=OTHER_LABEL) == 7
    assert value(metrics, "kiteq_metrics_label_overflow_total", label="topic") == 7


def test_cap_is_shared_by_every_topic_metric() -> None:
    metrics = BrokerMetrics(max_topics=1)
    metrics.received("first")
    metrics.rejected("second", "unknown_topic")
    metrics.delivered("first", "g", "ack")
    assert value(
        metrics, "kiteq_messages_rejected_total", topic=OTHER_LABEL, reason="unknown_topic"
    )
    assert value(metrics, "kiteq_messages_delivered_total", topic="first", group="g", result="ack")


def test_group_label_is_capped_separately() -> None:
    metrics = BrokerMetrics(max_topics=5, max_groups=2)
    for group in ("g1", "g2", "g3", "g4"):
        metrics.delivered("trade", group, "ack")
        metrics.redelivered("trade", group)
    assert (
        value(
            metrics,
            "kiteq_messages_delivered_total",
            topic="trade",
            group=OTHER_LABEL,
            result="ack",
        )
        == 2
    )
    assert value(metrics, "kiteq_messages_redelivered_total", topic="trade", group="g2") == 1
    assert value(metrics, "kiteq_metrics_label_overflow_total", label="group") == 4
    assert value(metrics, "kiteq_metrics_label_overflow_total", label="topic") == 0


def test_store_op_label_is_capped() -> None:
    metrics = BrokerMetrics(max_ops=2)
    for op in ("save", "get", "delete", "commit"):
        metrics.observe_store(op, 0.001, 1)
    assert value(metrics, "kiteq_store_batch_size_count", op=OTHER_LABEL) == 2


@pytest.mark.parametrize("name", ["a/b", "", "x" * 300, "ünïcode", "../.."])
def test_invalid_names_never_become_labels(metrics: BrokerMetrics, name: str) -> None:
    metrics.rejected(name, "invalid")
    metrics.delivered("trade", name, "nack")
    assert value(metrics, "kiteq_messages_rejected_total", topic=INVALID_LABEL, reason="invalid")
    assert value(
        metrics, "kiteq_messages_delivered_total", topic="trade", group=INVALID_LABEL, result="nack"
    )
    assert name.encode() not in metrics.render() or name == ""


def test_cap_reached_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    metrics = BrokerMetrics(max_topics=1)
    with caplog.at_level(logging.WARNING, logger="kiteq.ops.metrics"):
        for topic in ("a", "b", "c", "d"):
            metrics.received(topic)
    warnings = [r for r in caplog.records if "label cap reached" in r.getMessage()]
    assert len(warnings) == 1
    assert "label=topic limit=1" in warnings[0].getMessage()


def test_cap_holds_under_concurrent_reports() -> None:
    metrics = BrokerMetrics(max_topics=50)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda i: metrics.received(f"topic-{i}"), range(400)))
    parsed = families(metrics)["kiteq_messages_received"]
    samples = [s for s in parsed.samples if s.name.endswith("_total")]
    assert len(samples) == 51
    assert sum(s.value for s in samples) == 400


def test_backlog_replaces_and_removes_topics(metrics: BrokerMetrics) -> None:
    metrics.set_backlog({"a": 1, "b": 2})
    metrics.set_backlog({"b": 5, "c": 0})
    assert value(metrics, "kiteq_store_backlog_messages", topic="a") is None
    assert value(metrics, "kiteq_store_backlog_messages", topic="b") == 5
    assert value(metrics, "kiteq_store_backlog_messages", topic="c") == 0
    metrics.set_backlog({})
    assert b"kiteq_store_backlog_messages{" not in metrics.render()


def test_backlog_folds_overflow_topics_into_other() -> None:
    metrics = BrokerMetrics(max_topics=1)
    metrics.set_backlog({"a": 1, "b": 2, "c": 3})
    assert value(metrics, "kiteq_store_backlog_messages", topic="a") == 1
    assert value(metrics, "kiteq_store_backlog_messages", topic=OTHER_LABEL) == 5
    metrics.set_backlog({"a": 4})
    assert value(metrics, "kiteq_store_backlog_messages", topic=OTHER_LABEL) is None


def test_dead_letters_per_topic_and_group_replace_and_fold_overflow() -> None:
    metrics = BrokerMetrics(max_groups=1)
    metrics.set_dead_letters({("trade", "acct"): 3, ("trade", "audit"): 2, ("trade", ""): 1})
    assert value(metrics, "kiteq_dead_letters", topic="trade", group="acct") == 3
    assert value(metrics, "kiteq_dead_letters", topic="trade", group=OTHER_LABEL) == 2
    assert value(metrics, "kiteq_dead_letters", topic="trade", group=NO_GROUP_LABEL) == 1
    metrics.set_dead_letters({("trade", "acct"): 1})
    assert value(metrics, "kiteq_dead_letters", topic="trade", group="acct") == 1
    assert value(metrics, "kiteq_dead_letters", topic="trade", group=OTHER_LABEL) is None
    metrics.set_dead_letters({})
    assert b"kiteq_dead_letters{" not in metrics.render()


def test_build_info_is_replaced_and_never_carries_credentials(metrics: BrokerMetrics) -> None:
    metrics.set_info("0.1.0", "a", "memory")
    metrics.set_info("0.2.0", "b", "mysql://root:secret@db:3306?db=kite")
    text = metrics.render().decode()
    assert "secret" not in text
    assert value(metrics, "kiteq_build_info", version="0.2.0", cluster="b", store="mysql") == 1
    assert value(metrics, "kiteq_build_info", version="0.1.0", cluster="a", store="memory") is None


def test_registries_are_private() -> None:
    first, second = BrokerMetrics(), BrokerMetrics()
    first.received("trade")
    assert value(second, "kiteq_messages_received_total", topic="trade") is None
    assert first.registry is not prometheus_client.REGISTRY
    assert b"kiteq_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


def test_process_metrics_can_be_left_out() -> None:
    assert b"process_" not in BrokerMetrics(process=False).render()


def test_bad_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="label limit for topic"):
        BrokerMetrics(max_topics=0)


def test_promtool_lints_the_exposition(touched_metrics: BrokerMetrics, promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=touched_metrics.render(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_rejected_frames_count_by_bounded_reason(metrics: BrokerMetrics) -> None:
    for reason in FRAME_REJECT_REASONS:
        assert value(metrics, "kiteq_rejected_frames_total", reason=reason) == 0
    metrics.rejected_frames("undecodable")
    metrics.rejected_frames("stray_ack", 3)
    assert value(metrics, "kiteq_rejected_frames_total", reason="undecodable") == 1
    assert value(metrics, "kiteq_rejected_frames_total", reason="stray_ack") == 3
    with pytest.raises(ValueError, match="frame reject reason"):
        metrics.rejected_frames("anything a peer sent")


def test_binding_refusals_are_counted_by_bounded_reason() -> None:
    metrics = BrokerMetrics(process=False)
    metrics.bindings_refused("permission")
    metrics.bindings_refused("limit")
    metrics.bindings_refused("limit")
    with pytest.raises(ValueError, match="binding refusal reason"):
        metrics.bindings_refused("anything")
    samples = {
        s.labels["reason"]: s.value
        for s in families(metrics)["kiteq_bindings_refused"].samples
        if s.name.endswith("_total")
    }
    assert samples == {"permission": 1.0, "limit": 2.0, "webhook": 0.0}


# --- issue #14: per-group gauges, latency histograms, transactions, ZooKeeper -----------


def test_fast_histogram_matches_prometheus_client() -> None:
    """The list-based histogram exposes what prometheus_client's own would."""
    ours = BrokerMetrics(process=False)
    theirs = prometheus_client.CollectorRegistry()
    reference = prometheus_client.Histogram(
        "ref", "", ["topic", "group"], buckets=LATENCY_BUCKETS, registry=theirs
    )
    values = [0.0, 0.0005, 0.0007, 0.001, 0.3, 2.5, 299.0, 300.0, 301.0, 1e6]
    for v in values:
        ours.ack_latency.observe(("trade", "pay-svc"), v)
        reference.labels("trade", "pay-svc").observe(v)
    ours.ack_latency.observe(("trade", "pay-svc"), 0.02, 3)
    for _ in range(3):
        reference.labels("trade", "pay-svc").observe(0.02)
    labels = {"topic": "trade", "group": "pay-svc"}
    for bound in (*LATENCY_BUCKETS, float("inf")):
        le = "+Inf" if bound == float("inf") else str(bound)
        assert value(ours, "kiteq_delivery_ack_seconds_bucket", **labels, le=le) == (
            theirs.get_sample_value("ref_bucket", {**labels, "le": le})
        ), le
    assert value(ours, "kiteq_delivery_ack_seconds_count", **labels) == len(values) + 3
    assert value(ours, "kiteq_delivery_ack_seconds_sum", **labels) == pytest.approx(
        sum(values) + 0.06
    )


def test_fast_histogram_labels_go_through_the_caps() -> None:
    metrics = BrokerMetrics(max_topics=1, process=False)
    for topic in ("a", "b", "c"):
        metrics.first_delivery_latency.observe((topic, "g"), 0.01)
    metrics.first_delivery_latency.observe(("bad topic!", "g"), 0.01)
    count = "kiteq_publish_first_delivery_seconds_count"
    assert value(metrics, count, topic="a", group="g") == 1
    assert value(metrics, count, topic=OTHER_LABEL, group="g") == 2
    assert value(metrics, count, topic=INVALID_LABEL, group="g") == 1


def test_group_gauges_replace_and_remove_pairs(metrics: BrokerMetrics) -> None:
    metrics.set_groups(
        {("t", "a"): 2},
        {("t", "b"): 4},
        {("t", "a"): 3, ("t", "c"): 7},
        {("t", "a"): 9.5},
        {("t", "a"): 1},
    )
    assert value(metrics, "kiteq_group_unacked_messages", topic="t", group="a") == 2
    assert value(metrics, "kiteq_group_unacked_messages", topic="t", group="b") == 0
    assert value(metrics, "kiteq_group_waiting_messages", topic="t", group="b") == 4
    assert value(metrics, "kiteq_group_backlog_messages", topic="t", group="c") == 7
    assert value(metrics, "kiteq_group_oldest_message_age_seconds", topic="t", group="a") == 9.5
    assert value(metrics, "kiteq_group_consumers", topic="t", group="b") == 0
    metrics.set_groups({}, {}, {}, {}, {("t", "b"): 3})
    assert value(metrics, "kiteq_group_backlog_messages", topic="t", group="c") is None
    assert value(metrics, "kiteq_group_unacked_messages", topic="t", group="a") is None
    assert value(metrics, "kiteq_group_consumers", topic="t", group="a") is None
    assert value(metrics, "kiteq_group_consumers", topic="t", group="b") == 3


def test_zookeeper_state_is_one_hot_and_losses_count_once(metrics: BrokerMetrics) -> None:
    metrics.set_zookeeper("connected", 0)
    metrics.set_zookeeper("lost", 1)
    metrics.set_zookeeper("lost", 1)
    assert value(metrics, "kiteq_zookeeper_state", state="lost") == 1
    assert value(metrics, "kiteq_zookeeper_state", state="connected") == 0
    metrics.set_zookeeper("connected", 3)
    assert value(metrics, "kiteq_zookeeper_state", state="connected") == 1
    assert value(metrics, "kiteq_zookeeper_session_expirations_total") == 3


def test_dead_letters_without_a_group_count_under_none(metrics: BrokerMetrics) -> None:
    metrics.dead_lettered("trade", "", "no_binding", 2)
    labels = {"topic": "trade", "group": NO_GROUP_LABEL, "reason": "no_binding"}
    assert value(metrics, "kiteq_dead_lettered_total", **labels) == 2


def test_ordering_gauges_read_zero_once_a_pair_has_no_busy_key(metrics: BrokerMetrics) -> None:
    metrics.set_ordering({("t", "a"): 3, ("t", "b"): 0}, {("t", "a"): 12.5, ("t", "b"): 1.0})
    assert value(metrics, "kiteq_ordering_blocked_keys", topic="t", group="a") == 3
    assert value(metrics, "kiteq_ordering_oldest_head_age_seconds", topic="t", group="a") == 12.5
    assert value(metrics, "kiteq_ordering_oldest_head_age_seconds", topic="t", group="b") == 1.0
    metrics.set_ordering({}, {})
    assert value(metrics, "kiteq_ordering_blocked_keys", topic="t", group="a") == 0
    assert value(metrics, "kiteq_ordering_oldest_head_age_seconds", topic="t", group="a") == 0
