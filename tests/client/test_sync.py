"""The blocking facades (Producer, Consumer) against a fake broker on its own thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from typing import Any

import pytest

from kiteq.client import (
    AuthenticationError,
    Binding,
    ClientClosedError,
    Consumer,
    InvalidMessageError,
    Message,
    Producer,
    PublishTimeoutError,
    ReceivedMessage,
    SendResult,
)
from tests.client._fake_broker import ThreadedBroker, pb_message
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(30)


def msg(body: bytes = b"...") -> Message:
    return Message(topic="trade", message_type="pay-succ", body=body)


def test_producer_example(threaded_broker: ThreadedBroker) -> None:
    with Producer(brokers=[threaded_broker.address], group_id="pay-svc", secret_key="s3cret") as p:
        r = p.send(Message(topic="trade", message_type="pay-succ", body=b"..."))
        f = p.send_async(Message(topic="trade", message_type="pay-succ", body=b"..."))
        assert isinstance(f, concurrent.futures.Future)
        assert isinstance(f.result(timeout=5), SendResult)
    assert r.message_id in threaded_broker.broker.stored
    assert r.broker == threaded_broker.address
    assert p.closed


def test_send_async_is_batched(threaded_broker: ThreadedBroker) -> None:
    with Producer(brokers=[threaded_broker.address], group_id="pay-svc") as producer:
        futures = [producer.send_async(msg(b"%d" % i)) for i in range(2000)]
        results = [f.result(timeout=10) for f in futures]
    assert len({r.message_id for r in results}) == 2000
    assert len(threaded_broker.broker.stored) == 2000
    assert threaded_broker.broker.publish_frames < 200, threaded_broker.broker.publish_frames


def test_send_async_futures_resolve_on_the_loop_thread(threaded_broker: ThreadedBroker) -> None:
    seen: list[str] = []
    with Producer(brokers=[threaded_broker.address], group_id="pay-svc") as producer:
        future = producer.send_async(msg())
        future.add_done_callback(lambda _: seen.append(threading.current_thread().name))
        future.result(timeout=5)
        producer.send(msg())  # the callback has run by now
    assert seen in (["kiteq-producer"], ["MainThread"])  # MainThread if already resolved


def test_invalid_message_raises_in_the_caller(threaded_broker: ThreadedBroker) -> None:
    with (
        Producer(brokers=[threaded_broker.address], group_id="pay-svc") as producer,
        pytest.raises(InvalidMessageError),
    ):
        producer.send_async(Message(topic="", message_type="x", body=b""))
    assert threaded_broker.broker.publish_frames == 0


def test_timeout_and_max_pending(threaded_broker: ThreadedBroker) -> None:
    threaded_broker.broker.silent = True
    with Producer(
        brokers=[threaded_broker.address], group_id="pay-svc", max_pending=1, close_timeout=0
    ) as producer:
        start = time.monotonic()
        with pytest.raises(PublishTimeoutError):
            producer.send(msg(), timeout=0.3)
        assert time.monotonic() - start < 3
        producer.send_async(msg(), timeout=5)
        with pytest.raises(PublishTimeoutError, match="unacknowledged"):
            producer.send_async(msg(), timeout=0.1)


def test_a_blocked_send_async_goes_when_acks_free_room(threaded_broker: ThreadedBroker) -> None:
    broker = threaded_broker.broker
    threaded_broker.do(setattr, broker, "hold", True)
    with Producer(brokers=[threaded_broker.address], group_id="pay-svc", max_pending=2) as p:
        first = [p.send_async(msg(b"%d" % i)) for i in range(2)]
        threaded_broker.wait_for(lambda: len(broker.published_ids) == 2)
        queued: list[concurrent.futures.Future[SendResult]] = []
        blocked = threading.Thread(target=lambda: queued.append(p.send_async(msg(b"2"))))
        blocked.start()
        wait_until(lambda: p.waiting_for_room == 1, 10, "a sender waiting")
        assert blocked.is_alive()  # waiting for room
        threaded_broker.do(broker.release)
        blocked.join(5)
        assert not blocked.is_alive()
        assert [f.result(timeout=5).message_id for f in first] == broker.published_ids[:2]
        threaded_broker.wait_for(lambda: len(broker.published_ids) == 3)
        threaded_broker.do(broker.release)
        assert queued[0].result(timeout=5).message_id == broker.published_ids[2]


def test_close_wakes_a_send_waiting_for_room(threaded_broker: ThreadedBroker) -> None:
    threaded_broker.broker.silent = True
    producer = Producer(
        brokers=[threaded_broker.address], group_id="pay-svc", max_pending=1, close_timeout=0
    )
    producer.send_async(msg())
    errors: list[BaseException] = []

    def send() -> None:
        try:
            producer.send_async(msg(), timeout=20)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    blocked = threading.Thread(target=send)
    blocked.start()
    wait_until(lambda: producer.waiting_for_room == 1, 10, "a sender waiting")
    start = time.monotonic()
    producer.close()
    blocked.join(5)
    assert time.monotonic() - start < 5
    assert len(errors) == 1
    assert isinstance(errors[0], ClientClosedError)


def test_send_async_from_a_callback_never_blocks_the_loop(
    threaded_broker: ThreadedBroker,
) -> None:
    threaded_broker.broker.silent = True
    with Producer(
        brokers=[threaded_broker.address], group_id="pay-svc", max_pending=2, close_timeout=0
    ) as producer:
        producer.send_async(msg(), timeout=20)
        outcome: list[float] = []
        done = threading.Event()

        def again(_: object) -> None:
            # on the loop thread, where the holder's timeout has just freed one place
            producer.send_async(msg(), timeout=20)
            start = time.monotonic()
            try:
                producer.send_async(msg(), timeout=20)  # full: must not wait here
            except PublishTimeoutError:
                outcome.append(time.monotonic() - start)
            done.set()

        holder = producer.send_async(msg(), timeout=0.3)
        holder.add_done_callback(again)
        with pytest.raises(PublishTimeoutError):
            holder.result(timeout=5)
        assert done.wait(5)
    assert len(outcome) == 1
    assert outcome[0] < 1


def test_wrong_secret() -> None:
    server = ThreadedBroker(secret="right")
    try:
        with Producer(brokers=[server.address], group_id="pay-svc", secret_key="no") as p:
            with pytest.raises(AuthenticationError):
                p.send(msg())
            with pytest.raises(AuthenticationError):
                p.send_async(msg())
        with (
            pytest.raises(AuthenticationError),
            Consumer(
                brokers=[server.address],
                group_id="acct-svc",
                secret_key="no",
                bindings=[Binding.fanout("trade")],
                handler=lambda m: True,
            ),
        ):
            pytest.fail("the consumer must not start")
        assert len(server.broker.opens) == 2
    finally:
        server.close()


def test_producer_close_is_idempotent(threaded_broker: ThreadedBroker) -> None:
    producer = Producer(brokers=[threaded_broker.address], group_id="pay-svc")
    producer.send(msg())
    producer.close()
    producer.close()
    with pytest.raises(ClientClosedError):
        producer.send(msg())


def test_close_without_a_broker_does_not_hang() -> None:
    producer = Producer(brokers=["127.0.0.1:1"], group_id="pay-svc", close_timeout=0.2)
    future = producer.send_async(msg())
    start = time.monotonic()
    producer.close()
    assert time.monotonic() - start < 3
    with pytest.raises(ClientClosedError):
        future.result(timeout=1)


def test_consumer_example(threaded_broker: ThreadedBroker) -> None:
    got: list[ReceivedMessage] = []
    threads: set[str] = set()

    def handle(m: ReceivedMessage) -> bool:
        got.append(m)
        threads.add(threading.current_thread().name)
        return m.body != b"nack"

    with Consumer(
        brokers=[threaded_broker.address],
        group_id="acct-svc",
        secret_key="s3cret",
        bindings=[
            Binding.direct("trade", "pay-succ"),
            Binding.regex("trade", "pay-.*"),
            Binding.fanout("user"),
        ],
        handler=handle,
        concurrency=2,
    ) as c:
        assert not c.wait(timeout=0.05)
        threaded_broker.do(
            threaded_broker.broker.push, [pb_message(body=b"ok"), pb_message(body=b"nack")]
        )
        threaded_broker.wait_for(lambda: len(threaded_broker.broker.acks) == 2)
    assert sorted(m.body for m in got) == [b"nack", b"ok"]
    assert sorted(a.status for a in threaded_broker.broker.acks) == [False, True]
    assert all(name.startswith("kiteq-handler") for name in threads)
    assert c.closed
    assert c.wait(timeout=0.1)
    c.close()


def test_consumer_close_from_another_thread_ends_wait(threaded_broker: ThreadedBroker) -> None:
    consumer = Consumer(
        brokers=[threaded_broker.address],
        group_id="acct-svc",
        bindings=[Binding.fanout("trade")],
        handler=lambda m: None,
    )
    consumer.start()
    timer = threading.Timer(0.2, consumer.close)
    timer.start()
    try:
        assert consumer.wait(timeout=5)
    finally:
        timer.join()
    with pytest.raises(ClientClosedError):
        consumer.start()


def test_send_async_wakes_the_loop_once_per_batch_not_per_message(
    threaded_broker: ThreadedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Producer(brokers=[threaded_broker.address], group_id="pay-svc", linger=0.01) as producer:
        producer.send(msg())  # connected
        sender = threading.get_ident()
        wakes = 0
        original = asyncio.BaseEventLoop.call_soon_threadsafe

        def counting(loop: asyncio.BaseEventLoop, *args: Any, **kwargs: Any) -> Any:
            # the hops from this thread to an event loop: the producer's wake-ups
            nonlocal wakes
            if threading.get_ident() == sender:
                wakes += 1
            return original(loop, *args, **kwargs)

        monkeypatch.setattr(asyncio.BaseEventLoop, "call_soon_threadsafe", counting)
        futures = [producer.send_async(msg()) for _ in range(2000)]
        for future in futures:
            future.result(timeout=10)
    assert wakes < 400, wakes


def test_a_sync_handler_gets_each_batch_in_one_hop(
    threaded_broker: ThreadedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops: list[str] = []
    original = concurrent.futures.ThreadPoolExecutor.submit

    def counting(
        executor: concurrent.futures.ThreadPoolExecutor, fn: Any, /, *args: Any, **kwargs: Any
    ) -> Any:
        # a hop is a call handed to a thread pool and run on a handler thread
        def run() -> Any:
            hops.append(threading.current_thread().name)
            return fn(*args, **kwargs)

        return original(executor, run)

    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", counting)
    with Consumer(
        brokers=[threaded_broker.address],
        group_id="acct-svc",
        bindings=[Binding.fanout("trade")],
        handler=lambda m: True,
    ):
        threaded_broker.do(threaded_broker.broker.push, [pb_message() for _ in range(50)])
        threaded_broker.wait_for(lambda: len(threaded_broker.broker.acks) == 50)
    assert sum(name.startswith("kiteq-handler") for name in hops) == 1
    assert threaded_broker.broker.ack_frames == 1
