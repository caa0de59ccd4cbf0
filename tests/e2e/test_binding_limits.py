"""Issue #9, bounded bindings end to end: declarations beyond the limits are refused.

Embedded registry: the ``Open`` fails with ``INVALID_ARGUMENT`` naming the limit, nothing
is bound; up to the limit everything routes. ZooKeeper: a node beyond the limit is skipped
and logged, the group keeps its previous bindings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import grpc
import pytest

from kiteq.binding.model import Binding as ModelBinding, dumps
from kiteq.client import Binding, Consumer, Message, Producer
from kiteq.proto.v1 import broker_pb2, broker_pb2_grpc, common_pb2
from tests.e2e.broker_process import BrokerProcess, write_config
from tests.e2e.collector import Collector
from tests.e2e.fixtures import ZkConfig
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

LIMITS: Final = {"maxBindingsPerGroupTopic": 5, "maxPatternLength": 16}


@pytest.fixture
def limited_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    config = write_config(tmp_path, db=f"rocksdb://{tmp_path / 'db'}", extra=dict(LIMITS))
    process = BrokerProcess(config)
    process.start()
    yield process
    process.stop_quietly()


def regex(pattern: str) -> common_pb2.Binding:
    return common_pb2.Binding(
        topic="trade", messageType=pattern, bindType=common_pb2.BIND_TYPE_REGEX, persistent=True
    )


def raw_open(broker: BrokerProcess, group: str, bindings: Sequence[common_pb2.Binding]) -> None:
    frame = broker_pb2.ClientFrame(
        open=broker_pb2.Open(
            groupId=group, secretKey="s", bindings=list(bindings), maxInFlight=10, protocolVersion=1
        )
    )
    with grpc.insecure_channel(broker.address) as channel:
        replies = broker_pb2_grpc.BrokerStub(channel).Session(iter([frame]), timeout=10)
        assert next(replies).WhichOneof("kind") == "opened"
        replies.cancel()


def test_bindings_beyond_the_limits_are_refused_on_open(limited_broker: BrokerProcess) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        raw_open(limited_broker, "acct-svc", [regex(f"^t{i}-") for i in range(6)])
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == (
        "group 'acct-svc' declares 6 bindings for topic 'trade'; "
        "the limit is 5 (maxBindingsPerGroupTopic)"
    )
    with pytest.raises(grpc.RpcError) as raised:
        raw_open(limited_broker, "acct-svc", [regex("^" + "a" * 16)])
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "17 characters for topic 'trade'; the limit is 16 (maxPatternLength)" in (
        raised.value.details() or ""
    )
    assert limited_broker.bindings("trade") == []

    # at the limit: bound, and every pattern routes
    got = Collector()
    patterns = [f"^t{i}-" for i in range(5)]
    with (
        Consumer(
            brokers=[limited_broker.address],
            group_id="acct-svc",
            secret_key="s",
            bindings=[Binding.regex("trade", p) for p in patterns],
            handler=got,
        ),
        Producer(brokers=[limited_broker.address], group_id="pay-svc", secret_key="s") as p,
    ):
        sent = [
            p.send(Message(topic="trade", message_type=f"t{i}-x", body=b"x")).message_id
            for i in range(5)
        ]
        got.wait_count(5)
    assert sorted(got.ids()) == sorted(sent)
    assert limited_broker.bindings("trade") == sorted(("acct-svc", p) for p in patterns)


@pytest.fixture
def zk_limited_broker(
    zk_config: ZkConfig, launch: Callable[..., BrokerProcess]
) -> Callable[[], BrokerProcess]:
    return lambda: launch(zk_config(LIMITS))


def test_zookeeper_node_beyond_the_limits_is_skipped(
    zk_limited_broker: Callable[[], BrokerProcess], zk: Any
) -> None:
    node = "/kiteq/sub/trade/acct-svc-bind"
    first = [ModelBinding.regex("trade", "^pay-").with_group("acct-svc")]
    zk.create(node, dumps(first), makepath=True)
    broker = zk_limited_broker()
    assert broker.bindings("trade") == [("acct-svc", "^pay-")]

    too_many = [ModelBinding.direct("trade", f"t{i}").with_group("acct-svc") for i in range(6)]
    zk.set(node, dumps(too_many))
    wait_until(
        lambda: any(
            f"malformed binding node path={node}" in line and "maxBindingsPerGroupTopic" in line
            for line in broker.output
        ),
        5,
        "the skipped node's log line",
    )
    assert broker.bindings("trade") == [("acct-svc", "^pay-")], "previous bindings kept"

    # the watch goes on: a node within the limits applies
    zk.set(node, dumps(too_many[:5]))
    wait_until(
        lambda: broker.bindings("trade") == [("acct-svc", f"t{i}") for i in range(5)],
        5,
        "the bindings within the limit",
    )
