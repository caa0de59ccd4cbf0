"""Issue #3 end to end: real broker processes registered in a real ZooKeeper (a chroot each).

Layout exactly as KiteQ's; a binding written by a KiteQ client routes messages; changes
applied by a running broker within 2 s; the broker's session expired for real (the process
is frozen with SIGSTOP beyond the session timeout) and its nodes come back; graceful
shutdown removes the nodes before draining; ``-bind=:port`` publishes a reachable address.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiteq.binding.model import Binding as ModelBinding, dumps
from kiteq.broker.server import Broker
from kiteq.client import Binding, Message, ReceivedMessage
from kiteq.core.config import load_cluster
from tests._servers.zookeeper import ManagedZooKeeper, owner
from tests.e2e import broker_process
from tests.e2e.broker_process import BrokerProcess, zk_registry
from tests.e2e.collector import Collector
from tests.e2e.helpers import consumer, producer
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

# what a KiteQ (Go) consumer writes for Bind_Regx("acct-svc", "trade", "pay-.*", 1000, true)
KITEQ_JSON: Final = (
    b'[{"groupId":"acct-svc","topic":"trade","messageType":"pay-.*","bindType":1,'
    b'"version":"1.0.0","watermark":1000,"persistent":true}]'
)


@pytest.fixture
def start_broker(
    zookeeper: ManagedZooKeeper, zk: Any, tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> Callable[[list[str]], BrokerProcess]:
    def start(topics: list[str]) -> BrokerProcess:
        return launch(write_zk_config(tmp_path, zookeeper.hosts + zk.chroot, topics))

    return start


def write_zk_config(tmp_path: Path, hosts: str, topics: list[str]) -> Path:
    """A cluster whose registry is the test's ZooKeeper chroot (session timeout 4 s)."""
    return broker_process.write_zk_config(
        tmp_path,
        zk_registry(hosts),
        db=f"rocksdb://{tmp_path / 'db'}?fsync=batch",
        topics=topics,
        extra={"deliverySeconds": 5, "recoverSeconds": 1},
    )


def applied_within(
    broker: BrokerProcess, topic: str, wanted: list[tuple[str, str]], limit: float = 2.0
) -> float:
    """Seconds until the running broker's bindings for *topic* are *wanted* (at most *limit*)."""
    started = time.monotonic()
    while (current := broker.bindings(topic)) != wanted:
        elapsed = time.monotonic() - started
        assert elapsed < limit, f"not applied within {limit}s: {current}"
        time.sleep(0.02)
    return time.monotonic() - started


def test_registration_layout(start_broker: Callable[..., BrokerProcess], zk: Any) -> None:
    broker = start_broker(["trade", "user-profile"])
    address = broker.address
    data = {"grpc": address, "protocolVersion": 1, "proto": "kiteq.proto.v1"}
    session = owner(zk, f"/kiteq/alive_servers/{address}")
    assert session not in (None, 0)
    for path in (
        f"/kiteq/server/trade/{address}",
        f"/kiteq/server/user-profile/{address}",
        f"/kiteq/alive_servers/{address}",
    ):
        raw, stat = zk.get(path)
        assert (stat.ephemeralOwner, json.loads(raw)) == (session, data), path
    raw, stat = zk.get(f"/kiteq/all_servers/{address}")
    assert (stat.ephemeralOwner, json.loads(raw)) == (0, data)
    for topic in ("trade", "user-profile"):
        for root in ("server", "pub", "sub"):
            assert owner(zk, f"/kiteq/{root}/{topic}") == 0
    assert zk.get_children("/kiteq/server/trade") == [address]

    # a Python consumer's declared bindings land in its -bind node, in KiteQ's JSON
    got = Collector()
    with (
        consumer(broker, "acct-svc", [Binding.direct("trade", "pay-succ", watermark=10)], got),
        producer(broker) as p,
    ):
        raw, stat = zk.get("/kiteq/sub/trade/acct-svc-bind")
        assert stat.ephemeralOwner == 0
        assert json.loads(raw) == [
            {
                "groupId": "acct-svc",
                "topic": "trade",
                "messageType": "pay-succ",
                "bindType": 0,
                "version": "1.0.0",
                "watermark": 10,
                "persistent": True,
            }
        ]
        sent = p.send(Message(topic="trade", message_type="pay-succ", body=b"x")).message_id
        got.wait_count(1)
    assert got.ids() == [sent]


def test_kiteq_binding_written_into_zookeeper_routes_and_changes_apply_live(
    start_broker: Callable[..., BrokerProcess], zk: Any
) -> None:
    node = "/kiteq/sub/trade/acct-svc-bind"
    zk.create(node, KITEQ_JSON, makepath=True)
    broker = start_broker(["trade", "aux"])
    assert broker.bindings("trade") == [("acct-svc", "pay-.*")]
    got = Collector()
    # the group's consumer declares on another topic only: the trade node stays KiteQ's
    with (
        consumer(broker, "acct-svc", [Binding.direct("aux", "noop")], got),
        producer(broker) as p,
    ):
        sent = [
            p.send(Message(topic="trade", message_type=t, body=t.encode())).message_id
            for t in ("pay-succ", "pay-fail")
        ]
        got.wait_count(2)
        assert sorted(got.ids()) == sorted(sent)
        assert zk.get(node)[0] == KITEQ_JSON

        # changed
        zk.set(node, dumps([ModelBinding.direct("trade", "refund").with_group("acct-svc")]))
        applied_within(broker, "trade", [("acct-svc", "refund")])
        refund = p.send(Message(topic="trade", message_type="refund", body=b"r")).message_id
        got.wait_for(lambda received: refund in {m.message_id for m in received})

        # another group added; then the first removed: the other group is untouched
        zk.create(
            "/kiteq/sub/trade/audit-svc-bind",
            b'[{"groupId":"audit-svc","topic":"trade","messageType":"*","bindType":2,'
            b'"version":"1.0.0","watermark":0,"persistent":true}]',
        )
        applied_within(broker, "trade", [("acct-svc", "refund"), ("audit-svc", "*")])
        zk.delete(node)
        applied_within(broker, "trade", [("audit-svc", "*")])


