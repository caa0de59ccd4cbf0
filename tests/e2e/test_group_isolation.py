"""Issue #10 end to end: one group's failures never decide another group's delivery (real
broker processes on RocksDB and on MySQL, real clients, real time)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kiteq.client import Binding, Consumer, Message, Producer, ReceivedMessage
from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc
from tests._servers import unavailable
from tests.e2e.broker_process import BrokerProcess, write_config
from tests.e2e.collector import Collector
from tests.e2e.helpers import admin_json
from tests.store import mariadb
from tests.waiting import wait_until

BINDING = Binding.fanout("trade", persistent=True)
N = 200


@pytest.fixture(params=["rocksdb", "mysql"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerProcess]:
    """A real broker process on each durable store (per-group state is the store's)."""
    if request.param == "rocksdb":
        yield from _broker(tmp_path, f"rocksdb://{tmp_path / 'db'}?fsync=batch")
        return
    if not mariadb.available():
        unavailable("MariaDB")
    with mariadb.databases(4) as prefix:
        yield from _broker(tmp_path, mariadb.url(prefix, shardnum=4, flushSeconds=0.05))


def _broker(tmp_path: Path, db: str) -> Iterator[BrokerProcess]:
    process = BrokerProcess(write_config(tmp_path, db=db))
    process.start()
    yield process
    process.stop_quietly()


def consumer(broker: BrokerProcess, group: str, handler: Collector) -> Consumer:
    return Consumer(
        brokers=[broker.address],
        group_id=group,
        secret_key="s",
        bindings=[BINDING],
        handler=handler,
    )


def dead_letters(broker: BrokerProcess, group: str = "") -> list[admin_pb2.DeadLetterInfo]:
    with grpc.insecure_channel(broker.address) as channel:
        reply = admin_pb2_grpc.AdminStub(channel).ListDeadLetters(
            admin_pb2.ListDeadLettersRequest(
                filter=admin_pb2.DeadLetterFilter(groupId=group), limit=1000
            ),
            timeout=5,
        )
    return list(reply.deadLetters)


def backlog(broker: BrokerProcess) -> int:
    return sum(broker.stats().backlog.values())


def test_offline_group_gets_all_failing_group_is_dead_lettered_alone_and_redrive_reaches_it(
    broker: BrokerProcess,
) -> None:
    # "offline" declares its persistent binding, then goes away
    with consumer(broker, "offline", Collector()):
        pass
    healthy, failing, offline, redriven = (
        Collector(),
        Collector(lambda _: False),
        Collector(),
        Collector(),
    )
    with consumer(broker, "healthy", healthy), consumer(broker, "failing", failing):
        with Producer(brokers=[broker.address], group_id="pay", secret_key="s") as p:
            futures = [
                p.send_async(
                    Message(topic="trade", message_type="pay-succ", body=b"x", deliver_limit=2)
                )
                for _ in range(N)
            ]
            sent = {f.result(20).message_id for f in futures}
        healthy.wait_count(N, timeout=60)
        wait_until(lambda: len(dead_letters(broker)) == N, timeout=60.0, what=f"{N} dead letters")
    letters = dead_letters(broker)
    assert {(d.header.messageId, d.groupId, d.reason) for d in letters} == {
        (mid, "failing", "deliver_limit") for mid in sent
    }
    assert {d.deliverCount for d in letters} == {2}
    assert Counter(failing.ids()) == dict.fromkeys(sent, 2)
    stats = admin_json(broker, "stats")
    assert stats["deadLetterGroups"] == [{"topic": "trade", "groupId": "failing", "count": N}]
    assert stats["backlog"] == {"trade": N}  # still to be delivered to "offline"
    probe = admin_json(broker, "message", next(iter(sent)))
    assert probe["state"] == "MESSAGE_STATE_LIVE"
    states = {g["groupId"]: (g["state"], g["attempts"]) for g in probe["groups"]}
    # the offline group is parked (no attempt used) until it comes back or the message expires
    assert states == {"healthy": ("acked", 1), "failing": ("dead", 2), "offline": ("pending", 0)}
    assert [(d["groupId"], d["reason"]) for d in probe["deadLetters"]] == [
        ("failing", "deliver_limit")
    ]

    with consumer(broker, "offline", offline), consumer(broker, "healthy", healthy):
        offline.wait_count(N, timeout=60)
        wait_until(lambda: backlog(broker) == 0, timeout=60.0, what="an empty backlog")
        assert Counter(offline.ids()) == dict.fromkeys(sent, 1)
        assert {m.attempt for m in offline.received} == {1}  # its own count

        # redrive the failing group's letters: only that group gets them again
        assert admin_json(broker, "redrive", "-group", "failing")["redriven"] == N
        with consumer(broker, "failing", redriven):
            redriven.wait_count(N, timeout=60)
            wait_until(
                lambda: backlog(broker) == 0,
                timeout=60.0,
                what="an empty backlog after the redrive",
            )
        assert set(redriven.ids()) == sent
        assert {m.attempt for m in redriven.received} == {1}
    assert dead_letters(broker) == []
    assert len(healthy.ids()) == N  # the redrive reached neither of the other groups
    assert len(offline.ids()) == N
    history = admin_json(broker, "message", next(iter(sent)))["history"]
    assert ("redriven", "failing") in {(e["kind"], e["groupId"]) for e in history}


def test_a_group_in_its_backoff_window_does_not_delay_a_group_that_connects_later(
    broker: BrokerProcess,
) -> None:
    with consumer(broker, "late", Collector()):
        pass
    slow_times: dict[int, float] = {}
    in_window = threading.Event()

    def nack(message: ReceivedMessage) -> bool:
        slow_times[message.attempt] = time.monotonic()
        if message.attempt == 4:
            in_window.set()  # attempts 1-3 at once, 4 at a scan; then a 5 s window
        return False

    slow, late = Collector(nack), Collector()
    with consumer(broker, "slow", slow):
        with Producer(brokers=[broker.address], group_id="pay", secret_key="s") as p:
            message_id = p.send(
                Message(topic="trade", message_type="pay-succ", body=b"x")
            ).message_id
        assert in_window.wait(20)
        with consumer(broker, "late", late):
            late.wait_count(1, timeout=10)
            got_late = time.monotonic()
            slow.wait_for(lambda received: any(m.attempt == 5 for m in received), timeout=20)
    assert late.ids() == [message_id]
    assert late.received[0].attempt == 1
    # "late" had it inside the slow group's window, which it did not shorten
    assert got_late < slow_times[4] + 5.0
    assert slow_times[5] - slow_times[4] >= 5.0
    lookup: dict[str, Any] = admin_json(broker, "message", message_id)
    states = {g["groupId"]: g["state"] for g in lookup["groups"]}
    assert states == {"slow": "pending", "late": "acked"}


def test_redrive_by_id_takes_every_groups_letter_or_the_named_one_and_ops_count_per_group(
    tmp_path: Path,
) -> None:
    broker = BrokerProcess(
        write_config(tmp_path, db=f"rocksdb://{tmp_path / 'db'}?fsync=batch"), pport=0
    )
    broker.start()
    try:
        with (
            consumer(broker, "a", Collector(lambda _: False)),
            consumer(broker, "b", Collector(lambda _: False)),
        ):
            with Producer(brokers=[broker.address], group_id="pay", secret_key="s") as p:
                message_id = p.send(
                    Message(topic="trade", message_type="pay-succ", body=b"x", deliver_limit=1)
                ).message_id
            wait_until(
                lambda: len(dead_letters(broker)) == 2, timeout=60.0, what="a letter per group"
            )
        assert sorted(d.groupId for d in dead_letters(broker)) == ["a", "b"]

        wait_until(
            lambda: (
                json.loads(broker.ops_page("/stat"))["kiteq"]["dead_letters"]
                == {"trade": {"a": 1, "b": 1}}
            ),
            what="/stat dead letters per group",
            timeout=20,
        )
        metrics = broker.metrics()
        assert 'kiteq_dead_letters{group="a",topic="trade"} 1.0' in metrics
        assert 'kiteq_dead_letters{group="b",topic="trade"} 1.0' in metrics

        a, b = Collector(), Collector()
        with consumer(broker, "a", a), consumer(broker, "b", b):
            assert admin_json(broker, "redrive", message_id, "-group", "a")["redriven"] == 1
            a.wait_count(1)
            assert [d.groupId for d in dead_letters(broker)] == ["b"]
            assert admin_json(broker, "redrive", message_id)["redriven"] == 1  # every group left
            b.wait_count(1)
            wait_until(lambda: backlog(broker) == 0, timeout=60.0, what="an empty backlog")
        assert (a.ids(), b.ids()) == ([message_id], [message_id])
        assert dead_letters(broker) == []
    finally:
        broker.stop_quietly()
