"""zk:// discovery against the real ZooKeeper fixture (each test in its own chroot).

Brokers appearing and disappearing under ``/kiteq/server/{topic}``, node data parsing,
the chroot, the producer's ``/kiteq/pub`` node, the consumer's ``-bind`` node (KiteQ's
JSON, not rewritten when equal), and producers / consumers following the registry with
fake brokers.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from kiteq.binding.model import Binding as ModelBinding, loads
from kiteq.client import AsyncConsumer, AsyncProducer, Binding, Message, ReceivedMessage
from kiteq.client._discovery import resolve
from kiteq.client._zk_directory import ZkDirectory, broker_address
from kiteq.core.errors import ConfigError, NotConnectedError
from tests._servers.zookeeper import ManagedZooKeeper
from tests.client._fake_broker import FakeBroker, pb_message
from tests.client._zk import expire_directory_session, opened_directory, wait_for_new_owner
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(60)


def data_of(address: str) -> bytes:
    """What our brokers write into their nodes."""
    return json.dumps({"grpc": address, "protocolVersion": 1, "proto": "kiteq.proto.v1"}).encode()


def register(zk: Any, topic: str, name: str, data: bytes | None = None) -> None:
    zk.create(f"/kiteq/server/{topic}/{name}", data or b"", ephemeral=True, makepath=True)


def unregister(zk: Any, topic: str, name: str) -> None:
    zk.delete(f"/kiteq/server/{topic}/{name}")


@pytest.fixture
def uri(zookeeper: ManagedZooKeeper, zk: Any) -> str:
    """The test's chroot as a client registry URI."""
    return f"zk://{zookeeper.hosts}{zk.chroot}?timeout=4"


@pytest.fixture
async def directory(uri: str) -> AsyncIterator[ZkDirectory]:
    async with opened_directory(uri) as found:
        yield found


def test_node_data_parsing() -> None:
    assert broker_address("10.0.0.1:13800", data_of("10.0.0.2:13801")) == "10.0.0.2:13801"
    # KiteQ's brokers write no data: the node name is the address
    assert broker_address("10.0.0.1:13800", b"") == "10.0.0.1:13800"
    assert broker_address("10.0.0.1:13800", None) == "10.0.0.1:13800"
    # unreadable or incomplete data: the name
    assert broker_address("10.0.0.1:13800", b"{not json") == "10.0.0.1:13800"
    assert broker_address("10.0.0.1:13800", b'{"grpc": 5}') == "10.0.0.1:13800"
    assert broker_address("10.0.0.1:13800", b'{"grpc": "nohost"}') == "10.0.0.1:13800"
    # KiteQ's -bind=:port: this host
    assert broker_address(":13800", b"") == "localhost:13800"
    assert broker_address("garbage", b"") is None
    assert broker_address("h:99999", b"") is None


def test_uri_errors() -> None:
    with pytest.raises(ConfigError, match="no ZooKeeper host"):
        resolve(None, "zk://")
    with pytest.raises(ConfigError, match="unknown parameter"):
        resolve(None, "zk://127.0.0.1:2181?nope=1")
    with pytest.raises(ConfigError, match="not both"):
        resolve(["127.0.0.1:1"], "zk://127.0.0.1:2181")


async def test_brokers_appear_and_disappear(directory: ZkDirectory, uri: str, zk: Any) -> None:
    register(zk, "trade", "10.0.0.1:13800", data_of("127.0.0.1:13800"))
    register(zk, "trade", "10.0.0.9:13800")  # a KiteQ broker: no data
    changes: list[list[str]] = []
    directory.add_listener(lambda: changes.append(sorted(directory.brokers_for("trade"))))
    assert not directory.watching("trade")
    await directory.watch(["trade", "empty"], timeout=10)
    assert directory.watching("trade")
    assert sorted(directory.brokers_for("trade")) == ["10.0.0.9:13800", "127.0.0.1:13800"]
    assert directory.brokers_for("empty") == []
    assert zk.exists("/kiteq/server/empty") is not None  # created so it can be watched
    assert directory.brokers_for("unwatched") == []

    register(zk, "trade", "10.0.0.2:13800", data_of("127.0.0.2:13800"))
    await eventually(lambda: "127.0.0.2:13800" in directory.brokers_for("trade"))
    unregister(zk, "trade", "10.0.0.1:13800")
    await eventually(lambda: "127.0.0.1:13800" not in directory.brokers_for("trade"))
    assert sorted(directory.brokers_for("trade")) == ["10.0.0.9:13800", "127.0.0.2:13800"]
    register(zk, "empty", "bad name")  # no host:port: skipped
    register(zk, "empty", "10.0.0.3:1")
    await eventually(lambda: directory.brokers_for("empty") == ["10.0.0.3:1"])
    assert sorted(directory.every()) == ["10.0.0.3:1", "10.0.0.9:13800", "127.0.0.2:13800"]
    assert changes[-1] == ["10.0.0.9:13800", "127.0.0.2:13800"]

    await directory.close()
    # a directory still open sees the next broker come: by then the closed one, were it
    # still following, would have been told too
    async with opened_directory(uri) as witness:
        await witness.watch(["trade"], timeout=10)
        register(zk, "trade", "10.0.0.4:1")
        await eventually(lambda: "10.0.0.4:1" in witness.brokers_for("trade"))
    assert "10.0.0.4:1" not in directory.brokers_for("trade")  # closed: no longer followed
    assert changes[-1] == ["10.0.0.9:13800", "127.0.0.2:13800"]


