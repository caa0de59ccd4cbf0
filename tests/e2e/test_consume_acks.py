"""Explicit answers on real broker processes (issue #17): iteration, out-of-order acks,
redelivery after deliverySeconds, in_progress, the unacked bound, nack with delay."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest

from kiteq.client import AckMode, AsyncDelivery, DeliveryExpiredError, Message
from kiteq.proto.v1 import admin_pb2
from tests.e2e.broker_process import BrokerProcess
from tests.e2e.helpers import (
    async_consumer,
    async_producer,
    dead_letters,
    in_flight,
    pay_succ,
    wait_idle,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

DELIVERY_SECONDS = 2  # tests/e2e/broker_process.write_config


async def take(deliveries: AsyncIterator[AsyncDelivery], timeout: float = 20.0) -> AsyncDelivery:
    async with asyncio.timeout(timeout):
        return await anext(deliveries)


async def test_iterated_deliveries_acked_out_of_order_by_several_tasks(
    broker: BrokerProcess,
) -> None:
    count = 40
    async with async_consumer(broker) as c, async_producer(broker) as p:
        sent = {(await p.send(pay_succ(str(i).encode()))).message_id for i in range(count)}
        deliveries = aiter(c)
        taken = [await take(deliveries) for _ in range(count)]
        random.Random(17).shuffle(taken)
        queues: list[list[AsyncDelivery]] = [taken[i::4] for i in range(4)]

        async def ack_all(mine: list[AsyncDelivery]) -> None:
            for d in reversed(mine):
                await d.ack()
                await d.ack()  # a double ack is a no-op
                await asyncio.sleep(0)

        await asyncio.gather(*(ack_all(q) for q in queues))
        assert c.unanswered == 0
        # every message acked once: the broker deleted them all, so none can come back
        await asyncio.to_thread(wait_idle, broker)
    assert sorted(d.message_id for d in taken) == sorted(sent)
    assert {d.attempt for d in taken} == {1}


async def test_unacked_delivery_goes_to_another_connection_with_attempt_2(
    broker: BrokerProcess,
) -> None:
    async with async_consumer(broker, client_id="first") as first, async_producer(broker) as p:
        sent = (await p.send(pay_succ(b"slow"))).message_id
        held = await take(aiter(first))
        assert (held.message_id, held.attempt) == (sent, 1)
        async with async_consumer(broker, client_id="second") as second:
            again = await take(aiter(second), timeout=DELIVERY_SECONDS * 10)
            assert (again.message_id, again.attempt) == (sent, 2)
            with pytest.raises(DeliveryExpiredError, match="expired"):
                await held.ack()
            await again.ack()
            await asyncio.to_thread(wait_idle, broker)


async def test_in_progress_keeps_a_long_handler_from_redelivery(broker: BrokerProcess) -> None:
    other: list[AsyncDelivery] = []

    async def record(delivery: AsyncDelivery) -> None:
        other.append(delivery)
        await delivery.ack()

    async with async_consumer(broker, client_id="worker") as worker, async_producer(broker) as p:
        sent = (await p.send(pay_succ(b"long"))).message_id
        delivery = await take(aiter(worker))
        # a second connection of the group would get any redelivery
        async with async_consumer(
            broker, handler=record, ack_mode=AckMode.MANUAL, client_id="spare"
        ):
            started = time.monotonic()
            while time.monotonic() - started < 3 * DELIVERY_SECONDS:
                await delivery.in_progress()
                await asyncio.sleep(DELIVERY_SECONDS / 4)  # the handler's work
            await delivery.ack()
            await asyncio.to_thread(wait_idle, broker)
    assert delivery.message_id == sent
    assert other == []


async def test_unacked_bound_holds_back_deliveries_until_an_ack(broker: BrokerProcess) -> None:
    bound = 3
    witness: list[str] = []
    all_seen = asyncio.Event()

    async def see(delivery: AsyncDelivery) -> None:
        witness.append(delivery.message_id)
        if len(witness) == 10:
            all_seen.set()
        await delivery.ack()

    async with (
        async_consumer(broker, max_in_flight=bound) as c,
        async_consumer(broker, "audit-svc", handler=see, ack_mode=AckMode.MANUAL),
        async_producer(broker) as p,
    ):
        for i in range(10):
            await p.send(pay_succ(str(i).encode()))
        deliveries = aiter(c)
        held = [await take(deliveries) for _ in range(bound)]
        # positive event: the other group got all ten, so the broker was delivering
        await asyncio.wait_for(all_seen.wait(), 20)
        assert in_flight(broker, "acct-svc") == bound
        assert c.unanswered == bound
        with pytest.raises(TimeoutError):
            await take(deliveries, timeout=0.5)
        await held[0].ack()
        fourth = await take(deliveries)
        assert fourth.message_id not in {d.message_id for d in held}
        for d in [*held[1:], fourth]:
            await d.ack()
        seen = 4
        while seen < 10:
            assert in_flight(broker, "acct-svc") <= bound
            await (await take(deliveries)).ack()
            seen += 1
        await asyncio.to_thread(wait_idle, broker)


async def test_nack_with_delay_redelivers_no_earlier_and_others_keep_flowing(
    broker: BrokerProcess,
) -> None:
    async with async_consumer(broker) as c, async_producer(broker) as p:
        late = (await p.send(pay_succ(b"later"))).message_id
        deliveries = aiter(c)
        first = await take(deliveries)
        assert first.message_id == late
        nacked_at = time.monotonic()
        await first.nack(delay=5)
        others = {(await p.send(pay_succ(str(i).encode()))).message_id for i in range(5)}
        got: set[str] = set()
        while len(got) < 5:
            d = await take(deliveries)
            assert d.message_id != late, "redelivered before its delay"
            got.add(d.message_id)
            await d.ack()
        assert got == others
        assert time.monotonic() - nacked_at < 5, "other messages waited for the delay"
        again = await take(deliveries, timeout=30)
        assert (again.message_id, again.attempt) == (late, 2)
        assert time.monotonic() - nacked_at >= 5
        await again.ack()
        await asyncio.to_thread(wait_idle, broker)


async def test_delayed_nack_within_deliver_limit_dead_letters_at_the_limit(
    broker: BrokerProcess,
) -> None:
    async with async_consumer(broker) as c, async_producer(broker) as p:
        limited = Message(topic="trade", message_type="pay-succ", body=b"x", deliver_limit=2)
        sent = (await p.send(limited)).message_id
        deliveries = aiter(c)
        for attempt in (1, 2):
            d = await take(deliveries)
            assert (d.message_id, d.attempt) == (sent, attempt)
            await d.nack(delay=1)
        letters = await asyncio.to_thread(_letters_when_one, broker)
    assert [(letter.header.messageId, letter.reason, letter.groupId) for letter in letters] == [
        (sent, "deliver_limit", "acct-svc")
    ]


def _letters_when_one(broker: BrokerProcess) -> list[admin_pb2.DeadLetterInfo]:
    wait_until(lambda: len(dead_letters(broker)) == 1)
    return list(dead_letters(broker))
