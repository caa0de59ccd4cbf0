"""Crash tests: a broker SIGKILLed under continuous publishing loses no acknowledged message.

For RocksDB (fsync=batch) and MySQL: a consumer declares a persistent binding and goes
offline; a producer process publishes without pause (``send_async``), writing the id of
every store-acked message to a file; the broker is SIGKILLed mid-stream and restarted on
the same port (the producer reconnects and goes on); then the consumer comes back and
must receive every acked message. Each run prints acked, lost (must be 0), duplicated
(delivered more than once) and unacked-but-delivered counts.

Issue #10: the same with three groups on the message, one of which fails every delivery
(deliverLimit 2): the healthy group (connected across the kill) and the offline group
(connecting at the end) lose nothing, and the failing group's copies are all in the DLQ
under its name.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from kiteq.client import Binding, Consumer
from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc
from tests._servers import unavailable
from tests.e2e.broker_process import REPO, BrokerProcess, write_config
from tests.e2e.collector import Collector
from tests.store import mariadb
from tests.waiting import wait_until

PUBLISHER = Path(__file__).with_name("publisher.py")
BINDING = Binding.fanout("trade", persistent=True)
GROUP = "acct-svc"
SECRET = "s3cret"
# acks wanted before the kill, and from the restarted broker before the producer stops
ACKED_BEFORE_KILL = 3000
ACKED_AFTER_RESTART = 1000


@contextmanager
def store_url(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "rocksdb":
        yield f"rocksdb://{tmp_path / 'db'}?fsync=batch"
        return
    if not mariadb.available():
        unavailable("MariaDB")
    # no kiteServer here: the broker sets its own owner name (its advertised host:port)
    with mariadb.databases(4) as prefix:
        yield mariadb.url(prefix, shardnum=4)


@contextmanager
def crash_broker(kind: str, tmp_path: Path) -> Iterator[BrokerProcess]:
    """A started broker on *kind*'s store (deliverySeconds 5, recoverSeconds 1)."""
    with store_url(kind, tmp_path) as db:
        config = write_config(tmp_path, db=db, extra={"deliverySeconds": 5, "recoverSeconds": 1})
        broker = BrokerProcess(config)
        broker.start()
        try:
            yield broker
        finally:
            broker.stop_quietly()


def consumer(broker: BrokerProcess, handler: Collector, group: str = GROUP) -> Consumer:
    return Consumer(
        brokers=[broker.address],
        group_id=group,
        secret_key=SECRET,
        bindings=[BINDING],
        handler=handler,
        reconnect_max_delay=0.5,
    )


def acked_ids(path: Path) -> tuple[set[str], str]:
    lines = path.read_text().splitlines() if path.exists() else []
    summary = lines[-1] if lines and lines[-1].startswith("#") else ""
    return {line for line in lines if line and not line.startswith("#")}, summary


