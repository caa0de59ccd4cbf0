"""End to end: real broker process, real client library, RocksDB on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from kiteq.client import Binding, Message
from tests.e2e.broker_process import REPO, BrokerProcess
from tests.e2e.collector import Collector
from tests.e2e.helpers import consumer, in_flight, producer, wait_idle
from tests.waiting import wait_until


def test_direct_regex_and_fanout_routing(broker: BrokerProcess) -> None:
    direct, regex, fanout = Collector(), Collector(), Collector()
    with (
        consumer(broker, "direct-svc", [Binding.direct("trade", "pay-succ")], direct),
        consumer(broker, "regex-svc", [Binding.regex("trade", "pay-.*")], regex),
        consumer(broker, "fanout-svc", [Binding.fanout("trade")], fanout),
        producer(broker) as p,
    ):
        sent = {
            t: p.send(Message(topic="trade", message_type=t, body=t.encode())).message_id
            for t in ("pay-succ", "pay-fail", "refund", "xpay-yz")
        }
        fanout.wait_count(4)
        regex.wait_count(3)
        direct.wait_count(1)
        wait_idle(broker)
    assert sorted(direct.ids()) == [sent["pay-succ"]]
    assert sorted(regex.ids()) == sorted(
        [sent["pay-succ"], sent["pay-fail"], sent["xpay-yz"]]
    )  # unanchored search
    assert sorted(fanout.ids()) == sorted(sent.values())


def test_two_groups_each_get_every_message_and_a_group_spreads_over_its_consumers(
    broker: BrokerProcess,
) -> None:
    a1, a2, b = Collector(), Collector(), Collector()
    n = 300
    with (
        consumer(broker, "acct-svc", [Binding.fanout("trade")], a1),
        consumer(broker, "acct-svc", [Binding.fanout("trade")], a2),
        consumer(broker, "audit-svc", [Binding.direct("trade", "pay-succ")], b),
        producer(broker) as p,
    ):
        futures = [
            p.send_async(Message(topic="trade", message_type="pay-succ", body=b"%d" % i))
            for i in range(n)
        ]
        ids = {f.result(10).message_id for f in futures}
        b.wait_count(n)
        a1.wait_for(lambda _: len(set(a1.ids()) | set(a2.ids())) >= n)
        wait_idle(broker)
    assert set(b.ids()) == ids
    assert set(a1.ids()) | set(a2.ids()) == ids
    # each message went to exactly one consumer of the group (all acked, no redelivery)
    assert not set(a1.ids()) & set(a2.ids())
    assert a1.ids(), "both consumers of the group should receive some messages"
    assert a2.ids(), "both consumers of the group should receive some messages"
    assert all(m.attempt == 1 for m in a1.received + a2.received)


def test_nack_and_exception_are_redelivered_with_growing_attempts(broker: BrokerProcess) -> None:
    def decide(message: object) -> bool:
        attempt = message.attempt  # type: ignore[attr-defined]
        if attempt == 1:
            return False
        if attempt == 2:
            raise RuntimeError("handler failure counts as a nack")
        return True

    got = Collector(decide)
    with consumer(broker, "acct-svc", [Binding.fanout("trade")], got), producer(broker) as p:
        message_id = p.send(Message(topic="trade", message_type="pay-succ", body=b"x")).message_id
        got.wait_for(lambda received: any(m.attempt == 3 for m in received))
        wait_idle(broker)
    assert [m.attempt for m in got.received if m.message_id == message_id] == [1, 2, 3]


def test_consumer_killed_before_acking_its_messages_reach_the_other_consumer(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    log = tmp_path / "holder.log"
    holder = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("hold_consumer.py")),
            broker.address,
            str(log),
        ],
        cwd=REPO,
    )
    try:

        def holder_ready() -> bool:
            assert holder.poll() is None, "holding consumer exited"
            return log.exists() and "ready" in log.read_text()

        wait_until(holder_ready, 20, "the holding consumer's ready line")
        n = 50
        with producer(broker) as p:
            ids = {
                p.send_async(Message(topic="trade", message_type="pay-succ", body=b"x"))
                .result(10)
                .message_id
                for _ in range(n)
            }
        wait_until(lambda: in_flight(broker, "acct-svc") >= n, 20, "the holder's deliveries")
        survivor = Collector()
        with consumer(broker, "acct-svc", [Binding.fanout("trade")], survivor):
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(10)
            survivor.wait_count(n)
            wait_idle(broker)
        assert set(survivor.ids()) == ids
        assert all(m.attempt == 2 for m in survivor.received)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_broker_sigkilled_after_store_acks_delivers_every_acked_message_after_restart(
    broker: BrokerProcess,
) -> None:
    # declare a persistent binding, then go offline
    with consumer(broker, "acct-svc", [Binding.fanout("trade", persistent=True)], Collector()):
        pass
    n = 2000
    with producer(broker) as p:
        futures = [
            p.send_async(Message(topic="trade", message_type="pay-succ", body=b"x" * 1024))
            for _ in range(n)
        ]
        acked = {f.result(20).message_id for f in futures}
        broker.kill()  # right after the last store-ack: no graceful anything
    assert len(acked) == n
    broker.start()
    got = Collector()
    with consumer(broker, "acct-svc", [Binding.fanout("trade", persistent=True)], got):
        got.wait_count(n, timeout=60)
        wait_idle(broker, timeout=30)
    assert set(got.ids()) == acked
    assert max(Counter(got.ids()).values()) == 1


def test_sigterm_stops_the_broker_cleanly(broker: BrokerProcess) -> None:
    got = Collector()
    with consumer(broker, "acct-svc", [Binding.fanout("trade")], got), producer(broker) as p:
        p.send(Message(topic="trade", message_type="pay-succ", body=b"x"))
        got.wait_count(1)
        started = time.monotonic()
        assert broker.terminate() == 0
    assert time.monotonic() - started < 15
    assert any("stopped" in line for line in broker.output)
