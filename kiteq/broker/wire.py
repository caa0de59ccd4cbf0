"""Protobuf <-> ``kiteq.core`` conversion for the broker.

With the servicers, the only broker code that touches generated protobuf modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from kiteq.binding.model import Binding, BindType
from kiteq.core.message import GroupState, Message, StoredMessage
from kiteq.handler.connection import StoreAck
from kiteq.proto.v1 import admin_pb2, broker_pb2, common_pb2
from kiteq.store.base import DeadLetter, DlqFilter, HistoryEvent


def message_from_pb(pb: common_pb2.Message) -> Message:
    h = pb.header
    return Message(
        message_id=h.messageId,
        topic=h.topic,
        message_type=h.messageType,
        body=pb.body,
        properties=dict(h.properties) if h.properties else {},
        expired_time=h.expiredTime,
        deliver_limit=h.deliverLimit,
        group_id=h.groupId,
        commit=h.commit,
        fly=h.fly,
        create_time=h.createTime,
        snappy=h.snappy,
        deliver_at=h.deliverAt,
        ordering_key=h.orderingKey,
    )


def header_to_pb(message: Message) -> common_pb2.Header:
    return common_pb2.Header(
        messageId=message.message_id,
        topic=message.topic,
        messageType=message.message_type,
        expiredTime=message.expired_time,
        deliverLimit=message.deliver_limit,
        groupId=message.group_id,
        commit=message.commit,
        fly=message.fly,
        properties=message.properties or None,
        createTime=message.create_time,
        snappy=message.snappy,
        deliverAt=message.deliver_at,
        orderingKey=message.ordering_key,
    )


# Outgoing session frames are encoded here directly, not through protobuf objects: building
# a ServerFrame of 500 deliveries as nested messages copied every 1 KiB body twice and cost
# more than everything else the broker does for a message. The layout is fixed by
# broker.proto; tests/broker/test_wire.py parses the bytes back with the generated code.
_VARINT_1 = [bytes((i,)) for i in range(128)]
_FIELD1_LEN = (
    b"\x0a"  # DeliveryBatch.deliveries, Delivery.message, StoreAckBatch.acks, StoreAck.messageId
)
_DELIVERY_ATTEMPT = b"\x10"  # Delivery.attempt (field 2, varint)
_ACK_STATUS_TRUE = b"\x10\x01"  # StoreAck.status = true
_ACK_FEEDBACK = b"\x1a"  # StoreAck.feedback (field 3, length-delimited)
_ACK_CODE = b"\x20"  # StoreAck.code (field 4, varint)
_ACK_DISPOSITION = b"\x28"  # StoreAck.disposition (field 5, varint)
_FRAME_STORE_ACKS = b"\x12"  # ServerFrame.storeAcks (field 2)
_FRAME_DELIVERIES = b"\x1a"  # ServerFrame.deliveries (field 3)


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _VARINT_1[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def message_bytes(record: StoredMessage) -> bytes:
    """The serialized ``common.Message`` of a stored message, computed once per record.

    The publisher's own protobuf is reused when the broker still has it (with the broker's
    clamps applied); otherwise it is built from the record.
    """
    cached = record.wire
    if isinstance(cached, bytes):
        return cached
    message = record.message
    if isinstance(cached, common_pb2.Message):
        header = cached.header
        # the only fields the broker changes: the id's spelling, the session's group, clamps
        if header.messageId != message.message_id:
            header.messageId = message.message_id
        if header.groupId != message.group_id:
            header.groupId = message.group_id
        if header.expiredTime != message.expired_time:
            header.expiredTime = message.expired_time
        if header.deliverLimit != message.deliver_limit:
            header.deliverLimit = message.deliver_limit
        if header.createTime != message.create_time:
            header.createTime = message.create_time
        data = cached.SerializeToString()
    else:
        data = common_pb2.Message(
            header=header_to_pb(message), body=message.body
        ).SerializeToString()
    record.wire = data
    return data


def deliveries_frame(deliveries: Sequence[tuple[StoredMessage, int]]) -> bytes:
    """A serialized ``ServerFrame{deliveries}``."""
    parts = []
    for record, attempt in deliveries:
        data = message_bytes(record)
        item = _FIELD1_LEN + _varint(len(data)) + data + _DELIVERY_ATTEMPT + _varint(attempt)
        parts.append(_FIELD1_LEN + _varint(len(item)) + item)
    batch = b"".join(parts)
    return _FRAME_DELIVERIES + _varint(len(batch)) + batch


# deliveries per frame at most; frame bytes are bounded by the session's sendFrameBytes
FRAME_MESSAGES: Final = 500
# tags and length prefixes around one Delivery (two of each, and the attempt), and a frame's
_DELIVERY_OVERHEAD: Final = 24
_FRAME_OVERHEAD: Final = 16
# room kept in a split delivery's frames for the header's own prefixes and the part's id
_SPLIT_SLACK: Final = 256


def delivery_frames(deliveries: Sequence[tuple[StoredMessage, int]], limit: int) -> list[bytes]:
    """Serialized ``ServerFrame{deliveries}`` frames, none larger than *limit* bytes.

    A message that does not fit in one frame under *limit* goes alone: a Delivery with
    ``bodyBytes`` and the body's first part, then ``BodyPart`` frames (PROTOCOL.md).
    """
    frames: list[bytes] = []
    current: list[tuple[StoredMessage, int]] = []
    size = _FRAME_OVERHEAD
    for record, attempt in deliveries:
        item = len(message_bytes(record)) + _DELIVERY_OVERHEAD
        if item + _FRAME_OVERHEAD > limit:
            if current:
                frames.append(deliveries_frame(current))
                current, size = [], _FRAME_OVERHEAD
            frames.extend(_split_delivery(record, attempt, limit))
            continue
        if current and (len(current) >= FRAME_MESSAGES or size + item > limit):
            frames.append(deliveries_frame(current))
            current, size = [], _FRAME_OVERHEAD
        current.append((record, attempt))
        size += item
    if current:
        frames.append(deliveries_frame(current))
    return frames


def _split_delivery(record: StoredMessage, attempt: int, limit: int) -> list[bytes]:
    """One message as a Delivery with the body's first part and BodyPart frames."""
    data = message_bytes(record)
    pb = common_pb2.Message.FromString(data)
    body = pb.body
    first = max(0, limit - (len(data) - len(body)) - _SPLIT_SLACK)
    pb.body = body[:first]
    frames = [
        broker_pb2.ServerFrame(
            deliveries=broker_pb2.DeliveryBatch(
                deliveries=[broker_pb2.Delivery(message=pb, attempt=attempt, bodyBytes=len(body))]
            )
        ).SerializeToString()
    ]
    message_id = pb.header.messageId
    step = limit - _SPLIT_SLACK - len(message_id)
    for start in range(first, len(body), step):
        part = broker_pb2.BodyPart(messageId=message_id, data=body[start : start + step])
        frames.append(broker_pb2.ServerFrame(bodyPart=part).SerializeToString())
    return frames