async def test_chroot_is_created_and_used(zookeeper: ManagedZooKeeper, zk: Any) -> None:
    async with opened_directory(f"zk://{zookeeper.hosts}{zk.chroot}/deeper/root") as found:
        zk.create("/deeper/root/kiteq/server/trade/127.0.0.1:5", b"", makepath=True)
        await found.watch(["trade"], timeout=10)
        assert found.brokers_for("trade") == ["127.0.0.1:5"]


async def test_producer_node(directory: ZkDirectory, zk: Any) -> None:
    await directory.start(10)
    directory.publish_producer("trade", "pay-svc")
    path = f"/kiteq/pub/trade/pay-svc/{socket.gethostname()}"
    await eventually(lambda: zk.exists(path) is not None)
    stat = zk.exists(path)
    assert stat.ephemeralOwner != 0  # ephemeral: goes with the client
    await directory.close()
    await eventually(lambda: zk.exists(path) is None)


async def test_bind_node_written_in_kiteq_format_once(directory: ZkDirectory, zk: Any) -> None:
    bindings = [
        Binding.direct("trade", "pay-succ", watermark=10),
        Binding.regex("trade", "pay-.*"),
        Binding.direct("user", "profile"),
    ]
    await directory.write_bindings("acct-svc", bindings, timeout=10)
    raw, stat = zk.get("/kiteq/sub/trade/acct-svc-bind")
    assert stat.ephemeralOwner == 0  # persistent, as KiteQ's clients write it
    items = json.loads(raw)
    assert [item["messageType"] for item in items] == ["pay-succ", "pay-.*"]
    assert set(items[0]) == {
        "groupId",
        "topic",
        "messageType",
        "bindType",
        "version",
        "watermark",
        "persistent",
    }
    assert {item["groupId"] for item in items} == {"acct-svc"}
    assert list(loads(raw)) == [
        ModelBinding.direct("trade", "pay-succ", watermark=10).with_group("acct-svc"),
        ModelBinding.regex("trade", "pay-.*").with_group("acct-svc"),
    ]
    assert zk.exists("/kiteq/sub/user/acct-svc-bind") is not None

    # equal bindings: not rewritten
    await directory.write_bindings("acct-svc", bindings, timeout=10)
    assert zk.exists("/kiteq/sub/trade/acct-svc-bind").mzxid == stat.mzxid
    # different: rewritten
    await directory.write_bindings("acct-svc", bindings[:1], timeout=10)
    assert len(json.loads(zk.get("/kiteq/sub/trade/acct-svc-bind")[0])) == 1


async def test_producer_follows_the_registry(uri: str, zk: Any) -> None:
    async with FakeBroker() as first, FakeBroker() as second:
        register(zk, "trade", "node-a:1", data_of(first.address))
        async with AsyncProducer(registry=uri, group_id="pay-svc", timeout=10) as producer:
            result = await producer.send(Message(topic="trade", message_type="t", body=b"1"))
            assert result.broker == first.address
            pub = f"/kiteq/pub/trade/pay-svc/{socket.gethostname()}"
            await eventually(lambda: zk.exists(pub) is not None)

            # the second broker appears, the first leaves: sends follow
            register(zk, "trade", "node-b:1", data_of(second.address))
            unregister(zk, "trade", "node-a:1")
            await eventually(lambda: producer.connected_brokers == [second.address])
            for i in range(20):
                result = await producer.send(Message(topic="trade", message_type="t", body=b"x"))
                assert result.broker == second.address, i
            await eventually(lambda: not [s for s in first.sessions if not s.closed])

            # a topic with no broker yet: the send waits for one to register
            async with FakeBroker() as third:
                pending = asyncio.ensure_future(
                    producer.send(Message(topic="late", message_type="t", body=b"y"))
                )
                # the topic's producer node is written once its look-up has returned
                # (no broker) and the producer has applied that: the send still waits
                late_pub = f"/kiteq/pub/late/pay-svc/{socket.gethostname()}"
                await eventually(lambda: zk.exists(late_pub) is not None)
                assert not pending.done()
                register(zk, "late", "node-c:1", data_of(third.address))
                assert (await pending).broker == third.address


