"""Issue #10: one group's attempts, backoff, deliverLimit or dead letter never decide
another group's delivery (real memory store, bookkeeper, dispatcher, recover scan, and an
injected clock)."""

from __future__ import annotations

from kiteq.binding.model import Binding
from kiteq.core.message import GroupDelivery, GroupState, StoredMessage
from kiteq.handler.backoff import redelivery_delay
from kiteq.handler.connection import Connection
from kiteq.store.base import DlqFilter
from tests.handler.harness import Broker


async def published_before_late_connects(b: Broker, group: str) -> tuple[Connection, StoredMessage]:
    """One message for *group* (connected) and "late" (persistent, not connected yet)."""
    b.bind(group, Binding.fanout("trade"))
    b.bind("late", Binding.fanout("trade", persistent=True))
    conn = b.connect(group)
    return conn, await b.publish()


def ack(*_: object) -> bool:
    return True


def nack(*_: object) -> bool:
    return False


def ids(pairs: list[tuple[str, int]]) -> set[str]:
    return {mid for mid, _ in pairs}


def bind_three(b: Broker) -> tuple[Connection, Connection]:
    for group in ("healthy", "failing", "offline"):
        b.bind(group, Binding.fanout("trade", persistent=True))
    return b.connect("healthy"), b.connect("failing")


async def test_a_failing_group_dead_letters_for_itself_only_and_the_offline_group_gets_all() -> (
    None
):
    async with Broker() as b:
        healthy, failing = bind_three(b)
        records = [await b.publish(deliver_limit=2) for _ in range(20)]
        every = {r.message_id for r in records}
        await dead_lettered_for_failing_only(b, healthy, failing, records)
        offline = await offline_gets_all_later(b, healthy, failing, every)
        # a redrive of the failing group's letters reaches that group only
        letters = await b.store.list_dlq(DlqFilter(group="failing"), 100)
        for record in await b.store.redrive([lt.key for lt in letters], b.clock.now()):
            assert record.only_groups == ("failing",)
            b.dispatcher.submit(record)
        assert b.answer(healthy, ack) == []
        assert b.answer(offline, ack) == []
        assert ids(b.answer(failing, ack)) == every
        await b.settle()
        assert await b.store.backlog() == {}
        assert await b.store.list_dlq(DlqFilter(), 100) == []


async def dead_lettered_for_failing_only(
    b: Broker, healthy: Connection, failing: Connection, records: list[StoredMessage]
) -> None:
    """ "healthy" acks *records*, "failing" nacks them into the DLQ, "offline" waits."""
    every = {r.message_id for r in records}
    assert ids(b.answer(healthy, ack)) == every
    for _ in range(3):  # deliver_limit 2: the third round has nothing left to push
        b.answer(failing, nack)
    await b.settle()
    letters = await b.store.list_dlq(DlqFilter(), 100)
    assert {(lt.record.message_id, lt.group, lt.reason) for lt in letters} == {
        (mid, "failing", "deliver_limit") for mid in every
    }
    assert await b.store.dlq_size() == {("trade", "failing"): 20}
    stored = await b.store.get(records[0].message_id)
    assert stored is not None  # kept: "offline" has not had it yet
    assert stored.groups["failing"] == GroupDelivery(GroupState.DEAD, 2, 0.0)
    assert stored.groups["healthy"].state is GroupState.ACKED
    # never attempted: pending, parked until its expiry while "offline" is away
    expiry = float(records[0].message.expired_time)
    assert stored.groups["offline"] == GroupDelivery(GroupState.PENDING, 0, expiry)
    assert stored.next_deliver_time == expiry
    assert await b.scan() == 20  # the first scan after a start reads everything
    assert await b.scan() == 0  # then the periodic scan does not read an offline backlog


async def offline_gets_all_later(
    b: Broker, healthy: Connection, failing: Connection, every: set[str]
) -> Connection:
    """ "offline" connects long after and gets every message as its first attempt."""
    b.clock.advance(600)  # long after the failing group finished
    offline = b.connect("offline")
    assert await b.scan() == 20
    got = b.answer(offline, ack)
    assert ids(got) == every
    assert {attempt for _, attempt in got} == {1}  # its own count, not the failing one's
    assert b.answer(healthy, ack) == []
    assert b.answer(failing, ack) == []
    await b.settle()
    assert await b.store.backlog() == {}  # every group acked or dead-lettered them
    return offline