def store_acks_frame(outcomes: Sequence[StoreAck]) -> bytes:
    """A serialized ``ServerFrame{storeAcks}``."""
    parts = []
    for outcome in outcomes:
        mid = outcome.message_id.encode()
        item = _FIELD1_LEN + _varint(len(mid)) + mid
        code = int(outcome.code)
        if not code:
            item += _ACK_STATUS_TRUE
        if outcome.feedback:
            feedback = outcome.feedback.encode()
            item += _ACK_FEEDBACK + _varint(len(feedback)) + feedback
        if code:
            item += _ACK_CODE + _varint(code)
        if outcome.disposition:
            item += _ACK_DISPOSITION + _varint(int(outcome.disposition))
        parts.append(_FIELD1_LEN + _varint(len(item)) + item)
    batch = b"".join(parts)
    return _FRAME_STORE_ACKS + _varint(len(batch)) + batch


def checks_frames(
    checks: Sequence[tuple[StoredMessage, int]], limit: int
) -> list[broker_pb2.ServerFrame]:
    """Transaction checks (the publishing group decides these messages), in frames.

    None is larger than *limit* bytes (a header with the maximum properties is far below
    the smallest limit).
    """
    frames: list[broker_pb2.ServerFrame] = []
    batch = broker_pb2.TxCheckBatch()
    size = _FRAME_OVERHEAD
    for record, check in checks:
        item = broker_pb2.TxCheck(header=header_to_pb(record.message), check=check)
        item_size = item.ByteSize() + _DELIVERY_OVERHEAD
        if batch.checks and size + item_size > limit:
            frames.append(broker_pb2.ServerFrame(checks=batch))
            batch, size = broker_pb2.TxCheckBatch(), _FRAME_OVERHEAD
        batch.checks.append(item)
        size += item_size
    if batch.checks:
        frames.append(broker_pb2.ServerFrame(checks=batch))
    return frames


