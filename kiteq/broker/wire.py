"""Protobuf <-> ``kiteq.core`` conversion for the broker.

With the servicers, the only broker code that touches generated protobuf modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kiteq.binding.model import Binding, BindType
from kiteq.core.message import Message, StoredMessage
from kiteq.handler.connection import Outcome
from kiteq.proto.v1 import admin_pb2, broker_pb2, common_pb2


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
    )


def deliveries_frame(deliveries: Sequence[tuple[Message, int]]) -> broker_pb2.ServerFrame:
    batch = broker_pb2.DeliveryBatch(
        deliveries=[
            broker_pb2.Delivery(
                message=common_pb2.Message(header=header_to_pb(m), body=m.body), attempt=attempt
            )
            for m, attempt in deliveries
        ]
    )
    return broker_pb2.ServerFrame(deliveries=batch)


def store_acks(outcomes: Iterable[Outcome]) -> list[broker_pb2.StoreAck]:
    return [
        broker_pb2.StoreAck(
            messageId=o.message_id,
            status=o.ok,
            feedback=o.feedback,
            code=common_pb2.ErrorCode.ValueType(int(o.code)),
        )
        for o in outcomes
    ]


def store_acks_frame(outcomes: Sequence[Outcome]) -> broker_pb2.ServerFrame:
    return broker_pb2.ServerFrame(storeAcks=broker_pb2.StoreAckBatch(acks=store_acks(outcomes)))


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
        failGroups=list(record.fail_groups),
        nextDeliverTime=record.next_deliver_time,
        publishTime=record.publish_time,
        bodyBytes=len(record.message.body),
    )
