"""AsyncConsumer against the in-process fake broker."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from kiteq.binding.model import BindType
from kiteq.client import (
    AsyncConsumer,
    AuthenticationError,
    Binding,
    ClientClosedError,
    ConfigError,
    ReceivedMessage,
)
from tests.client._fake_broker import FakeBroker, pb_message

pytestmark = pytest.mark.timeout(30)

BINDINGS = [
    Binding.direct("trade", "pay-succ"),
    Binding.regex("trade", "pay-.*"),
    Binding.fanout("user"),
]


class Recorder:
    """A handler that records what it got and answers from a script."""

    def __init__(self, answer: Callable[[ReceivedMessage], bool | None] | None = None) -> None:
        self.messages: list[ReceivedMessage] = []
        self.threads: set[str] = set()
        self._answer = answer

    def __call__(self, message: ReceivedMessage) -> bool | None:
        self.messages.append(message)
        self.threads.add(threading.current_thread().name)
        return self._answer(message) if self._answer else True


def consumer_for(
    broker: FakeBroker, handler: Callable[[ReceivedMessage], Any], **kwargs: Any
) -> AsyncConsumer:
    options: dict[str, Any] = {
        "brokers": [broker.address],
        "group_id": "acct-svc",
        "secret_key": "s3cret",
        "bindings": BINDINGS,
    }
    options.update(kwargs)
    return AsyncConsumer(handler=handler, **options)


async def test_open_declares_group_bindings_and_credits(broker: FakeBroker) -> None:
    async with consumer_for(broker, Recorder(), max_in_flight=64, warmup_seconds=5) as consumer:
        assert consumer.connected_brokers == [broker.address]
    (opened,) = broker.opens
    assert opened.groupId == "acct-svc"
    assert opened.secretKey == "s3cret"
    assert opened.maxInFlight == 64
    assert opened.warmingupSec == 5
    assert opened.protocolVersion == 1
    assert [(b.groupId, b.topic, b.messageType, int(b.bindType)) for b in opened.bindings] == [
        ("acct-svc", "trade", "pay-succ", BindType.DIRECT),
        ("acct-svc", "trade", "pay-.*", BindType.REGEX),
        ("acct-svc", "user", "*", BindType.FANOUT),
    ]


async def test_async_handler_acks_a_batch_with_one_frame(broker: FakeBroker) -> None:
    got: list[ReceivedMessage] = []

    async def handle(message: ReceivedMessage) -> bool:
        got.append(message)
        await asyncio.sleep(0)
        return True

    async with consumer_for(broker, handle):
        sent = [pb_message(body=b"%d" % i) for i in range(3)]
        broker.push(sent, attempt=2)
        await broker.wait_for(lambda: len(broker.acks) == 3)
    assert [m.message_id for m in got] == [m.header.messageId for m in sent]
    first = got[0]
    assert (first.topic, first.message_type, first.body) == ("trade", "pay-succ", b"0")
    assert first.properties == {"k": "v"}
    assert first.attempt == 2
    assert first.group_id == "pay-svc"
    assert all(a.status for a in broker.acks)
    assert broker.ack_frames == 1


async def test_false_and_exceptions_nack(broker: FakeBroker) -> None:
    def answer(message: ReceivedMessage) -> bool | None:
        if message.body == b"false":
            return False
        if message.body == b"raise":
            raise RuntimeError("boom")
        return None

    async def handle(message: ReceivedMessage) -> bool | None:
        return answer(message)

    async with consumer_for(broker, handle):
        broker.push([pb_message(body=b) for b in (b"false", b"raise", b"none")])
        await broker.wait_for(lambda: len(broker.acks) == 3)
    statuses = [(a.status, a.feedback) for a in broker.acks]
    assert statuses[0] == (False, "handler returned False")
    assert statuses[1] == (False, "RuntimeError: boom")
    assert statuses[2] == (True, "")


async def test_sync_handler_runs_on_a_handler_thread(broker: FakeBroker) -> None:
    recorder = Recorder(lambda m: m.body != b"no")
    async with consumer_for(broker, recorder):
        broker.push([pb_message(body=b"yes"), pb_message(body=b"no")])
        await broker.wait_for(lambda: len(broker.acks) == 2)
    assert [a.status for a in broker.acks] == [True, False]
    assert all(name.startswith("kiteq-handler") for name in recorder.threads)


async def test_sync_handler_returning_a_coroutine_is_a_nack(broker: FakeBroker) -> None:
    async def work() -> bool:
        return True

    def handle(message: ReceivedMessage) -> Awaitable[bool]:
        return work()

    async with consumer_for(broker, handle):
        broker.push([pb_message()])
        await broker.wait_for(lambda: len(broker.acks) == 1)
    assert not broker.acks[0].status
    assert "awaitable" in broker.acks[0].feedback


async def test_concurrency_runs_handlers_in_parallel(broker: FakeBroker) -> None:
    running = 0
    peak = 0

    async def handle(message: ReceivedMessage) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1

    async with consumer_for(broker, handle, concurrency=4):
        broker.push([pb_message() for _ in range(8)])
        await broker.wait_for(lambda: len(broker.acks) == 8)
    assert peak == 4


async def test_sync_concurrency_splits_a_batch_across_threads(broker: FakeBroker) -> None:
    barrier = threading.Barrier(2, timeout=5)

    def handle(message: ReceivedMessage) -> bool:
        barrier.wait()  # needs two handler threads at once
        return True

    async with consumer_for(broker, handle, concurrency=2):
        broker.push([pb_message(), pb_message()])
        await broker.wait_for(lambda: len(broker.acks) == 2)
    assert all(a.status for a in broker.acks)


async def test_wrong_secret_fails_start_without_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with FakeBroker(secret="right") as broker:
        consumer = consumer_for(broker, Recorder(), secret_key="wrong")
        caplog.set_level(logging.INFO, logger="kiteq.client")
        with pytest.raises(AuthenticationError, match="wrong secret"):
            await consumer.start()
        assert consumer.closed  # close() has ended the consumer's tasks, its link's too
        # the link gave up at the refusal (it logs that, then returns) instead of
        # scheduling a reconnect (which it logs too)
        logged = [r.getMessage() for r in caplog.records]
        assert any(m.startswith(f"giving up on broker={broker.address}") for m in logged)
        assert not [m for m in logged if m.startswith("reconnecting")]
        assert len(broker.opens) == 1


async def test_refused_bindings_are_a_config_error(broker: FakeBroker) -> None:
    broker.open_error = (grpc.StatusCode.INVALID_ARGUMENT, "bad regex pattern")
    with pytest.raises(ConfigError, match="bad regex pattern"):
        await consumer_for(broker, Recorder()).start()


async def test_reconnects_after_the_broker_restarts(broker: FakeBroker) -> None:
    recorder = Recorder()
    async with consumer_for(broker, recorder, reconnect_max_delay=0.2) as consumer:
        await broker.stop()
        await broker.wait_for(lambda: not consumer.connected_brokers)
        await broker.start()  # same port
        await broker.wait_for(lambda: len(broker.consumer_sessions()) == 1)
        broker.push([pb_message()])
        await broker.wait_for(lambda: len(broker.acks) == 1)
    assert len(broker.opens) == 2
    assert len(recorder.messages) == 1


async def test_starts_while_the_broker_is_down_and_connects_later() -> None:
    broker = FakeBroker()
    await broker.start()
    await broker.stop()  # keeps the port number
    try:
        recorder = Recorder()
        async with consumer_for(
            broker, recorder, connect_timeout=0.5, reconnect_max_delay=0.2
        ) as consumer:
            assert consumer.connected_brokers == []
            await broker.start()
            await broker.wait_for(lambda: len(broker.consumer_sessions()) == 1)
            broker.push([pb_message()])
            await broker.wait_for(lambda: len(broker.acks) == 1)
    finally:
        await broker.stop()


async def test_connects_to_every_broker(broker: FakeBroker) -> None:
    async with FakeBroker() as other:
        consumer = consumer_for(broker, Recorder(), brokers=[broker.address, other.address])
        async with consumer:
            assert sorted(consumer.connected_brokers) == sorted([broker.address, other.address])
            other.push([pb_message()])
            await other.wait_for(lambda: len(other.acks) == 1)
        assert len(broker.opens) == len(other.opens) == 1


async def test_registry_file_picks_brokers_serving_the_binding_topics(
    broker: FakeBroker, tmp_path: Path
) -> None:
    registry = tmp_path / "registry.toml"
    registry.write_text(
        f'[[brokers]]\naddress = "{broker.address}"\ntopics = ["trade"]\n'
        '[[brokers]]\naddress = "127.0.0.1:1"\ntopics = ["other"]\n'
    )
    consumer = consumer_for(broker, Recorder(), brokers=None, registry=f"file://{registry}")
    async with consumer:
        assert consumer.connected_brokers == [broker.address]


async def test_close_waits_for_running_handlers_and_their_acks(broker: FakeBroker) -> None:
    started = asyncio.Event()

    async def slow(message: ReceivedMessage) -> bool:
        started.set()
        await asyncio.sleep(0.2)
        return True

    consumer = consumer_for(broker, slow)
    await consumer.start()
    await broker.wait_for(lambda: bool(broker.consumer_sessions()))
    broker.push([pb_message()])
    await started.wait()
    await consumer.close()
    assert [a.status for a in broker.acks] == [True]


async def test_close_waits_for_a_running_sync_handler_and_its_acks(broker: FakeBroker) -> None:
    started = threading.Event()

    def slow(message: ReceivedMessage) -> bool:
        started.set()
        time.sleep(0.2)
        return True

    consumer = consumer_for(broker, slow)
    await consumer.start()
    await broker.wait_for(lambda: bool(broker.consumer_sessions()))
    broker.push([pb_message(), pb_message()])
    await asyncio.to_thread(started.wait, 5)
    await consumer.close()
    assert [a.status for a in broker.acks] == [True, True]


class Stuck:
    """A sync handler that says it has started, then waits (10 s at most) for ``release``."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, message: ReceivedMessage) -> bool:
        self.started.set()
        self.release.wait(10)
        return True


