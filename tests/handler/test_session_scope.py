"""Issue #9 on a manual clock: a producer decides only its group's transactions, an ack
settles only a delivery of its own connection."""

from __future__ import annotations

from kiteq.binding.model import Binding
from kiteq.core.message import TxStatus
from kiteq.handler.transactions import TxDecision
from tests.handler.harness import Broker


async def test_another_group_cannot_decide_and_the_owner_still_can() -> None:
    async with Broker() as b:
        b.bind("acct", Binding.fanout("trade"))
        consumer = b.connect("acct")
        owner, intruder = b.producer("pay"), b.producer("mallory")
        record = await b.publish(commit=False, publisher=owner)
        for status in (TxStatus.COMMIT, TxStatus.ROLLBACK, TxStatus.UNKNOWN):
            decision = await b.tx.decide_for("mallory", record.message_id, status, "test")
            assert decision is TxDecision.DENIED
        stored = await b.store.get(record.message_id)
        assert stored is not None
        assert not stored.message.commit
        assert b.tx.pending == 1
        assert [e.kind for e in b.history.unflushed(record.message_id)].count("tx_denied") == 3
        decision = await b.tx.decide_for("pay", record.message_id, TxStatus.COMMIT, "test")
        assert decision is TxDecision.APPLIED
        _, deliveries = consumer.drain()
        assert [r.message_id for r, _ in deliveries] == [record.message_id]
        assert intruder.drain_checks() == []


async def test_an_unresolved_message_keeps_its_owner() -> None:
    async with Broker(check_max=1) as b:
        owner = b.producer("pay")
        record = await b.publish(commit=False, publisher=owner)
        for _ in range(3):
            b.clock.advance(60)
            b.tx._check_due()
        assert b.tx.is_unresolved(record.message_id)
        denied = await b.tx.decide_for("mallory", record.message_id, TxStatus.ROLLBACK, "test")
        assert denied is TxDecision.DENIED
        assert b.tx.is_unresolved(record.message_id)
        applied = await b.tx.decide_for("pay", record.message_id, TxStatus.ROLLBACK, "test")
        assert applied is TxDecision.APPLIED
        assert await b.store.get(record.message_id) is None


async def test_a_decision_on_an_id_not_pending_never_reaches_the_store() -> None:
    async with Broker() as b:
        committed = await b.publish(commit=True)
        for status in (TxStatus.COMMIT, TxStatus.ROLLBACK):
            decision = await b.tx.decide_for("pay", committed.message_id, status, "test")
            assert decision is TxDecision.IGNORED
        assert await b.store.get(committed.message_id) is not None


async def test_an_ack_settles_only_a_delivery_in_flight_on_its_own_connection() -> None:
    async with Broker() as b:
        b.bind("acct", Binding.fanout("trade"))
        victim = b.connect("acct")
        record = await b.publish()
        _, deliveries = victim.drain()
        assert [r.message_id for r, _ in deliveries] == [record.message_id]
        other = b.connect("acct")
        # another connection (even of the same group) naming the id settles nothing
        assert b.dispatcher.acked(other, [(record.message_id, True)]) == 1
        assert record.message_id in victim.inflight
        assert b.dispatcher.inflight == 1
        # the connection it was pushed to does
        assert b.dispatcher.acked(victim, [(record.message_id, True)]) == 0
        assert b.dispatcher.inflight == 0
        await b.settle()
        assert await b.store.get(record.message_id) is None
