"""Bad input gets a clear error, stores nothing, and the broker keeps working."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from kiteq.client import (
    AuthenticationError,
    Binding,
    Consumer,
    Message,
    Producer,
    UnknownTopicError,
)
from kiteq.core.limits import MAX_BODY_BYTES
from kiteq.proto.v1 import broker_pb2, broker_pb2_grpc, common_pb2
from tests.e2e.broker_process import BrokerProcess, run_kiteq, strict_config, write_config
from tests.e2e.collector import Collector
from tests.e2e.raw_session import message as raw_message


@pytest.fixture
def strict_broker(tmp_path: Path, launch: Callable[..., BrokerProcess]) -> BrokerProcess:
    """Listed topics and per-group secrets; no acceptAnySecret."""
    return launch(strict_config(tmp_path, {"pay-svc": "right", "acct-svc": "right"}))


def raw_publish(
    broker: BrokerProcess, *messages: common_pb2.Message, secret: str = "right"
) -> list[broker_pb2.StoreAck]:
    with grpc.insecure_channel(broker.address) as channel:
        reply = broker_pb2_grpc.BrokerStub(channel).Publish(
            broker_pb2.PublishRequest(groupId="pay-svc", secretKey=secret, messages=list(messages)),
            timeout=10,
        )
    return list(reply.acks)


def test_wrong_secret_is_unauthenticated_and_stores_nothing(strict_broker: BrokerProcess) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        raw_publish(strict_broker, raw_message(), secret="wrong")
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "wrong secret" in (raised.value.details() or "")
    with (
        Producer(brokers=[strict_broker.address], group_id="pay-svc", secret_key="wrong") as p,
        pytest.raises(AuthenticationError),
    ):
        p.send(Message(topic="trade", message_type="pay-succ", body=b"x"), timeout=10)
    with (
        pytest.raises(AuthenticationError),
        Consumer(
            brokers=[strict_broker.address],
            group_id="acct-svc",
            secret_key="wrong",
            bindings=[Binding.fanout("trade")],
            handler=Collector(),
        ) as c,
    ):
        c.wait(10)
    assert not any(strict_broker.stats().backlog.values())
    assert strict_broker.stats().received == 0


@pytest.mark.parametrize(
    ("message", "code", "words"),
    [
        (raw_message(topic="bad/topic"), common_pb2.ERROR_CODE_INVALID_ARGUMENT, "invalid topic"),
        (raw_message(topic="unserved"), common_pb2.ERROR_CODE_UNKNOWN_TOPIC, "not served"),
        (raw_message(body=b"x" * (MAX_BODY_BYTES + 1)), common_pb2.ERROR_CODE_TOO_LARGE, "exceeds"),
        (raw_message(expired=int(time.time()) - 60), common_pb2.ERROR_CODE_EXPIRED, "expired"),
        (raw_message(message_id="not-hex"), common_pb2.ERROR_CODE_INVALID_ARGUMENT, "32 hex"),
    ],
    ids=["bad-topic-name", "unknown-topic", "oversized-body", "expired", "bad-id"],
)
def test_bad_message_gets_a_clear_error_and_is_not_stored(
    strict_broker: BrokerProcess, message: common_pb2.Message, code: int, words: str
) -> None:
    good = raw_message()
    bad_ack, good_ack = raw_publish(strict_broker, message, good)
    assert not bad_ack.status
    assert bad_ack.code == code
    assert words in bad_ack.feedback
    assert good_ack.status, "the rest of the batch and the connection keep working"
    if len(message.header.messageId) == 32:
        assert not strict_broker.lookup(message.header.messageId).found
    assert strict_broker.lookup(good.header.messageId).found
    assert sum(strict_broker.stats().backlog.values()) == 1


def test_client_reports_typed_errors(strict_broker: BrokerProcess) -> None:
    with Producer(brokers=[strict_broker.address], group_id="pay-svc", secret_key="right") as p:
        with pytest.raises(UnknownTopicError) as raised:
            p.send(Message(topic="unserved", message_type="pay-succ", body=b"x"))
        assert not raised.value.retriable
        assert p.send(Message(topic="trade", message_type="pay-succ", body=b"x")).message_id


def test_cli_rejects_unknown_cluster_and_bad_values(tmp_path: Path) -> None:
    unknown = run_kiteq(["-clusterName=nope"])
    assert unknown.returncode == 1
    assert "unknown cluster 'nope'" in unknown.stderr
    assert "rocksdb_dev" in unknown.stderr
    config = write_config(tmp_path, db="memory://", extra={"deliverySeconds": -1})
    bad = run_kiteq(["-clusterName=e2e", f"-configPath={config}"])
    assert bad.returncode == 1
    assert "clusters.e2e.deliverySeconds" in bad.stderr
    usage = run_kiteq(["-noSuchFlag=1"])
    assert usage.returncode == 2
