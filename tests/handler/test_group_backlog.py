"""Per-(topic, group) backlog: what a group has still to settle, in memory and in the store.

Through the broker's own stations (``BrokerCore`` over a real memory store): the counts
follow every write that changes a stored record's pending groups, and a broker started
on the same store reads them back.
"""

from __future__ import annotations

from kiteq.binding.model import Binding
from kiteq.broker.operator import Operator
from kiteq.handler.backoff import IMMEDIATE_ATTEMPTS, redelivery_delay
from kiteq.handler.group_backlog import BUCKET_SECONDS, StoredBacklog
from kiteq.store.base import DlqFilter
from tests.handler.harness import Broker

AWAY = ("trade", "away")


async def five_acked_by_live_only(b: Broker) -> None:
    """Five messages for "live" (connected, acks them) and "away" (persistent, offline)."""
    b.bind("live", Binding.fanout("trade"))
    b.bind("away", Binding.fanout("trade", persistent=True))
    live = b.connect("live")
    for _ in range(5):
        await b.publish()
    assert len(b.answer(live, lambda r, a: True)) == 5


def backlog(b: Broker) -> dict[tuple[str, str], int]:
    return dict(b.dispatcher.group_gauges().backlog)


async def test_an_offline_groups_messages_count_until_it_comes_back_and_acks() -> None:
    async with Broker() as b:
        await five_acked_by_live_only(b)
        await b.settle()
        # "live" has nothing left; the five wait in the store for "away" only
        assert backlog(b) == {AWAY: 5}
        b.clock.advance(30)
        age = b.dispatcher.group_gauges().oldest[AWAY]
        assert 30 <= age < 30 + BUCKET_SECONDS

        restarted = Broker(store=b.store)
        await restarted.core.load()
        assert backlog(restarted) == {AWAY: 5}

        away = b.connect("away")
        await b.scan()
        assert backlog(b) == {AWAY: 5}  # in flight now, counted once
        assert len(b.answer(away, lambda r, a: True)) == 5
        await b.settle()
        assert backlog(b) == {}
        assert await b.store.backlog() == {}


async def test_a_retry_in_its_backoff_window_counts_once_in_memory_and_in_the_store() -> None:
    async with Broker() as b:
        b.bind("acct", Binding.fanout("trade"))
        conn = b.connect("acct")
        record = await b.publish()
        for attempt in range(1, IMMEDIATE_ATTEMPTS + 1):
            assert backlog(b) == {("trade", "acct"): 1}
            assert b.answer(conn, lambda r, a: False) == [(record.message_id, attempt)]
        await b.settle()
        assert not b.dispatcher.tracking(record.message_id)
        assert backlog(b) == {("trade", "acct"): 1}  # in the store only, in its window
        b.clock.advance(redelivery_delay(IMMEDIATE_ATTEMPTS) + 1)
        await b.scan()
        assert b.dispatcher.tracking(record.message_id)
        assert backlog(b) == {("trade", "acct"): 1}
        assert b.answer(conn, lambda r, a: True) == [(record.message_id, IMMEDIATE_ATTEMPTS + 1)]
        await b.settle()
        assert backlog(b) == {}


async def test_a_dead_letter_leaves_the_backlog_and_a_redrive_brings_it_back() -> None:
    async with Broker() as b:
        b.bind("acct", Binding.fanout("trade"))
        b.bind("away", Binding.fanout("trade", persistent=True))
        conn = b.connect("acct")
        record = await b.publish(deliver_limit=1)
        b.answer(conn, lambda r, a: False)
        await b.settle()
        # "acct" used its one attempt: dead-lettered for it, still parked for "away"
        assert backlog(b) == {AWAY: 1}
        assert await b.store.dlq_size() == {("trade", "acct"): 1}

        assert await Operator(b.core).redrive_where(DlqFilter(group="acct")) == 1
        await b.settle()
        assert backlog(b) == {AWAY: 1, ("trade", "acct"): 1}
        assert b.answer(conn, lambda r, a: True) == [(record.message_id, 1)]
        await b.settle()
        assert backlog(b) == {AWAY: 1}


def test_stored_backlog_counts_differences_and_never_goes_below_zero() -> None:
    stored = StoredBacklog()
    stored.load({("t", "a", 100): 2, ("t", "a", 125): 1})
    stored.changed("t", 101.0, frozenset(), frozenset({"a", "b"}))
    assert stored.counts() == {("t", "a"): 4, ("t", "b"): 1}
    assert stored.oldest_ages(200.0) == {("t", "a"): 100.0, ("t", "b"): 100.0}
    stored.changed("t", 101.0, frozenset({"a", "b"}), frozenset({"a", "b"}))
    stored.changed("t", 100.0, frozenset({"a"}), frozenset())
    stored.changed("t", 100.0, frozenset({"a"}), frozenset())
    stored.changed("t", 100.0, frozenset({"a"}), frozenset())
    assert stored.counts() == {("t", "a"): 1, ("t", "b"): 1}
    assert stored.oldest_ages(200.0) == {("t", "a"): 80.0, ("t", "b"): 100.0}
    stored.changed("t", 125.0, frozenset({"a", "b"}), frozenset())
    stored.changed("t", 125.0, frozenset({"a"}), frozenset())
    assert stored.counts() == {("t", "b"): 1}


async def test_another_consumer_of_a_served_group_does_not_make_a_full_scan() -> None:
    async with Broker() as b:
        await five_acked_by_live_only(b)
        assert await b.scan() == 5  # the first scan after a start reads everything
        assert await b.scan() == 0  # the periodic one skips what is parked for "away"
        b.connect("live")
        b.recover.nudge()  # what a consumer's arrival does (kiteq.broker.service)
        assert await b.scan() == 0
        b.recover.wake()  # a binding change: the parked messages are read again
        assert await b.scan() == 5
        b.connect("away")
        b.recover.nudge()  # the group's first consumer: its parked messages are due
        assert await b.scan() == 5
        assert len(b.answer(b.connections.consumers("away")[0], lambda r, a: True)) == 5