def test_session_expired_for_real_nodes_come_back_and_delivery_goes_on(
    start_broker: Callable[..., BrokerProcess], zk: Any
) -> None:
    broker = start_broker(["trade"])
    assert broker.proc is not None
    alive = f"/kiteq/alive_servers/{broker.address}"
    server = f"/kiteq/server/trade/{broker.address}"
    old = owner(zk, alive)
    got = Collector()
    with consumer(broker, "acct-svc", [Binding.fanout("trade")], got):
        # frozen past its 4 s session timeout, the broker cannot ping: the server expires
        # the session and deletes its ephemeral nodes
        os.kill(broker.proc.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: owner(zk, alive) is None, 20, "the session to expire")
            assert owner(zk, server) is None
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        wait_until(lambda: owner(zk, alive) not in (None, old), 20, "re-registration")
        new = owner(zk, alive)
        assert owner(zk, server) == new
        assert json.loads(zk.get(server)[0])["grpc"] == broker.address
        with producer(broker) as p:
            sent = p.send(Message(topic="trade", message_type="after", body=b"x")).message_id
        got.wait_for(lambda received: sent in {m.message_id for m in received})
    output = "\n".join(broker.output)
    assert "zookeeper session lost" in output
    assert f"zookeeper connected session=0x{new:x} (new session)" in output


def test_graceful_shutdown_removes_the_nodes_before_draining(
    start_broker: Callable[..., BrokerProcess], zk: Any
) -> None:
    broker = start_broker(["trade"])
    assert broker.proc is not None
    server = f"/kiteq/server/trade/{broker.address}"
    entered = threading.Event()
    release = threading.Event()

    def hold(message: ReceivedMessage) -> bool:
        entered.set()
        release.wait(30)
        return True

    with consumer(broker, "acct-svc", [Binding.fanout("trade")], hold):
        with producer(broker) as p:
            p.send(Message(topic="trade", message_type="slow", body=b"x"))
        assert entered.wait(20)
        # an unacked delivery: the drain waits for it (up to deliverySeconds)
        broker.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: owner(zk, server) is None, 5, "the server node to go")
        still_running = broker.proc.poll() is None
        release.set()
    assert still_running
    assert broker.proc.wait(20) == 0
    assert owner(zk, f"/kiteq/alive_servers/{broker.address}") is None
    assert owner(zk, f"/kiteq/all_servers/{broker.address}") == 0
    output = "\n".join(broker.output)
    assert output.index("unregistered from zookeeper") < output.index("stopping: refusing")


def _outward_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


async def test_bind_without_host_publishes_a_reachable_address(
    zookeeper: ManagedZooKeeper, zk: Any, tmp_path: Path
) -> None:
    config = load_cluster(write_zk_config(tmp_path, zookeeper.hosts + zk.chroot, ["trade"]), "e2e")
    broker = Broker(config, bind=":0", grace=1)
    await broker.start()
    try:
        (name,) = zk.get_children("/kiteq/server/trade")
        assert name == broker.advertised
        host, _, published_port = name.rpartition(":")
        assert host
        assert published_port == str(broker.port)
        outward = _outward_address()
        if outward is not None:  # a machine with a network: never a loopback address
            assert host == outward
        async with grpc.aio.insecure_channel(name) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await broker.stop()
    assert zk.get_children("/kiteq/server/trade") == []


def overview_brokers(broker: BrokerProcess) -> list[dict[str, Any]]:
    """``/api/overview``'s brokers on *broker*'s console (a dev cluster: no secret)."""
    url = f"{broker.ops_url}/api/overview"
    with urllib.request.urlopen(url, timeout=5) as reply:
        brokers: list[dict[str, Any]] = json.load(reply)["brokers"]
    return brokers


def test_the_console_overview_lists_the_live_brokers_of_the_cluster(
    zookeeper: ManagedZooKeeper, zk: Any, tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    hosts = zookeeper.hosts + zk.chroot
    first = launch(write_zk_config(tmp_path / "a", hosts, ["trade"]), pport=0)
    second = launch(write_zk_config(tmp_path / "b", hosts, ["trade"]))

    def listed() -> list[tuple[str, bool]]:
        return [(b["address"], b["self"]) for b in overview_brokers(first)]

    # this broker first, with its own figures; then the others, from /kiteq/alive_servers
    wait_until(lambda: len(listed()) == 2, 20, "both brokers listed")
    assert listed() == [(first.address, True), (second.address, False)]
    [own, other] = overview_brokers(first)
    assert own["store"].startswith("rocksdb://")
    assert own["uptime"] >= 0
    assert other == {"address": second.address, "self": False, "cluster": "e2e"}
    assert second.terminate() == 0  # a graceful stop deletes its alive node first
    wait_until(lambda: listed() == [(first.address, True)], 20, "the stopped broker gone")
