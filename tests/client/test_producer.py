"""AsyncProducer against the in-process fake broker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kiteq.client import (
    AsyncProducer,
    AuthenticationError,
    BodyTooLargeError,
    ClientClosedError,
    ConfigError,
    ExpiredMessageError,
    InvalidMessageError,
    KiteQError,
    Message,
    MessageRejectedError,
    NotConnectedError,
    PublishTimeoutError,
    SendResult,
)
from kiteq.proto.v1 import common_pb2
from tests.client._fake_broker import FakeBroker
from tests.client._refusals import TYPED_REFUSALS

pytestmark = pytest.mark.timeout(30)


def msg(body: bytes = b"x", topic: str = "trade", **kwargs: Any) -> Message:
    return Message(topic=topic, message_type="pay-succ", body=body, **kwargs)


@pytest.fixture
async def producer(broker: FakeBroker) -> AsyncIterator[AsyncProducer]:
    async with AsyncProducer(
        brokers=[broker.address], group_id="pay-svc", secret_key="s3cret"
    ) as p:
        yield p


async def test_send_returns_after_the_store_ack(
    broker: FakeBroker, producer: AsyncProducer
) -> None:
    message = msg(b"hello", properties={"uid": "42"})

    result = await producer.send(message)

    assert result == SendResult(message.message_id, broker.address, duplicate=False)
    stored = broker.stored[message.message_id]
    assert stored.body == b"hello"
    assert stored.header.groupId == "pay-svc"  # the producer's group, always
    assert stored.header.topic == "trade"
    assert dict(stored.header.properties) == {"uid": "42"}
    assert stored.header.deliverLimit == 100  # clamped by normalize before sending
    assert stored.header.expiredTime > time.time()
    (opened,) = broker.opens
    assert (opened.groupId, opened.secretKey, opened.protocolVersion) == ("pay-svc", "s3cret", 1)
    assert opened.maxInFlight == 0  # a pure producer
    assert opened.clientId


async def test_send_of_a_stored_id_is_a_duplicate_success(producer: AsyncProducer) -> None:
    message = msg()
    first = await producer.send(message)
    second = await producer.send(message)
    assert not first.duplicate
    assert second.duplicate
    assert second.message_id == message.message_id


async def test_concurrent_sends_of_one_id_both_resolve(
    broker: FakeBroker, producer: AsyncProducer
) -> None:
    message = msg()
    first, second = await asyncio.gather(producer.send(message), producer.send(message))
    assert first.message_id == second.message_id == message.message_id
    assert broker.published_ids.count(message.message_id) == 1


async def test_invalid_message_fails_fast_and_nothing_is_sent(
    broker: FakeBroker, producer: AsyncProducer
) -> None:
    with pytest.raises(InvalidMessageError) as info:
        await producer.send(msg(topic="bad/topic"))
    assert info.value.message_id
    with pytest.raises(BodyTooLargeError):
        await producer.send(msg(b"x" * (4 * 1024 * 1024 + 1)))
    with pytest.raises(ExpiredMessageError):
        await producer.send(msg(expired_time=int(time.time()) - 10))
    with pytest.raises(TypeError):
        await producer.send(b"not a message")  # type: ignore[arg-type]
    assert broker.opens == []  # lazy: not even connected
    assert broker.publish_frames == 0


async def test_sends_are_batched(broker: FakeBroker) -> None:
    async with AsyncProducer(
        brokers=[broker.address], group_id="pay-svc", linger=0.005, max_batch=500
    ) as producer:
        futures = [await producer.send_async(msg(b"%d" % i)) for i in range(2000)]
        results = await asyncio.gather(*futures)
    assert len({r.message_id for r in results}) == 2000
    assert len(broker.stored) == 2000
    assert broker.publish_frames <= 20, broker.publish_frames


async def test_batches_respect_max_batch(broker: FakeBroker) -> None:
    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc", max_batch=7) as p:
        futures = [await p.send_async(msg()) for _ in range(70)]
        await asyncio.gather(*futures)
    assert broker.publish_frames >= 10


async def test_sequential_sends_are_not_delayed_by_linger(broker: FakeBroker) -> None:
    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc", linger=0.5) as p:
        await p.send(msg())  # connects
        start = time.monotonic()
        for _ in range(5):
            await p.send(msg())
        assert time.monotonic() - start < 0.5


@pytest.mark.parametrize(("code", "error"), [*TYPED_REFUSALS, (42, MessageRejectedError)])
async def test_refusals_raise_typed_errors(
    broker: FakeBroker, code: int, error: type[KiteQError]
) -> None:
    broker.refuse = lambda m, n: (code, "refused by the test")
    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc", retries=2) as p:
        message = msg()
        with pytest.raises(error) as info:
            await p.send(message)
    assert type(info.value) is error
    assert "refused by the test" in str(info.value)
    if isinstance(info.value, MessageRejectedError):
        assert info.value.message_id == message.message_id
    # retriable refusals are tried 1 + retries times, with the same id
    assert broker.seen[message.message_id] == (3 if error.retriable else 1)


async def test_retriable_refusal_then_success(broker: FakeBroker) -> None:
    broker.refuse = lambda m, n: (common_pb2.ERROR_CODE_STORE_FULL, "full") if n < 3 else None
    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc", retries=3) as p:
        message = msg()
        result = await p.send(message)
    assert result.message_id == message.message_id
    assert broker.seen[message.message_id] == 3


async def test_wrong_secret_is_an_authentication_error_without_retries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kiteq.client")
    async with FakeBroker(secret="right") as broker:
        producer = AsyncProducer(
            brokers=[broker.address], group_id="pay-svc", secret_key="wrong", timeout=3.0
        )
        async with producer:
            with pytest.raises(AuthenticationError, match="wrong secret"):
                await producer.send(msg())
            with pytest.raises(AuthenticationError):
                await producer.send(msg())  # reported at once from now on
        # no reconnect loop: the link gave up at the refusal (it logs that, then returns)
        # instead of scheduling a reconnect (which it logs too)
        logged = [r.getMessage() for r in caplog.records]
        assert any(m.startswith(f"giving up on broker={broker.address}") for m in logged)
        assert not [m for m in logged if m.startswith("reconnecting")]
        assert len(broker.opens) == 1
        assert broker.publish_frames == 0


async def test_stream_dropped_before_the_ack_resends_the_same_id(broker: FakeBroker) -> None:
    broker.drop_next = 1
    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc") as producer:
        message = msg()
        result = await producer.send(message)
    assert result.message_id == message.message_id
    assert broker.published_ids == [message.message_id, message.message_id]
    assert len(broker.opens) == 2  # reconnected
    assert message.message_id in broker.stored


async def test_stream_dropped_too_often_fails_with_not_connected(broker: FakeBroker) -> None:
    broker.drop_next = 10
    async with AsyncProducer(
        brokers=[broker.address], group_id="pay-svc", retries=1, reconnect_max_delay=0.1
    ) as producer:
        with pytest.raises(NotConnectedError, match="lost before the store-ack"):
            await producer.send(msg())
    assert len(broker.published_ids) == 2


async def test_retry_prefers_another_broker(broker: FakeBroker) -> None:
    async with FakeBroker() as other:
        # each broker refuses a message the first time it sees it
        for b in (broker, other):
            b.refuse = lambda m, n: (
                (common_pb2.ERROR_CODE_NOT_SERVING, "stopping") if n == 1 else None
            )
        async with AsyncProducer(
            brokers=[broker.address, other.address], group_id="pay-svc"
        ) as producer:
            await producer.send(msg())  # dials both brokers
            await broker.wait_for(lambda: len(broker.sessions) == len(other.sessions) == 1)
            message = msg()
            result = await producer.send(message)
        # refused by one, so sent to the other (refused too), then stored on the first
        assert broker.seen[message.message_id] >= 1
        assert other.seen[message.message_id] >= 1
        assert result.broker in {broker.address, other.address}


async def test_no_store_ack_in_time_is_a_publish_timeout(broker: FakeBroker) -> None:
    broker.silent = True
    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc") as producer:
        start = time.monotonic()
        with pytest.raises(PublishTimeoutError) as info:
            await producer.send(msg(), timeout=0.3)
        assert 0.25 < time.monotonic() - start < 2.0
        assert isinstance(info.value, TimeoutError)
        assert info.value.retriable


async def test_unreachable_broker_is_not_connected() -> None:
    async with AsyncProducer(brokers=["127.0.0.1:1"], group_id="pay-svc") as producer:
        with pytest.raises(NotConnectedError, match="no broker reachable"):
            await producer.send(msg(), timeout=0.5)


async def test_close_flushes_pending_sends(broker: FakeBroker) -> None:
    producer = AsyncProducer(brokers=[broker.address], group_id="pay-svc", linger=0.05)
    await producer.start()
    futures = [await producer.send_async(msg()) for _ in range(50)]
    await producer.close()
    assert all(f.done() and not f.exception() for f in futures)
    assert len(broker.stored) == 50


async def test_close_fails_sends_still_unacknowledged(broker: FakeBroker) -> None:
    broker.silent = True
    producer = AsyncProducer(brokers=[broker.address], group_id="pay-svc")
    await producer.start()
    future = await producer.send_async(msg())
    await broker.wait_for(lambda: broker.publish_frames == 1)
    await producer.close(timeout=0.1)
    with pytest.raises(ClientClosedError):
        await future


async def test_close_is_idempotent_and_sends_after_close_fail(broker: FakeBroker) -> None:
    producer = AsyncProducer(brokers=[broker.address], group_id="pay-svc")
    await producer.send(msg())
    await asyncio.gather(producer.close(), producer.close())
    await producer.close()
    assert producer.closed
    with pytest.raises(ClientClosedError):
        await producer.send(msg())
    with pytest.raises(ClientClosedError):
        await producer.start()


async def test_close_without_start() -> None:
    producer = AsyncProducer(brokers=["127.0.0.1:1"], group_id="pay-svc")
    await producer.close()
    assert producer.closed


async def test_max_pending_bounds_unacknowledged_sends(broker: FakeBroker) -> None:
    broker.silent = True
    async with AsyncProducer(
        brokers=[broker.address], group_id="pay-svc", max_pending=2, close_timeout=0
    ) as producer:
        pending = [await producer.send_async(msg(), timeout=5.0) for _ in range(2)]
        with pytest.raises(PublishTimeoutError, match="unacknowledged"):
            await producer.send_async(msg(), timeout=0.2)
    for future in pending:
        with pytest.raises(ClientClosedError):
            await future


async def test_a_send_waiting_for_room_goes_when_acks_free_it(broker: FakeBroker) -> None:
    broker.hold = True
    async with AsyncProducer(
        brokers=[broker.address], group_id="pay-svc", max_pending=2, linger=0
    ) as producer:
        first = [await producer.send_async(msg(b"%d" % i)) for i in range(2)]
        third = asyncio.ensure_future(producer.send_async(msg(b"2"), timeout=5.0))
        # two unacknowledged: the third waits for room
        await broker.wait_for(lambda: producer.waiting_for_room == 1)
        assert not third.done()
        await broker.wait_for(lambda: len(broker.published_ids) == 2)
        broker.release()
        results = await asyncio.gather(*first)
        future = await asyncio.wait_for(third, 5)
        await broker.wait_for(lambda: len(broker.published_ids) == 3)
        broker.release()
        last = await future
    assert [r.message_id for r in results] == broker.published_ids[:2]
    assert last.message_id == broker.published_ids[2]


async def test_a_cancelled_send_future_still_frees_its_room(broker: FakeBroker) -> None:
    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc", max_pending=1) as p:
        future = await p.send_async(msg())
        future.cancel()
        result = await p.send(msg(), timeout=5)  # waits for the first one's ack, then goes
    assert result.broker == broker.address


async def test_publish_frames_carry_the_clamps(broker: FakeBroker) -> None:
    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc") as producer:
        before = int(time.time())
        plain = await producer.send(msg())
        kept = await producer.send(
            msg(expired_time=before + 60, deliver_limit=3, create_time=before - 5)
        )
    header = broker.stored[plain.message_id].header
    assert header.deliverLimit == 100
    assert before + 7 * 24 * 3600 <= header.expiredTime <= time.time() + 7 * 24 * 3600
    assert before <= header.createTime <= time.time()
    header = broker.stored[kept.message_id].header
    assert (header.expiredTime, header.deliverLimit, header.createTime) == (
        before + 60,
        3,
        before - 5,
    )


async def test_registry_file_routes_by_topic(broker: FakeBroker, tmp_path: Path) -> None:
    registry = tmp_path / "registry.toml"
    registry.write_text(f'[[brokers]]\naddress = "{broker.address}"\ntopics = ["trade"]\n')
    async with AsyncProducer(registry=f"file://{registry}", group_id="pay-svc") as producer:
        result = await producer.send(msg())
        assert result.broker == broker.address
        with pytest.raises(NotConnectedError, match="no broker serves topic 'user'"):
            await producer.send(msg(topic="user"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"brokers": ["127.0.0.1:1"], "group_id": "bad group"}, "group_id"),
        ({"group_id": "g"}, "brokers"),
        ({"brokers": ["a:1"], "registry": "file://x", "group_id": "g"}, "not both"),
        ({"registry": "zk://127.0.0.1:2181?bad=1", "group_id": "g"}, r"unknown parameter"),
        ({"registry": "http://x", "group_id": "g"}, "file://"),
        ({"registry": "file:///nonexistent/registry.toml", "group_id": "g"}, "registry"),
        ({"brokers": ["localhost"], "group_id": "g"}, "host:port"),
        ({"brokers": "127.0.0.1:1", "group_id": "g"}, "list"),
        ({"brokers": [], "group_id": "g"}, "at least one"),
        ({"brokers": ["a:1"], "group_id": "g", "max_batch": 5000}, "max_batch"),
        ({"brokers": ["a:1"], "group_id": "g", "timeout": 0}, "timeout"),
        ({"brokers": ["a:1"], "group_id": "g", "retries": -1}, "retries"),
        ({"brokers": ["a:1"], "group_id": "g", "max_pending": 1.5}, "integer"),
        ({"brokers": ["a:1"], "group_id": "g", "secret_key": "x" * 2000}, "secret_key"),
    ],
)
def test_invalid_options_are_config_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AsyncProducer(**kwargs)


async def test_a_dropped_stream_resends_to_the_other_broker(broker: FakeBroker) -> None:
    async with FakeBroker() as other:
        async with AsyncProducer(
            brokers=[broker.address, other.address], group_id="pay-svc"
        ) as producer:
            await producer.send(msg())
            await broker.wait_for(lambda: len(broker.sessions) == len(other.sessions) == 1)
            broker.drop_next = other.drop_next = 1
            message = msg()
            result = await producer.send(message)
        assert result.message_id == message.message_id
        # whichever got it first dropped the stream; the resend went to the other one
        assert message.message_id in broker.published_ids
        assert message.message_id in other.published_ids
