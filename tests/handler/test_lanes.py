"""``kiteq.handler.ordering.Lanes`` on its own, with a ManualClock: store order, heads,
holds and their generations, gauges."""

from __future__ import annotations

from kiteq.binding.match import BindingTable
from kiteq.binding.model import Binding
from kiteq.core.clock import ManualClock
from kiteq.core.message import GroupDelivery, GroupState, Message, StoredMessage
from kiteq.handler.history import History
from kiteq.handler.ordering import Lanes

NOW = 1_700_000_000.0


def lanes() -> tuple[Lanes, ManualClock]:
    clock = ManualClock(NOW)
    table = BindingTable()
    table.replace("trade", "acct", [Binding.direct("trade", "pay").with_group("acct")])
    return Lanes(clock=clock, history=History(lambda _events: None), bindings=table), clock


def record(key: str, publish_time: float) -> StoredMessage:
    message = Message(topic="trade", message_type="pay", body=b"", ordering_key=key)
    return StoredMessage(message, publish_time=publish_time, next_deliver_time=publish_time)


def acked(r: StoredMessage) -> StoredMessage:
    r.groups["acct"] = GroupDelivery(GroupState.ACKED, 1)
    return r


def test_held_lanes_sort_by_store_order_and_release_the_earliest() -> None:
    lane, _ = lanes()
    late, early, middle = record("A", NOW + 2), record("A", NOW), record("A", NOW + 1)
    for r in (late, early, middle, early):  # seen twice: entered once
        assert not lane.admit(r, "acct")
    lane.release(lane.generation)
    assert lane.wanted == {early.message_id: ""}
    assert lane.admit(early, "acct")
    assert not lane.admit(late, "acct")
    lane.ended(acked(early), "acct")
    # the next head is read once the previous head's write has landed
    assert lane.wanted == {early.message_id: "", middle.message_id: early.message_id}


def test_a_hold_is_released_only_by_a_scan_that_started_after_it() -> None:
    lane, _ = lanes()
    lane.release(lane.generation)
    before = lane.generation
    lane.hold()
    assert not lane.admit(record("B", NOW), "acct")
    lane.release(before)  # that scan started before the binding change
    assert lane.held
    lane.release(lane.generation)
    assert not lane.held


def test_a_lane_that_exists_goes_on_while_new_ones_are_held() -> None:
    lane, _ = lanes()
    lane.release(lane.generation)
    first, second = record("A", NOW), record("A", NOW + 1)
    assert lane.admit(first, "acct")
    assert not lane.admit(second, "acct")
    lane.hold()
    lane.ended(acked(first), "acct")
    assert second.message_id in lane.wanted
    assert lane.admit(second, "acct")
    assert not lane.admit(record("C", NOW + 2), "acct")  # a new key waits for the scan


def test_a_gone_head_is_skipped_and_an_older_arrival_goes_next() -> None:
    lane, clock = lanes()
    lane.release(lane.generation)
    head, later, older = record("A", NOW + 1), record("A", NOW + 3), record("A", NOW)
    assert lane.admit(head, "acct")
    assert not lane.admit(later, "acct")
    assert not lane.admit(older, "acct")  # committed late: before the waiting ones
    clock.advance(4.0)
    gauge = lane.gauges()[("trade", "acct")]
    assert (gauge.blocked, gauge.oldest_head_age) == (1, 4.0)
    lane.gone(head.message_id)
    assert older.message_id in lane.wanted
    lane.gone(older.message_id)
    assert later.message_id in lane.wanted
    lane.ended(acked(later), "acct")
    assert len(lane) == 0


def test_enter_starts_a_lane_with_a_head_to_read_and_skips_settled_groups() -> None:
    lane, _ = lanes()
    lane.release(lane.generation)
    r = record("A", NOW)
    lane.enter(acked(record("B", NOW)))
    assert len(lane) == 0
    lane.enter(r)
    assert lane.wanted == {r.message_id: ""}
