"""Conversion between the wire contract (protobuf) and the ``kiteq.core`` dataclasses.

With ``_channel`` this is the only module of ``kiteq.client`` that touches generated
``*_pb2`` code; everything above it works on ``Message``, ``ReceivedMessage`` and the small
frozen dataclasses defined here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Final

from kiteq.binding.model import Binding
from kiteq.core.errors import (
    AuthenticationError,
    BodyTooLargeError,
    ExpiredMessageError,
    FlowLimitedError,
    InvalidMessageError,
    KiteQError,
    MessageRejectedError,
    NotConnectedError,
    StoreFullError,
    StoreUnavailableError,
    UnknownTopicError,
)
from kiteq.core.message import Message, ReceivedMessage
from kiteq.proto.v1 import broker_pb2, common_pb2

__all__ = [
    "PROTOCOL_VERSION",
    "BrokerLimits",
    "Deliveries",
    "DeliveryResult",
    "OpenParams",
    "ServerEvent",
    "StoreAcks",
    "StoreResult",
    "TxCheckRequest",
    "TxChecks",
    "acks_frame",
    "decode_server_frame",
    "open_frame",
    "publish_frame",
    "rejection_error",
]

PROTOCOL_VERSION: Final = 1

# Store-ack codes that refuse one message; the class carries message_id and reason.
_REJECTED: Final[dict[int, type[MessageRejectedError]]] = {
    common_pb2.ERROR_CODE_INVALID_ARGUMENT: InvalidMessageError,
    common_pb2.ERROR_CODE_TOO_LARGE: BodyTooLargeError,
    common_pb2.ERROR_CODE_UNKNOWN_TOPIC: UnknownTopicError,
    common_pb2.ERROR_CODE_EXPIRED: ExpiredMessageError,
    common_pb2.ERROR_CODE_OVERFLOW: FlowLimitedError,
}
# Store-ack codes whose error class takes a plain message.
_FAILED: Final[dict[int, type[KiteQError]]] = {
    common_pb2.ERROR_CODE_STORE_FULL: StoreFullError,
    common_pb2.ERROR_CODE_STORE_UNAVAILABLE: StoreUnavailableError,
    common_pb2.ERROR_CODE_NOT_SERVING: NotConnectedError,
    common_pb2.ERROR_CODE_UNAUTHENTICATED: AuthenticationError,
}


@dataclasses.dataclass(frozen=True, slots=True)
class OpenParams:
    """What a client declares when its session opens (the ``Open`` frame)."""

    group_id: str
    secret_key: str
    client_id: str
    warmup_seconds: int = 0
    bindings: tuple[Binding, ...] = ()
    max_in_flight: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerLimits:
    """The broker's ``Opened`` answer: who it is and the batch limits to respect."""

    broker: str
    max_batch_messages: int
    max_batch_bytes: int
    max_body_bytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class StoreResult:
    """One store-ack: ``error`` is None when the message is durable."""

    message_id: str
    error: KiteQError | None = None
    duplicate: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class DeliveryResult:
    """A consumer's answer to one delivery: ``ok`` False is a nack (redeliver)."""

    message_id: str
    ok: bool
    feedback: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class TxCheckRequest:
    """The broker asks the publishing group to decide an uncommitted message."""

    message: Message
    check: int


@dataclasses.dataclass(frozen=True, slots=True)
class StoreAcks:
    """A ``storeAcks`` frame."""

    results: list[StoreResult]


@dataclasses.dataclass(frozen=True, slots=True)
class Deliveries:
    """A ``deliveries`` frame."""

    messages: list[ReceivedMessage]


@dataclasses.dataclass(frozen=True, slots=True)
class TxChecks:
    """A ``checks`` frame."""

    checks: list[TxCheckRequest]


ServerEvent = BrokerLimits | StoreAcks | Deliveries | TxChecks


def rejection_error(code: int, message_id: str, feedback: str) -> KiteQError:
    """The typed error for a refused store-ack (``status`` false) with ErrorCode *code*."""
    reason = feedback or _CODE_NAMES.get(code, f"code {code}")
    rejected = _REJECTED.get(code)
    if rejected is not None:
        return rejected(message_id, reason)
    failed = _FAILED.get(code)
    if failed is not None:
        return failed(f"message {message_id} refused: {reason}")
    return MessageRejectedError(message_id, reason)


