"""Conversion between the wire contract (protobuf) and the ``kiteq.core`` dataclasses.

With ``_channel`` this is the only module of ``kiteq.client`` that touches generated
``*_pb2`` code; everything above it works on ``Message``, ``ReceivedMessage`` and the small
frozen dataclasses defined here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Iterable
from typing import Final, NamedTuple

from kiteq.binding.model import Binding
from kiteq.core.codes import ERROR_FOR_CODE
from kiteq.core.errors import KiteQError, MessageRejectedError
from kiteq.core.ids import canonical_message_id
from kiteq.core.limits import MAX_FRAME_BYTES, clamp
from kiteq.core.message import Message, ReceivedMessage
from kiteq.proto.v1 import broker_pb2, common_pb2

__all__ = [
    "IN_PROGRESS",
    "PROTOCOL_VERSION",
    "SETTLE",
    "BrokerLimits",
    "Deliveries",
    "DeliveryResult",
    "FlowState",
    "OpenParams",
    "ServerEvent",
    "StoreAcks",
    "StoreResult",
    "TxAnswer",
    "TxCheckRequest",
    "TxChecks",
    "acks_frame",
    "decode_server_frame",
    "flow_frame",
    "open_frame",
    "publish_frame",
    "rejection_error",
    "tx_frame",
]

PROTOCOL_VERSION: Final = 1


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
    # a delivery not acked within this many seconds is redelivered; 0: not announced
    delivery_seconds: int = 0


class StoreResult(NamedTuple):
    """One store-ack: ``error`` is None when the message is durable.

    A named tuple: a producer decodes one per message, and a tuple is the cheapest to
    build and to unpack.
    """

    message_id: str
    error: KiteQError | None = None
    duplicate: bool = False


# StoreResult((id, error, duplicate)) without the generated __new__'s argument handling
_new_store_result: Final = functools.partial(tuple.__new__, StoreResult)


class DeliveryResult(NamedTuple):
    """A consumer's answer to one delivery: ``ok`` False is a nack (redeliver).

    A named tuple: a consumer builds one per message.
    """

    message_id: str
    ok: bool
    feedback: str = ""
    # a nack: redeliver no earlier than this many seconds from now (issue #17)
    delay: float = 0.0
    # IN_PROGRESS: not a result, the deadline of the delivery restarts
    action: int = broker_pb2.DELIVER_ACTION_SETTLE


FlowState = broker_pb2.FlowState
# DeliveryResult.action: a settlement, or "still working" (the deadline restarts)
SETTLE: Final = broker_pb2.DELIVER_ACTION_SETTLE
IN_PROGRESS: Final = broker_pb2.DELIVER_ACTION_IN_PROGRESS


class TxAnswer(NamedTuple):
    """A producer's decision on an uncommitted message (``TxAck``): status is a TxStatus."""

    message_id: str
    topic: str
    status: int
    feedback: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class TxCheckRequest:
    """The broker asks the publishing group to decide an uncommitted message.

    ``message`` is its header (no body: checks do not carry it), with ``attempt`` set to
    the check's number (1 for the first check).
    """

    message: ReceivedMessage
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
    error = ERROR_FOR_CODE.get(code, MessageRejectedError)
    if issubclass(error, MessageRejectedError):
        return error(message_id, reason)
    return error(f"message {message_id} refused: {reason}")


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
    # the channel receives frames this large (_channel), so deliveries never arrive split
    out.maxReceiveBytes = MAX_FRAME_BYTES
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


def publish_frame(
    messages: Iterable[Message], group_id: str, now: float | None = None
) -> broker_pb2.ClientFrame:
    """One ``PublishBatch`` frame; every header carries the producer's *group_id*.

    Headers carry KiteQ's clamps as of *now* (default: the current time), as the broker
    would apply them, so that it stores the message as it is.
    """
    if now is None:
        now = time.time()
    # what the clamps make of the defaults (0, 0, 0), which most messages keep
    defaults = clamp(0, 0, 0, now)
    frame = broker_pb2.ClientFrame()
    add = frame.publish.messages.add
    for message in messages:
        item = add()
        item.body = message.body
        header = item.header
        header.messageId = message.message_id
        header.topic = message.topic
        header.messageType = message.message_type
        header.groupId = group_id
        expired, limit, created = message.expired_time, message.deliver_limit, message.create_time
        deliver_at = message.deliver_at
        if deliver_at:
            # scheduled: the expiry counts from the delivery time (kiteq.core.limits.clamp)
            header.deliverAt = deliver_at
            header.expiredTime, header.deliverLimit, header.createTime = clamp(
                expired, limit, created, now, deliver_at
            )
        else:
            header.expiredTime, header.deliverLimit, header.createTime = (
                clamp(expired, limit, created, now) if expired or limit or created else defaults
            )
        # proto3 defaults (False, empty) are not set: less work, the same bytes
        if message.commit:
            header.commit = True
        if message.fly:
            header.fly = True
        if message.snappy:
            header.snappy = True
        if message.properties:
            header.properties.update(message.properties)
        if message.ordering_key:
            header.orderingKey = message.ordering_key
    return frame


