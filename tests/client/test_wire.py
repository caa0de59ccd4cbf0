"""Proto <-> core conversion and the gRPC status choke point."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from kiteq.binding.model import Binding
from kiteq.client import _wire
from kiteq.client._channel import backoff_delay, fresh_error, mapped_rpc_errors
from kiteq.client._discovery import resolve
from kiteq.core.errors import (
    AuthenticationError,
    ConfigError,
    ExpiredMessageError,
    InvalidMessageError,
    KiteQError,
    MessageRejectedError,
    NotConnectedError,
    ProtocolError,
)
from kiteq.core.message import Message
from kiteq.proto.v1 import broker_pb2, common_pb2
from tests.client._refusals import TYPED_REFUSALS


def test_publish_frame_carries_every_header_field_and_the_producer_group() -> None:
    message = Message(
        topic="trade",
        message_type="pay-succ",
        body=b"body",
        properties={"a": "1"},
        expired_time=123,
        deliver_limit=7,
        group_id="someone-else",
        commit=False,
        create_time=99,
        snappy=True,
    )
    frame = _wire.publish_frame([message], "pay-svc")
    (item,) = frame.publish.messages
    header = item.header
    assert header.messageId == message.message_id
    assert (header.topic, header.messageType, item.body) == ("trade", "pay-succ", b"body")
    assert (header.expiredTime, header.deliverLimit, header.createTime) == (123, 7, 99)
    assert header.groupId == "pay-svc"
    assert (header.commit, header.fly, header.snappy) == (False, False, True)
    assert dict(header.properties) == {"a": "1"}


def test_open_frame() -> None:
    params = _wire.OpenParams(
        group_id="acct",
        secret_key="s",
        client_id="c",
        warmup_seconds=3,
        bindings=(Binding.regex("trade", "pay-.*", watermark=10, persistent=False),),
        max_in_flight=5,
    )
    frame = _wire.open_frame(params).open
    assert (frame.groupId, frame.secretKey, frame.clientId) == ("acct", "s", "c")
    assert (frame.warmingupSec, frame.maxInFlight, frame.protocolVersion) == (3, 5, 1)
    (binding,) = frame.bindings
    assert binding.bindType == common_pb2.BIND_TYPE_REGEX
    assert (binding.groupId, binding.watermark, binding.persistent) == ("acct", 10, False)


def test_decode_frames() -> None:
    opened = _wire.decode_server_frame(
        broker_pb2.ServerFrame(opened=broker_pb2.Opened(broker="b:1", maxBatchMessages=10))
    )
    assert opened == _wire.BrokerLimits("b:1", 10, 0, 0)
    acks = _wire.decode_server_frame(
        broker_pb2.ServerFrame(
            storeAcks=broker_pb2.StoreAckBatch(
                acks=[
                    # a feedback text is never parsed: only the disposition says duplicate
                    broker_pb2.StoreAck(messageId="a", status=True, feedback="duplicate: x"),
                    broker_pb2.StoreAck(
                        messageId="b",
                        status=True,
                        disposition=broker_pb2.STORE_DISPOSITION_DUPLICATE,
                    ),
                    broker_pb2.StoreAck(
                        messageId="c", status=False, code=common_pb2.ERROR_CODE_EXPIRED
                    ),
                ]
            )
        )
    )
    assert isinstance(acks, _wire.StoreAcks)
    first, second, third = acks.results
    assert first == _wire.StoreResult("a")
    assert not first.duplicate
    assert second.duplicate
    assert isinstance(third.error, ExpiredMessageError)
    assert "ERROR_CODE_EXPIRED" in str(third.error)
    checks = _wire.decode_server_frame(
        broker_pb2.ServerFrame(
            checks=broker_pb2.TxCheckBatch(
                checks=[broker_pb2.TxCheck(header=common_pb2.Header(messageId="m"), check=2)]
            )
        )
    )
    assert isinstance(checks, _wire.TxChecks)
    assert checks.checks[0].message.message_id == "m"
    assert checks.checks[0].check == 2
    assert _wire.decode_server_frame(broker_pb2.ServerFrame()) is None


@pytest.mark.parametrize(
    ("code", "error"), [*TYPED_REFUSALS, (common_pb2.ERROR_CODE_OK, MessageRejectedError)]
)
def test_every_error_code_has_a_typed_error(code: int, error: type[KiteQError]) -> None:
    result = _wire.rejection_error(code, "m" * 32, "why")
    assert type(result) is error
    assert "why" in str(result)


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, AuthenticationError),
        (grpc.StatusCode.PERMISSION_DENIED, AuthenticationError),
        (grpc.StatusCode.INVALID_ARGUMENT, ConfigError),
        (grpc.StatusCode.FAILED_PRECONDITION, ConfigError),
        (grpc.StatusCode.UNIMPLEMENTED, ProtocolError),
        (grpc.StatusCode.UNAVAILABLE, NotConnectedError),
        (grpc.StatusCode.CANCELLED, NotConnectedError),
        (grpc.StatusCode.INTERNAL, NotConnectedError),
    ],
)
def test_status_codes_map_once(code: grpc.StatusCode, error: type[KiteQError]) -> None:
    with pytest.raises(error, match=r"b:1.*details here") as info, mapped_rpc_errors("b:1"):
        raise _rpc_error(code, "details here")
    assert isinstance(info.value.__cause__, grpc.aio.AioRpcError)
    assert info.value.retriable is (error is NotConnectedError)


def test_a_write_after_the_end_is_not_connected() -> None:
    with pytest.raises(NotConnectedError), mapped_rpc_errors("b:1"):
        raise asyncio.InvalidStateError("RPC already finished")


def test_fresh_error_copies_without_the_traceback() -> None:
    with pytest.raises(AuthenticationError) as info:
        raise AuthenticationError("nope")
    original = info.value
    assert original.__traceback__ is not None
    copy = fresh_error(original)
    assert copy is not original
    assert type(copy) is AuthenticationError
    assert str(copy) == "nope"
    assert copy.__traceback__ is None
    rejected = InvalidMessageError("m", "bad")
    assert fresh_error(rejected) is rejected  # not replayable from args: kept


def test_backoff_jitter_stays_within_half_and_full_delay() -> None:
    delays = [backoff_delay(1.0) for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in delays)
    assert len(set(delays)) > 1


def test_static_directory_deduplicates() -> None:
    directory = resolve(["a:1", "b:2", "a:1"], None)
    assert directory.static
    assert directory.brokers_for("any") == ["a:1", "b:2"]
    assert directory.brokers_for_any(["x", "y"]) == ["a:1", "b:2"]


def test_tx_frame_sends_canonical_ids() -> None:
    lower = "0123456789abcdef0123456789abcdef"
    frame = _wire.tx_frame(
        [_wire.TxAnswer(lower.upper(), "trade", 1), _wire.TxAnswer(lower, "trade", 2, "why")]
    )
    acks = broker_pb2.ClientFrame.FromString(frame.SerializeToString()).tx.acks
    assert [(a.messageId, a.status, a.feedback) for a in acks] == [
        (lower, 1, ""),
        (lower, 2, "why"),
    ]


def test_a_scheduled_message_carries_its_delivery_time_and_the_expiry_counts_from_it() -> None:
    now = 1_700_000_000.0
    message = Message(topic="trade", message_type="remind", body=b"", deliver_at=now + 3600.5)
    (item,) = _wire.publish_frame([message], "pay-svc", now).publish.messages
    assert item.header.deliverAt == now + 3600.5
    assert item.header.expiredTime == int(now + 3600.5) + 7 * 24 * 3600
    (plain,) = _wire.publish_frame(
        [Message(topic="trade", message_type="remind", body=b"")], "pay-svc", now
    ).publish.messages
    assert plain.header.deliverAt == 0.0
    assert plain.header.expiredTime == int(now) + 7 * 24 * 3600


def test_an_ordering_key_goes_on_the_wire_and_comes_back_on_a_delivery() -> None:
    keyed = Message(topic="trade", message_type="pay", body=b"x", ordering_key="order-9")
    (item,) = _wire.publish_frame([keyed], "pay-svc").publish.messages
    assert item.header.orderingKey == "order-9"
    (plain,) = _wire.publish_frame(
        [Message(topic="trade", message_type="pay", body=b"")], "pay-svc"
    ).publish.messages
    assert plain.header.orderingKey == ""
    delivered = broker_pb2.DeliveryBatch(deliveries=[broker_pb2.Delivery(message=item, attempt=2)])
    decoded = _wire.decode_server_frame(broker_pb2.ServerFrame(deliveries=delivered))
    assert isinstance(decoded, _wire.Deliveries)
    (received,) = decoded.messages
    assert (received.ordering_key, received.attempt) == ("order-9", 2)
