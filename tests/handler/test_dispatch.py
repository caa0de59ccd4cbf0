from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence

import pytest

from kiteq.binding.match import BindingTable
from kiteq.binding.model import Binding
from kiteq.core.clock import ManualClock
from kiteq.core.message import GroupDelivery, GroupState, Message, StoredMessage
from kiteq.handler.backoff import IMMEDIATE_ATTEMPTS, redelivery_delay
from kiteq.handler.bookkeeper import Bookkeeper
from kiteq.handler.connection import Connection, ConnectionTable
from kiteq.handler.dispatch import Dispatcher
from kiteq.handler.history import History
from kiteq.ops.metrics import BrokerMetrics
from kiteq.store import base


class RecordingStore:
    """Only what the bookkeeper calls; remembers every write."""

    durable = True
    description = "recording://"

    def __init__(self) -> None:
        self.deleted: list[str] = []
        self.rescheduled: list[base.Rescheduled] = []
        self.dead: list[base.DeadLetter] = []
        self.history: list[base.HistoryEvent] = []

    async def reschedule(self, changes: Sequence[base.Rescheduled]) -> None:
        self.rescheduled.extend(changes)

    async def delete(self, records: Sequence[StoredMessage], remember_until: float = 0.0) -> None:
        self.deleted.extend(r.message_id for r in records)

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def save(self, records: Sequence[StoredMessage]) -> list[base.SaveOutcome]:
        raise NotImplementedError

    async def get(self, message_id: str) -> StoredMessage | None:
        return None

    async def commit(self, message_id: str) -> StoredMessage | None:
        return None

    async def page_due(
        self, now: float, limit: int, after: base.DueCursor | None = None
    ) -> list[StoredMessage]:
        return []

    async def backlog(self) -> dict[str, int]:
        return {}

    async def dead_letter(self, letters: Sequence[base.DeadLetter]) -> None:
        self.dead.extend(letters)

    async def list_dlq(
        self, where: base.DlqFilter, limit: int, after: base.DlqKey | None = None
    ) -> list[base.DeadLetter]:
        return []

    async def rollback(self, message_id: str) -> StoredMessage | None:
        return None

    async def page_uncommitted(self, limit: int, after: str | None = None) -> list[StoredMessage]:
        return []

    async def get_dead_letters(self, message_id: str) -> list[base.DeadLetter]:
        return []

    async def redrive(self, keys: Sequence[base.DlqKey], now: float) -> list[StoredMessage]:
        return []

    async def dlq_size(self) -> dict[tuple[str, str], int]:
        return {}

    async def append_history(self, events: Sequence[base.HistoryEvent]) -> None:
        self.history.extend(events)

    async def get_history(self, message_id: str) -> list[base.HistoryEvent]:
        return []

    async def pending_counts(self) -> base.PendingCounts:
        return {}

    async def take_over(self, owner: str) -> base.TakenOver:
        return base.TakenOver()

    async def prune_history(self, before: float) -> int:
        return 0

    async def prune_remembered(self, before: float) -> int:
        return 0

    async def remembered_estimate(self) -> int:
        return 0

    async def release_memory(self) -> None: ...

    async def put_meta(self, key: str, value: bytes | None) -> None: ...
    async def get_meta(self, prefix: str) -> Mapping[str, bytes]:
        return {}


class Harness:
    def __init__(
        self, *, timeout: float = 5.0, max_workers: int = 1000, metrics: BrokerMetrics | None = None
    ) -> None:
        self.clock = ManualClock()
        self.table = BindingTable()
        self.connections = ConnectionTable()
        self.store = RecordingStore()
        self.bookkeeper = Bookkeeper(self.store)
        self.dispatcher = Dispatcher(
            bindings=self.table,
            connections=self.connections,
            bookkeeper=self.bookkeeper,
            history=History(self.bookkeeper.history),
            clock=self.clock,
            delivery_timeout=timeout,
            max_workers=max_workers,
            metrics=metrics,
        )
        self._task = asyncio.create_task(self.bookkeeper.run())

    def bind(self, group: str, binding: Binding) -> None:
        self.table.replace(binding.topic, group, [binding.with_group(group)])

    def connect(self, group: str, max_in_flight: int = 100) -> Connection:
        conn = Connection(
            group=group,
            client_id="t",
            peer="test",
            max_in_flight=max_in_flight,
            warmup_seconds=0,
            opened_at=self.clock.monotonic(),
        )
        self.connections.add(conn)
        self.dispatcher.connection_opened(conn)
        return conn

    def publish(self, message_type: str = "pay-succ", topic: str = "trade") -> StoredMessage:
        message = Message(
            topic=topic,
            message_type=message_type,
            body=b"x",
            expired_time=int(self.clock.now()) + 3600,
            deliver_limit=100,
        )
        record = StoredMessage(
            message, publish_time=self.clock.now(), next_deliver_time=self.clock.now()
        )
        self.dispatcher.submit(record)
        return record

    async def settle(self) -> None:
        await asyncio.wait_for(self.bookkeeper.flushed(), 2)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    harness = Harness()
    yield harness
    await harness.close()


