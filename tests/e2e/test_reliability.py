"""Issue #4 end to end: real time, short windows, real broker processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kiteq.client import Binding, Consumer, InvalidMessageError, Message, Producer, ReceivedMessage
from tests.e2e.broker_process import BrokerProcess, write_config
from tests.e2e.collector import Collector
from tests.e2e.helpers import admin_json, dead_letters
from tests.waiting import wait_until

TRADE = Binding.fanout("trade")


def acct_consumer(
    broker: BrokerProcess,
    handler: Callable[[ReceivedMessage], bool],
    binding: Binding = TRADE,
    **options: object,
) -> Consumer:
    """Group acct's consumer of the trade topic (secret "s")."""
    return Consumer(
        brokers=[broker.address],
        group_id="acct",
        secret_key="s",
        bindings=[binding],
        handler=handler,
        **options,  # type: ignore[arg-type]
    )


def pay_producer(broker: BrokerProcess) -> Producer:
    return Producer(brokers=[broker.address], group_id="pay", secret_key="s")


def rescheduled(broker: BrokerProcess, message_id: str) -> int:
    """The attempt of the last "rescheduled" event of *message_id*'s history (0: none)."""
    history = admin_json(broker, "message", message_id).get("history", [])
    return max((e.get("attempt", 0) for e in history if e["kind"] == "rescheduled"), default=0)


def test_nacked_four_times_then_acked_follows_the_windows_in_real_time(
    broker: BrokerProcess,
) -> None:
    times: list[tuple[int, float]] = []

    def decide(message: ReceivedMessage) -> bool:
        times.append((message.attempt, time.monotonic()))
        return message.attempt > 4

    got = Collector(decide)
    with acct_consumer(broker, got):
        with pay_producer(broker) as p:
            p.send(Message(topic="trade", message_type="pay-succ", body=b"x"))
        got.wait_for(lambda received: any(m.attempt == 5 for m in received), timeout=30)
    assert [a for a, _ in times] == [1, 2, 3, 4, 5]
    # attempts 1-3 at once; 4 at the next recover scan (recoverSeconds=1); 5 after the 5 s window
    assert times[2][1] - times[0][1] < 1.0
    assert times[4][1] - times[3][1] >= 5.0


def test_deliver_limit_3_then_the_dlq_then_redrive_delivers(broker: BrokerProcess) -> None:
    failing = Collector(lambda _: False)
    with pay_producer(broker) as p:
        with acct_consumer(broker, failing):
            message_id = p.send(
                Message(topic="trade", message_type="pay-succ", body=b"x", deliver_limit=3)
            ).message_id
            wait_until(lambda: len(dead_letters(broker)) == 1)
            broker.passed_recover_scan()  # it would offer anything still due
        assert [m.attempt for m in failing.received] == [1, 2, 3]
        [letter] = dead_letters(broker)
        assert (letter.header.messageId, letter.reason, list(letter.groups)) == (
            message_id,
            "deliver_limit",
            ["acct"],
        )
        listed = admin_json(broker, "dlq", "-reason", "deliver_limit")
        assert [d["header"]["messageId"] for d in listed["deadLetters"]] == [message_id]
        healthy = Collector()
        with acct_consumer(broker, healthy):
            assert admin_json(broker, "redrive", "-group", "acct")["redriven"] == 1
            healthy.wait_count(1)
        assert healthy.ids() == [message_id]
    assert dead_letters(broker) == []
    info = admin_json(broker, "message", message_id)
    kinds = [e["kind"] for e in info["history"]]
    assert kinds.count("nacked") == 3
    assert "dead_lettered" in kinds
    assert "redriven" in kinds
    assert kinds[-1] == "acked"
    assert [e["attempt"] for e in info["history"] if e["kind"] == "delivered"] == [1, 2, 3, 1]


def test_an_expired_message_is_dead_lettered_not_delivered(broker: BrokerProcess) -> None:
    expires = int(time.time()) + 2
    with pay_producer(broker) as p:
        message_id = p.send(
            Message(topic="trade", message_type="pay-succ", body=b"x", expired_time=expires)
        ).message_id
    # no consumer yet: the message waits in the store until its expiry has passed
    wait_until(lambda: time.time() > expires, 10, "the expiry")
    got = Collector()
    with acct_consumer(broker, got):
        wait_until(lambda: len(dead_letters(broker)) == 1)
        broker.passed_recover_scan()
    assert got.received == []
    [letter] = dead_letters(broker)
    assert (letter.header.messageId, letter.reason) == (message_id, "expired")


