"""Ordered delivery (issue #16) in the pipeline, with a ManualClock: one message of a key in
flight per group, in store order; nacks, timeouts, lost connections and backoff windows
redeliver the head first; a dead-lettered head unblocks its key; a restart (a new broker
on the same store) keeps the order; transactions; memory-bound intake; the gauges."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from kiteq.binding.model import Binding
from kiteq.core.codes import AckCode
from kiteq.core.errors import StoreUnavailableError
from kiteq.core.message import GroupDelivery, GroupState, Message, StoredMessage, TxStatus
from kiteq.handler import ordering
from kiteq.handler.connection import Connection
from kiteq.store.base import DlqFilter
from kiteq.store.memory import MemoryStore
from tests.handler.harness import NOW, Broker


@pytest.fixture
async def b() -> AsyncIterator[Broker]:
    async with Broker() as broker:
        broker.bind("acct", Binding.direct("trade", "pay-succ"))
        await broker.scan()  # the first full scan after the start releases the lanes
        yield broker


def message(key: str = "", **kwargs: Any) -> Message:
    kwargs.setdefault("expired_time", int(NOW) + 3600)
    return Message(topic="trade", message_type="pay-succ", body=b"x", ordering_key=key, **kwargs)


async def publish(b: Broker, *messages: Message) -> list[str]:
    acks = await b.core.intake.publish(list(messages), group="pay")
    assert [a.code for a in acks] == [AckCode.OK] * len(messages)
    await b.settle()
    return [m.message_id for m in messages]


def drain(conn: Connection) -> list[tuple[str, int]]:
    _, deliveries = conn.drain()
    return [(r.message_id, a) for r, a in deliveries]


async def answer(b: Broker, conn: Connection, results: dict[str, bool]) -> None:
    b.dispatcher.acked(conn, list(results.items()))
    await b.settle()


async def ack_all(b: Broker, conn: Connection, pushed: list[str] | None = None) -> list[str]:
    """Ack *pushed* (drained already) and what *conn* has, again and again, until nothing
    comes; the ids in push order."""
    seen: list[str] = list(pushed or [])
    if pushed:
        await answer(b, conn, dict.fromkeys(pushed, True))
    while got := drain(conn):
        seen.extend(mid for mid, _ in got)
        await answer(b, conn, {mid: True for mid, _ in got})
    return seen


async def test_one_key_goes_one_at_a_time_in_publish_order_other_keys_in_parallel(
    b: Broker,
) -> None:
    conn = b.connect("acct")
    a = await publish(b, *(message("A") for _ in range(5)))
    c = await publish(b, *(message("C") for _ in range(3)))
    plain = await publish(b, message(), message())
    first = drain(conn)
    # the head of each key and every unkeyed message
    assert [mid for mid, _ in first] == [a[0], c[0], *plain]
    assert b.dispatcher.inflight == 4
    # stored due at their expiry: the periodic scan reads none of the waiting ones
    assert (await b.store.get(a[1])).next_deliver_time == NOW + 3600  # type: ignore[union-attr]
    due = {r.message_id for r in await b.store.page_due(NOW, 100)}
    assert due == set(plain)
    await answer(b, conn, {a[0]: True})
    assert drain(conn) == [(a[1], 1)]
    await answer(b, conn, {c[0]: True, a[1]: True, plain[0]: True, plain[1]: True})
    assert sorted(drain(conn)) == sorted([(a[2], 1), (c[1], 1)])
    await answer(b, conn, {a[2]: True, c[1]: True})
    rest = await ack_all(b, conn)
    assert [m for m in rest if m in a] == [*a[3:]]
    assert [m for m in rest if m in c] == [*c[2:]]
    assert await b.store.page_due(1e300, 100) == []  # all delivered and deleted
    assert len(b.dispatcher.lanes) == 0


async def test_a_nack_or_timeout_redelivers_the_head_first_then_after_its_window(
    b: Broker,
) -> None:
    conn = b.connect("acct")
    m = await publish(b, *(message("A") for _ in range(3)))
    assert drain(conn) == [(m[0], 1)]
    await answer(b, conn, {m[0]: False})
    assert drain(conn) == [(m[0], 2)]  # at once, nothing else of the key
    b.clock.advance(5.0)  # deliverySeconds: a timeout
    b.dispatcher.expire()
    await b.settle()
    assert drain(conn) == [(m[0], 3)]
    await answer(b, conn, {m[0]: False})
    # three immediate attempts used: the recover scan brings the head back
    assert drain(conn) == []
    await b.scan()
    assert drain(conn) == [(m[0], 4)]
    await answer(b, conn, {m[0]: False})
    # four attempts: the head waits for its backoff window (5 s), and the key with it
    b.clock.advance(1.0)
    await b.scan()
    assert drain(conn) == []  # m[1] and m[2] are due, yet wait behind their head
    gauges = b.dispatcher.lanes.gauges()[("trade", "acct")]
    assert (gauges.blocked, gauges.oldest_head_age) == (1, 6.0)
    b.clock.advance(4.5)
    await b.scan()
    assert drain(conn) == [(m[0], 5)]
    assert await ack_all(b, conn, [m[0]]) == m


async def test_a_lost_connection_redelivers_the_head_on_another_one(b: Broker) -> None:
    one = b.connect("acct")
    m = await publish(b, *(message("A") for _ in range(2)))
    assert drain(one) == [(m[0], 1)]
    two = b.connect("acct")
    b.dispatcher.connection_closed(one)
    await b.settle()
    assert drain(two) == [(m[0], 2)]
    assert await ack_all(b, two, [m[0]]) == m


async def test_a_dead_lettered_head_unblocks_its_key_and_says_so(b: Broker) -> None:
    conn = b.connect("acct")
    m = await publish(b, message("A", deliver_limit=2), message("A"))
    assert drain(conn) == [(m[0], 1)]
    await answer(b, conn, {m[0]: False})
    assert drain(conn) == [(m[0], 2)]
    await answer(b, conn, {m[0]: False})  # deliverLimit 2: dead-lettered
    assert drain(conn) == [(m[1], 1)]
    kinds = [e.kind for e in await b.store.get_history(m[0])]
    assert kinds[-3:] == ["nacked", "dead_lettered", "unblocked"]
    (event,) = [e for e in await b.store.get_history(m[0]) if e.kind == "unblocked"]
    assert (event.group, event.detail) == ("acct", "ordering key 'A' goes on with its next message")
    assert [d.record.message_id for d in await b.store.list_dlq(DlqFilter(), 10)] == [m[0]]


async def test_an_expired_head_unblocks_its_key(b: Broker) -> None:
    conn = b.connect("acct")
    short = int(NOW) + 30
    m = await publish(b, message("A", expired_time=short), message("A"))
    for attempt in (1, 2, 3):
        assert drain(conn) == [(m[0], attempt)]
        await answer(b, conn, {m[0]: False})
    assert drain(conn) == []
    b.clock.advance(31.0)  # its window (5 s) passed, and so did its expiry
    await b.scan()
    assert drain(conn) == [(m[1], 1)]
    assert [d.reason for d in await b.store.list_dlq(DlqFilter(), 10)] == ["expired"]


async def test_groups_are_independent(b: Broker) -> None:
    b.bind("audit", Binding.direct("trade", "pay-succ"))
    await b.scan()  # a binding change holds new lanes until the next full scan
    acct, audit = b.connect("acct"), b.connect("audit")
    m = await publish(b, *(message("A") for _ in range(3)))
    assert drain(acct) == [(m[0], 1)]
    assert drain(audit) == [(m[0], 1)]
    # audit goes through the key while acct sits on its head
    assert await ack_all(b, audit, [m[0]]) == m
    assert drain(acct) == []
    assert await ack_all(b, acct, [m[0]]) == m


async def test_a_committed_transaction_takes_its_publish_place_among_the_waiting(
    b: Broker,
) -> None:
    conn = b.connect("acct")
    producer = b.producer("pay")
    first = await publish(b, message("A"))
    acks = await b.core.intake.publish([message("A", commit=False)], group="pay", origin=producer)
    tx = acks[0].message_id
    later = await publish(b, message("A"), message("A"))
    await b.settle()
    assert drain(conn) == [(first[0], 1)]
    await b.core.transactions.decide_for("pay", tx, TxStatus.COMMIT, "test")
    await b.settle()
    # committed after 'later' was published, before it was delivered: it goes first
    assert await ack_all(b, conn, first) == [first[0], tx, *later]


async def test_without_room_keyed_messages_keep_their_place(b: Broker) -> None:
    async with Broker(max_flights=2) as small:
        small.bind("acct", Binding.direct("trade", "pay-succ"))
        await small.scan()
        conn = small.connect("acct")
        filler = await publish(small, message(), message())  # memory is full
        m = await publish(small, *(message("A") for _ in range(4)))
        # no room: the keyed ones are only entered in their lane; its head is read from
        # the store and pushed anyway (one flight per busy lane)
        assert sorted(mid for mid, _ in drain(conn)) == sorted([*filler, m[0]])
        assert small.dispatcher.tracking(m[0])
        assert not small.dispatcher.tracking(m[1])
        await answer(small, conn, dict.fromkeys(filler, True))
        assert await ack_all(small, conn, [m[0]]) == m


def stored(key: str, publish_time: float, due: float, attempts: int = 0) -> StoredMessage:
    msg = message(key, expired_time=int(NOW) + 3600, deliver_limit=100, group_id="pay")
    record = StoredMessage(msg, publish_time=publish_time, next_deliver_time=due)
    if attempts:
        record.groups = {"acct": GroupDelivery(GroupState.PENDING, attempts, due)}
        record.deliver_count = attempts
    return record


async def test_after_a_restart_a_head_in_its_window_holds_back_its_due_key() -> None:
    store = MemoryStore(maxcap=1000)
    # what a crashed broker left: the head of key A in a 20 s window, two due behind it,
    # and key B, whose messages the due index reads in the reverse of their store order
    head = stored("A", NOW - 10, NOW + 20, attempts=10)
    behind = [stored("A", NOW - 9, NOW - 9), stored("A", NOW - 8, NOW - 8)]
    b_late, b_early = stored("B", NOW - 5, NOW - 7, attempts=1), stored("B", NOW - 6, NOW - 6)
    async with Broker(store) as b:
        await store.save([head, *behind, b_late, b_early])
        b.bind("acct", Binding.direct("trade", "pay-succ"))
        conn = b.connect("acct")
        await b.core.intake.publish([message("B")], group="pay")
        await b.settle()
        assert drain(conn) == []  # held until the scan: B's stored ones go first
        await b.scan()
        assert not b.dispatcher.lanes.held
        assert drain(conn) == [(b_early.message_id, 1)]
        await answer(b, conn, {b_early.message_id: True})
        assert drain(conn) == [(b_late.message_id, 2)]
        await answer(b, conn, {b_late.message_id: True})
        assert len(drain(conn)) == 1  # the new B
        b.clock.advance(10.0)
        await b.scan()
        assert drain(conn) == []  # the window of A's head is still open
        b.clock.advance(10.5)
        await b.scan()
        assert drain(conn) == [(head.message_id, 11)]
        assert await ack_all(b, conn, [head.message_id]) == [
            head.message_id,
            *(r.message_id for r in behind),
        ]


async def test_held_lanes_take_new_messages_in_order_until_the_scan() -> None:
    async with Broker() as b:
        b.bind("acct", Binding.direct("trade", "pay-succ"))
        conn = b.connect("acct")
        m = await publish(b, *(message("A") for _ in range(3)))
        plain = await publish(b, message())
        assert drain(conn) == [(plain[0], 1)]  # unkeyed: never held
        await answer(b, conn, {plain[0]: True})
        await b.scan()
        assert await ack_all(b, conn) == m


async def test_gauges_count_blocked_keys_and_the_oldest_head(b: Broker) -> None:
    conn = b.connect("acct")
    await publish(b, message("A"), message("A"), message("B"))
    b.clock.advance(2.5)
    await publish(b, message("C"), message("C"))
    gauge = b.dispatcher.lanes.gauges()[("trade", "acct")]
    assert (gauge.blocked, gauge.oldest_head_age) == (2, 2.5)
    assert len(drain(conn)) == 3


async def test_the_next_message_is_read_only_once_the_previous_ack_is_durable(
    b: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = b.connect("acct")
    m = await publish(b, *(message("A") for _ in range(3)))
    original = b.store.get
    seen: list[tuple[str, bool]] = []

    async def get(message_id: str) -> StoredMessage | None:
        # what the store holds of every message before this one when this one is read
        before = m[: m.index(message_id)]
        seen.append((message_id, all([await original(p) is None for p in before])))
        return await original(message_id)

    monkeypatch.setattr(b.store, "get", get)
    for i in (0, 1):
        assert drain(conn) == [(m[i], 1)]
        b.dispatcher.acked(conn, [(m[i], True)])  # its delete is queued, not written
        await b.core.head_fetcher.fetch_once()  # at once: not waiting for the bookkeeper
    assert seen == [(m[1], True), (m[2], True)]
    assert await ack_all(b, conn) == [m[2]]


async def test_messages_stored_before_a_binding_keep_their_order_once_it_appears() -> None:
    async with Broker() as b:
        await b.scan()
        conn = b.connect("acct")
        early = await publish(b, *(message("A") for _ in range(3)))  # no binding yet
        b.bind("acct", Binding.direct("trade", "pay-succ"))
        late = await publish(b, message("A"))  # the binding is there: it waits
        assert drain(conn) == []
        await b.scan()  # the full scan the binding change asked for
        assert await ack_all(b, conn) == [*early, *late]


async def test_a_failed_read_of_a_new_head_keeps_it_wanted(
    b: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = b.connect("acct")
    m = await publish(b, message("A"), message("A"))
    original = b.store.get
    failures = [StoreUnavailableError("database away")]

    async def get(message_id: str) -> StoredMessage | None:
        if failures:
            raise failures.pop()
        return await original(message_id)

    monkeypatch.setattr(b.store, "get", get)
    monkeypatch.setattr(ordering, "_RETRY_DELAY", 0.0)
    assert drain(conn) == [(m[0], 1)]
    b.dispatcher.acked(conn, [(m[0], True)])
    await b.core.head_fetcher.fetch_once()  # the read fails: nothing is lost
    assert m[1] in b.dispatcher.lanes.wanted
    await b.settle()
    assert drain(conn) == [(m[1], 1)]


async def test_messages_waiting_behind_a_head_count_in_the_groups_backlog(b: Broker) -> None:
    conn = b.connect("acct")
    a = await publish(b, *(message("A") for _ in range(4)))
    assert [mid for mid, _ in drain(conn)] == [a[0]]
    gauges = b.dispatcher.group_gauges()
    # the head in flight and the three behind it, which are neither flights nor stored state
    assert gauges.backlog == {("trade", "acct"): 4}
    assert gauges.unacked == {("trade", "acct"): 1}
    b.clock.advance(30)
    assert b.dispatcher.group_gauges().oldest[("trade", "acct")] >= 30
    await ack_all(b, conn, [a[0]])
    assert b.dispatcher.group_gauges().backlog == {}
