"""Issue #5 end to end: transactional messages with real broker and producer processes.

Checks are fast here (first after 1 s, then every 1 s); a message is parked unresolved
after ``txCheckMax`` unanswered checks (3 by default here, more where a test must not
race the parking). Two consumer groups bind the topic, so "exactly once to each group"
is checked on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kiteq.client import (
    Binding,
    Consumer,
    Message,
    Producer,
    ReceivedMessage,
    TxStatus,
    _wire,
)
from kiteq.client._channel import Session, open_params
from tests.e2e.broker_process import REPO, BrokerProcess, write_config
from tests.e2e.collector import Collector
from tests.e2e.helpers import admin_json
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(90)

GROUPS = ("acct", "audit")
FAST_CHECKS = {"txCheckDelaySeconds": 1, "txCheckIntervalSeconds": 1, "txCheckMax": 3}


def start_broker(tmp_path: Path, **extra: object) -> BrokerProcess:
    config = write_config(
        tmp_path, db=f"rocksdb://{tmp_path / 'db'}?fsync=batch", extra={**FAST_CHECKS, **extra}
    )
    process = BrokerProcess(config)
    process.start()
    return process


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A broker checking after 1 s, every 1 s, at most 3 times."""
    process = start_broker(tmp_path)
    yield process
    process.stop_quietly()


@pytest.fixture
def patient_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """As ``broker``, with 20 checks: the tests here take a few seconds to answer."""
    process = start_broker(tmp_path, txCheckMax=20)
    yield process
    process.stop_quietly()


@contextlib.contextmanager
def consumers(broker: BrokerProcess) -> Iterator[dict[str, Collector]]:
    """One consumer in each of two groups bound to every message of ``trade``."""
    got = {group: Collector() for group in GROUPS}
    with contextlib.ExitStack() as stack:
        for group, collector in got.items():
            stack.enter_context(
                Consumer(
                    brokers=[broker.address],
                    group_id=group,
                    secret_key="s",
                    bindings=[Binding.fanout("trade")],
                    handler=collector,
                )
            )
        yield got


def delivered(got: dict[str, Collector]) -> dict[str, list[str]]:
    return {group: collector.ids() for group, collector in got.items()}


def nothing_delivered(got: dict[str, Collector]) -> bool:
    return all(not ids for ids in delivered(got).values())


def wait_delivered_once(broker: BrokerProcess, got: dict[str, Collector], message_id: str) -> None:
    """Wait until each group has it, and a recover scan has passed: still once per group."""
    for collector in got.values():
        collector.wait_for(lambda received: any(m.message_id == message_id for m in received))
    broker.passed_recover_scan()  # a redelivery would have been offered by now
    assert delivered(got) == {group: [message_id] for group in GROUPS}


def late_answers_recorded(kinds: list[str]) -> bool:
    """Both batches of answers of the duplicate-decision test are in the history."""
    return kinds.count("committed_ignored") == 2 and kinds.count("rolled_back_ignored") == 2


def passed_checks(broker: BrokerProcess, p: Producer) -> None:
    """Until every transaction check due before now has been sent.

    A canary published now, undecided, is checked after the same delay as every message
    published before it: once its check is sent, theirs would have been. The canary is then
    rolled back.
    """
    canary = p.send_transactional(trade("canary"), lambda m: None).message_id
    wait_until(lambda: "tx_check" in history(broker, canary), 30, "the canary's check")
    admin_json(broker, "rollback", canary)


def history(broker: BrokerProcess, message_id: str) -> list[str]:
    return [event["kind"] for event in admin_json(broker, "message", message_id).get("history", [])]


def transactions(broker: BrokerProcess, *args: str) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = admin_json(broker, "tx", *args).get("transactions", [])
    return listed


def trade(order: str = "1") -> Message:
    return Message(topic="trade", message_type="pay-succ", body=b"tx", properties={"order": order})


class Checker:
    """A sync ``tx_checker`` that records its calls and answers with ``decide``."""

    def __init__(
        self,
        decide: Callable[[ReceivedMessage], TxStatus],
        got: dict[str, Collector] | None = None,
    ) -> None:
        self._decide = decide
        self._got = got
        self._lock = threading.Lock()
        self.calls: list[ReceivedMessage] = []
        # were deliveries seen when each check arrived? (they must not be)
        self.seen_deliveries: list[bool] = []

    def __call__(self, message: ReceivedMessage) -> TxStatus:
        with self._lock:
            self.calls.append(message)
            if self._got is not None:
                self.seen_deliveries.append(not nothing_delivered(self._got))
        return self._decide(message)

    def checked(self, message_id: str) -> list[int]:
        with self._lock:
            return [m.attempt for m in self.calls if m.message_id == message_id]


# -- the local transaction decides ----------------------------------------------------------


