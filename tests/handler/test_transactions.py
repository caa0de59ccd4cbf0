"""Issue #5 on a manual clock: decisions are final, checks are bounded and never stall."""

from __future__ import annotations

from kiteq.binding.model import Binding
from kiteq.core.message import TxStatus
from kiteq.handler.connection import Connection
from tests.handler.harness import Broker


def checks(conn: Connection) -> list[tuple[str, int]]:
    return [(r.message_id, n) for r, n in conn.drain_checks()]


def delivered(b: Broker, conn: Connection) -> list[str]:
    return [mid for mid, _ in b.answer(conn, lambda *_: True)]


async def test_uncommitted_is_never_delivered_commit_delivers_once_and_later_decisions_change_nothing() -> (
    None
):
    async with Broker() as b:
        b.bind("acct", Binding.fanout("trade"))
        consumer = b.connect("acct")
        record = await b.publish(commit=False)
        await b.scan()
        assert delivered(b, consumer) == []
        assert await b.tx.decide(record.message_id, TxStatus.COMMIT, "test")
        assert delivered(b, consumer) == [record.message_id]
        await b.settle()
        assert not await b.tx.decide(record.message_id, TxStatus.COMMIT, "test")
        assert not await b.tx.decide(record.message_id, TxStatus.ROLLBACK, "test")
        assert not await b.tx.decide(record.message_id, TxStatus.UNKNOWN, "test")
        await b.scan()
        assert delivered(b, consumer) == []


async def test_rollback_removes_and_a_late_commit_is_ignored() -> None:
    async with Broker() as b:
        b.bind("acct", Binding.fanout("trade"))
        consumer = b.connect("acct")
        record = await b.publish(commit=False)
        assert await b.tx.decide(record.message_id, TxStatus.ROLLBACK, "test")
        assert await b.store.get(record.message_id) is None
        assert not await b.tx.decide(record.message_id, TxStatus.COMMIT, "test")
        await b.scan()
        assert delivered(b, consumer) == []
        kinds = [e.kind for e in await b.store.get_history(record.message_id)]
        assert "rolled_back" in kinds


async def test_checks_go_to_the_publisher_first_then_any_live_connection_of_its_group() -> None:
    async with Broker() as b:
        first, other = b.producer("pay"), b.producer("pay")
        record = await b.publish(commit=False, publisher=first)
        b.clock.advance(5.9)
        b.tx._check_due()
        assert checks(first) == []
        b.clock.advance(0.1)
        b.tx._check_due()
        assert checks(first) == [(record.message_id, 1)]
        b.clock.advance(30)
        b.tx._check_due()
        assert checks(first) == [(record.message_id, 2)]
        b.dispatcher.connection_closed(first)
        b.clock.advance(30)
        b.tx._check_due()
        assert checks(other) == [(record.message_id, 3)]


async def test_no_live_producer_is_an_unanswered_check_and_exhausted_checks_leave_it_unresolved() -> (
    None
):
    async with Broker(check_max=3) as b:
        b.bind("acct", Binding.fanout("trade"))
        consumer = b.connect("acct")
        record = await b.publish(commit=False)
        b.clock.advance(6)
        for _ in range(3):
            b.tx._check_due()
            b.clock.advance(30)
        assert b.tx.unanswered == 3
        b.tx._check_due()
        assert b.tx.is_unresolved(record.message_id)
        assert (b.tx.pending, b.tx.unresolved) == (0, 1)
        await b.settle()
        stored = await b.store.get(record.message_id)
        assert stored is not None
        assert stored.deliver_count == 3  # kept, never discarded
        assert await b.tx.decide(record.message_id, TxStatus.COMMIT, "operator")
        assert delivered(b, consumer) == [record.message_id]
        assert b.tx.unresolved == 0


async def test_a_restarted_broker_resumes_the_checks_where_they_were() -> None:
    async with Broker() as first:
        producer = first.producer("pay")
        record = await first.publish(commit=False, publisher=producer)
        first.clock.advance(6)
        first.tx._check_due()
        assert checks(producer) == [(record.message_id, 1)]
        await first.settle()
        second = Broker(first.store)
        second.clock.advance(first.clock.now() - second.clock.now())
        await second.tx.load()
        producer2 = second.producer("pay")
        second.tx._check_due()
        assert checks(producer2) == []
        second.clock.advance(30)
        second.tx._check_due()
        assert checks(producer2) == [(record.message_id, 2)]


async def test_an_unanswering_producer_does_not_delay_other_checks() -> None:
    async with Broker() as b:
        silent, healthy = b.producer("silent"), b.producer("pay")
        stuck = [await b.publish(commit=False, publisher=silent) for _ in range(100)]
        fine = await b.publish(commit=False, publisher=healthy)
        b.clock.advance(6)
        b.tx._check_due()
        assert len(checks(silent)) == 100
        assert checks(healthy) == [(fine.message_id, 1)]
        assert await b.tx.decide(fine.message_id, TxStatus.COMMIT, "test")
        b.clock.advance(30)
        b.tx._check_due()
        assert {mid for mid, n in checks(silent) if n == 2} == {r.message_id for r in stuck}
        assert checks(healthy) == []
