"""Ways of consuming on real broker processes (issue #17): batch handlers with per-message
results, max_concurrency for sync and async handlers, pause/resume, the sync iterator."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kiteq.client import ClientClosedError, Consumer, Delivery, Producer, ReceivedMessage
from tests.e2e.broker_process import BrokerProcess
from tests.e2e.helpers import PAY_SUCC, async_consumer, async_producer, pay_succ, wait_idle

pytestmark = pytest.mark.e2e


class Overlap:
    """Counts handler calls running at once (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0
        self.most = 0

    def enter(self) -> None:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)

    def leave(self) -> None:
        with self._lock:
            self.running -= 1


def test_batch_handler_results_per_message_and_max_concurrency(broker: BrokerProcess) -> None:
    overlap = Overlap()
    calls: list[list[tuple[bytes, int]]] = []
    done = threading.Condition()
    acked: set[bytes] = set()

    def handle(batch: list[ReceivedMessage]) -> list[bool]:
        overlap.enter()
        try:
            time.sleep(0.05)  # work, so that calls overlap when they may
            with done:
                calls.append([(m.body, m.attempt) for m in batch])
                # odd bodies fail their first attempt
                results = [m.attempt > 1 or int(m.body) % 2 == 0 for m in batch]
                acked.update(m.body for m, ok in zip(batch, results, strict=True) if ok)
                done.notify_all()
            return results
        finally:
            overlap.leave()

    count = 60
    with (
        Consumer(
            brokers=[broker.address],
            group_id="acct-svc",
            bindings=PAY_SUCC,
            batch_handler=handle,
            max_concurrency=2,
        ),
        Producer(brokers=[broker.address], group_id="pay-svc") as p,
    ):
        futures = [p.send_async(pay_succ(str(i).encode())) for i in range(count)]
        for future in futures:
            future.result(20)
        with done:
            assert done.wait_for(lambda: len(acked) == count, 30)
        wait_idle(broker)
    assert overlap.most <= 2
    attempts = [(body, attempt) for call in calls for body, attempt in call]
    assert sorted(b for b, a in attempts if a == 2) == sorted(
        str(i).encode() for i in range(count) if i % 2
    )
    assert max(len(call) for call in calls) > 1  # batches, not one message per call


async def test_async_handler_max_concurrency(broker: BrokerProcess) -> None:
    overlap = Overlap()
    seen: set[bytes] = set()
    all_seen = asyncio.Event()
    count = 40

    async def handle(msg: ReceivedMessage) -> bool:
        overlap.enter()
        try:
            await asyncio.sleep(0.02)
        finally:
            overlap.leave()
        seen.add(msg.body)
        if len(seen) == count:
            all_seen.set()
        return True

    async with (
        async_consumer(broker, handler=handle, max_concurrency=3),
        async_producer(broker) as p,
    ):
        await asyncio.gather(*(p.send(pay_succ(str(i).encode())) for i in range(count)))
        await asyncio.wait_for(all_seen.wait(), 30)
    assert 1 < overlap.most <= 3


async def test_pause_stops_deliveries_until_resume(broker: BrokerProcess) -> None:
    paused_got: list[str] = []
    got_one = asyncio.Event()
    witness_got = asyncio.Event()

    async def paused_handler(msg: ReceivedMessage) -> bool:
        paused_got.append(msg.message_id)
        got_one.set()
        return True

    async def witness(msg: ReceivedMessage) -> bool:
        witness_got.set()
        return True

    async with (
        async_consumer(broker, handler=paused_handler) as c,
        async_consumer(broker, "audit-svc", handler=witness),
        async_producer(broker) as p,
    ):
        await c.pause()
        assert c.paused
        sent = (await p.send(pay_succ(b"wait"))).message_id
        # positive event: another group got it, so the broker delivered meanwhile
        await asyncio.wait_for(witness_got.wait(), 20)
        assert paused_got == []
        assert broker.lookup(sent).found
        await c.resume()
        await asyncio.wait_for(got_one.wait(), 20)
        assert paused_got == [sent]
        await asyncio.to_thread(wait_idle, broker)


def test_sync_iterator_answers_from_other_threads(broker: BrokerProcess) -> None:
    count = 20
    answered: list[Delivery] = []
    with (
        Consumer(brokers=[broker.address], group_id="acct-svc", bindings=PAY_SUCC) as c,
        Producer(brokers=[broker.address], group_id="pay-svc") as p,
    ):
        sent = {p.send(pay_succ(str(i).encode())).message_id for i in range(count)}
        threads = []
        for delivery in c:
            answered.append(delivery)
            if len(answered) == count:
                break  # the last one stays unanswered
            worker = threading.Thread(target=delivery.ack)
            worker.start()
            threads.append(worker)
        for worker in threads:
            worker.join(10)
        assert c.unanswered == 1
    assert {d.message_id for d in answered} == sent
    answered[0].ack()  # settled already: a no-op, even after close
    with pytest.raises(ClientClosedError, match="closed"):
        answered[-1].ack()
