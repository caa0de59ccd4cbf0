"""Transactional sends and transaction checks against the in-process fake broker."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from kiteq.client import (
    AsyncProducer,
    AuthenticationError,
    ConfigError,
    Message,
    NotConnectedError,
    Producer,
    PublishTimeoutError,
    ReceivedMessage,
    TxResult,
    TxStatus,
    UnknownTopicError,
    _tx,
    _tx_checks,
    _wire,
)
from kiteq.proto.v1 import broker_pb2, common_pb2
from tests.client._fake_broker import FakeBroker, ThreadedBroker

pytestmark = pytest.mark.timeout(30)

COMMIT, ROLLBACK, UNKNOWN = TxStatus.COMMIT, TxStatus.ROLLBACK, TxStatus.UNKNOWN


def msg(body: bytes = b"x", **kwargs: Any) -> Message:
    return Message(topic="trade", message_type="pay-succ", body=body, **kwargs)


def header(message_id: str, **kwargs: Any) -> common_pb2.Header:
    fields: dict[str, Any] = {"topic": "trade", "messageType": "pay-succ", "groupId": "pay-svc"}
    fields.update(kwargs)
    return common_pb2.Header(messageId=message_id, **fields)


def ids(n: int) -> list[str]:
    return [f"{i:032x}" for i in range(1, n + 1)]


def answered(broker: FakeBroker, message_id: str) -> bool:
    """True once *broker* has a transaction decision for *message_id*."""
    return message_id in broker.decisions()


# -- the outcome and the wire ------------------------------------------------------------


def test_tx_status_values_are_the_wire_values() -> None:
    assert {s.name: int(s) for s in TxStatus} == {
        "UNKNOWN": broker_pb2.TX_STATUS_UNKNOWN,
        "COMMIT": broker_pb2.TX_STATUS_COMMIT,
        "ROLLBACK": broker_pb2.TX_STATUS_ROLLBACK,
    }


def test_tx_result_is_frozen() -> None:
    result = TxResult("a" * 32, COMMIT, "127.0.0.1:1")
    assert result.error is None
    with pytest.raises(AttributeError):
        result.status = ROLLBACK  # type: ignore[misc]


def test_tx_frame_encodes_a_batch() -> None:
    frame = _wire.tx_frame(
        [_wire.TxAnswer("a" * 32, "trade", COMMIT), _wire.TxAnswer("b" * 32, "user", 0, "why")]
    )
    assert frame.WhichOneof("kind") == "tx"
    first, second = frame.tx.acks
    assert (first.messageId, first.topic, first.status, first.feedback) == (
        "a" * 32,
        "trade",
        broker_pb2.TX_STATUS_COMMIT,
        "",
    )
    assert (second.topic, second.status, second.feedback) == (
        "user",
        broker_pb2.TX_STATUS_UNKNOWN,
        "why",
    )


def test_checks_decode_to_a_header_view() -> None:
    frame = broker_pb2.ServerFrame(
        checks=broker_pb2.TxCheckBatch(
            checks=[broker_pb2.TxCheck(header=header("c" * 32, properties={"o": "1"}), check=3)]
        )
    )
    event = _wire.decode_server_frame(frame)
    assert isinstance(event, _wire.TxChecks)
    [check] = event.checks
    assert isinstance(check.message, ReceivedMessage)
    assert (check.message.message_id, check.message.attempt, check.check) == ("c" * 32, 3, 3)
    assert check.message.properties == {"o": "1"}
    assert check.message.body == b""


# -- AsyncProducer.send_transactional -----------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "status"),
    [
        (True, COMMIT),
        (False, ROLLBACK),
        (COMMIT, COMMIT),
        (ROLLBACK, ROLLBACK),
        (UNKNOWN, UNKNOWN),
        (None, UNKNOWN),
    ],
)
async def test_the_local_outcome_is_the_decision(
    broker: FakeBroker, outcome: object, status: TxStatus
) -> None:
    seen: list[Message] = []

    def local_tx(message: Message) -> Any:
        # the message is stored (uncommitted) before the local transaction runs
        assert message.message_id in broker.stored
        seen.append(message)
        return outcome

    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc") as producer:
        message = msg(properties={"order": "7"})
        result = await producer.send_transactional(message, local_tx)
        await broker.wait_for(lambda: len(broker.tx_acks) == 1)
    assert result == TxResult(message.message_id, status, broker.address, None)
    stored = broker.stored[message.message_id].header
    assert (stored.commit, stored.groupId) == (False, "pay-svc")
    assert message.commit  # the caller's message is not changed
    [local] = seen
    assert (local.message_id, local.commit, local.group_id) == (
        message.message_id,
        False,
        "pay-svc",
    )
    assert local.properties == {"order": "7"}
    [(session, ack)] = broker.tx_acks
    assert (ack.messageId, ack.topic, TxStatus(ack.status)) == (message.message_id, "trade", status)
    assert session is broker.publishers[message.message_id]  # the publishing session


async def test_an_async_local_tx_is_awaited(broker: FakeBroker) -> None:
    async def local_tx(message: Message) -> TxStatus:
        await asyncio.sleep(0.01)
        return ROLLBACK

    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc") as producer:
        result = await producer.send_transactional(msg(), local_tx)
        await broker.wait_for(lambda: len(broker.tx_acks) == 1)
    assert result.status is ROLLBACK
    assert broker.decisions() == {result.message_id: [ROLLBACK]}


@pytest.mark.parametrize("fails", ["raises", "bad type", "async raises"])
async def test_a_failing_local_tx_decides_unknown_and_reports_it(
    broker: FakeBroker, fails: str, caplog: pytest.LogCaptureFixture
) -> None:
    def raises(message: Message) -> bool:
        raise RuntimeError("db down")

    def bad_type(message: Message) -> Any:
        return "yes"

    async def async_raises(message: Message) -> bool:
        raise RuntimeError("db down")

    local_tx: Callable[[Message], Any] = {
        "raises": raises,
        "bad type": bad_type,
        "async raises": async_raises,
    }[fails]
    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc") as producer:
        with caplog.at_level(logging.ERROR, logger="kiteq.client"):
            result = await producer.send_transactional(msg(), local_tx)
        await broker.wait_for(lambda: len(broker.tx_acks) == 1)
    assert result.status is UNKNOWN
    expected = TypeError if fails == "bad type" else RuntimeError
    assert isinstance(result.error, expected)
    [(_, ack)] = broker.tx_acks
    assert TxStatus(ack.status) is UNKNOWN
    assert ack.feedback.startswith(expected.__name__)
    assert any("local transaction failed" in r.getMessage() for r in caplog.records)


async def test_local_tx_runs_only_after_the_store_ack(broker: FakeBroker) -> None:
    broker.hold = True
    ran = asyncio.Event()

    def local_tx(message: Message) -> bool:
        ran.set()
        return True

    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc") as producer:
        task = asyncio.ensure_future(producer.send_transactional(msg(), local_tx))
        await broker.wait_for(lambda: broker.publish_frames == 1)
        # a check sent after the publish arrived is answered: the producer has gone on
        # reading and writing that session, and still waits for the store-ack
        [canary] = ids(1)
        broker.push_checks([header(canary)])
        await broker.wait_for(lambda: canary in broker.decisions())
        assert not ran.is_set()
        assert broker.decisions() == {canary: [UNKNOWN]}  # no decision of the message
        broker.release()
        result = await asyncio.wait_for(task, 5)
    assert ran.is_set()
    assert result.status is COMMIT


async def test_a_failed_publish_raises_and_runs_nothing(broker: FakeBroker) -> None:
    broker.refuse = lambda m, n: (common_pb2.ERROR_CODE_UNKNOWN_TOPIC, "no such topic")
    calls: list[Message] = []
    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc") as producer:
        with pytest.raises(UnknownTopicError):
            await producer.send_transactional(msg(), calls.append)
        broker.refuse = None
        broker.silent = True
        with pytest.raises(PublishTimeoutError):
            await producer.send_transactional(msg(), calls.append, timeout=0.2)
    assert calls == []
    assert broker.tx_acks == []


async def test_invalid_arguments_fail_before_anything_is_sent(broker: FakeBroker) -> None:
    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc") as producer:
        with pytest.raises(TypeError):
            await producer.send_transactional(msg(), "not callable")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await producer.send_transactional(b"x", bool)  # type: ignore[arg-type]
        with pytest.raises(Exception, match="fly"):
            await producer.send_transactional(msg(fly=True), bool)
    assert broker.publish_frames == 0


async def test_many_decisions_share_frames(broker: FakeBroker) -> None:
    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc") as producer:
        results = await asyncio.gather(
            *(producer.send_transactional(msg(b"%d" % i), lambda m: True) for i in range(300))
        )
        await broker.wait_for(lambda: len(broker.tx_acks) == 300)
    assert {r.status for r in results} == {COMMIT}
    assert set(broker.decisions()) == {r.message_id for r in results}
    assert broker.tx_frames < 30, broker.tx_frames


async def test_each_decision_goes_to_the_broker_that_stored_the_message(
    broker: FakeBroker,
) -> None:
    async with FakeBroker() as other:
        async with AsyncProducer(
            brokers=[broker.address, other.address], group_id="pay-svc"
        ) as producer:
            await producer.send(msg())  # dials both
            await broker.wait_for(lambda: len(broker.sessions) == len(other.sessions) == 1)
            results = await asyncio.gather(
                *(producer.send_transactional(msg(), lambda m: True) for _ in range(40))
            )
            await broker.wait_for(lambda: len(broker.tx_acks) + len(other.tx_acks) == 40)
        for b in (broker, other):
            mine = {r.message_id for r in results if r.broker == b.address}
            assert set(b.decisions()) == mine
            assert mine <= set(b.stored)


async def test_a_decision_survives_a_lost_session(broker: FakeBroker) -> None:
    producer = AsyncProducer(brokers=[broker.address], group_id="pay-svc")

    async def local_tx(message: Message) -> bool:
        # the publishing session ends before the decision: it goes on the next one
        broker.drop_sessions()
        # the broker got a second Open, and the producer has that session open
        await broker.wait_for(
            lambda: len(broker.opens) == 2 and producer.connected_brokers == [broker.address]
        )
        return True

    async with producer:
        result = await producer.send_transactional(msg(), local_tx)
        await broker.wait_for(lambda: len(broker.tx_acks) == 1)
    [(session, ack)] = broker.tx_acks
    assert TxStatus(ack.status) is COMMIT
    assert session is not broker.publishers[result.message_id]  # a new session, same broker
    assert len(broker.opens) == 2


async def test_close_writes_the_decisions_made(broker: FakeBroker) -> None:
    producer = AsyncProducer(brokers=[broker.address], group_id="pay-svc")
    await producer.start()
    result = await producer.send_transactional(msg(), lambda m: False)
    await producer.close()
    assert broker.decisions() == {result.message_id: [ROLLBACK]}


def test_close_right_after_a_decision_writes_it_and_ends_cleanly(
    threaded_broker: ThreadedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    # close() must not cancel the decision writer in the middle of a write: that would
    # cancel the whole stream (and lose the decision)
    decided: list[str] = []
    with caplog.at_level(logging.WARNING, logger="kiteq.client"):
        for _ in range(20):
            with Producer(brokers=[threaded_broker.address], group_id="pay-svc") as producer:
                decided.append(producer.send_transactional(msg(), lambda m: True).message_id)
    threaded_broker.wait_for(lambda: len(threaded_broker.broker.tx_acks) == 20)
    assert list(threaded_broker.broker.decisions()) == decided
    assert [r.getMessage() for r in caplog.records] == []


# -- checks ----------------------------------------------------------------------------


async def test_the_checker_answers_with_the_header_on_the_same_session(
    broker: FakeBroker,
) -> None:
    seen: list[tuple[ReceivedMessage, str]] = []

    def checker(message: ReceivedMessage) -> TxStatus:
        seen.append((message, threading.current_thread().name))
        return COMMIT if message.properties["order"] == "paid" else ROLLBACK

    async with AsyncProducer(
        brokers=[broker.address], group_id="pay-svc", tx_checker=checker
    ) as producer:
        await broker.wait_for(lambda: len(broker.sessions) == 1)
        [checked_on] = broker.sessions
        paid, unpaid = ids(2)
        broker.push_checks(
            [header(paid, properties={"order": "paid"}), header(unpaid, properties={"order": "x"})],
            check=2,
        )
        await broker.wait_for(lambda: len(broker.tx_acks) == 2)
        assert not producer.closed
    assert broker.decisions() == {paid: [COMMIT], unpaid: [ROLLBACK]}
    assert all(session is checked_on for session, _ in broker.tx_acks)
    message, thread = seen[0]
    assert thread.startswith("kiteq-tx-checker")  # never on the loop
    assert (message.message_id, message.topic, message.message_type, message.group_id) == (
        paid,
        "trade",
        "pay-succ",
        "pay-svc",
    )
    assert (message.body, message.attempt, message.commit) == (b"", 2, False)


async def test_an_async_checker_runs_on_the_loop(broker: FakeBroker) -> None:
    async def checker(message: ReceivedMessage) -> bool:
        await asyncio.sleep(0.01)
        return message.message_id.endswith("1")

    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc", tx_checker=checker):
        await broker.wait_for(lambda: len(broker.sessions) == 1)
        first, second = ids(2)
        broker.push_checks([header(first), header(second)])
        await broker.wait_for(lambda: len(broker.tx_acks) == 2)
    assert broker.decisions() == {first: [COMMIT], second: [ROLLBACK]}


async def test_checks_are_answered_on_the_session_that_sent_them(broker: FakeBroker) -> None:
    async with FakeBroker() as other:
        async with AsyncProducer(
            brokers=[broker.address, other.address], group_id="pay-svc", tx_checker=bool
        ):
            # connected eagerly to both; each broker checks its own message
            await broker.wait_for(lambda: len(broker.sessions) == len(other.sessions) == 1)
            mine, theirs = ids(2)
            broker.push_checks([header(mine)])
            other.push_checks([header(theirs)])
            await broker.wait_for(lambda: len(broker.tx_acks) == len(other.tx_acks) == 1)
        assert list(broker.decisions()) == [mine]
        assert list(other.decisions()) == [theirs]


async def test_without_a_checker_checks_are_answered_unknown_and_logged_once(
    broker: FakeBroker, caplog: pytest.LogCaptureFixture
) -> None:
    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc") as producer:
        await producer.send(msg())
        first, second = ids(2)
        with caplog.at_level(logging.WARNING, logger="kiteq.client"):
            broker.push_checks([header(first)])
            broker.push_checks([header(second)])
            await broker.wait_for(lambda: len(broker.tx_acks) == 2)
    assert broker.decisions() == {first: [UNKNOWN], second: [UNKNOWN]}
    assert {ack.feedback for _, ack in broker.tx_acks} == {"no tx_checker"}
    warnings = [r.getMessage() for r in caplog.records if "no tx_checker" in r.getMessage()]
    assert warnings == [
        f"answering 1 transaction checks from broker={broker.address} UNKNOWN: no tx_checker"
    ]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_raising_or_hanging_checker_answers_unknown_and_blocks_nothing(
    broker: FakeBroker, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    failing, hanging, *healthy = ids(12)
    release = threading.Event()
    calls: list[str] = []

    def sync_checker(message: ReceivedMessage) -> bool:
        calls.append(message.message_id)
        if message.message_id == failing:
            raise RuntimeError("checker bug")
        if message.message_id == hanging:
            release.wait(20)
        return True

    async def async_checker(message: ReceivedMessage) -> bool:
        calls.append(message.message_id)
        if message.message_id == failing:
            raise RuntimeError("checker bug")
        if message.message_id == hanging:
            await asyncio.sleep(20)
        return True

    checker: Callable[[ReceivedMessage], bool | Awaitable[bool]] = (
        sync_checker if kind == "sync" else async_checker
    )
    async with AsyncProducer(
        brokers=[broker.address],
        group_id="pay-svc",
        tx_checker=checker,
        tx_check_timeout=0.5,
        tx_check_concurrency=2,
        close_timeout=0,
    ):
        await broker.wait_for(lambda: len(broker.sessions) == 1)
        with caplog.at_level(logging.WARNING, logger="kiteq.client"):
            start = time.monotonic()
            broker.push_checks([header(hanging), header(failing)])
            broker.push_checks([header(hanging)], check=2)  # while the first still runs
            broker.push_checks([header(i) for i in healthy])
            # the healthy ones are answered while the hanging one still runs
            await broker.wait_for(lambda: all(i in broker.decisions() for i in healthy))
            assert hanging not in broker.decisions()
            assert broker.decisions()[failing] == [UNKNOWN]
            await broker.wait_for(lambda: hanging in broker.decisions())
            assert time.monotonic() - start < 3.0
            if kind == "sync":
                # the thread still hangs: a new check of it does not start another call
                broker.push_checks([header(hanging)], check=3)
                broker.push_checks([header(healthy[0])], check=2)
                await broker.wait_for(lambda: len(broker.decisions()[healthy[0]]) == 2)
        release.set()
    decisions = broker.decisions()
    assert decisions[hanging] == [UNKNOWN]
    assert all(decisions[i][0] == COMMIT for i in healthy)
    assert calls.count(hanging) == 1
    feedback = {ack.messageId: ack.feedback for _, ack in broker.tx_acks}
    assert feedback[hanging] == "checker timed out after 0.5s"
    assert feedback[failing] == "RuntimeError: checker bug"
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"tx_checker failed id={failing}") for m in messages)
    assert any(m.startswith(f"tx_checker timed out id={hanging}") for m in messages)


async def test_a_checker_may_run_again_once_it_returned(broker: FakeBroker) -> None:
    calls: list[int] = []

    def checker(message: ReceivedMessage) -> None:
        calls.append(message.attempt)

    async with AsyncProducer(brokers=[broker.address], group_id="pay-svc", tx_checker=checker):
        await broker.wait_for(lambda: len(broker.sessions) == 1)
        [message_id] = ids(1)
        for check in (1, 2, 3):
            broker.push_checks([header(message_id)], check=check)
            await broker.wait_for(lambda: len(broker.tx_acks) == len(calls) == check)  # noqa: B023
    assert calls == [1, 2, 3]
    assert broker.decisions() == {message_id: [UNKNOWN] * 3}


async def test_a_checker_connects_at_start_to_every_broker(
    broker: FakeBroker, tmp_path: Path
) -> None:
    async with FakeBroker() as other:
        registry = tmp_path / "registry.toml"
        registry.write_text(
            f'[[brokers]]\naddress = "{broker.address}"\ntopics = ["trade"]\n'
            f'[[brokers]]\naddress = "{other.address}"\ntopics = ["user"]\n'
        )
        async with AsyncProducer(
            registry=f"file://{registry}", group_id="pay-svc", tx_checker=bool
        ):
            # start() waited for both (each answered the open), before any send
            assert len(broker.opens) == len(other.opens) == 1
            await broker.wait_for(lambda: len(broker.sessions) == len(other.sessions) == 1)
            # idle, no send: each session opened at start carries a check and its answer
            for checking, message_id in zip((broker, other), ids(2), strict=True):
                checking.push_checks([header(message_id)])
                await checking.wait_for(functools.partial(answered, checking, message_id))
            assert len(broker.sessions) == len(other.sessions) == 1
            assert len(broker.opens) == len(other.opens) == 1
        async with AsyncProducer(brokers=[broker.address], group_id="pay-svc") as lazy:
            # without a checker: lazy, started without a link to any broker
            assert lazy.connected_brokers == []
            assert len(broker.opens) == 1
            await lazy.send(msg())  # the first send dials
            assert len(broker.opens) == 2


async def test_a_checker_producer_with_a_wrong_secret_fails_at_start() -> None:
    async with FakeBroker(secret="right") as broker:
        producer = AsyncProducer(
            brokers=[broker.address], group_id="pay-svc", secret_key="wrong", tx_checker=bool
        )
        with pytest.raises(AuthenticationError):
            await producer.start()
        assert producer.closed


async def test_a_checker_producer_starts_while_its_broker_is_down() -> None:
    async with AsyncProducer(
        brokers=["127.0.0.1:1"], group_id="pay-svc", tx_checker=bool, connect_timeout=0.5
    ) as producer:
        with pytest.raises(NotConnectedError):
            await producer.send(msg(), timeout=0.3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tx_checker": "yes"}, "tx_checker"),
        ({"tx_checker": bool, "tx_check_timeout": 0}, "tx_check_timeout"),
        ({"tx_checker": bool, "tx_check_concurrency": 0}, "tx_check_concurrency"),
        ({"tx_checker": bool, "tx_check_concurrency": 1.5}, "integer"),
    ],
)
def test_invalid_tx_options_are_config_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AsyncProducer(brokers=["127.0.0.1:1"], group_id="g", **kwargs)


# -- Producer (blocking) -----------------------------------------------------------------


def test_sync_local_tx_runs_in_the_calling_thread(threaded_broker: ThreadedBroker) -> None:
    threads: list[int] = []

    def local_tx(message: Message) -> TxStatus:
        threads.append(threading.get_ident())
        return ROLLBACK

    with Producer(brokers=[threaded_broker.address], group_id="pay-svc") as producer:
        result = producer.send_transactional(msg(), local_tx)
        failed = producer.send_transactional(msg(), lambda m: 1 / 0 > 0)
        threaded_broker.wait_for(lambda: len(threaded_broker.broker.tx_acks) == 2)
    assert threads == [threading.get_ident()]
    assert (result.status, result.broker, result.error) == (
        ROLLBACK,
        threaded_broker.address,
        None,
    )
    assert failed.status is UNKNOWN
    assert isinstance(failed.error, ZeroDivisionError)
    assert threaded_broker.broker.decisions() == {
        result.message_id: [ROLLBACK],
        failed.message_id: [UNKNOWN],
    }
    assert threaded_broker.broker.stored[result.message_id].header.commit is False


def test_sync_producer_refuses_an_async_local_tx(threaded_broker: ThreadedBroker) -> None:
    async def local_tx(message: Message) -> bool:
        return True

    with Producer(brokers=[threaded_broker.address], group_id="pay-svc") as producer:
        with pytest.raises(TypeError, match="AsyncProducer"):
            producer.send_transactional(msg(), local_tx)  # type: ignore[arg-type]
        not_a_status: Any = lambda m: "commit"  # noqa: E731
        result = producer.send_transactional(msg(), not_a_status)
    assert result.status is UNKNOWN
    assert isinstance(result.error, TypeError)
    assert threaded_broker.broker.publish_frames == 1


def test_sync_producer_checker_and_close(threaded_broker: ThreadedBroker) -> None:
    broker = threaded_broker.broker

    async def checker(message: ReceivedMessage) -> TxStatus:
        return COMMIT

    with Producer(brokers=[threaded_broker.address], group_id="pay-svc", tx_checker=checker):
        assert len(broker.opens) == 1  # connected by the constructor
        threaded_broker.wait_for(lambda: len(broker.sessions) == 1)
        [message_id] = ids(1)
        threaded_broker.do(broker.push_checks, [header(message_id)])
        threaded_broker.wait_for(lambda: broker.decisions() == {message_id: [COMMIT]})


def test_sync_producer_with_a_checker_and_a_wrong_secret_raises() -> None:
    broker = ThreadedBroker(secret="right")
    try:
        with pytest.raises(AuthenticationError):
            Producer(brokers=[broker.address], group_id="pay-svc", secret_key="no", tx_checker=bool)
    finally:
        broker.close()


# -- internals ------------------------------------------------------------------------------


def test_checker_threads_queue_past_their_bound_and_reuse_idle_threads() -> None:
    threads = _tx_checks.CheckerThreads("test-checker", max_threads=2)
    gate = threading.Event()
    done: list[tuple[object, BaseException | None]] = []
    finished = threading.Semaphore(0)

    def record(result: object, error: BaseException | None) -> None:
        done.append((result, error))
        finished.release()

    running = threading.Semaphore(0)

    def blocked(value: object) -> object:
        running.release()
        gate.wait(10)
        return value

    def fails(value: object) -> object:
        raise ValueError(value)

    threads.run(blocked, 1, record)
    threads.run(blocked, 2, record)
    threads.run(fails, 3, record)  # no third thread: it waits for one of the first two
    # both threads are held in blocked(): nothing is free to run the queued call
    assert running.acquire(timeout=5)
    assert running.acquire(timeout=5)
    assert done == []
    assert len([t for t in threading.enumerate() if t.name.startswith("test-checker")]) == 2
    gate.set()
    for _ in range(3):
        assert finished.acquire(timeout=5)
    assert sorted(str(r) for r, e in done if e is None) == ["1", "2"]
    [(_, error)] = [(r, e) for r, e in done if e is not None]
    assert isinstance(error, ValueError)
    threads.run(blocked, 4, record)  # an idle thread takes it
    assert finished.acquire(timeout=5)
    assert len([t for t in threading.enumerate() if t.name.startswith("test-checker")]) == 2
    threads.shutdown()


async def test_the_outbox_keeps_a_bounded_number_of_decisions(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_tx, "_OUTBOX_LIMIT", 3)
    outbox = _tx.TxOutbox(lambda address: None)  # no session to any broker
    with caplog.at_level(logging.WARNING, logger="kiteq.client"):
        for message_id in ids(5):
            outbox.put("127.0.0.1:1", _wire.TxAnswer(message_id, "trade", COMMIT))
    assert len(outbox) == 3
    dropped = [r.getMessage() for r in caplog.records if "dropping decision" in r.getMessage()]
    assert len(dropped) == 2
    assert ids(2)[0] in dropped[0]
    await outbox.flush(0.1)
    assert len(outbox) == 0