async def test_producer_fails_over_with_the_same_id(uri: str, zk: Any) -> None:
    async with FakeBroker() as first, FakeBroker() as second:
        register(zk, "trade", "node-a:1", data_of(first.address))
        register(zk, "trade", "node-b:1", data_of(second.address))
        async with AsyncProducer(registry=uri, group_id="pay-svc", timeout=10) as producer:
            await producer.send(Message(topic="trade", message_type="t", body=b"0"))
            await eventually(lambda: len(producer.connected_brokers) == 2)
            # whichever broker gets the next batch holds its acks, then drops the stream
            first.hold = second.hold = True
            message = Message(topic="trade", message_type="t", body=b"1")
            pending = asyncio.ensure_future(producer.send(message))
            await eventually(lambda: message.message_id in first.seen | second.seen)
            holder, other = (first, second) if message.message_id in first.seen else (second, first)
            other.hold = False
            holder.held.clear()
            holder.drop_sessions()
            result = await pending
            assert result.broker == other.address
            assert result.message_id == message.message_id
            assert other.seen[message.message_id] == 1


async def test_consumer_follows_the_registry(uri: str, zk: Any) -> None:
    got: list[ReceivedMessage] = []
    async with FakeBroker() as first, FakeBroker() as second:
        register(zk, "trade", "node-a:1", data_of(first.address))
        consumer = AsyncConsumer(
            registry=uri,
            group_id="acct-svc",
            bindings=[Binding.direct("trade", "pay-succ")],
            handler=got.append,
        )
        async with consumer:
            # the bindings were written before the stream opened
            bind = loads(zk.get("/kiteq/sub/trade/acct-svc-bind")[0])
            assert [b.message_type for b in bind] == ["pay-succ"]
            assert consumer.connected_brokers == [first.address]

            register(zk, "trade", "node-b:1", data_of(second.address))
            await eventually(lambda: len(second.consumer_sessions()) == 1)
            second.push([pb_message("trade", "pay-succ", b"from-b")])
            first.push([pb_message("trade", "pay-succ", b"from-a")])
            await eventually(lambda: len(got) == 2)

            unregister(zk, "trade", "node-a:1")
            await eventually(lambda: not first.consumer_sessions())
            assert consumer.connected_brokers == [second.address]


async def test_consumer_waits_for_a_broker(uri: str, zk: Any) -> None:
    async with (
        FakeBroker() as broker,
        AsyncConsumer(
            registry=uri,
            group_id="acct-svc",
            bindings=[Binding.direct("trade", "pay-succ")],
            handler=lambda _message: True,
            connect_timeout=2,
        ) as consumer,
    ):
        assert consumer.connected_brokers == []
        register(zk, "trade", "node-a:1", data_of(broker.address))
        await eventually(lambda: consumer.connected_brokers == [broker.address])


async def test_session_loss_keeps_brokers_and_recreates_the_producer_node(
    directory: ZkDirectory, zookeeper: ManagedZooKeeper, zk: Any
) -> None:
    register(zk, "trade", "node-a:1", data_of("127.0.0.1:7"))
    await directory.watch(["trade"], timeout=10)
    directory.publish_producer("trade", "pay-svc")
    path = f"/kiteq/pub/trade/pay-svc/{socket.gethostname()}"
    await eventually(lambda: zk.exists(path) is not None)
    kazoo = directory.session.client
    old_session = await expire_directory_session(directory, zookeeper.hosts)
    # the brokers stay known throughout; the ephemeral node comes back in the new session
    assert directory.brokers_for("trade") == ["127.0.0.1:7"]
    assert await wait_for_new_owner(zk, path, old_session) == kazoo.client_id[0]
    assert directory.session.client is kazoo  # the same client: never restarted
    # and the watch is re-armed on the new session
    register(zk, "trade", "node-b:1", data_of("127.0.0.1:8"))
    await eventually(lambda: "127.0.0.1:8" in directory.brokers_for("trade"), timeout=10)


async def test_unreachable_zookeeper_fails_sends_at_their_deadline() -> None:
    async with AsyncProducer(
        registry="zk://127.0.0.1:1?timeout=2", group_id="pay-svc", timeout=1.5, close_timeout=0
    ) as producer:
        started = asyncio.get_running_loop().time()
        with pytest.raises(NotConnectedError, match="no broker reachable"):
            await producer.send(Message(topic="trade", message_type="t", body=b"1"))
        assert asyncio.get_running_loop().time() - started < 5