def taken(conn: Connection) -> list[tuple[str, int]]:
    _, deliveries = conn.drain()
    return [(m.message_id, attempt) for m, attempt in deliveries]


async def test_ack_from_the_only_group_deletes_the_message(h: Harness) -> None:
    h.bind("acct", Binding.direct("trade", "pay-succ"))
    conn = h.connect("acct")
    record = h.publish()
    assert taken(conn) == [(record.message_id, 1)]
    h.dispatcher.acked(conn, [(record.message_id, True)])
    await h.settle()
    assert h.store.deleted == [record.message_id]
    assert not h.dispatcher.tracking(record.message_id)


async def test_every_matching_group_gets_the_message_and_delete_waits_for_all(h: Harness) -> None:
    h.bind("a", Binding.direct("trade", "pay-succ"))
    h.bind("b", Binding.regex("trade", "pay-.*"))
    h.bind("c", Binding.direct("trade", "other"))
    a, b, c = h.connect("a"), h.connect("b"), h.connect("c")
    record = h.publish()
    assert taken(a) == [(record.message_id, 1)]
    assert taken(b) == [(record.message_id, 1)]
    assert taken(c) == []
    h.dispatcher.acked(a, [(record.message_id, True)])
    await h.settle()
    assert h.store.deleted == []
    h.dispatcher.acked(b, [(record.message_id, True)])
    await h.settle()
    assert h.store.deleted == [record.message_id]


async def test_nack_is_redelivered_to_another_connection_of_the_group(h: Harness) -> None:
    h.bind("acct", Binding.fanout("trade"))
    first, second = h.connect("acct"), h.connect("acct")
    record = h.publish()
    got = {c: taken(c) for c in (first, second)}
    holder = first if got[first] else second
    other = second if holder is first else first
    h.dispatcher.acked(holder, [(record.message_id, False)])
    assert taken(other) == [(record.message_id, 2)]
    h.dispatcher.acked(other, [(record.message_id, True)])
    await h.settle()
    assert h.store.deleted == [record.message_id]


async def test_timeout_redelivers_and_a_late_ack_is_ignored(h: Harness) -> None:
    h.bind("acct", Binding.fanout("trade"))
    conn = h.connect("acct")
    record = h.publish()
    assert taken(conn) == [(record.message_id, 1)]
    h.clock.advance(4.9)
    assert h.dispatcher.expire() == 0
    h.clock.advance(0.2)
    assert h.dispatcher.expire() == 1
    assert taken(conn) == [(record.message_id, 2)]
    assert h.dispatcher.inflight == 1


async def test_lost_connection_hands_its_messages_to_the_other_consumer(h: Harness) -> None:
    h.bind("acct", Binding.fanout("trade"))
    doomed = h.connect("acct")
    records = [h.publish() for _ in range(20)]
    survivor = h.connect("acct")
    assert len(taken(doomed)) == 20
    h.dispatcher.connection_closed(doomed)
    redelivered = taken(survivor)
    assert sorted(mid for mid, _ in redelivered) == sorted(r.message_id for r in records)
    assert {attempt for _, attempt in redelivered} == {2}


