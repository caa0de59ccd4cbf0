"""Issue #9: one spelling per message id; upper and lower case are one message."""

from __future__ import annotations

import grpc

from kiteq.client import Message, Producer
from kiteq.core.ids import new_message_id
from kiteq.proto.v1 import broker_pb2, broker_pb2_grpc, common_pb2
from tests.e2e.broker_process import BrokerProcess
from tests.e2e.raw_session import RawSession, message

FANOUT = common_pb2.Binding(topic="trade", messageType="*", bindType=common_pb2.BIND_TYPE_FANOUT)


async def test_upper_and_lower_case_spellings_are_one_message_delivered_once(
    broker: BrokerProcess,
) -> None:
    lower = new_message_id()
    upper = lower.upper()
    async with (
        RawSession(broker.address, "acct", bindings=[FANOUT], max_in_flight=100) as acct,
        RawSession(broker.address, "pay") as pay,
    ):
        async with grpc.aio.insecure_channel(broker.address) as channel:
            reply = await broker_pb2_grpc.BrokerStub(channel).Publish(
                broker_pb2.PublishRequest(
                    groupId="pay", secretKey="s", messages=[message(message_id=upper)]
                ),
                timeout=10,
            )
        (first,) = reply.acks
        assert (first.messageId, first.status, first.feedback) == (upper, True, "")
        (second,) = await pay.publish(message(message_id=lower))
        assert second.status
        assert second.feedback.startswith("duplicate")
        mixed = lower[:16].upper() + lower[16:]
        with Producer(brokers=[broker.address], group_id="pay") as producer:
            sent = Message(topic="trade", message_type="pay-succ", body=b"x", message_id=mixed)
            result = producer.send(sent, timeout=10)
            assert result.duplicate
            # the client sends and reports the canonical spelling; the caller's message is
            # left as it was given
            assert (result.message_id, sent.message_id) == (lower, mixed)
            marker = producer.send(
                Message(topic="trade", message_type="pay-succ", body=b"marker"), timeout=10
            ).message_id
        # the marker was published after every spelling: once it is in, all of them are
        await acct.until(lambda: marker in acct.delivered_ids())
        assert acct.delivered_ids().count(lower) == 1
        assert upper not in acct.delivered_ids()
        assert mixed not in acct.delivered_ids()
    # any spelling finds it in the admin service too: one history, one publish
    kinds = [e.kind for e in broker.lookup(upper).history]
    assert kinds == [e.kind for e in broker.lookup(lower).history]
    assert kinds.count("published") == 1
    assert "acked" in kinds
