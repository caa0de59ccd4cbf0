"""Issue #9, permissions end to end: real broker processes with an ``acl`` table.

Publish outside a group's grants gets a per-message ``PERMISSION_DENIED`` (the rest of the
batch goes on, nothing is stored); bindings outside them are refused on ``Open`` (embedded
registry) or not applied, logged once and counted (ZooKeeper); inside them everything works.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import grpc
import pytest

from kiteq.binding.model import Binding as ModelBinding, dumps
from kiteq.client import Binding, Consumer, KiteQError, Message, PermissionDeniedError, Producer
from kiteq.core.ids import new_message_id
from kiteq.proto.v1 import broker_pb2, broker_pb2_grpc, common_pb2
from tests.e2e.broker_process import BrokerProcess, write_config
from tests.e2e.collector import Collector
from tests.e2e.fixtures import ZkConfig
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

SECRET: Final = "right"
# pay-svc publishes trade; acct-svc consumes trade; audit-svc consumes everything
ACL: Final = """
[clusters.e2e.acl.pay-svc]
publish = ["trade"]

[clusters.e2e.acl.acct-svc]
subscribe = ["trade"]

[clusters.e2e.acl.audit-svc]
publish = []
subscribe = ["*"]
"""


def with_acl(config: Path, extra: str = "") -> Path:
    config.write_text(config.read_text() + ACL + extra)
    return config


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    config = write_config(
        tmp_path,
        db=f"rocksdb://{tmp_path / 'db'}",
        extra={"topics": ["trade", "user-profile"]},
        secrets={"pay-svc": SECRET, "acct-svc": SECRET, "audit-svc": SECRET, "spy-svc": SECRET},
    )
    process = BrokerProcess(with_acl(config))
    process.start()
    yield process
    process.stop_quietly()


def raw_message(topic: str) -> common_pb2.Message:
    header = common_pb2.Header(
        messageId=new_message_id(), topic=topic, messageType="pay-succ", commit=True
    )
    return common_pb2.Message(header=header, body=b"x")


def raw_publish(
    broker: BrokerProcess, group: str, *messages: common_pb2.Message
) -> list[broker_pb2.StoreAck]:
    with grpc.insecure_channel(broker.address) as channel:
        reply = broker_pb2_grpc.BrokerStub(channel).Publish(
            broker_pb2.PublishRequest(groupId=group, secretKey=SECRET, messages=list(messages)),
            timeout=10,
        )
    return list(reply.acks)


def raw_open(broker: BrokerProcess, group: str, bindings: Sequence[common_pb2.Binding]) -> None:
    """Open a session declaring *bindings*; returns once the broker answered ``Opened``."""
    frame = broker_pb2.ClientFrame(
        open=broker_pb2.Open(
            groupId=group,
            secretKey=SECRET,
            bindings=list(bindings),
            maxInFlight=10,
            protocolVersion=1,
        )
    )
    with grpc.insecure_channel(broker.address) as channel:
        replies = broker_pb2_grpc.BrokerStub(channel).Session(iter([frame]), timeout=10)
        first = next(replies)
        assert first.WhichOneof("kind") == "opened"
        replies.cancel()


def fanout(topic: str) -> common_pb2.Binding:
    return common_pb2.Binding(topic=topic, messageType="*", bindType=common_pb2.BIND_TYPE_FANOUT)


def test_publish_outside_the_groups_grants_is_refused_per_message(
    acl_broker: BrokerProcess,
) -> None:
    allowed, denied, also_allowed = (
        raw_message("trade"),
        raw_message("user-profile"),
        raw_message("trade"),
    )
    acks = raw_publish(acl_broker, "pay-svc", allowed, denied, also_allowed)
    assert [a.status for a in acks] == [True, False, True], "the rest of the batch goes on"
    assert acks[1].code == common_pb2.ERROR_CODE_PERMISSION_DENIED
    assert acks[1].feedback == "group 'pay-svc' may not publish to topic 'user-profile'"
    assert acl_broker.lookup(allowed.header.messageId).found
    assert not acl_broker.lookup(denied.header.messageId).found

    # a group with an entry but no publish grant, and a group without an entry
    for group in ("audit-svc", "spy-svc"):
        (ack,) = raw_publish(acl_broker, group, raw_message("trade"))
        assert ack.code == common_pb2.ERROR_CODE_PERMISSION_DENIED, group

    # the session path (the client library) gets the typed error; inside the grant it works
    with Producer(brokers=[acl_broker.address], group_id="pay-svc", secret_key=SECRET) as p:
        with pytest.raises(PermissionDeniedError, match="may not publish to topic 'user-profile'"):
            p.send(Message(topic="user-profile", message_type="x", body=b"x"), timeout=10)
        assert p.send(Message(topic="trade", message_type="x", body=b"x"), timeout=10).message_id
    assert acl_broker.stats().received == 3


def test_bindings_outside_the_groups_grants_are_refused_on_open(
    acl_broker: BrokerProcess,
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        raw_open(acl_broker, "spy-svc", [fanout("trade")])
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert raised.value.details() == "group 'spy-svc' may not subscribe to topic 'trade'"
    with pytest.raises(grpc.RpcError) as raised:
        raw_open(acl_broker, "acct-svc", [fanout("trade"), fanout("user-profile")])
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "'acct-svc' may not subscribe to topic 'user-profile'" in (raised.value.details() or "")
    with (
        pytest.raises(KiteQError, match="may not subscribe to topic 'trade'"),
        Consumer(
            brokers=[acl_broker.address],
            group_id="spy-svc",
            secret_key=SECRET,
            bindings=[Binding.fanout("trade")],
            handler=Collector(),
        ) as spy,
    ):
        spy.wait(10)

    # inside the grants: bound and delivered; the refused declarations left nothing behind
    got, everything = Collector(), Collector()
    with (
        Consumer(
            brokers=[acl_broker.address],
            group_id="acct-svc",
            secret_key=SECRET,
            bindings=[Binding.fanout("trade")],
            handler=got,
        ),
        Consumer(
            brokers=[acl_broker.address],
            group_id="audit-svc",
            secret_key=SECRET,
            bindings=[Binding.fanout("trade"), Binding.fanout("user-profile")],
            handler=everything,
        ),
        Producer(brokers=[acl_broker.address], group_id="pay-svc", secret_key=SECRET) as p,
    ):
        sent = p.send(Message(topic="trade", message_type="pay-succ", body=b"x")).message_id
        got.wait_count(1)
        everything.wait_count(1)
    assert got.ids() == everything.ids() == [sent]
    assert acl_broker.bindings("trade") == [("acct-svc", "*"), ("audit-svc", "*")]


# -- ZooKeeper ---------------------------------------------------------------------------


def ops_metric(broker: BrokerProcess, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in broker.metrics().splitlines()
        if line.startswith((name + "{", name + " "))
    )


@pytest.fixture
def zk_acl_broker(
    zk_config: ZkConfig, launch: Callable[..., BrokerProcess]
) -> Callable[[], BrokerProcess]:
    return lambda: launch(with_acl(zk_config({"recoverSeconds": 1})), pport=0)


def test_zookeeper_bindings_outside_the_grants_are_not_applied(
    zk_acl_broker: Callable[[], BrokerProcess], zk: Any
) -> None:
    spy_node = "/kiteq/sub/trade/spy-svc-bind"
    spy = ModelBinding.fanout("trade").with_group("spy-svc")
    zk.create(spy_node, dumps([spy]), makepath=True)
    broker = zk_acl_broker()
    refused = f"binding node refused path={spy_node}"
    assert any(refused in line for line in broker.output)
    assert ops_metric(broker, "kiteq_bindings_refused_total") == 1

    # a permitted group's node written after it applies; the refused one still does not
    acct_node = "/kiteq/sub/trade/acct-svc-bind"
    zk.create(acct_node, dumps([ModelBinding.fanout("trade").with_group("acct-svc")]))
    wait_until(lambda: broker.bindings("trade") == [("acct-svc", "*")], 5, "acct binding")
    got = Collector()
    with (
        Consumer(
            brokers=[broker.address],
            group_id="acct-svc",
            secret_key=SECRET,
            bindings=[Binding.fanout("trade")],
            handler=got,
        ),
        Producer(brokers=[broker.address], group_id="pay-svc", secret_key=SECRET) as p,
    ):
        sent = p.send(Message(topic="trade", message_type="pay-succ", body=b"x")).message_id
        got.wait_count(1)
    assert got.ids() == [sent]
    assert broker.bindings("trade") == [("acct-svc", "*")]
    assert sum(refused in line for line in broker.output) == 1, "logged once"

    # a declaration outside the grants is refused before anything is written to ZooKeeper
    with pytest.raises(grpc.RpcError) as raised:
        raw_open(broker, "other-svc", [fanout("trade")])
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert zk.exists("/kiteq/sub/trade/other-svc-bind") is None
    assert json.loads(zk.get(spy_node)[0])[0]["groupId"] == "spy-svc"
    assert ops_metric(broker, "kiteq_bindings_refused_total") == 2