_CODE_NAMES: Final[dict[int, str]] = {
    int(value): name for name, value in common_pb2.ErrorCode.items()
}


def open_frame(params: OpenParams) -> broker_pb2.ClientFrame:
    """The first frame of a session."""
    frame = broker_pb2.ClientFrame()
    out = frame.open
    out.groupId = params.group_id
    out.secretKey = params.secret_key
    out.warmingupSec = params.warmup_seconds
    out.clientId = params.client_id
    out.maxInFlight = params.max_in_flight
    out.protocolVersion = PROTOCOL_VERSION
    for binding in params.bindings:
        item = out.bindings.add()
        item.groupId = params.group_id
        item.topic = binding.topic
        item.messageType = binding.message_type
        item.bindType = common_pb2.BindType.ValueType(binding.bind_type)
        item.version = binding.version
        item.watermark = binding.watermark
        item.persistent = binding.persistent
    return frame


def publish_frame(messages: Iterable[Message], group_id: str) -> broker_pb2.ClientFrame:
    """One ``PublishBatch`` frame; every header carries the producer's *group_id*."""
    frame = broker_pb2.ClientFrame()
    out = frame.publish.messages
    for message in messages:
        item = out.add()
        header = item.header
        header.messageId = message.message_id
        header.topic = message.topic
        header.messageType = message.message_type
        header.expiredTime = message.expired_time
        header.deliverLimit = message.deliver_limit
        header.groupId = group_id
        header.commit = message.commit
        header.fly = message.fly
        header.createTime = message.create_time
        header.snappy = message.snappy
        if message.properties:
            header.properties.update(message.properties)
        item.body = message.body
    return frame


def acks_frame(results: Iterable[DeliveryResult]) -> broker_pb2.ClientFrame:
    """One ``DeliverAckBatch`` frame."""
    frame = broker_pb2.ClientFrame()
    out = frame.acks.acks
    for result in results:
        ack = out.add()
        ack.messageId = result.message_id
        ack.status = result.ok
        if result.feedback:
            ack.feedback = result.feedback
    return frame


def decode_server_frame(frame: broker_pb2.ServerFrame) -> ServerEvent | None:
    """Decode one server frame; None for an empty (unknown) frame."""
    kind = frame.WhichOneof("kind")
    if kind == "storeAcks":
        return StoreAcks([_store_result(ack) for ack in frame.storeAcks.acks])
    if kind == "deliveries":
        return Deliveries([_received(d) for d in frame.deliveries.deliveries])
    if kind == "opened":
        opened = frame.opened
        return BrokerLimits(
            broker=opened.broker,
            max_batch_messages=opened.maxBatchMessages,
            max_batch_bytes=opened.maxBatchBytes,
            max_body_bytes=opened.maxBodyBytes,
        )
    if kind == "checks":
        return TxChecks(
            [
                TxCheckRequest(_header_message(check.header), check.check)
                for check in frame.checks.checks
            ]
        )
    return None


def _store_result(ack: broker_pb2.StoreAck) -> StoreResult:
    if ack.status:
        return StoreResult(ack.messageId, duplicate=ack.feedback.lower().startswith("duplicate"))
    return StoreResult(ack.messageId, rejection_error(ack.code, ack.messageId, ack.feedback))


def _received(delivery: broker_pb2.Delivery) -> ReceivedMessage:
    header = delivery.message.header
    return ReceivedMessage(
        topic=header.topic,
        message_type=header.messageType,
        body=delivery.message.body,
        message_id=header.messageId,
        properties=dict(header.properties),
        expired_time=header.expiredTime,
        deliver_limit=header.deliverLimit,
        group_id=header.groupId,
        commit=header.commit,
        fly=header.fly,
        create_time=header.createTime,
        snappy=header.snappy,
        attempt=delivery.attempt,
    )


def _header_message(header: common_pb2.Header) -> Message:
    return Message(
        topic=header.topic,
        message_type=header.messageType,
        body=b"",
        message_id=header.messageId,
        properties=dict(header.properties),
        expired_time=header.expiredTime,
        deliver_limit=header.deliverLimit,
        group_id=header.groupId,
        commit=header.commit,
        fly=header.fly,
        create_time=header.createTime,
        snappy=header.snappy,
    )
