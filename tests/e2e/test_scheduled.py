"""Scheduled delivery (issue #15) end to end: real broker processes (recoverSeconds = 1),
the real client library; never early, delivered within one recover period of due, in due
order, across a SIGKILL, and cancelled through kiteq-admin."""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from kiteq.client import AsyncConsumer, AsyncProducer, Binding, Message, ReceivedMessage
from tests.e2e.broker_process import BrokerProcess, write_config
from tests.e2e.helpers import (
    SECRET,
    admin_cli,
    admin_json,
    consumer,
    producer,
    run_readme_example,
    wait_idle,
)
from tests.waiting import wait_until

BINDING: Final = Binding.direct("trade", "remind")
# the test brokers' recoverSeconds (tests/e2e/broker_process.write_config)
RECOVER_SECONDS: Final = 1.0
# what a loaded 2-core test machine may add to a recover period (scan, push, handler)
SLACK: Final = 1.0


class Arrivals:
    """A consumer handler recording each message with the wall time it arrived."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.got: dict[str, tuple[ReceivedMessage, float]] = {}

    def __call__(self, message: ReceivedMessage) -> bool:
        with self._lock:
            self.got.setdefault(message.message_id, (message, time.time()))
        return True

    def count(self) -> int:
        with self._lock:
            return len(self.got)

    def wait_count(self, n: int, timeout: float) -> None:
        wait_until(lambda: self.count() >= n, timeout, f"{n} deliveries")


def remind(**kwargs: object) -> Message:
    return Message(topic="trade", message_type="remind", body=b"r", **kwargs)  # type: ignore[arg-type]


def assert_on_time(arrivals: Arrivals, due: dict[str, float]) -> None:
    for message_id, at in due.items():
        _, arrived = arrivals.got[message_id]
        assert arrived >= at, f"{message_id} delivered {at - arrived:.3f} s early"
        assert arrived <= at + RECOVER_SECONDS + SLACK, f"{message_id} {arrived - at:.3f} s late"


def test_delays_of_0_and_2_seconds_are_never_early_and_come_within_a_recover_period(
    broker: BrokerProcess,
) -> None:
    arrivals = Arrivals()
    with consumer(broker, "remind-svc", [BINDING], arrivals), producer(broker) as p:
        sent = time.time()
        now = remind(delay=0)
        later = remind(delay=2)
        p.send(now)
        p.send(later)
        arrivals.wait_count(2, 15)
        wait_idle(broker)
    assert later.deliver_at >= sent + 2
    assert_on_time(arrivals, {now.message_id: sent, later.message_id: later.deliver_at})
    # the consumer's message shows the delivery time it was published with
    assert arrivals.got[later.message_id][0].deliver_at == later.deliver_at
    assert arrivals.got[now.message_id][0].deliver_at == 0.0


def test_a_due_message_does_not_wait_for_a_long_recover_period(
    tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    # the loop wakes at the next delivery time it knows of, not a period later
    period = 60
    config = write_config(
        tmp_path, db=f"rocksdb://{tmp_path / 'db'}?fsync=batch", extra={"recoverSeconds": period}
    )
    broker = launch(config)
    arrivals = Arrivals()
    with consumer(broker, "remind-svc", [BINDING], arrivals), producer(broker) as p:
        soon = [remind(delay=2), remind(delay=3)]
        for message in soon:
            p.send(message)
        arrivals.wait_count(2, period / 2)
    for message in soon:
        _, arrived = arrivals.got[message.message_id]
        assert message.deliver_at <= arrived <= message.deliver_at + 1 + SLACK


def test_asyncio_classes_schedule_and_show_the_delivery_time(broker: BrokerProcess) -> None:
    arrivals = Arrivals()

    async def run() -> Message:
        async with (
            AsyncConsumer(
                brokers=[broker.address],
                group_id="remind-svc",
                secret_key=SECRET,
                bindings=[BINDING],
                handler=arrivals,
            ),
            AsyncProducer(brokers=[broker.address], group_id="pay-svc", secret_key=SECRET) as p,
        ):
            message = remind(deliver_at=time.time() + 1.5)
            await p.send(message)
            await asyncio.to_thread(arrivals.wait_count, 1, 15)
            return message

    message = asyncio.run(run())
    assert_on_time(arrivals, {message.message_id: message.deliver_at})
    assert arrivals.got[message.message_id][0].deliver_at == message.deliver_at


def test_10000_messages_over_30_seconds_arrive_in_due_order(broker: BrokerProcess) -> None:
    n, spread, lead = 10_000, 30.0, 4.0
    arrivals = Arrivals()
    rng = random.Random(15)
    with consumer(broker, "remind-svc", [BINDING], arrivals), producer(broker) as p:
        start = time.time() + lead
        messages = [remind(deliver_at=start + spread * i / n) for i in range(n)]
        rng.shuffle(messages)  # published in no particular order
        for future in [p.send_async(m) for m in messages]:
            future.result(30)
        assert time.time() < start, "publishing took longer than the lead time"
        assert arrivals.count() == 0
        arrivals.wait_count(n, lead + spread + 20)
    due = {m.message_id: m.deliver_at for m in messages}
    assert_on_time(arrivals, due)
    # in the order of their due times, within 1 s: nothing arrives after one due > 1 s later
    by_arrival = sorted(arrivals.got, key=lambda mid: arrivals.got[mid][1])
    latest_due = 0.0
    for message_id in by_arrival:
        assert due[message_id] >= latest_due - 1.0
        latest_due = max(latest_due, due[message_id])


def killed_with_scheduled_messages(make: Callable[[], BrokerProcess]) -> None:
    """Publish scheduled messages, SIGKILL the broker, start it again: all delivered on time."""
    broker = make()
    with producer(broker) as p:
        messages = [remind(delay=3 + i * 0.1) for i in range(20)]
        for future in [p.send_async(m) for m in messages]:
            future.result(10)
    broker.kill()
    broker.start()
    arrivals = Arrivals()
    with consumer(broker, "remind-svc", [BINDING], arrivals):
        arrivals.wait_count(len(messages), 30)
        wait_idle(broker)
    for m in messages:
        assert arrivals.got[m.message_id][1] >= m.deliver_at, "delivered early after a restart"


def test_a_killed_rocksdb_broker_delivers_its_scheduled_messages_after_restart(
    tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    config = write_config(tmp_path, db=f"rocksdb://{tmp_path / 'db'}?fsync=batch")
    killed_with_scheduled_messages(lambda: launch(config))


def test_a_killed_mysql_broker_delivers_its_scheduled_messages_after_restart(
    tmp_path: Path, launch: Callable[..., BrokerProcess], mysql_url: str
) -> None:
    config = write_config(tmp_path, db=mysql_url)
    killed_with_scheduled_messages(lambda: launch(config))


def test_cancel_through_kiteq_admin(broker: BrokerProcess) -> None:
    arrivals = Arrivals()
    with consumer(broker, "remind-svc", [BINDING], arrivals), producer(broker) as p:
        # the one cancelled is due long after the test: however slow the admin calls
        # below, it is still scheduled when they cancel it
        kept, cancelled = remind(delay=3), remind(delay=600)
        p.send(cancelled)
        p.send(kept)
        listed = admin_json(broker, "scheduled", "-topic", "trade")
        assert [m["header"]["messageId"] for m in listed["messages"]] == [
            kept.message_id,
            cancelled.message_id,
        ]
        table = admin_cli(broker, "scheduled")
        assert table.returncode == 0
        assert cancelled.message_id in table.stdout
        assert "DELIVER-AT" in table.stdout
        done = admin_cli(broker, "cancel", cancelled.message_id)
        assert done.returncode == 0, done.stderr
        assert "cancelled" in done.stdout
        assert admin_json(broker, "cancel", cancelled.message_id, exit_code=3)["outcome"] == (
            "CANCEL_OUTCOME_NOT_FOUND"
        )
        listed = admin_json(broker, "scheduled", "-topic", "trade")
        assert [m["header"]["messageId"] for m in listed["messages"]] == [kept.message_id]
        arrivals.wait_count(1, 15)  # the positive event: the one kept came
        wait_idle(broker)
        # delivered: no longer scheduled (exit 4), and never a stored id (exit 3)
        assert admin_cli(broker, "cancel", "0" * 32).returncode == 3
    assert list(arrivals.got) == [kept.message_id]
    history = [e.kind for e in broker.lookup(cancelled.message_id).history]
    assert "cancelled" in history


def test_readme_scheduled_example_runs_as_written(broker: BrokerProcess) -> None:
    run = run_readme_example("Scheduled delivery", broker)
    assert run.returncode == 0, run.stderr
    found = re.fullmatch(r"delivered (-?[0-9.]+) s after its delivery time\n", run.stdout)
    assert found is not None, run.stdout
    assert 0.0 <= float(found[1]) <= RECOVER_SECONDS + SLACK
