"""Scheduled delivery (issue #15) in the pipeline, with a ManualClock: never early by any
path (intake, full scan, commit, redrive of a join), delivered by the first scan once due;
the in-memory count of scheduled messages; cancel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from kiteq.binding.model import Binding
from kiteq.broker.operator import CancelOutcome, Operator
from kiteq.core.codes import AckCode
from kiteq.core.limits import MAX_EXPIRY_SECONDS
from kiteq.core.message import Message, TxStatus
from kiteq.handler.connection import Connection
from kiteq.handler.core import BrokerCore
from tests.handler.harness import NOW, Broker

HOUR = 3600.0


@pytest.fixture
async def b() -> AsyncIterator[Broker]:
    async with Broker() as broker:
        broker.bind("acct", Binding.direct("trade", "pay-succ"))
        yield broker


def delivered(conn: Connection) -> list[str]:
    _, deliveries = conn.drain()
    return [r.message_id for r, _ in deliveries]


def message(deliver_at: float = 0.0, **kwargs: Any) -> Message:
    return Message(
        topic="trade", message_type="pay-succ", body=b"x", deliver_at=deliver_at, **kwargs
    )


async def publish(b: Broker, *messages: Message) -> list[AckCode]:
    acks = await b.core.intake.publish(list(messages), group="pay")
    await b.settle()
    return [a.code for a in acks]


async def test_an_hour_delay_is_delivered_once_due_and_never_before(b: Broker) -> None:
    conn = b.connect("acct")
    m = message(NOW + HOUR)
    assert await publish(b, m) == [AckCode.OK]
    assert delivered(conn) == []  # stored and acked, not dispatched
    stored = await b.store.get(m.message_id)
    assert stored is not None
    assert stored.next_deliver_time == NOW + HOUR
    # the expiry counts from the delivery time: its 7-day default starts there
    assert stored.message.expired_time == int(NOW + HOUR) + MAX_EXPIRY_SECONDS
    assert b.core.scheduled.counts(b.clock.now()) == {"trade": 1}

    b.recover.wake()  # a full scan (as after a start or a binding change) reads it
    assert await b.scan() == 0
    b.clock.advance(HOUR - 0.5)
    assert await b.scan() == 0
    assert delivered(conn) == []
    b.clock.advance(0.5)
    assert await b.scan() == 1
    assert delivered(conn) == [m.message_id]
    assert b.core.scheduled.counts(b.clock.now()) == {}


async def test_no_entry_point_starts_a_scheduled_message_early(b: Broker) -> None:
    conn = b.connect("acct")
    m = message(NOW + 60)
    await publish(b, m)
    record = await b.store.get(m.message_id)
    assert record is not None
    b.dispatcher.submit(record)  # e.g. a stale copy offered by a redrive or a join
    b.dispatcher.redriven(record, ["acct"])
    b.connect("acct")  # a consumer arrives: full scan
    await b.scan()
    assert delivered(conn) == []
    assert not b.dispatcher.tracking(m.message_id)


async def test_a_committed_transaction_waits_for_its_delivery_time(b: Broker) -> None:
    conn = b.connect("acct")
    m = message(NOW + 30, commit=False)
    await publish(b, m)
    assert await b.tx.decide(m.message_id, TxStatus.COMMIT, "test")
    await b.settle()
    assert delivered(conn) == []
    stored = await b.store.get(m.message_id)
    assert stored is not None
    assert stored.next_deliver_time == NOW + 30
    assert b.core.scheduled.counts(b.clock.now()) == {"trade": 1}
    b.clock.advance(30)
    await b.scan()
    assert delivered(conn) == [m.message_id]


async def test_a_delivery_time_past_or_zero_is_at_once(b: Broker) -> None:
    conn = b.connect("acct")
    m1, m2 = message(NOW - 5), message(0.0)
    await publish(b, m1, m2)
    assert sorted(delivered(conn)) == sorted([m1.message_id, m2.message_id])


async def test_refused_schedules_say_why(b: Broker) -> None:
    acks = await b.core.intake.publish(
        [
            message(NOW + 120, expired_time=int(NOW) + 60),  # due after its expiry
            message(NOW + MAX_EXPIRY_SECONDS + 10),  # too far ahead
            message(NOW + 10, fly=True),  # never stored
            message(float("nan")),
        ],
        group="pay",
    )
    assert [a.code for a in acks] == [AckCode.INVALID_ARGUMENT] * 4
    assert "expiry" in acks[0].feedback
    assert "7 days" in acks[1].feedback
    assert "fly" in acks[2].feedback
    assert await b.store.backlog() == {}


async def test_deliver_limit_counts_from_the_delivery_time(b: Broker) -> None:
    conn = b.connect("acct")
    m = message(NOW + 10, deliver_limit=1)
    await publish(b, m)
    b.clock.advance(10)
    await b.scan()
    _, deliveries = conn.drain()
    assert [(r.message_id, attempt) for r, attempt in deliveries] == [(m.message_id, 1)]


async def test_census_counts_what_the_store_held_before_the_start(b: Broker) -> None:
    for delay in (10, 20, 3000):
        await publish(b, message(NOW + delay))
    # a broker started again on the same store: nothing counted until its first scan
    again = BrokerCore(
        config=b.core.config, store=b.store, bindings=b.table, clock=b.clock, server_name="2"
    )
    assert again.scheduled.counts(NOW) == {}
    b.clock.advance(1)
    await again.recover.scan()  # the first scan after a start is full: its census counts
    assert again.scheduled.counts(b.clock.now()) == {"trade": 3}
    await again.intake.publish([message(NOW + 50)], group="pay")
    b.clock.advance(1)
    again.recover.wake()
    await again.recover.scan()  # a second census counts nothing twice
    assert again.scheduled.counts(b.clock.now()) == {"trade": 4}
    assert again.scheduled.counts(NOW + 25) == {"trade": 2}


async def test_cancel_removes_a_scheduled_message_only(b: Broker) -> None:
    conn = b.connect("acct")
    operator = Operator(b.core)
    m, soon, plain = message(NOW + 600), message(NOW + 0.5), message(NOW + 60)
    await publish(b, m, soon, plain)
    listed, cursor = await operator.scheduled(10)
    assert [r.message_id for r in listed] == [soon.message_id, plain.message_id, m.message_id]
    assert cursor is None
    assert (await operator.cancel(m.message_id))[0] is CancelOutcome.CANCELLED
    assert await b.store.get(m.message_id) is None
    assert (await operator.cancel(m.message_id))[0] is CancelOutcome.NOT_FOUND
    # due within the cancel margin: no longer cancellable
    assert (await operator.cancel(soon.message_id))[0] is CancelOutcome.NOT_SCHEDULED
    assert b.core.scheduled.counts(NOW) == {"trade": 2}
    b.clock.advance(600)
    await b.scan()
    assert sorted(delivered(conn)) == sorted([soon.message_id, plain.message_id])
    kinds = [e.kind for e in b.history.unflushed(m.message_id)]
    kinds += [e.kind for e in await b.store.get_history(m.message_id)]
    assert "cancelled" in kinds
