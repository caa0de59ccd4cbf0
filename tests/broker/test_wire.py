"""The hand-encoded session frames parse back, field for field, with the generated code."""

from __future__ import annotations

import dataclasses

from hypothesis import given, strategies as st

from kiteq.broker import wire
from kiteq.core.codes import AckCode
from kiteq.core.message import GroupDelivery, GroupState, Message, StoredMessage
from kiteq.handler.connection import Outcome
from kiteq.proto.v1 import broker_pb2, common_pb2
from kiteq.store.base import DeadLetter


def record(body: bytes, expired_time: int, deliver_limit: int) -> StoredMessage:
    message = Message(
        topic="trade",
        message_type="pay-succ",
        body=body,
        properties={"k": "v"},
        expired_time=expired_time,
        deliver_limit=deliver_limit,
    )
    return StoredMessage(message, publish_time=1.0)


def test_deliveries_frame_round_trips() -> None:
    records = [
        record(b"a" * n, expired_time=1_900_000_000 + n, deliver_limit=7)
        for n in (0, 1, 127, 128, 300, 70_000)
    ]
    data = wire.deliveries_frame([(r, i + 1) for i, r in enumerate(records)])
    frame = broker_pb2.ServerFrame.FromString(data)
    assert frame.WhichOneof("kind") == "deliveries"
    got = frame.deliveries.deliveries
    assert [d.attempt for d in got] == [1, 2, 3, 4, 5, 6]
    for delivery, expected in zip(got, records, strict=True):
        assert wire.message_from_pb(delivery.message) == expected.message


def test_publisher_protobuf_is_reused_with_the_brokers_clamps() -> None:
    pb = common_pb2.Message(
        header=common_pb2.Header(messageId="0" * 32, topic="t", messageType="x", commit=True),
        body=b"b",
    )
    message = wire.message_from_pb(pb)
    clamped = StoredMessage(
        dataclasses.replace(message, expired_time=5, deliver_limit=100, create_time=4),
        publish_time=1.0,
        wire=pb,
    )
    data = wire.deliveries_frame([(clamped, 1)])
    header = broker_pb2.ServerFrame.FromString(data).deliveries.deliveries[0].message.header
    assert (header.expiredTime, header.deliverLimit, header.createTime) == (5, 100, 4)
    assert isinstance(clamped.wire, bytes)  # cached for redeliveries


def test_publisher_protobuf_gets_the_canonical_id_and_the_sessions_group() -> None:
    pb = common_pb2.Message(
        header=common_pb2.Header(messageId="AB" * 16, topic="t", messageType="x", commit=True),
        body=b"b",
    )
    message = wire.message_from_pb(pb)
    stored = StoredMessage(
        dataclasses.replace(message, message_id="ab" * 16, group_id="pay"),
        publish_time=1.0,
        wire=pb,
    )
    data = wire.deliveries_frame([(stored, 1)])
    header = broker_pb2.ServerFrame.FromString(data).deliveries.deliveries[0].message.header
    assert (header.messageId, header.groupId) == ("ab" * 16, "pay")


@given(
    st.lists(
        st.tuples(st.text(max_size=40), st.sampled_from(list(AckCode)), st.text(max_size=300)),
        max_size=50,
    )
)
def test_store_acks_frame_round_trips(items: list[tuple[str, AckCode, str]]) -> None:
    outcomes = [Outcome(mid, code, feedback) for mid, code, feedback in items]
    frame = broker_pb2.ServerFrame.FromString(wire.store_acks_frame(outcomes))
    expected = broker_pb2.ServerFrame(
        storeAcks=broker_pb2.StoreAckBatch(acks=wire.store_acks(outcomes))
    )
    assert frame == expected


def test_message_info_and_dead_letters_show_the_state_of_each_group() -> None:
    stored = record(b"x", expired_time=1_900_000_000, deliver_limit=2)
    stored.groups = {
        "ok": GroupDelivery(GroupState.ACKED, 1),
        "bad": GroupDelivery(GroupState.DEAD, 2, 0.0),
        "slow": GroupDelivery(GroupState.PENDING, 4, 1_800_000_005.0),
        "parked": GroupDelivery(GroupState.PENDING, 0, 0.0),
    }
    stored.only_groups = ("bad", "ok", "parked", "slow")
    info = wire.message_info(stored, with_body=False)
    assert [(g.groupId, g.state, g.attempts, g.nextDeliverTime) for g in info.groups] == [
        ("bad", "dead", 2, 0.0),
        ("ok", "acked", 1, 0.0),
        ("parked", "pending", 0, 0.0),
        ("slow", "pending", 4, 1_800_000_005.0),
    ]
    assert list(info.succGroups) == ["ok"]
    assert list(info.failGroups) == ["bad", "slow"]  # had an attempt and did not ack
    assert list(info.onlyGroups) == ["bad", "ok", "parked", "slow"]
    letter = wire.dead_letter_to_pb(DeadLetter(stored, "deliver_limit", 5.0, group="bad"))
    assert (letter.groupId, list(letter.groups), letter.deliverCount) == ("bad", ["bad"], 2)
    none = wire.dead_letter_to_pb(DeadLetter(stored, "no_binding", 5.0))
    assert (none.groupId, list(none.groups)) == ("", [])