def acks_frame(results: Iterable[DeliveryResult]) -> broker_pb2.ClientFrame:
    """One ``DeliverAckBatch`` frame."""
    frame = broker_pb2.ClientFrame()
    add = frame.acks.acks.add
    for message_id, ok, feedback, delay, action in results:
        ack = add()
        ack.messageId = message_id
        if ok:
            ack.status = True
        if feedback:
            ack.feedback = feedback
        if delay:
            ack.delayMs = math.ceil(delay * 1000)
        if action:
            ack.action = broker_pb2.DeliverAction.ValueType(action)
    return frame


def flow_frame(state: broker_pb2.FlowState.ValueType) -> broker_pb2.ClientFrame:
    """A ``Flow`` frame: pause or resume this session's deliveries."""
    frame = broker_pb2.ClientFrame()
    frame.flow.state = state
    return frame


def tx_frame(answers: Iterable[TxAnswer]) -> broker_pb2.ClientFrame:
    """One ``TxAckBatch`` frame, ids in their canonical spelling (as the broker stores them).

    (A publish keeps the spelling the caller gave: its store-ack is matched by that id.)
    """
    frame = broker_pb2.ClientFrame()
    add = frame.tx.acks.add
    for message_id, topic, status, feedback in answers:
        ack = add()
        ack.messageId = canonical_message_id(message_id)
        ack.topic = topic
        ack.status = broker_pb2.TxStatus.ValueType(status)
        if feedback:
            ack.feedback = feedback
    return frame


def decode_server_frame(frame: broker_pb2.ServerFrame) -> ServerEvent | None:
    """Decode one server frame; None for an empty (unknown) frame."""
    kind = frame.WhichOneof("kind")
    if kind == "storeAcks":
        return StoreAcks(_store_results(frame.storeAcks.acks))
    if kind == "deliveries":
        return Deliveries(_received(frame.deliveries.deliveries))
    if kind == "opened":
        opened = frame.opened
        return BrokerLimits(
            broker=opened.broker,
            max_batch_messages=opened.maxBatchMessages,
            max_batch_bytes=opened.maxBatchBytes,
            max_body_bytes=opened.maxBodyBytes,
            delivery_seconds=opened.deliverySeconds,
        )
    if kind == "checks":
        return TxChecks(
            [
                TxCheckRequest(_header_message(check.header, check.check), check.check)
                for check in frame.checks.checks
            ]
        )
    return None


def _store_results(acks: Iterable[broker_pb2.StoreAck]) -> list[StoreResult]:
    new = _new_store_result
    results: list[StoreResult] = []
    append = results.append
    for ack in acks:
        if ack.status:
            duplicate = ack.disposition == broker_pb2.STORE_DISPOSITION_DUPLICATE
            append(new((ack.messageId, None, duplicate)))
        else:
            message_id = ack.messageId
            append(new((message_id, rejection_error(ack.code, message_id, ack.feedback), False)))
    return results


def _received(deliveries: Iterable[broker_pb2.Delivery]) -> list[ReceivedMessage]:
    received: list[ReceivedMessage] = []
    append = received.append
    for delivery in deliveries:
        message = delivery.message
        append(_header_message(message.header, delivery.attempt, message.body))
    return received


def _header_message(header: common_pb2.Header, attempt: int, body: bytes = b"") -> ReceivedMessage:
    # a check's header has no body: checks do not carry it
    properties = header.properties
    return ReceivedMessage(
        topic=header.topic,
        message_type=header.messageType,
        body=body,
        message_id=header.messageId,
        # dict(map) goes through the Mapping ABC, items() does not
        properties=dict(properties.items()) if properties else {},
        expired_time=header.expiredTime,
        deliver_limit=header.deliverLimit,
        group_id=header.groupId,
        commit=header.commit,
        fly=header.fly,
        create_time=header.createTime,
        snappy=header.snappy,
        deliver_at=header.deliverAt,
        ordering_key=header.orderingKey,
        attempt=attempt,
    )
