"""Explicit answers (issue #17): the ledger's rules, without a broker."""

from __future__ import annotations

import threading

import pytest

from kiteq.client import _wire
from kiteq.client._acks import AsyncDelivery, Delivery, Ledger
from kiteq.client._channel import Session
from kiteq.core.errors import ClientClosedError, ConfigError, DeliveryExpiredError
from kiteq.core.message import ReceivedMessage
from kiteq.proto.v1 import broker_pb2

Sent = list[tuple[Session, _wire.DeliveryResult]]


def session(delivery_seconds: int = 30) -> Session:
    s = Session("127.0.0.1:1", _wire.OpenParams("acct-svc", "", "test"))
    s.limits = _wire.BrokerLimits("127.0.0.1:1", 0, 0, 0, delivery_seconds)
    s.alive = True
    return s


def received(n: int = 1) -> ReceivedMessage:
    return ReceivedMessage(topic="trade", message_type="pay-succ", body=b"%d" % n, attempt=1)


def ledger() -> tuple[Ledger, Sent]:
    sent: Sent = []
    return Ledger(lambda s, r: sent.append((s, r))), sent


def test_ack_once_and_a_second_answer_is_a_no_op() -> None:
    book, sent = ledger()
    s = session()
    d = Delivery(book.issue(s, received()), book)
    assert book.open == 1
    d.ack()
    d.ack()
    d.nack(delay=5)
    assert [r for _, r in sent] == [_wire.DeliveryResult(d.message_id, True)]
    assert d.settled
    assert book.open == 0


def test_nack_carries_its_delay_and_in_progress_restarts_the_deadline() -> None:
    book, sent = ledger()
    s = session(delivery_seconds=30)
    ticket = book.issue(s, received())
    d = Delivery(ticket, book)
    before = ticket.deadline
    d.in_progress()
    assert ticket.deadline >= before
    assert not d.settled
    d.nack(delay=2.5, reason="db down")
    progress, nack = (r for _, r in sent)
    assert progress.action == broker_pb2.DELIVER_ACTION_IN_PROGRESS
    assert (nack.ok, nack.feedback, nack.delay) == (False, "db down", 2.5)
    frame = _wire.acks_frame([progress, nack])
    first, second = frame.acks.acks
    assert first.action == broker_pb2.DELIVER_ACTION_IN_PROGRESS
    assert (second.status, second.delayMs, second.action) == (False, 2500, 0)


@pytest.mark.parametrize("delay", [-1, float("nan"), "5", True])
def test_a_bad_delay_is_a_config_error(delay: object) -> None:
    book, sent = ledger()
    d = Delivery(book.issue(session(), received()), book)
    with pytest.raises(ConfigError, match="delay"):
        d.nack(delay=delay)  # type: ignore[arg-type]
    assert sent == []
    assert not d.settled


def test_answers_after_the_session_ended_or_the_deadline_raise_expired() -> None:
    book, sent = ledger()
    s = session()
    lost = Delivery(book.issue(s, received(1)), book)
    s.alive = False
    with pytest.raises(DeliveryExpiredError, match="expired") as info:
        lost.ack()
    assert not info.value.retriable
    late_session = session()
    ticket = book.issue(late_session, received(2))
    ticket.deadline = 0.0  # deliverySeconds passed
    with pytest.raises(DeliveryExpiredError):
        Delivery(ticket, book).in_progress()
    assert sent == []
    assert book.open == 0


def test_answers_after_close_raise_client_closed() -> None:
    book, _ = ledger()
    d = Delivery(book.issue(session(), received()), book)
    book.close()
    with pytest.raises(ClientClosedError, match="closed"):
        d.ack()


async def test_async_answers_and_answers_from_other_threads() -> None:
    book, sent = ledger()
    s = session()
    deliveries = [Delivery(book.issue(s, received(i)), book) for i in range(50)]
    threads = [threading.Thread(target=d.ack) for d in reversed(deliveries)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    a = AsyncDelivery(book.issue(s, received(99)), book)
    await a.in_progress()
    await a.nack()
    await a.ack()
    assert len(sent) == 52
    assert sorted(r.message_id for _, r in sent[:50]) == sorted(d.message_id for d in deliveries)
    assert book.open == 0


def test_flow_frame() -> None:
    frame = _wire.flow_frame(broker_pb2.FLOW_STATE_PAUSED)
    assert frame.WhichOneof("kind") == "flow"
    assert frame.flow.state == broker_pb2.FLOW_STATE_PAUSED


def test_a_broker_that_announces_no_delivery_seconds_never_expires_a_delivery() -> None:
    book, sent = ledger()
    ticket = book.issue(session(delivery_seconds=0), received())
    d = Delivery(ticket, book)
    d.in_progress()
    d.ack()
    assert ticket.deadline == float("inf")
    assert [r.ok for _, r in sent] == [False, True]
