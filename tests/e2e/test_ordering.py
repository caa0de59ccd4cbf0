"""Ordered delivery (issue #16) end to end: real broker processes and consumer processes.

Every key's messages are handled in publish order: a message is handled again only as a
redelivery of the key's current head (a nack, a killed consumer, a restarted broker), and
the next one only after the previous one's ack; nothing is lost. RocksDB: the issue's
100 keys x 1,000 messages (about 25 s here); MySQL: 100 keys x 100 (each new head is one
more row read, about 700 messages/s on this 2-core machine, 16 s). ``KITEQ_ORDER_PER_KEY``
sets both.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

import pytest

from kiteq.client import Message, Producer
from tests.conftest import unavailable
from tests.e2e.broker_process import REPO, BrokerProcess, write_config
from tests.e2e.helpers import SECRET, wait_idle
from tests.store import mariadb
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

KEYS: Final = 100
_PER_KEY: Final = os.environ.get("KITEQ_ORDER_PER_KEY", "")
PER_KEY: Final = int(_PER_KEY or 1000)
MYSQL_PER_KEY: Final = int(_PER_KEY or 100)
NACK_RATE: Final = 0.1
# an event: (time_ns, key, seq, attempt, ok)
Event = tuple[int, str, int, int, bool]


class ConsumerProcess:
    """tests/e2e/order_consumer.py as a child process, logging what it handles."""

    def __init__(self, addresses: Sequence[str], log: Path, seed: int) -> None:
        self.log = log
        self.popen = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("order_consumer.py")),
                ",".join(addresses),
                str(log),
                str(seed),
                str(NACK_RATE),
            ],
            cwd=REPO,
        )

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.popen.poll() is None, "consumer process exited"
            return "ready" in self.lines()

        wait_until(ready, 30, f"the ready line of {self.log.name}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)


@pytest.fixture
def consumers(tmp_path: Path) -> Iterator[Callable[[Sequence[str], int], ConsumerProcess]]:
    started: list[ConsumerProcess] = []

    def start(addresses: Sequence[str], seed: int) -> ConsumerProcess:
        process = ConsumerProcess(addresses, tmp_path / f"consumer-{seed}.log", seed)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def events(processes: Sequence[ConsumerProcess]) -> list[Event]:
    out: list[Event] = []
    for process in processes:
        for line in process.lines():
            parts = line.split()
            if len(parts) == 5:  # a killed process may leave half a line
                t, key, seq, attempt, ok = parts
                out.append((int(t), key, int(seq), int(attempt), ok == "1"))
    out.sort()
    return out


def handled(processes: Sequence[ConsumerProcess]) -> int:
    return sum(1 for e in events(processes) if e[4])


def check_order(all_events: list[Event], keys: Sequence[str], per_key: int) -> None:
    """Each key's handlings, in time order: the same message again, or the next one after
    an ok; every message handled ok at least once."""
    by_key: dict[str, list[Event]] = {k: [] for k in keys}
    for event in all_events:
        by_key[event[1]].append(event)
    for key, seen in by_key.items():
        assert seen, f"key {key}: nothing handled"
        assert seen[0][2] == 0, f"key {key} began with message {seen[0][2]}"
        for previous, event in itertools.pairwise(seen):
            seq, last = event[2], previous[2]
            assert seq in (last, last + 1), f"key {key}: message {seq} handled after {last}"
            if seq == last + 1:
                assert previous[4], f"key {key}: message {seq} pushed after a nack of {last}"
        assert seen[-1][2] == per_key - 1, f"key {key}: ended at {seen[-1][2]}"
        assert seen[-1][4], f"key {key}: its last message was not acked"


def keyed(key: str, seq: int) -> Message:
    return Message(
        topic="trade",
        message_type="ordered",
        body=b"o",
        ordering_key=key,
        properties={"seq": str(seq)},
    )


def publish(producer: Producer, keys: Sequence[str], per_key: int) -> dict[str, str]:
    """Every key's messages, in seq order, keys interleaved; message id -> broker."""
    futures = [producer.send_async(keyed(k, s)) for s in range(per_key) for k in keys]
    return {r.message_id: r.broker for r in (f.result(60) for f in futures)}


def broker_config(directory: Path, db: str) -> Path:
    return write_config(directory, db=db, extra={"deliverySeconds": 5})


def test_keys_keep_publish_order_through_nacks_and_a_killed_consumer(
    tmp_path: Path,
    launch: Callable[..., BrokerProcess],
    consumers: Callable[[Sequence[str], int], ConsumerProcess],
) -> None:
    broker = launch(broker_config(tmp_path, f"rocksdb://{tmp_path / 'db'}?fsync=batch"))
    procs = [consumers([broker.address], seed) for seed in (1, 2, 3)]
    for process in procs:
        process.wait_ready()
    keys = [f"k{i}" for i in range(KEYS)]
    total = KEYS * PER_KEY
    with Producer(brokers=[broker.address], group_id="pay-svc", secret_key=SECRET) as p:
        publish(p, keys, PER_KEY)
    wait_until(lambda: handled(procs) >= total // 3, 60, "a third handled")
    procs[2].kill()  # mid-run: its unacked heads go to the other two
    wait_idle(broker, timeout=90)
    check_order(events(procs), keys, PER_KEY)


def killed_broker_mid_run(
    start: Callable[[], BrokerProcess],
    consumers: Callable[[Sequence[str], int], ConsumerProcess],
    per_key: int,
) -> None:
    broker = start()
    keys = [f"k{i}" for i in range(KEYS)]
    total = KEYS * per_key
    with Producer(brokers=[broker.address], group_id="pay-svc", secret_key=SECRET) as p:
        publish(p, keys, per_key)  # all stored first: the store order is the publish order
    procs = [consumers([broker.address], seed) for seed in (4, 5)]
    wait_until(lambda: handled(procs) >= total // 3, 60, "a third handled")
    broker.kill()
    broker.start()  # same port, same store: the consumers reconnect
    wait_idle(broker, timeout=90)
    check_order(events(procs), keys, per_key)


def test_a_sigkilled_rocksdb_broker_keeps_every_keys_order(
    tmp_path: Path,
    launch: Callable[..., BrokerProcess],
    consumers: Callable[[Sequence[str], int], ConsumerProcess],
) -> None:
    config = broker_config(tmp_path, f"rocksdb://{tmp_path / 'db'}?fsync=batch")
    killed_broker_mid_run(lambda: launch(config), consumers, PER_KEY)


@pytest.fixture
def mysql_db() -> Iterator[str]:
    if not mariadb.available():
        unavailable("MariaDB")
    with mariadb.databases(4) as prefix:
        yield mariadb.url(prefix, shardnum=4, flushSeconds=0.05)


def test_a_sigkilled_mysql_broker_keeps_every_keys_order(
    tmp_path: Path,
    launch: Callable[..., BrokerProcess],
    consumers: Callable[[Sequence[str], int], ConsumerProcess],
    mysql_db: str,
) -> None:
    config = broker_config(tmp_path, mysql_db)
    killed_broker_mid_run(lambda: launch(config), consumers, MYSQL_PER_KEY)
