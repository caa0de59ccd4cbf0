"""Issue #4 behaviour: backoff windows, limits, dead letters, flow control, history."""

from __future__ import annotations

import itertools

from kiteq.binding.model import Binding
from kiteq.handler.backoff import IMMEDIATE_ATTEMPTS, redelivery_delay
from kiteq.store.base import DlqFilter
from tests.handler.harness import Broker


def ack(*_: object) -> bool:
    return True


def nack(*_: object) -> bool:
    return False


async def test_nacked_n_times_then_acked_gets_attempts_1_to_n_plus_1_after_the_windows() -> None:
    n = 6
    async with Broker() as b:
        b.bind("acct", Binding.fanout("trade"))
        conn = b.connect("acct")
        record = await b.publish()
        attempts: list[tuple[int, float]] = []

        def decide(_: object, attempt: int) -> bool:
            attempts.append((attempt, b.clock.now()))
            return attempt > n

        for _ in range(IMMEDIATE_ATTEMPTS):
            b.answer(conn, decide)
        await b.settle()
        while len(attempts) <= n:
            due = (await b.store.get(record.message_id)).next_deliver_time  # type: ignore[union-attr]
            wait = due - b.clock.now()
            if wait > 0:
                b.clock.advance(wait - 0.5)
                assert await b.scan() == 0, "nothing may be delivered before its window"
                b.clock.advance(0.5)
            assert await b.scan() == 1
            b.answer(conn, decide)
            await b.settle()
        assert [a for a, _ in attempts] == list(range(1, n + 2))
        gaps = [round(t2 - t1) for (_, t1), (_, t2) in itertools.pairwise(attempts)]
        assert gaps == [0, 0] + [redelivery_delay(k) for k in range(IMMEDIATE_ATTEMPTS, n + 1)]
        assert await b.store.get(record.message_id) is None  # acked: deleted


async def test_deliver_limit_3_gives_exactly_3_attempts_then_the_dlq_and_redrive_delivers() -> None:
    async with Broker() as b:
        b.bind("acct", Binding.fanout("trade"))
        bad = b.connect("acct")
        record = await b.publish(deliver_limit=3)
        seen = []
        for _ in range(5):
            seen += b.answer(bad, nack)
        await b.settle()
        b.clock.advance(600)
        await b.scan()
        seen += b.answer(bad, nack)
        assert seen == [(record.message_id, 1), (record.message_id, 2), (record.message_id, 3)]
        [letter] = await b.store.list_dlq(DlqFilter(), 10)
        assert (letter.reason, letter.group) == ("deliver_limit", "acct")
        assert await b.store.get(record.message_id) is None
        b.dispatcher.connection_closed(bad)
        good = b.connect("acct")
        [again] = await b.store.redrive([letter.key], b.clock.now())
        b.dispatcher.submit(again)
        assert b.answer(good, ack) == [(record.message_id, 1)]
        await b.settle()
        assert await b.store.list_dlq(DlqFilter(), 10) == []


async def test_an_expired_message_goes_to_the_dlq_and_is_never_delivered_after_its_expiry() -> None:
    async with Broker() as b:
        b.bind("acct", Binding.fanout("trade"))
        conn = b.connect("acct")
        record = await b.publish(ttl=30)
        for _ in range(IMMEDIATE_ATTEMPTS):
            b.answer(conn, nack)
        await b.settle()
        b.clock.advance(31)
        await b.scan()
        assert b.answer(conn, ack) == []
        [letter] = await b.store.list_dlq(DlqFilter(reason="expired"), 10)
        assert (letter.record.message_id, letter.group) == (record.message_id, "acct")


async def test_watermark_100_per_second_paces_the_group_without_using_attempts() -> None:
    async with Broker() as b:
        b.bind("acct", Binding.fanout("trade", watermark=100))
        conn = b.connect("acct", max_in_flight=10_000)
        records = [await b.publish() for _ in range(500)]
        per_tick = []
        for _ in range(40):  # 4 s in ticks of 0.1 s
            got = b.answer(conn, ack)
            per_tick.append(len(got))
            assert all(attempt == 1 for _, attempt in got)
            b.clock.advance(0.1)
            b.dispatcher.tick()
        # burst of 50 (half the rate), then 10 per 0.1 s
        assert per_tick[0] == 50
        assert sum(per_tick[1:11]) in range(95, 106)
        delivered = sum(per_tick)
        assert abs(delivered - (50 + 100 * 3.9)) <= 10  # burst + 100/s over the remaining 3.9 s
        await b.settle()
        assert b.dispatcher.tally.flow_limited > 0
        left = [r for r in records if await b.store.get(r.message_id) is not None]
        assert len(left) == 500 - delivered  # nothing lost, nothing dead-lettered
        assert await b.store.list_dlq(DlqFilter(), 10) == []