def test_a_committed_local_transaction_is_delivered_exactly_once_to_each_group(
    broker: BrokerProcess,
) -> None:
    undelivered: list[bool] = []
    with consumers(broker) as got, Producer(brokers=[broker.address], group_id="pay") as p:

        def local_tx(message: Message) -> bool:
            # stored, and its first check sent: still not delivered
            wait_until(lambda: "tx_check" in history(broker, message.message_id), 30, "a check")
            broker.passed_recover_scan()
            undelivered.append(nothing_delivered(got))
            return True

        result = p.send_transactional(trade(), local_tx)
        assert undelivered == [True]
        assert (result.status, result.broker, result.error) == (
            TxStatus.COMMIT,
            broker.address,
            None,
        )
        wait_delivered_once(broker, got, result.message_id)
    kinds = history(broker, result.message_id)
    assert kinds.index("committed") < kinds.index("delivered")
    assert transactions(broker) == []


def test_a_rolled_back_local_transaction_is_never_delivered(broker: BrokerProcess) -> None:
    with consumers(broker) as got, Producer(brokers=[broker.address], group_id="pay") as p:
        result = p.send_transactional(trade(), lambda m: False)
        assert result.status is TxStatus.ROLLBACK
        passed_checks(broker, p)  # any check of it would have been sent
        broker.passed_recover_scan()
        assert nothing_delivered(got)
    info = admin_json(broker, "message", result.message_id)
    assert info.get("state") == "MESSAGE_STATE_GONE"
    assert "rolled_back" in history(broker, result.message_id)
    assert "tx_check" not in history(broker, result.message_id)
    assert transactions(broker) == []


# -- a producer dies between the store-ack and its decision ----------------------------------


@pytest.mark.parametrize(
    "decision", [TxStatus.COMMIT, TxStatus.ROLLBACK], ids=["commit", "rollback"]
)
def test_a_killed_producer_is_answered_by_another_process_of_its_group(
    patient_broker: BrokerProcess, decision: TxStatus
) -> None:
    broker = patient_broker
    with consumers(broker) as got:
        doomed = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("tx_producer.py")),
                broker.address,
                "pay",
                "order-7",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert doomed.stdout is not None
            message_id = doomed.stdout.readline().strip()  # written after the store-ack
            assert len(message_id) == 32, message_id
            os.kill(doomed.pid, signal.SIGKILL)
            doomed.wait(10)
        finally:
            if doomed.poll() is None:
                doomed.kill()
                doomed.wait(10)
            if doomed.stdout is not None:
                doomed.stdout.close()
        # checks go unanswered meanwhile: nothing is delivered without a decision
        wait_until(lambda: history(broker, message_id).count("tx_check") >= 2)
        assert nothing_delivered(got)
        checker = Checker(lambda m: decision, got)
        with Producer(brokers=[broker.address], group_id="pay", tx_checker=checker):
            wait_until(lambda: bool(checker.checked(message_id)))
            if decision is TxStatus.COMMIT:
                wait_delivered_once(broker, got, message_id)
            else:
                wait_until(lambda: "rolled_back" in history(broker, message_id), 30, "rollback")
                broker.passed_recover_scan()
                assert nothing_delivered(got)
    [first, *_] = checker.calls
    assert (first.message_id, first.topic, first.message_type, first.group_id) == (
        message_id,
        "trade",
        "pay-succ",
        "pay",
    )
    assert first.properties == {"order": "order-7"}
    assert first.body == b""
    assert checker.seen_deliveries[0] is False
    assert len(checker.checked(message_id)) == 1  # decided at the first answer
    kinds = history(broker, message_id)
    assert ("committed" if decision is TxStatus.COMMIT else "rolled_back") in kinds
    if decision is TxStatus.ROLLBACK:
        assert admin_json(broker, "message", message_id).get("state") == "MESSAGE_STATE_GONE"
    assert transactions(broker) == []


# -- nobody knows: unresolved, then an operator decides ---------------------------------------


def test_unknown_forever_is_unresolved_after_the_last_check_then_an_admin_commit_delivers(
    broker: BrokerProcess,
) -> None:
    checker = Checker(lambda m: TxStatus.UNKNOWN)
    with (
        consumers(broker) as got,
        Producer(brokers=[broker.address], group_id="pay", tx_checker=checker) as p,
    ):
        result = p.send_transactional(trade(), lambda m: TxStatus.UNKNOWN)
        assert result.status is TxStatus.UNKNOWN
        message_id = result.message_id
        wait_until(lambda: bool(transactions(broker, "-unresolved")))
        [parked] = transactions(broker, "-unresolved")
        assert parked["header"]["messageId"] == message_id
        assert parked["unresolved"] is True
        assert checker.checked(message_id) == [1, 2, 3]  # txCheckMax checks, no more
        stats = broker.stats()
        assert (stats.pendingTransactions, stats.unresolvedTransactions) == (0, 1)
        passed_checks(broker, p)  # a fourth check would have been sent by now
        assert checker.checked(message_id) == [1, 2, 3]
        assert nothing_delivered(got)

        assert admin_json(broker, "commit", message_id) == {"changed": True}
        wait_delivered_once(broker, got, message_id)
        # decided already: nothing changed, which kiteq-admin says with exit code 4
        assert admin_json(broker, "commit", message_id, exit_code=4) == {"changed": False}
    assert transactions(broker, "-unresolved") == []
    assert broker.stats().unresolvedTransactions == 0
    kinds = history(broker, message_id)
    assert kinds.count("tx_check") == 3
    assert "unresolved" in kinds
    assert kinds.index("committed") > kinds.index("unresolved")


