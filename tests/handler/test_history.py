"""History: the bounded in-memory table of what happened to each message, and what of it
is written to the store once a message leaves the happy path."""

from __future__ import annotations

from kiteq.core.message import Message
from kiteq.handler.history import History
from kiteq.store.base import HistoryEvent
from tests.handler.harness import Broker


class _Written:
    def __init__(self) -> None:
        self.events: list[HistoryEvent] = []

    def __call__(self, events: list[HistoryEvent]) -> None:
        self.events.extend(events)


def _happy_path(history: History, message_id: str, t: float) -> None:
    history.record(message_id, t, "published", detail="pay")
    history.record(message_id, t + 1, "delivered", group="acct", connection="c1", attempt=1)
    history.record(message_id, t + 2, "acked", group="acct", connection="c1", attempt=1)


def test_the_happy_path_stays_in_memory_in_order() -> None:
    written = _Written()
    history = History(written)
    _happy_path(history, "m1", 10.0)
    assert history.unflushed("m1") == [
        HistoryEvent("m1", 10.0, "published", "", "", 0, "pay"),
        HistoryEvent("m1", 11.0, "delivered", "acct", "c1", 1, ""),
        HistoryEvent("m1", 12.0, "acked", "acct", "c1", 1, ""),
    ]
    assert history.unflushed("unknown") == []
    assert written.events == []


def test_the_oldest_messages_are_forgotten_first() -> None:
    history = History(_Written(), capacity=3)
    for i in range(5):
        _happy_path(history, f"m{i}", float(i))
    # a later event of an early message does not move it: m2 is still the oldest
    history.record("m2", 9.0, "acked", group="other")
    history.record("m5", 9.0, "published")
    assert len(history) == 3
    assert [bool(history.unflushed(f"m{i}")) for i in range(6)] == [
        False, False, False, True, True, True,
    ]  # fmt: skip


def test_a_kept_message_has_its_past_and_later_events_written_once() -> None:
    written = _Written()
    history = History(written)
    _happy_path(history, "m1", 0.0)
    history.keep("m1")
    assert [e.kind for e in written.events] == ["published", "delivered", "acked"]
    history.record("m1", 5.0, "redriven", detail="operator")
    assert [e.kind for e in written.events][-1] == "redriven"
    assert len(written.events) == 4
    history.keep("m1")  # again: nothing new to write
    assert len(written.events) == 4
    assert history.unflushed("m1") == []


def test_a_kept_message_forgotten_by_memory_still_has_its_later_events_written() -> None:
    written = _Written()
    history = History(written, capacity=1)
    _happy_path(history, "m1", 0.0)
    history.keep("m1")
    history.record("m2", 1.0, "published")  # evicts m1's events
    history.record("m1", 2.0, "dead_lettered", group="acct")
    assert [(e.message_id, e.kind) for e in written.events][-1] == ("m1", "dead_lettered")
    assert len(written.events) == 4


def test_a_message_with_many_events_keeps_its_first_and_latest() -> None:
    written = _Written()
    history = History(written)
    for attempt in range(1, 101):
        history.record("m1", float(attempt), "delivered", group="acct", attempt=attempt)
    events = history.unflushed("m1")
    assert len(events) == 64
    attempts = [e.attempt for e in events]
    assert attempts[:32] == list(range(1, 33))
    assert attempts[32:] == list(range(69, 101))


def test_dropping_an_event_of_a_kept_message_writes_no_event_twice() -> None:
    written = _Written()
    history = History(written)
    history.keep("m1")
    for attempt in range(1, 101):
        history.record("m1", float(attempt), "delivered", group="acct", attempt=attempt)
    assert [e.attempt for e in written.events] == list(range(1, 101))
    assert history.unflushed("m1") == []


async def test_history_messages_bounds_what_the_broker_remembers_of_its_publishes() -> None:
    async with Broker(history_messages=2) as b:
        b.producer("pay")
        messages = [
            Message(topic="trade", message_type="pay-succ", body=b"x", commit=i != 2)
            for i in range(3)
        ]
        acks = await b.core.intake.publish(messages, group="pay")
        assert [a.ok for a in acks] == [True] * 3
        assert len(b.history) == 2
        assert b.history.unflushed(messages[0].message_id) == []
        (committed,) = b.history.unflushed(messages[1].message_id)
        (uncommitted,) = b.history.unflushed(messages[2].message_id)
        assert (committed.kind, committed.detail) == ("published", "pay")
        assert (uncommitted.kind, uncommitted.detail) == ("published", "pay (uncommitted)")