async def test_credits_cap_unacked_deliveries() -> None:
    async with Broker() as b:
        b.bind("acct", Binding.fanout("trade"))
        conn = b.connect("acct", max_in_flight=10)
        for _ in range(50):
            await b.publish()
        highest = 0
        for _ in range(10):
            _, deliveries = conn.drain()
            highest = max(highest, len(conn.inflight))
            b.dispatcher.acked(conn, [(r.message_id, True) for r, _ in deliveries])
        assert highest == 10


async def test_offline_non_persistent_group_is_dropped_for_it_only_and_history_says_so() -> None:
    async with Broker() as b:
        b.bind("keep", Binding.fanout("trade", persistent=True))
        b.bind("drop", Binding.fanout("trade", persistent=False))
        record = await b.publish()
        await b.settle()
        assert await b.store.get(record.message_id) is not None  # kept for "keep"
        keep = b.connect("keep")
        await b.scan()
        assert b.answer(keep, ack) == [(record.message_id, 1)]
        await b.settle()
        assert await b.store.get(record.message_id) is None
        kinds = [
            (e.kind, e.group)
            for e in await b.store.get_history(record.message_id)
            + b.history.unflushed(record.message_id)
        ]
        assert ("skipped", "drop") in kinds
        assert ("acked", "keep") in kinds


async def test_restart_during_backoff_keeps_attempt_counts_and_due_times() -> None:
    async with Broker() as first:
        first.bind("acct", Binding.fanout("trade"))
        conn = first.connect("acct")
        record = await first.publish()
        for _ in range(IMMEDIATE_ATTEMPTS):
            first.answer(conn, nack)
        await first.scan()
        first.answer(conn, nack)  # attempt 4 -> 5 s window
        await first.settle()
        store = first.store
        stored = await store.get(record.message_id)
        assert stored is not None
        assert stored.deliver_count == 4
        due = stored.next_deliver_time
        # a new broker on the same store (the memory store stands in for a reopened one)
        second = Broker(store)
        second.clock.advance(first.clock.now() - second.clock.now())
        second._task = __import__("asyncio").create_task(second.bookkeeper.run())
        second.bind("acct", Binding.fanout("trade"))
        conn2 = second.connect("acct")
        assert await second.scan() == 0
        second.clock.advance(due - second.clock.now())
        assert await second.scan() == 1
        assert second.answer(conn2, ack) == [(record.message_id, 5)]
        await second.settle()
        second._task.cancel()


async def test_a_message_without_binding_is_kept_then_delivered_when_a_binding_appears() -> None:
    async with Broker(retention=60) as b:
        record = await b.publish()
        await b.scan()
        assert await b.store.get(record.message_id) is not None
        b.bind("late", Binding.fanout("trade"))
        conn = b.connect("late")
        await b.scan()
        assert b.answer(conn, ack) == [(record.message_id, 1)]


async def test_a_message_without_binding_goes_to_the_dlq_after_the_retention() -> None:
    async with Broker(retention=60) as b:
        record = await b.publish()
        b.clock.advance(61)
        await b.scan()
        [letter] = await b.store.list_dlq(DlqFilter(reason="no_binding"), 10)
        assert (letter.record.message_id, letter.group) == (record.message_id, "")


async def test_history_shows_each_attempt() -> None:
    async with Broker() as b:
        b.bind("acct", Binding.fanout("trade"))
        first, second = b.connect("acct"), b.connect("acct")
        record = await b.publish()
        for conn in (first, second, first, second):
            b.answer(conn, nack)
        await b.settle()
        events = await b.store.get_history(record.message_id) + b.history.unflushed(
            record.message_id
        )
        pushes = [(e.attempt, e.connection) for e in events if e.kind == "delivered"]
        assert [a for a, _ in pushes] == [1, 2, 3]
        assert len({c for _, c in pushes}) == 2  # retried on the other connection
        assert [e.kind for e in events].count("nacked") == 3
        assert events[0].kind == "published"
        assert events[-1].kind == "rescheduled"


async def test_a_group_of_only_warming_connections_still_gets_its_messages() -> None:
    async with Broker() as b:
        b.bind("acct", Binding.fanout("trade"))
        warm = b.connect("acct", warmup=60)
        warm2 = b.connect("acct", warmup=60)
        for _ in range(20):
            await b.publish()
        got = b.answer(warm, ack) + b.answer(warm2, ack)
        assert len(got) == 20


async def test_warm_up_gives_a_new_connection_a_growing_share() -> None:
    async with Broker() as b:
        b.bind("acct", Binding.fanout("trade"))
        old = b.connect("acct", max_in_flight=100_000)
        b.clock.advance(100)
        new = b.connect("acct", max_in_flight=100_000, warmup=100)
        shares = []
        for _ in range(4):
            for _ in range(400):
                await b.publish()
            n_new, n_old = len(b.answer(new, ack)), len(b.answer(old, ack))
            shares.append(n_new / (n_new + n_old))
            b.clock.advance(25)
        # weights new:old = s:1 with s = 0.01, 0.25, 0.5, 0.75 -> shares ~0.01, 0.2, 0.33, 0.43
        assert shares[0] < 0.05
        assert shares[0] < shares[1] < shares[2] < shares[3]
        assert 0.33 < shares[3] < 0.53