async def test_a_group_in_its_160_s_window_does_not_delay_a_group_that_connects_later() -> None:
    async with Broker() as b:
        slow, record = await published_before_late_connects(b, "slow")
        attempts = 0
        while redelivery_delay(attempts) < 160:  # nack until the window is 160 s
            got = b.answer(slow, nack)
            if not got:
                await b.settle()
                state = (await b.store.get(record.message_id)).groups["slow"]  # type: ignore[union-attr]
                b.clock.advance(max(state.next_deliver_time - b.clock.now(), 0.0))
                await b.scan()
                got = b.answer(slow, nack)
            attempts = max(a for _, a in got)
        await b.settle()
        stored = await b.store.get(record.message_id)
        assert stored is not None
        slow_due = stored.groups["slow"].next_deliver_time
        assert slow_due == b.clock.now() + 160
        # "late" is still pending, parked until the expiry while it has no consumer
        assert stored.groups["late"] == GroupDelivery(
            GroupState.PENDING, 0, float(record.message.expired_time)
        )
        assert stored.next_deliver_time == slow_due  # the earliest of its groups' due times

        b.clock.advance(1)
        late = b.connect("late")
        await b.scan()
        assert b.answer(late, ack) == [(record.message_id, 1)]
        assert b.answer(slow, ack) == []  # its own window is still closed
        await b.settle()
        stored = await b.store.get(record.message_id)
        assert stored is not None
        assert stored.next_deliver_time == slow_due  # due for "slow" alone now
        assert stored.groups["late"].state is GroupState.ACKED

        b.clock.advance(slow_due - b.clock.now() - 1)
        assert await b.scan() == 0
        b.clock.advance(1)
        assert await b.scan() == 1
        assert b.answer(slow, ack) == [(record.message_id, attempts + 1)]
        assert b.answer(late, ack) == []
        await b.settle()
        assert await b.store.get(record.message_id) is None


async def test_expiry_dead_letters_every_group_that_had_not_acked_one_entry_each() -> None:
    async with Broker() as b:
        for group in ("done", "failing", "never"):
            b.bind(group, Binding.fanout("trade", persistent=True))
        done, failing = b.connect("done"), b.connect("failing")
        record = await b.publish(ttl=30)
        b.answer(done, ack)
        for _ in range(3):
            b.answer(failing, nack)
        await b.settle()
        b.clock.advance(31)
        await b.scan()
        assert b.answer(failing, ack) == []
        await b.settle()
        letters = await b.store.get_dead_letters(record.message_id)
        assert [(lt.group, lt.reason) for lt in letters] == [
            ("failing", "expired"),
            ("never", "expired"),
        ]
        assert await b.store.get(record.message_id) is None


async def test_a_message_in_flight_for_one_group_is_offered_to_another_group_that_is_due() -> None:
    async with Broker() as b:
        holder, record = await published_before_late_connects(b, "holder")
        _, held = holder.drain()  # pushed, not answered: the message stays in flight
        assert [(r.message_id, a) for r, a in held] == [(record.message_id, 1)]
        late = b.connect("late")
        await b.scan()
        assert b.answer(late, ack) == [(record.message_id, 1)]
        b.dispatcher.acked(holder, [(record.message_id, True)])
        await b.settle()
        assert await b.store.get(record.message_id) is None


async def test_a_group_waiting_for_delivery_workers_gets_them_when_another_group_acks() -> None:
    async with Broker(max_workers=1) as b:
        b.bind("a", Binding.fanout("trade"))
        b.bind("b", Binding.fanout("trade"))
        a, other = b.connect("a"), b.connect("b")
        record = await b.publish()
        assert b.answer(other, ack) == []  # the only worker went to "a"
        b.answer(a, ack)  # releases it: "b" must not wait for the next tick
        assert b.answer(other, ack) == [(record.message_id, 1)]
        await b.settle()
        assert await b.store.get(record.message_id) is None