# -- decisions are final ---------------------------------------------------------------------


async def test_a_duplicate_commit_or_a_late_unknown_or_rollback_changes_nothing(
    broker: BrokerProcess,
) -> None:
    session = Session(broker.address, open_params(group_id="pay", secret_key="s", client_id="raw"))
    await session.open(5.0)

    def answers(message_id: str, *statuses: TxStatus) -> list[_wire.TxAnswer]:
        return [_wire.TxAnswer(message_id, "trade", status) for status in statuses]

    try:
        with consumers(broker) as got:
            # the producer does not decide; the decisions come in raw TxAck frames
            with Producer(brokers=[broker.address], group_id="pay") as p:
                message_id = p.send_transactional(trade(), lambda m: None).message_id
            await session.send_tx(
                answers(message_id, TxStatus.COMMIT, TxStatus.COMMIT, TxStatus.UNKNOWN)
                + answers(message_id, TxStatus.ROLLBACK)
            )
            await asyncio.to_thread(wait_delivered_once, broker, got, message_id)
            await session.send_tx(
                answers(message_id, TxStatus.ROLLBACK, TxStatus.UNKNOWN, TxStatus.COMMIT)
            )
            # the three late answers are recorded (ignored), and no scan redelivers
            await asyncio.to_thread(
                wait_until,
                lambda: late_answers_recorded(history(broker, message_id)),
                30,
                "the late answers",
            )
            await asyncio.to_thread(broker.passed_recover_scan)
            assert delivered(got) == {group: [message_id] for group in GROUPS}
    finally:
        await session.close()
    kinds = history(broker, message_id)
    assert kinds.count("committed") == 1
    assert kinds.count("committed_ignored") == 2
    assert kinds.count("rolled_back_ignored") == 2
    assert "rolled_back" not in kinds
    assert kinds.count("delivered") == len(GROUPS)


# -- a broker restart ------------------------------------------------------------------------


def test_a_restarted_broker_resumes_the_checks_of_uncommitted_messages(
    patient_broker: BrokerProcess,
) -> None:
    broker = patient_broker
    with Producer(brokers=[broker.address], group_id="pay") as p:
        results = [p.send_transactional(trade(str(i)), lambda m: None) for i in range(3)]
    assert broker.terminate() == 0
    broker.start()
    assert {t["header"]["messageId"] for t in transactions(broker)} == {
        r.message_id for r in results
    }
    with consumers(broker) as got:
        # order 0 commits, 1 rolls back, 2 stays unknown (still checked)
        outcome = {"0": TxStatus.COMMIT, "1": TxStatus.ROLLBACK, "2": TxStatus.UNKNOWN}
        checker = Checker(lambda m: outcome[m.properties["order"]], got)
        with Producer(brokers=[broker.address], group_id="pay", tx_checker=checker):
            committed, rolled_back, unknown = (r.message_id for r in results)
            wait_delivered_once(broker, got, committed)
            wait_until(lambda: len(checker.checked(unknown)) >= 2)
    assert checker.seen_deliveries[0] is False
    assert len(checker.checked(committed)) == len(checker.checked(rolled_back)) == 1
    assert [t["header"]["messageId"] for t in transactions(broker)] == [unknown]
    assert admin_json(broker, "message", rolled_back).get("state") == "MESSAGE_STATE_GONE"


# -- a broken checker ------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["hangs", "raises"])
def test_a_hanging_or_raising_checker_does_not_stop_checks_of_other_messages(
    patient_broker: BrokerProcess, fault: str
) -> None:
    broker = patient_broker
    release = threading.Event()
    stuck: list[str] = []

    def decide(message: ReceivedMessage) -> TxStatus:
        if message.properties["order"] == "bad":
            stuck.append(message.message_id)
            if fault == "raises":
                raise RuntimeError("checker bug")
            release.wait(60)
        return TxStatus.COMMIT

    checker = Checker(decide)
    try:
        with (
            consumers(broker) as got,
            Producer(
                brokers=[broker.address],
                group_id="pay",
                tx_checker=checker,
                tx_check_timeout=0.5,
                close_timeout=1.0,
            ) as p,
        ):
            bad = p.send_transactional(trade("bad"), lambda m: None).message_id
            wait_until(lambda: bool(stuck))  # the first check of the bad one is running
            good = p.send_transactional(trade("good"), lambda m: None).message_id
            wait_delivered_once(broker, got, good)
            assert all(bad not in ids for ids in delivered(got).values())
        if fault == "hangs":
            # one call of the hung checker: later checks of it are not started again
            assert checker.checked(bad) == [1]
        else:
            assert len(checker.checked(bad)) >= 2  # every check runs it again
        info = admin_json(broker, "message", bad)
        assert info.get("state") == "MESSAGE_STATE_LIVE"
        assert "tx_unknown" in history(broker, bad)
    finally:
        release.set()