def publish_through_a_kill(
    broker: BrokerProcess, tmp_path: Path, *publisher_args: str
) -> tuple[set[str], str, int]:
    """Publish from a producer process, SIGKILL *broker* mid-stream and restart it.

    The kill comes after ACKED_BEFORE_KILL store-acks; the producer stops once the
    restarted broker has acked ACKED_AFTER_RESTART more. Returns the acked ids, the
    producer's summary line and the number acked at the kill.
    """
    acked_file, stop_file = tmp_path / "acked.txt", tmp_path / "stop"
    publisher = subprocess.Popen(
        [
            sys.executable,
            str(PUBLISHER),
            broker.address,
            str(acked_file),
            str(stop_file),
            "120",
            *publisher_args,
        ],
        cwd=REPO,
    )
    try:
        wait_until(
            lambda: len(acked_ids(acked_file)[0]) >= ACKED_BEFORE_KILL,
            60,
            f"{ACKED_BEFORE_KILL} acks before the kill",
        )
        broker.kill()  # SIGKILL, in the middle of the stream
        acked_at_kill = len(acked_ids(acked_file)[0])
        broker.start()
        wait_until(
            lambda: len(acked_ids(acked_file)[0]) >= acked_at_kill + ACKED_AFTER_RESTART,
            60,
            f"{ACKED_AFTER_RESTART} acks after the restart",
        )
        stop_file.touch()
        publisher.wait(90)
    finally:
        if publisher.poll() is None:
            publisher.kill()
            publisher.wait(10)
    assert publisher.returncode == 0
    acked, summary = acked_ids(acked_file)
    assert summary, "the publisher did not finish"
    return acked, summary, acked_at_kill


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["rocksdb", "mysql"])
def test_sigkill_under_continuous_publishing_loses_no_acked_message(
    kind: str, tmp_path: Path
) -> None:
    with crash_broker(kind, tmp_path) as broker:
        # declare the persistent binding, then go offline: everything stays stored
        with consumer(broker, Collector()):
            pass
        acked, summary, acked_at_kill = publish_through_a_kill(broker, tmp_path)
        got = Collector()
        with consumer(broker, got):
            wait_until(lambda: acked <= set(got.ids()), 120, "every acked message")
            wait_until(lambda: not any(broker.stats().backlog.values()), 60, "an empty backlog")
        received = Counter(got.ids())

    lost = acked - set(received)
    duplicated = sum(1 for n in received.values() if n > 1)
    unacked_delivered = len(set(received) - acked)
    print(
        f"\ncrash test {kind}: acked={len(acked)} (at kill {acked_at_kill}) lost={len(lost)} "
        f"duplicated={duplicated} delivered_without_ack={unacked_delivered} "
        f"received={len(received)} publisher: {summary.lstrip('# ')}"
    )
    assert not lost, f"{len(lost)} acked messages lost, e.g. {sorted(lost)[:5]}"


def dead_letter_ids(broker: BrokerProcess, group: str) -> set[str]:
    """Every dead letter of *group*, page by page."""
    found: set[str] = set()
    after, after_group = "", ""
    with grpc.insecure_channel(broker.address) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        while True:
            reply = stub.ListDeadLetters(
                admin_pb2.ListDeadLettersRequest(
                    filter=admin_pb2.DeadLetterFilter(groupId=group),
                    limit=1000,
                    after=after,
                    afterGroup=after_group,
                ),
                timeout=10,
            )
            found.update(d.header.messageId for d in reply.deadLetters)
            if not reply.next:
                return found
            after, after_group = reply.next, reply.nextGroup


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["rocksdb", "mysql"])
def test_sigkill_with_a_failing_group_loses_nothing_for_the_healthy_and_offline_groups(
    kind: str, tmp_path: Path
) -> None:
    with crash_broker(kind, tmp_path) as broker:
        healthy, failing, offline = Collector(), Collector(lambda _: False), Collector()
        with consumer(broker, Collector(), "offline"):
            pass  # declares its persistent binding, then stays away until the end
        with consumer(broker, healthy, "healthy"), consumer(broker, failing, "failing"):
            # the kill comes while all three groups have messages to settle
            acked, summary, acked_at_kill = publish_through_a_kill(broker, tmp_path, "2")
            wait_until(lambda: acked <= set(healthy.ids()), 120, "the healthy group")
            wait_until(
                lambda: acked <= dead_letter_ids(broker, "failing"),
                120,
                "the failing group's dead letters",
            )
        with consumer(broker, offline, "offline"):
            wait_until(lambda: acked <= set(offline.ids()), 120, "the offline group")
            wait_until(lambda: not any(broker.stats().backlog.values()), 60, "an empty backlog")

    healthy_got, offline_got = Counter(healthy.ids()), Counter(offline.ids())
    print(
        f"\ncrash test {kind}, three groups: acked={len(acked)} (at kill {acked_at_kill}) "
        f"healthy lost={len(acked - set(healthy_got))} "
        f"dup={sum(1 for n in healthy_got.values() if n > 1)} "
        f"offline lost={len(acked - set(offline_got))} "
        f"dup={sum(1 for n in offline_got.values() if n > 1)} "
        f"failing attempts={len(failing.ids())} publisher: {summary.lstrip('# ')}"
    )
    assert acked <= set(healthy_got)
    assert acked <= set(offline_got)