async def test_each_groups_own_count_and_window_are_stored() -> None:
    async with Broker() as first:
        first.bind("ok", Binding.fanout("trade"))
        first.bind("bad", Binding.fanout("trade"))
        ok, bad = first.connect("ok"), first.connect("bad")
        record = await first.publish()
        first.answer(ok, ack)
        for _ in range(3):
            first.answer(bad, nack)
        await first.scan()
        first.answer(bad, nack)  # attempt 4: a 5 s window for "bad" only
        await first.settle()
        stored = await first.store.get(record.message_id)
        assert stored is not None
        assert stored.groups["ok"] == GroupDelivery(GroupState.ACKED, 1, 0.0)
        assert stored.groups["bad"] == GroupDelivery(
            GroupState.PENDING, 4, first.clock.now() + redelivery_delay(4)
        )
        assert stored.next_deliver_time == first.clock.now() + redelivery_delay(4)


async def test_a_redrive_while_the_message_is_in_flight_for_another_group_reaches_its_group() -> (
    None
):
    async with Broker() as b:
        b.bind("holder", Binding.fanout("trade", persistent=True))
        b.bind("bad", Binding.fanout("trade"))
        bad = b.connect("bad")
        record = await b.publish(deliver_limit=1)
        b.answer(bad, nack)  # "holder" is offline: the letter for "bad" is written at once
        await b.settle()
        [letter] = await b.store.get_dead_letters(record.message_id)
        assert letter.group == "bad"
        holder = b.connect("holder")
        await b.scan()
        _, held = holder.drain()  # in flight for "holder", not answered yet
        assert [r.message_id for r, _ in held] == [record.message_id]
        [again] = await b.store.redrive([letter.key], b.clock.now())
        b.dispatcher.redriven(again, ["bad"])
        assert b.answer(bad, ack) == [(record.message_id, 1)]
        b.dispatcher.acked(holder, [(record.message_id, True)])
        await b.settle()
        assert await b.store.get(record.message_id) is None
        assert await b.store.list_dlq(DlqFilter(), 10) == []


async def test_scarce_delivery_workers_take_turns_between_groups() -> None:
    async with Broker(max_workers=1) as b:
        for group in ("a", "b", "c"):
            b.bind(group, Binding.fanout("trade"))
        conns = {group: b.connect(group) for group in ("a", "b", "c")}
        first, second = await b.publish(), await b.publish()
        names = {first.message_id: "first", second.message_id: "second"}
        order: list[tuple[str, str]] = []
        for _ in range(6):
            [group] = [g for g, c in conns.items() if c.inflight]  # the only worker's push
            [(message_id, _)] = b.answer(conns[group], ack)
            order.append((group, names[message_id]))
        # every group has the first message before any group has a second one
        assert sorted(order[:3]) == [("a", "first"), ("b", "first"), ("c", "first")]
        assert sorted(order[3:]) == [("a", "second"), ("b", "second"), ("c", "second")]
        await b.settle()
        assert await b.store.backlog() == {}


async def test_a_shutdown_writes_the_letters_of_groups_dead_while_others_were_in_flight() -> None:
    async with Broker() as b:
        b.bind("holder", Binding.fanout("trade"))
        b.bind("bad", Binding.fanout("trade"))
        holder, bad = b.connect("holder"), b.connect("bad")
        record = await b.publish(deliver_limit=1)
        holder.drain()  # in flight for "holder" at the shutdown
        b.answer(bad, nack)
        b.dispatcher.pause()
        assert b.dispatcher.checkpoint() == 1
        await b.settle()
        [letter] = await b.store.get_dead_letters(record.message_id)
        assert (letter.group, letter.reason) == ("bad", "deliver_limit")
        stored = await b.store.get(record.message_id)
        assert stored is not None  # still to be delivered to "holder"
        assert stored.groups["bad"].state is GroupState.DEAD
        assert stored.groups["holder"] == GroupDelivery(GroupState.PENDING, 1, 0.0)


async def test_a_message_parked_for_an_offline_group_is_dead_lettered_for_it_at_its_expiry() -> (
    None
):
    async with Broker() as b:
        b.bind("away", Binding.fanout("trade", persistent=True))
        record = await b.publish(ttl=60)
        await b.settle()
        assert await b.scan() == 1  # the first scan after a start reads everything
        assert await b.scan() == 0  # parked: not read again while "away" is away
        b.clock.advance(61)
        assert await b.scan() == 1  # due at its expiry
        await b.settle()
        letters = await b.store.list_dlq(DlqFilter(), 10)
        assert [(lt.record.message_id, lt.group, lt.reason) for lt in letters] == [
            (record.message_id, "away", "expired")
        ]
        assert await b.store.backlog() == {}
