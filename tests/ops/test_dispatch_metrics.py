"""What the dispatcher reports to the metrics: latencies, dead letters, flow limits, gauges."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from kiteq.binding.model import Binding
from kiteq.core.message import StoredMessage, TxStatus
from kiteq.handler.connection import Connection
from kiteq.ops.metrics import BrokerMetrics
from tests.handler.harness import Broker as TxBroker
from tests.handler.test_dispatch import Harness, taken


@pytest.fixture
async def h() -> AsyncIterator[tuple[Harness, BrokerMetrics]]:
    metrics = BrokerMetrics(process=False)
    harness = Harness(metrics=metrics)
    yield harness, metrics
    await harness.close()


def value(metrics: BrokerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_first_delivery_and_ack_latency_are_observed(
    h: tuple[Harness, BrokerMetrics],
) -> None:
    harness, metrics = h
    harness.bind("acct", Binding.direct("trade", "pay-succ"))
    record = harness.publish()  # no consumer yet: parked, stays due
    harness.clock.advance(0.3)
    conn = harness.connect("acct")
    harness.dispatcher.submit(record)  # what the recover scan does when the group is back
    assert taken(conn) == [(record.message_id, 1)]
    harness.clock.advance(0.02)
    harness.dispatcher.acked(conn, [(record.message_id, True)])
    labels = {"topic": "trade", "group": "acct"}
    first = "kiteq_publish_first_delivery_seconds"
    assert value(metrics, f"{first}_count", **labels) == 1
    assert value(metrics, f"{first}_sum", **labels) == pytest.approx(0.3)
    assert value(metrics, f"{first}_bucket", **labels, le="0.25") == 0
    assert value(metrics, f"{first}_bucket", **labels, le="0.5") == 1
    assert value(metrics, "kiteq_delivery_ack_seconds_sum", **labels) == pytest.approx(0.02)
    harness.dispatcher.flush_metrics()
    assert value(metrics, "kiteq_delivered_bytes_total") == 1  # body b"x"


def offered_to_acct(harness: Harness) -> tuple[Connection, StoredMessage]:
    """A message pushed to a connection of group acct (not answered yet)."""
    harness.bind("acct", Binding.direct("trade", "pay-succ"))
    conn = harness.connect("acct")
    return conn, harness.publish()


async def test_a_retry_is_not_a_first_delivery_and_a_nack_has_no_ack_latency(
    h: tuple[Harness, BrokerMetrics],
) -> None:
    harness, metrics = h
    conn, record = offered_to_acct(harness)
    taken(conn)
    harness.dispatcher.acked(conn, [(record.message_id, False)])  # retried at once
    assert taken(conn) == [(record.message_id, 2)]
    labels = {"topic": "trade", "group": "acct"}
    assert value(metrics, "kiteq_publish_first_delivery_seconds_count", **labels) == 1
    assert value(metrics, "kiteq_delivery_ack_seconds_count", **labels) is None


async def test_dead_letters_are_counted_by_reason_and_kept_for_the_summary(
    h: tuple[Harness, BrokerMetrics],
) -> None:
    harness, metrics = h
    conn, record = offered_to_acct(harness)
    record.message.deliver_limit = 1
    taken(conn)
    harness.dispatcher.acked(conn, [(record.message_id, False)])
    await harness.settle()
    assert [d.reason for d in harness.store.dead] == ["deliver_limit"]
    harness.dispatcher.flush_metrics()
    labels = {"topic": "trade", "group": "acct", "reason": "deliver_limit"}
    assert value(metrics, "kiteq_dead_lettered_total", **labels) == 1
    assert harness.dispatcher.tally.dead_letter_summary == {"trade/acct/deliver_limit": 1}


async def test_watermark_holds_are_counted_and_waiting_messages_show_in_the_gauges(
    h: tuple[Harness, BrokerMetrics],
) -> None:
    harness, metrics = h
    # 2 messages/s, burst 1: the first goes, the rest wait
    harness.bind("slow", Binding.direct("trade", "pay-succ", watermark=2))
    conn = harness.connect("slow")
    records = [harness.publish() for _ in range(4)]
    assert [mid for mid, _ in taken(conn)] == [records[0].message_id]
    harness.clock.advance(7.0)
    harness.dispatcher.flush_metrics()
    # counted when a push finds the bucket empty; the others queue behind it
    assert value(metrics, "kiteq_flow_limited_pushes_total", topic="trade", group="slow") == 1
    gauges = harness.dispatcher.group_gauges()
    assert gauges.unacked == {("trade", "slow"): 1}
    assert gauges.waiting == {("trade", "slow"): 3}
    assert gauges.backlog == {("trade", "slow"): 4}
    assert gauges.oldest == {("trade", "slow"): pytest.approx(7.0)}


async def test_transaction_check_results_count_answers_after_a_check_and_unresolved() -> None:
    async with TxBroker(check_max=1) as b:
        producer = b.producer("pay")
        checked = await b.publish(commit=False, publisher=producer)
        b.clock.advance(6)
        b.tx._check_due()  # the first check of "checked"
        direct = await b.publish(commit=False, publisher=producer)
        await b.tx.decide_for("pay", direct.message_id, TxStatus.COMMIT, "producer")
        assert b.tx.check_results == {}  # decided before any check: not a check result
        await b.tx.decide_for("pay", checked.message_id, TxStatus.UNKNOWN, "producer")
        assert b.tx.check_results == {"unknown": 1}
        b.clock.advance(30)
        b.tx._check_due()  # check_max reached: unresolved
        assert b.tx.check_results == {"unknown": 1, "unresolved": 1}