async def test_after_immediate_attempts_the_message_is_rescheduled_with_backoff(h: Harness) -> None:
    h.bind("acct", Binding.fanout("trade"))
    conn = h.connect("acct")
    record = h.publish()
    for attempt in range(1, IMMEDIATE_ATTEMPTS + 1):
        assert taken(conn) == [(record.message_id, attempt)]
        h.dispatcher.acked(conn, [(record.message_id, False)])
    assert taken(conn) == []
    await h.settle()
    assert h.store.deleted == []
    [change] = h.store.rescheduled
    assert change.record.deliver_count == IMMEDIATE_ATTEMPTS
    due = h.clock.now() + redelivery_delay(IMMEDIATE_ATTEMPTS)
    assert change.record.groups == {
        "acct": GroupDelivery(GroupState.PENDING, IMMEDIATE_ATTEMPTS, due)
    }
    assert change.record.next_deliver_time == due


async def test_offline_persistent_group_keeps_the_message_without_using_attempts(
    h: Harness,
) -> None:
    h.bind("acct", Binding.fanout("trade", persistent=True))
    record = h.publish()
    await h.settle()
    assert h.store.deleted == []
    # parked until its expiry, once: the periodic scan does not read it while "acct" is away
    [change] = h.store.rescheduled
    expiry = float(record.message.expired_time)
    assert change.record.next_deliver_time == expiry
    assert change.record.groups == {"acct": GroupDelivery(GroupState.PENDING, 0, expiry)}
    assert record.deliver_count == 0
    assert not h.dispatcher.tracking(record.message_id)
    h.dispatcher.submit(change.record)  # read again while "acct" is still away
    await h.settle()
    assert len(h.store.rescheduled) == 1  # parked and unchanged: nothing more to write


async def test_offline_non_persistent_group_is_skipped_for_that_group_only(h: Harness) -> None:
    h.bind("live", Binding.fanout("trade"))
    h.bind("gone", Binding.fanout("trade", persistent=False))
    live = h.connect("live")
    record = h.publish()
    h.dispatcher.acked(live, [(record.message_id, True)])
    await h.settle()
    assert h.store.deleted == [record.message_id]
    assert set(record.succ_groups) == {"live", "gone"}


async def test_no_binding_keeps_the_message(h: Harness) -> None:
    record = h.publish(topic="nobody")
    await h.settle()
    assert h.store.deleted == []
    assert not h.dispatcher.tracking(record.message_id)


async def test_credits_bound_unacked_deliveries_per_connection(h: Harness) -> None:
    h.bind("acct", Binding.fanout("trade"))
    conn = h.connect("acct", max_in_flight=2)
    records = [h.publish() for _ in range(5)]
    first = taken(conn)
    assert len(first) == 2
    assert h.dispatcher.waiting("acct") == 3
    h.dispatcher.acked(conn, [(first[0][0], True)])
    assert [mid for mid, _ in taken(conn)] == [records[2].message_id]
    assert len(conn.inflight) == 2


async def test_a_message_in_flight_is_not_pushed_again(h: Harness) -> None:
    h.bind("acct", Binding.fanout("trade"))
    conn = h.connect("acct")
    record = h.publish()
    h.dispatcher.submit(record)
    assert taken(conn) == [(record.message_id, 1)]


async def test_succeeded_groups_are_not_delivered_again(h: Harness) -> None:
    h.bind("a", Binding.fanout("trade"))
    h.bind("b", Binding.fanout("trade"))
    a, b = h.connect("a"), h.connect("b")
    message = Message(
        topic="trade",
        message_type="t",
        body=b"",
        expired_time=int(h.clock.now()) + 60,
        deliver_limit=100,
    )
    record = StoredMessage(
        message,
        publish_time=h.clock.now(),
        groups={
            "a": GroupDelivery(GroupState.ACKED, 1),
            "b": GroupDelivery(GroupState.PENDING, 4, h.clock.now()),
        },
        deliver_count=4,
    )
    h.dispatcher.submit(record)
    assert taken(a) == []
    assert taken(b) == [(message.message_id, 5)]


async def test_consumer_arriving_later_gets_waiting_messages_after_offline_park(h: Harness) -> None:
    h.bind("acct", Binding.fanout("trade"))
    conn = h.connect("acct", max_in_flight=1)
    first, second = h.publish(), h.publish()
    assert taken(conn) == [(first.message_id, 1)]
    h.dispatcher.connection_closed(conn)  # first fails over to nobody; second was waiting
    await h.settle()
    assert not h.dispatcher.tracking(second.message_id)
    assert h.store.deleted == []