async def test_close_gives_up_on_a_stuck_sync_handler(broker: FakeBroker) -> None:
    stuck = Stuck()
    consumer = consumer_for(broker, stuck)
    await consumer.start()
    try:
        broker.push([pb_message()])
        await asyncio.to_thread(stuck.started.wait, 5)
        begin = time.monotonic()
        await consumer.close(timeout=0.2)
        assert time.monotonic() - begin < 3
        assert broker.acks == []  # the broker redelivers it
    finally:
        stuck.release.set()


async def test_deliveries_during_close_are_nacked(broker: FakeBroker) -> None:
    stuck = Stuck()
    consumer = consumer_for(broker, stuck)
    await consumer.start()
    try:
        broker.push([pb_message(body=b"first")])
        await asyncio.to_thread(stuck.started.wait, 5)
        closing = asyncio.ensure_future(consumer.close())
        await broker.wait_for(lambda: consumer.closed)  # close() has begun
        broker.push([pb_message(body=b"late")])
        await broker.wait_for(lambda: len(broker.acks) == 1)
        assert (broker.acks[0].status, broker.acks[0].feedback) == (False, "consumer closing")
        stuck.release.set()
        await closing
    finally:
        stuck.release.set()
    assert [a.status for a in broker.acks] == [False, True]


