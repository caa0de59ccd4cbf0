"""The Node.js conformance kit (tests/interop/) against real broker processes.

The golden tests of proto/PROTOCOL.md run in node's test runner; the cross-language runs
pass 10,000 messages each way between the kit and the Python client library. The npm
packages are installed by scripts/test.sh (``npm ci``); without node or them the tests
fail under CI and skip elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from kiteq.client import Binding, Consumer, Message, Producer, ReceivedMessage
from tests._servers import unavailable
from tests._servers.zookeeper import ManagedZooKeeper
from tests.e2e.broker_process import BrokerProcess, write_config, write_zk_config, zk_registry

KIT: Final = Path(__file__).resolve().parent
SECRET: Final = "right"
CROSS_COUNT: Final = 10_000


@pytest.fixture(scope="module")
def node() -> str:
    path = shutil.which("node")
    if path is None:
        unavailable("node (Node.js 20)")
    if not (KIT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        unavailable("the kit's npm packages (cd tests/interop && npm ci)")
    return path


def _broker(tmp_path: Path, **extra: object) -> Iterator[BrokerProcess]:
    config = write_config(
        tmp_path,
        db=f"rocksdb://{tmp_path / 'db'}?fsync=batch",
        extra={"txCheckDelaySeconds": 1, "txCheckIntervalSeconds": 1, **extra},
        secrets={"node": SECRET},
    )
    process = BrokerProcess(config)
    process.start()
    yield process
    process.stop_quietly()


def zk_broker(hosts: str, tmp_path: Path, topic: str) -> BrokerProcess:
    """A started broker of *topic* registered in ZooKeeper at *hosts* (with its chroot)."""
    config = write_zk_config(
        tmp_path, zk_registry(hosts), db=f"rocksdb://{tmp_path / 'db'}?fsync=batch", topics=[topic]
    )
    broker = BrokerProcess(config)
    broker.start()
    return broker


@pytest.fixture
def golden_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """deliverySeconds 2 (the ack-scope test waits it out), checks after 1 s."""
    yield from _broker(tmp_path)


@pytest.fixture
def delivery_first_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """deliveryFirst: pushed before it is stored, acked DELIVERED when every group acked."""
    directory = tmp_path / "delivery-first"
    directory.mkdir()
    yield from _broker(directory, deliveryFirst=True)


@pytest.fixture
def cross_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """deliverySeconds 60: on two busy cores a slow ack must not count as a duplicate."""
    yield from _broker(tmp_path, deliverySeconds=60)


def _node(node: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, *args], cwd=KIT, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_golden_rules_in_node(
    node: str, golden_broker: BrokerProcess, delivery_first_broker: BrokerProcess
) -> None:
    run = subprocess.run(
        [node, "--test", "--test-reporter=tap", "golden.test.js"],
        cwd=KIT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={
            **os.environ,
            "KITEQ_BROKER": golden_broker.address,
            "KITEQ_DELIVERY_FIRST_BROKER": delivery_first_broker.address,
        },
    )
    print(run.stdout[-20_000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-4000:]
    assert "# fail 0" in run.stdout


def test_node_producer_to_python_consumer(node: str, cross_broker: BrokerProcess) -> None:
    received: Counter[str] = Counter()
    attempts: Counter[int] = Counter()
    lock = threading.Lock()
    enough = threading.Event()

    def handle(message: ReceivedMessage) -> bool:
        with lock:
            received[message.message_id] += 1
            attempts[message.attempt] += 1
            if len(received) >= CROSS_COUNT:
                enough.set()
        return True

    with Consumer(
        brokers=[cross_broker.address],
        group_id="py-consumer",
        secret_key=SECRET,
        bindings=[Binding.direct("cross-n2p", "order")],
        handler=handle,
    ):
        run = _node(
            node,
            "produce.js",
            cross_broker.address,
            "node",
            SECRET,
            "cross-n2p",
            "order",
            str(CROSS_COUNT),
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-4000:]
        sent = json.loads(run.stdout.splitlines()[-1])
        assert (len(sent["sent"]), sent["failed"]) == (CROSS_COUNT, 0)
        assert enough.wait(180), f"{len(received)} of {CROSS_COUNT} received"
    assert set(received) == set(sent["sent"])  # 0 lost
    assert max(received.values()) == 1  # 0 duplicated
    assert set(attempts) == {1}


def test_python_producer_to_node_consumer(node: str, cross_broker: BrokerProcess) -> None:
    consumer = subprocess.Popen(
        [
            node,
            "consume.js",
            cross_broker.address,
            "node-consumer",
            SECRET,
            "cross-p2n",
            "order",
            str(CROSS_COUNT),
            "240",
        ],
        cwd=KIT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert consumer.stdout is not None
        assert consumer.stdout.readline().strip() == "ready"
        with Producer(brokers=[cross_broker.address], group_id="py", secret_key=SECRET) as p:
            futures = [
                p.send_async(Message(topic="cross-p2n", message_type="order", body=b"p:%d" % i))
                for i in range(CROSS_COUNT)
            ]
            sent = {f.result(timeout=120).message_id for f in futures}
        out, err = consumer.communicate(timeout=300)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()
    assert consumer.returncode == 0, err[-4000:]
    result = json.loads(out.splitlines()[-1])
    assert len(sent) == CROSS_COUNT
    assert set(result["ids"]) == sent  # 0 lost
    assert result["deliveries"] == CROSS_COUNT  # 0 duplicated
    assert result["maxAttempt"] == 1


def test_node_discovers_the_broker_in_zookeeper_and_its_bindings_are_applied(
    node: str, zookeeper: ManagedZooKeeper, zk: Any, tmp_path: Path
) -> None:
    hosts = zookeeper.hosts + zk.chroot
    broker = zk_broker(hosts, tmp_path, "interop")
    try:
        run = _node(node, "discover.js", hosts, "interop", "node-zk", timeout=120)
    finally:
        broker.stop_quietly()
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["brokers"] == [
        {"grpc": broker.address, "protocolVersion": 1, "proto": "kiteq.proto.v1"}
    ]
    # Open.bindings with zk://: written to the group's node in KiteQ's JSON, and applied
    assert result["bindNode"] == [
        {
            "groupId": "node-zk",
            "topic": "interop",
            "messageType": "created",
            "bindType": 0,
            "version": "1.0.0",
            "watermark": 0,
            "persistent": True,
        }
    ]
    assert result["received"] == result["sent"]


def test_a_shutdown_ends_a_node_session_with_unavailable(
    node: str, golden_broker: BrokerProcess
) -> None:
    session = subprocess.Popen(  # our own script
        [node, "shutdown.js", golden_broker.address],
        cwd=KIT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert session.stdout is not None
        assert session.stdout.readline().strip() == "ready"
        assert golden_broker.terminate() == 0
        out, err = session.communicate(timeout=60)
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
    assert session.returncode == 0, err[-4000:]
    assert json.loads(out.splitlines()[-1])["code"] == 14  # UNAVAILABLE


def test_a_star_broker_registers_a_topic_once_a_node_producer_writes_its_pub_node(
    node: str, zookeeper: ManagedZooKeeper, zk: Any, tmp_path: Path
) -> None:
    hosts = zookeeper.hosts + zk.chroot
    broker = zk_broker(hosts, tmp_path, "*")
    try:
        # before any pub/sub node names the topic, nothing is registered under it
        assert not zk.exists("/kiteq/server/fresh-topic")
        run = _node(node, "register.js", hosts, "fresh-topic", "node-pub", timeout=120)
    finally:
        broker.stop_quietly()
    assert run.returncode == 0, run.stderr[-4000:]
    assert json.loads(run.stdout.splitlines()[-1]) == {
        "grpc": broker.address,
        "protocolVersion": 1,
        "proto": "kiteq.proto.v1",
    }
