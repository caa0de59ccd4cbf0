"""Issue #3 acceptance: producer failover and consumers on every broker, through zk://.

Two real broker processes (RocksDB, each its own store) register a topic in a real
ZooKeeper (a chroot per test). A producer found them through ``zk://`` and publishes
continuously, recording every acked id and the broker that acked it. One broker is
SIGKILLed: publishing goes on on the other. The killed broker restarts on its store. A
consumer connected through ``zk://`` to both brokers the whole time, and a second group
that connects only after the restart (its persistent binding written in KiteQ's JSON),
each receive every acked message: lost == 0, from both brokers.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from kiteq.client import Binding, Consumer, Message, Producer
from kiteq.core.errors import KiteQError
from tests._servers.zookeeper import ManagedZooKeeper
from tests.e2e.broker_process import BrokerProcess, write_zk_config, zk_registry
from tests.e2e.collector import Collector
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(90)

SECRET: Final = "s3cret"
TOPIC: Final = "trade"
# a KiteQ (Go) consumer's binding: persistent, so the group's messages wait for it
LATE_BIND: Final = (
    b'[{"groupId":"late-svc","topic":"trade","messageType":"pay-succ","bindType":0,'
    b'"version":"1.0.0","watermark":0,"persistent":true}]'
)


def write_config(directory: Path, hosts: str) -> Path:
    return write_zk_config(
        directory,
        zk_registry(hosts),
        db=f"rocksdb://{directory / 'db'}?fsync=batch",
        topics=[TOPIC],
        extra={"deliverySeconds": 5, "recoverSeconds": 1},
    )


class Publisher(threading.Thread):
    """Publishes one message at a time until stopped; records acks by broker."""

    def __init__(self, registry: str) -> None:
        super().__init__(name="publisher", daemon=True)
        self.producer = Producer(
            registry=registry, group_id="pay-svc", secret_key=SECRET, timeout=15
        )
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.acked: dict[str, str] = {}  # message id -> broker
        self.failed: list[str] = []

    def run(self) -> None:
        while not self.stop_event.is_set():
            message = Message(topic=TOPIC, message_type="pay-succ", body=b"x" * 64)
            try:
                result = self.producer.send(message)
            except KiteQError as exc:
                with self.lock:
                    self.failed.append(f"{message.message_id}: {exc!r}")
                continue
            with self.lock:
                self.acked[result.message_id] = result.broker

    def by_broker(self) -> Counter[str]:
        with self.lock:
            return Counter(self.acked.values())

    def count(self) -> int:
        with self.lock:
            return len(self.acked)


@pytest.fixture
def brokers(zookeeper: ManagedZooKeeper, zk: Any, tmp_path: Path) -> Iterator[list[BrokerProcess]]:
    hosts = zookeeper.hosts + zk.chroot
    started = [BrokerProcess(write_config(tmp_path / name, hosts)) for name in ("a", "b")]
    try:
        for broker in started:
            broker.start()
        yield started
    finally:
        for broker in started:
            broker.stop_quietly()


def test_failover(brokers: list[BrokerProcess], zookeeper: ManagedZooKeeper, zk: Any) -> None:
    began = time.monotonic()
    victim, survivor = brokers
    registry = f"zk://{zookeeper.hosts}{zk.chroot}?timeout=4"
    zk.create("/kiteq/sub/trade/late-svc-bind", LATE_BIND, makepath=True)
    wait_until(lambda: len(zk.get_children(f"/kiteq/server/{TOPIC}")) == 2, 10, "both registered")

    live = Collector()
    late = Collector()
    binding = [Binding.direct(TOPIC, "pay-succ")]
    consumer = Consumer(
        registry=registry,
        group_id="acct-svc",
        secret_key=SECRET,
        bindings=binding,
        handler=live,
        reconnect_max_delay=1.0,
    )
    publisher = Publisher(registry)
    try:
        with consumer:
            assert sorted(consumer._consumer.connected_brokers) == sorted(
                b.address for b in brokers
            )
            publisher.start()
            wait_until(
                lambda: min(publisher.by_broker()[b.address] for b in brokers) >= 50,
                15,
                "acks from both brokers",
            )

            victim.kill()  # SIGKILL
            killed_at = publisher.count()
            acked_before = dict(publisher.acked)
            wait_until(lambda: publisher.count() >= killed_at + 200, 15, "acks after the kill")
            after_kill = publisher.count() - killed_at
            assert publisher.by_broker()[survivor.address] > 0
            # its node expires with its ZooKeeper session: clients drop it, publishing goes on
            wait_until(
                lambda: victim.address not in zk.get_children(f"/kiteq/server/{TOPIC}"),
                15,
                "the killed broker's node to expire",
            )
            expired_at = publisher.count()
            wait_until(lambda: publisher.count() >= expired_at + 50, 10, "acks after expiry")

            victim.start()  # same port, same store
            on_victim = publisher.by_broker()[victim.address]
            wait_until(
                lambda: publisher.by_broker()[victim.address] > on_victim,
                15,
                "acks from the restarted broker",
            )
            publisher.stop_event.set()
            publisher.join(20)
            assert not publisher.is_alive()
            publisher.producer.close()

            acked = dict(publisher.acked)
            with Consumer(
                registry=registry,
                group_id="late-svc",
                secret_key=SECRET,
                bindings=binding,
                handler=late,
            ):
                for got in (live, late):
                    got.wait_for(lambda seen: acked.keys() <= {m.message_id for m in seen}, 30)
            live_connected = sorted(consumer._consumer.connected_brokers)
    finally:
        publisher.stop_event.set()
        if publisher.is_alive():
            publisher.join(20)
        publisher.producer.close()

    victim_acked = [i for i, b in acked_before.items() if b == victim.address]
    by_broker = Counter(acked.values())
    print(
        f"\nfailover: acked={len(acked)} (before kill {killed_at}, after kill {after_kill})"
        f" by broker={dict(by_broker)} send failures={len(publisher.failed)}"
        f" elapsed={time.monotonic() - began:.1f}s"
    )
    for name, got in (("live", live), ("late", late)):
        received = Counter(got.ids())
        lost = [i for i in acked if i not in received]
        duplicated = sum(1 for n in received.values() if n > 1)
        print(
            f"{name}: acked={len(acked)} received={len(received)} lost={len(lost)}"
            f" duplicated={duplicated}"
        )
        assert lost == [], name
    assert set(by_broker) == {victim.address, survivor.address}
    # the dead broker's acked messages were delivered after its restart to the late group
    assert victim_acked
    assert set(victim_acked) <= set(late.ids())
    assert live_connected == sorted(b.address for b in brokers)
    assert publisher.failed == []