def serialize_server_frame(frame: broker_pb2.ServerFrame | bytes) -> bytes:
    """The session's response serializer: frames encoded above pass through."""
    return frame if isinstance(frame, bytes) else frame.SerializeToString()


def store_acks(outcomes: Iterable[StoreAck]) -> list[broker_pb2.StoreAck]:
    return [
        broker_pb2.StoreAck(
            messageId=o.message_id,
            status=o.ok,
            feedback=o.feedback,
            code=common_pb2.ErrorCode.ValueType(int(o.code)),
            disposition=broker_pb2.StoreDisposition.ValueType(int(o.disposition)),
        )
        for o in outcomes
    ]


def binding_from_pb(pb: common_pb2.Binding) -> Binding:
    return Binding(
        topic=pb.topic,
        message_type=pb.messageType or "*",
        bind_type=BindType(int(pb.bindType)),
        group_id=pb.groupId,
        watermark=pb.watermark,
        persistent=pb.persistent,
        version=pb.version or "1.0.0",
    )


def binding_to_pb(binding: Binding) -> common_pb2.Binding:
    return common_pb2.Binding(
        groupId=binding.group_id,
        topic=binding.topic,
        messageType=binding.message_type,
        bindType=common_pb2.BindType.ValueType(int(binding.bind_type)),
        version=binding.version,
        watermark=binding.watermark,
        persistent=binding.persistent,
    )


def message_info(record: StoredMessage, with_body: bool) -> admin_pb2.GetMessageResponse:
    return admin_pb2.GetMessageResponse(
        found=True,
        header=header_to_pb(record.message),
        body=record.message.body if with_body else b"",
        deliverCount=record.deliver_count,
        succGroups=list(record.succ_groups),
        failGroups=sorted(
            g for g, d in record.groups.items() if d.state is not GroupState.ACKED and d.attempts
        ),
        nextDeliverTime=record.next_deliver_time,
        publishTime=record.publish_time,
        bodyBytes=len(record.message.body),
        groups=[
            admin_pb2.GroupDeliveryInfo(
                groupId=group,
                state=d.state.value,
                attempts=d.attempts,
                nextDeliverTime=d.next_deliver_time,
            )
            for group, d in sorted(record.groups.items())
        ],
        onlyGroups=list(record.only_groups),
    )


def history_to_pb(event: HistoryEvent) -> admin_pb2.HistoryEvent:
    return admin_pb2.HistoryEvent(
        time=event.time,
        kind=event.kind,
        groupId=event.group,
        connection=event.connection,
        attempt=event.attempt,
        detail=event.detail,
    )


def dlq_filter(pb: admin_pb2.DeadLetterFilter) -> DlqFilter:
    return DlqFilter(
        topic=pb.topic, message_type=pb.messageType, group=pb.groupId, reason=pb.reason
    )


def dead_letter_to_pb(letter: DeadLetter) -> admin_pb2.DeadLetterInfo:
    record = letter.record
    state = record.groups.get(letter.group)
    return admin_pb2.DeadLetterInfo(
        header=header_to_pb(record.message),
        reason=letter.reason,
        deadTime=letter.dead_time,
        groups=[letter.group] if letter.group else [],
        deliverCount=state.attempts if state is not None else record.deliver_count,
        bodyBytes=len(record.message.body),
        groupId=letter.group,
    )


def transaction_info(record: StoredMessage, unresolved: bool) -> admin_pb2.TransactionInfo:
    return admin_pb2.TransactionInfo(
        header=header_to_pb(record.message),
        checks=record.deliver_count,
        nextCheck=0.0 if unresolved else record.next_deliver_time,
        unresolved=unresolved,
        publishTime=record.publish_time,
    )