@pytest.fixture
def delivery_first(tmp_path: Path) -> Iterator[BrokerProcess]:
    config = write_config(
        tmp_path, db=f"rocksdb://{tmp_path / 'db'}", extra={"deliveryFirst": True}
    )
    process = BrokerProcess(config)
    process.start()
    yield process
    process.stop_quietly()


def test_delivery_first_stores_only_what_was_not_delivered(delivery_first: BrokerProcess) -> None:
    broker = delivery_first
    flaky = Collector(lambda m: m.body != b"fail" or m.attempt > 1)
    with (
        acct_consumer(broker, flaky),
        pay_producer(broker) as p,
    ):
        ok = p.send(Message(topic="trade", message_type="t", body=b"ok")).message_id
        assert not broker.lookup(ok).found  # delivered, never stored
        failed = p.send(Message(topic="trade", message_type="t", body=b"fail")).message_id
        assert broker.lookup(failed).found  # nacked: stored, acked to the producer truthfully
        flaky.wait_for(
            lambda received: any(m.message_id == failed and m.attempt == 2 for m in received)
        )
        wait_until(lambda: not broker.lookup(failed).found)
    assert [m.attempt for m in flaky.received if m.message_id == ok] == [1]


def test_broker_restart_during_backoff_keeps_attempt_counts_and_windows(
    broker: BrokerProcess,
) -> None:
    times: list[tuple[int, float]] = []

    def decide(message: ReceivedMessage) -> bool:
        times.append((message.attempt, time.monotonic()))
        return message.attempt >= 5

    got = Collector(decide)
    with pay_producer(broker) as p:
        with acct_consumer(broker, got):
            message_id = p.send(
                Message(topic="trade", message_type="pay-succ", body=b"x")
            ).message_id
            got.wait_for(lambda received: any(m.attempt == 4 for m in received))
            # the window after attempt 4 is set (a graceful stop then writes it)
            wait_until(lambda: rescheduled(broker, message_id) >= 4, 10, "the reschedule")
        assert broker.terminate() == 0
        broker.start()
        with acct_consumer(broker, got):
            got.wait_for(lambda received: any(m.attempt == 5 for m in received), timeout=30)
    assert [a for a, _ in times] == [1, 2, 3, 4, 5]
    assert times[4][1] - times[3][1] >= 5.0  # the 5 s window survived the restart


def test_watermark_paces_a_group_and_credits_bound_its_unacked_messages(
    broker: BrokerProcess,
) -> None:
    lock = threading.Lock()
    busy = 0
    most = 0

    def slow(_: ReceivedMessage) -> bool:
        nonlocal busy, most
        with lock:
            busy += 1
            most = max(most, busy)
        time.sleep(0.01)
        with lock:
            busy -= 1
        return True

    got = Collector(slow)
    n = 350
    with (
        acct_consumer(
            broker, got, Binding.fanout("trade", watermark=100), max_in_flight=10, concurrency=32
        ),
        pay_producer(broker) as p,
    ):
        futures = [
            p.send_async(Message(topic="trade", message_type="t", body=b"x")) for _ in range(n)
        ]
        started = time.monotonic()
        for future in futures:
            future.result(10)
        got.wait_count(n, timeout=30)
        elapsed = time.monotonic() - started
    # burst of 50, then 100/s: about 3 s for 350 messages
    assert 2.4 <= elapsed <= 4.5, elapsed
    assert all(m.attempt == 1 for m in got.received), "the limiter must not use up attempts"
    assert most <= 10


def test_a_fly_message_is_delivered_without_being_stored_and_must_be_committed(
    broker: BrokerProcess,
) -> None:
    got = Collector()
    with (
        acct_consumer(broker, got),
        pay_producer(broker) as p,
    ):
        message_id = p.send(
            Message(topic="trade", message_type="t", body=b"x", fly=True)
        ).message_id
        assert not broker.lookup(message_id).found  # acked without being stored
        got.wait_count(1)
        with pytest.raises(InvalidMessageError, match="fly message must be committed"):
            p.send(Message(topic="trade", message_type="t", body=b"x", fly=True, commit=False))
    assert got.ids() == [message_id]
