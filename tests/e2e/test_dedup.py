"""End to end: the idempotency window (``dedupWindowSeconds``, issue #15) on RocksDB.

A message every group acked is deleted; its id stays remembered for the window, so a
producer's retry of it is answered duplicate and never delivered again, also after a
broker restart; once the window has passed the same id is a new message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from kiteq.client import Binding
from tests.e2e.broker_process import BrokerProcess, write_config
from tests.e2e.collector import Collector
from tests.e2e.helpers import consumer, pay_succ, producer, wait_idle
from tests.waiting import wait_until

BINDINGS = [Binding.fanout("trade", persistent=True)]


def _broker(
    tmp_path: Path, launch: Callable[..., BrokerProcess], window: float, **options: object
) -> BrokerProcess:
    config = write_config(
        tmp_path,
        db=f"rocksdb://{tmp_path / 'db'}?fsync=batch",
        extra={"dedupWindowSeconds": window},
    )
    return launch(config, **options)


def _duplicates_metric(broker: BrokerProcess) -> float:
    name = 'kiteq_messages_duplicate_total{topic="trade"}'
    lines = broker.metrics().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


def test_a_retry_of_a_delivered_message_is_a_duplicate_and_not_delivered(
    tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    broker = _broker(tmp_path, launch, 120, pport=0)
    got = Collector()
    first = pay_succ(b"first")
    with consumer(broker, "acct-svc", BINDINGS, got), producer(broker) as p:
        assert not p.send(first).duplicate
        got.wait_count(1)
        wait_idle(broker)  # acked and deleted: only the window knows the id now

        retry = p.send(first)
        assert retry.duplicate
        assert retry.message_id == first.message_id
        # the positive event: a new message sent after the retry arrives
        after = p.send(pay_succ(b"after")).message_id
        got.wait_for(lambda received: after in {m.message_id for m in received})
        wait_idle(broker)
        broker.passed_recover_scan()
    assert sorted(got.ids()) == sorted([first.message_id, after])
    assert _duplicates_metric(broker) == 1


def test_after_a_short_window_the_same_id_is_delivered_again(
    tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    window = 2.0
    broker = _broker(tmp_path, launch, window)
    got = Collector()
    message = pay_succ(b"again")
    with consumer(broker, "acct-svc", BINDINGS, got), producer(broker) as p:
        p.send(message)
        got.wait_count(1)
        wait_idle(broker)
        deleted_by = time.time()
        # the window is time itself: wait for the clock, not for an event
        wait_until(lambda: time.time() > deleted_by + window + 0.5, window + 5, "the window")
        assert not p.send(message).duplicate
        got.wait_for(lambda received: len(received) >= 2)
        wait_idle(broker)
    assert got.ids() == [message.message_id, message.message_id]


def test_the_window_survives_a_sigkill_and_restart(
    tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    broker = _broker(tmp_path, launch, 120)
    first = pay_succ(b"before the crash")
    before = Collector()
    with consumer(broker, "acct-svc", BINDINGS, before), producer(broker) as p:
        p.send(first)
        before.wait_count(1)
        wait_idle(broker)
    broker.kill()  # SIGKILL: no shutdown, only what the store had written
    broker.start()

    after = Collector()
    with consumer(broker, "acct-svc", BINDINGS, after), producer(broker) as p:
        assert p.send(first).duplicate
        new = p.send(pay_succ(b"after the restart")).message_id
        after.wait_count(1)
        wait_idle(broker)
        broker.passed_recover_scan()
    assert before.ids() == [first.message_id]
    assert after.ids() == [new]
