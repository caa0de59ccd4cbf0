"""The hand-encoded session frames parse back, field for field, with the generated code."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given, settings, strategies as st

from kiteq.broker import wire
from kiteq.core.codes import AckCode, Disposition
from kiteq.core.message import GroupDelivery, GroupState, Message, StoredMessage
from kiteq.handler.connection import StoreAck
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


def _pushed(published_id: str, **changes: Any) -> tuple[StoredMessage, common_pb2.Header]:
    """A publisher's protobuf message stored with *changes*, and the header it is pushed with."""
    pb = common_pb2.Message(
        header=common_pb2.Header(messageId=published_id, topic="t", messageType="x", commit=True),
        body=b"b",
    )
    message = dataclasses.replace(wire.message_from_pb(pb), **changes)
    stored = StoredMessage(message, publish_time=1.0, wire=pb)
    data = wire.deliveries_frame([(stored, 1)])
    return stored, broker_pb2.ServerFrame.FromString(data).deliveries.deliveries[0].message.header


def test_publisher_protobuf_is_reused_with_the_brokers_clamps() -> None:
    clamped, header = _pushed("0" * 32, expired_time=5, deliver_limit=100, create_time=4)
    assert (header.expiredTime, header.deliverLimit, header.createTime) == (5, 100, 4)
    assert isinstance(clamped.wire, bytes)  # cached for redeliveries


def test_publisher_protobuf_gets_the_canonical_id_and_the_sessions_group() -> None:
    _, header = _pushed("AB" * 16, message_id="ab" * 16, group_id="pay")
    assert (header.messageId, header.groupId) == ("ab" * 16, "pay")


@given(
    st.lists(
        st.tuples(
            st.text(max_size=40),
            st.sampled_from(list(AckCode)),
            st.text(max_size=300),
            st.sampled_from(list(Disposition)),
        ),
        max_size=50,
    )
)
def test_store_acks_frame_round_trips(
    items: list[tuple[str, AckCode, str, Disposition]],
) -> None:
    outcomes = [StoreAck(mid, code, feedback, how) for mid, code, feedback, how in items]
    frame = broker_pb2.ServerFrame.FromString(wire.store_acks_frame(outcomes))
    expected = broker_pb2.ServerFrame(
        storeAcks=broker_pb2.StoreAckBatch(acks=wire.store_acks(outcomes))
    )
    assert frame == expected


MIB = 1024 * 1024


def reassembled(frames: list[bytes], limit: int) -> list[tuple[common_pb2.Message, int]]:
    """Deliveries as a client reads them (PROTOCOL.md), checking every frame's size."""
    out: list[tuple[common_pb2.Message, int]] = []
    pending: tuple[broker_pb2.Delivery, list[bytes]] | None = None
    for data in frames:
        assert len(data) <= limit
        frame = broker_pb2.ServerFrame.FromString(data)
        if frame.WhichOneof("kind") == "bodyPart":
            assert pending is not None
            assert frame.bodyPart.messageId == pending[0].message.header.messageId
            pending[1].append(frame.bodyPart.data)
            if sum(map(len, pending[1])) == pending[0].bodyBytes:
                pending[0].message.body = b"".join(pending[1])
                out.append((pending[0].message, pending[0].attempt))
                pending = None
            continue
        assert pending is None  # nothing comes between a split delivery and its parts
        deliveries = frame.deliveries.deliveries
        for delivery in deliveries:
            if delivery.bodyBytes:
                assert len(deliveries) == 1
                pending = (delivery, [delivery.message.body])
            else:
                out.append((delivery.message, delivery.attempt))
    assert pending is None
    return out


# megabytes per example: no per-example deadline on a shared machine, fewer examples
@settings(deadline=None, max_examples=40)
@given(
    st.lists(st.sampled_from([0, 1, 1000, MIB // 2, MIB, 3 * MIB, 4 * MIB]), max_size=12),
    st.sampled_from([MIB, 4 * MIB, 13 * MIB]),
)
def test_delivery_frames_stay_under_the_limit_and_reassemble(sizes: list[int], limit: int) -> None:
    records = [record(bytes([i % 251]) * n, 1_900_000_000, 5) for i, n in enumerate(sizes)]
    frames = wire.delivery_frames([(r, i + 1) for i, r in enumerate(records)], limit)
    got = reassembled(frames, limit)
    assert [attempt for _, attempt in got] == list(range(1, len(records) + 1))
    for (message, _), expected in zip(got, records, strict=True):
        assert wire.message_from_pb(message) == expected.message


def test_small_deliveries_share_frames_of_at_most_500() -> None:
    records = [record(b"x", 1_900_000_000, 5) for _ in range(1200)]
    frames = wire.delivery_frames([(r, 1) for r in records], 4 * MIB)
    assert [len(broker_pb2.ServerFrame.FromString(f).deliveries.deliveries) for f in frames] == [
        500,
        500,
        200,
    ]


def test_checks_frames_stay_under_the_limit() -> None:
    props = {f"k{i}": "v" * 4096 for i in range(64)}
    big = [
        (StoredMessage(dataclasses.replace(record(b"", 0, 1).message, properties=props), 1.0), 1)
        for _ in range(10)
    ]
    frames = wire.checks_frames(big, MIB)
    assert len(frames) > 1
    assert all(f.ByteSize() <= MIB for f in frames)
    assert sum(len(f.checks.checks) for f in frames) == 10


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
