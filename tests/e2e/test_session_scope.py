"""Issue #9: a session acts only for the group it opened with (real broker process)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc, broker_pb2, broker_pb2_grpc, common_pb2
from tests.e2e.broker_process import BrokerProcess, strict_config
from tests.e2e.raw_session import RawSession, message, tx

COMMIT = broker_pb2.TX_STATUS_COMMIT
ROLLBACK = broker_pb2.TX_STATUS_ROLLBACK
DENIED = common_pb2.ERROR_CODE_PERMISSION_DENIED
INVALID = common_pb2.ERROR_CODE_INVALID_ARGUMENT
FANOUT = common_pb2.Binding(topic="trade", messageType="*", bindType=common_pb2.BIND_TYPE_FANOUT)


@pytest.fixture
def broker(tmp_path: Path, launch: Callable[..., BrokerProcess]) -> BrokerProcess:
    """Per-group secrets (no acceptAnySecret): pay and mallory publish, acct consumes."""
    return launch(strict_config(tmp_path, {"pay": "right", "mallory": "right", "acct": "right"}))


def consumer(broker: BrokerProcess) -> RawSession:
    return RawSession(broker.address, "acct", bindings=[FANOUT], max_in_flight=100)


def state(broker: BrokerProcess, message_id: str) -> admin_pb2.GetMessageResponse:
    return broker.lookup(message_id)


async def test_another_group_can_neither_commit_nor_roll_back_and_the_owner_still_decides(
    broker: BrokerProcess,
) -> None:
    async with (
        RawSession(broker.address, "pay") as owner,
        RawSession(broker.address, "mallory") as intruder,
        consumer(broker) as acct,
    ):
        pending = message(commit=False)
        mid = pending.header.messageId
        (ack,) = await owner.publish(pending)
        assert ack.status
        await intruder.decide(tx(mid, COMMIT), tx(mid, ROLLBACK))
        await intruder.until(lambda: len(intruder.store_acks) >= 2)
        assert [(a.messageId, a.status, a.code) for a in intruder.store_acks] == [
            (mid, False, DENIED),
            (mid, False, DENIED),
        ]
        assert "did not publish" in intruder.store_acks[0].feedback
        found = state(broker, mid)
        assert found.found, "a refused rollback removed nothing"
        assert not found.header.commit, "a refused commit committed nothing"
        assert found.header.groupId == "pay", "an empty groupId is the session's"
        # the owner's own decision works afterwards
        await owner.decide(tx(mid, COMMIT))
        await acct.until(lambda: mid in acct.delivered_ids())
        assert acct.deliveries[0].header.groupId == "pay"
    assert owner.store_acks == [ack], "an applied decision is not answered"
    kinds = [e.kind for e in state(broker, mid).history]
    assert kinds.count("tx_denied") == 2
    assert "committed" in kinds
    assert "rolled_back" not in kinds


async def test_a_spoofed_group_is_refused_and_nothing_is_stored(broker: BrokerProcess) -> None:
    async with RawSession(broker.address, "pay") as pay, consumer(broker) as acct:
        spoofed, empty, own = message(group_id="acct"), message(), message(group_id="pay")
        acks = await pay.publish(spoofed, empty, own)
        assert [(a.status, a.code) for a in acks] == [(False, DENIED), (True, 0), (True, 0)]
        assert "cannot publish for group 'acct'" in acks[0].feedback
        # the unary Publish takes its group from its own authentication
        unary_spoof = message(group_id="mallory")
        async with grpc.aio.insecure_channel(broker.address) as channel:
            reply = await broker_pb2_grpc.BrokerStub(channel).Publish(
                broker_pb2.PublishRequest(
                    groupId="pay", secretKey="right", messages=[unary_spoof, message()]
                ),
                timeout=10,
            )
        assert [(a.status, a.code) for a in reply.acks] == [(False, DENIED), (True, 0)]
        expected = {empty.header.messageId, own.header.messageId, reply.acks[1].messageId}
        await acct.until(lambda: expected <= set(acct.delivered_ids()))
        assert {m.header.groupId for m in acct.deliveries} == {"pay"}
    for refused in (spoofed, unary_spoof):
        assert not state(broker, refused.header.messageId).found
    assert refused.header.messageId not in acct.delivered_ids()
    with grpc.insecure_channel(broker.address) as channel:
        stats = admin_pb2_grpc.AdminStub(channel).Stats(admin_pb2.StatsRequest(), timeout=5)
    assert stats.received == 3


async def test_a_tx_batch_with_bad_items_applies_every_valid_one(broker: BrokerProcess) -> None:
    async with RawSession(broker.address, "pay") as pay, consumer(broker) as acct:
        first, second, third = (message(commit=False) for _ in range(3))
        ids = [m.header.messageId for m in (first, second, third)]
        assert all(a.status for a in await pay.publish(first, second, third))
        published = len(pay.store_acks)
        await pay.decide(
            tx(ids[0], 99),  # no such status
            tx(ids[0], COMMIT),
            tx("not-an-id", COMMIT),
            tx(ids[1], ROLLBACK),
            tx(ids[2].upper(), COMMIT),  # another spelling of the same id
        )
        await acct.until(lambda: {ids[0], ids[2]} <= set(acct.delivered_ids()))
        await pay.until(lambda: len(pay.store_acks) >= published + 2)
        answers = [(a.messageId, a.code) for a in pay.store_acks[published:]]
        assert answers == [(ids[0], INVALID), ("not-an-id", INVALID)]
        assert "unknown status 99" in pay.store_acks[published].feedback
    assert not state(broker, ids[1]).found, "the rollback was applied"
    assert ids[1] not in acct.delivered_ids()