async def test_answers_of_sync_batches_finished_together_share_a_frame(
    broker: FakeBroker,
) -> None:
    release = threading.Event()

    def handle(message: ReceivedMessage) -> bool:
        release.wait(10)
        return True

    async with consumer_for(broker, handle) as consumer:
        for _ in range(5):
            broker.push([pb_message(), pb_message()])
        await broker.wait_for(lambda: consumer.in_handlers == 5)
        release.set()
        await broker.wait_for(lambda: len(broker.acks) == 10)
    assert all(a.status for a in broker.acks)
    assert len({a.messageId for a in broker.acks}) == 10
    assert broker.ack_frames < 5


async def test_a_handler_thread_failure_is_logged_and_consuming_goes_on(
    broker: FakeBroker, caplog: pytest.LogCaptureFixture
) -> None:
    def handle(message: ReceivedMessage) -> bool:
        if message.body == b"exit":
            raise SystemExit(3)  # not an Exception: no nack, the broker redelivers
        return True

    async with consumer_for(broker, handle):
        broker.push([pb_message(body=b"exit")])
        await broker.wait_for(lambda: "handler thread failed" in caplog.text)
        broker.push([pb_message(body=b"ok")])
        await broker.wait_for(lambda: len(broker.acks) == 1)
    assert broker.acks[0].status


async def test_close_is_idempotent(broker: FakeBroker) -> None:
    consumer = consumer_for(broker, Recorder())
    await consumer.start()
    await asyncio.gather(consumer.close(), consumer.close())
    await consumer.close()
    await consumer.wait()  # returns at once when closed
    with pytest.raises(ClientClosedError):
        await consumer.start()


async def test_wait_raises_when_a_reconnect_is_refused(broker: FakeBroker) -> None:
    consumer = consumer_for(broker, Recorder(), reconnect_max_delay=0.2)
    async with consumer:
        broker.secret = "changed"
        broker.drop_sessions()
        with pytest.raises(AuthenticationError):
            await asyncio.wait_for(consumer.wait(), 5)
        assert isinstance(consumer.error, AuthenticationError)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bindings": []}, "at least one binding"),
        ({"bindings": [Binding.direct("bad/topic", "x")]}, "binding topic"),
        ({"bindings": ["trade"]}, "Binding objects"),
        ({"handler": 42}, "callable"),
        ({"batch_handler": 42}, "callable"),
        ({"batch_handler": lambda ms: None}, "not both"),
        ({"ack_mode": "manual"}, "AckMode"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": 2, "concurrency": 3}, "differ"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"concurrency": 0}, "concurrency"),
        ({"warmup_seconds": -1}, "warmup_seconds"),
    ],
)
def test_invalid_options_are_config_errors(kwargs: dict[str, Any], match: str) -> None:
    options: dict[str, Any] = {
        "brokers": ["127.0.0.1:1"],
        "group_id": "acct-svc",
        "bindings": BINDINGS,
        "handler": Recorder(),
    }
    options.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        AsyncConsumer(**options)
