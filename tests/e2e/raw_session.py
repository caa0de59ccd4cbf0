"""A broker session driven frame by frame with the generated stubs (what a hostile or
foreign client can send), for end-to-end tests of the broker's own checks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from types import TracebackType

import grpc

from kiteq.core.ids import new_message_id
from kiteq.proto.v1 import broker_pb2, broker_pb2_grpc, common_pb2


def message(
    *,
    topic: str = "trade",
    group_id: str = "",
    commit: bool = True,
    message_id: str | None = None,
    body: bytes = b"x",
    expired: int = 0,
) -> common_pb2.Message:
    """A pay-succ message as the wire carries it (*expired*: ``expiredTime``, 0: none)."""
    header = common_pb2.Header(
        messageId=message_id or new_message_id(),
        topic=topic,
        messageType="pay-succ",
        groupId=group_id,
        commit=commit,
        expiredTime=expired,
    )
    return common_pb2.Message(header=header, body=body)


def tx(message_id: str, status: int) -> broker_pb2.TxAck:
    ack = broker_pb2.TxAck(messageId=message_id, topic="trade")
    ack.status = status  # type: ignore[assignment]  # any int: the wire allows it
    return ack


class RawSession:
    """One ``Session`` call; ``open`` sends the open frame and waits for ``opened``."""

    def __init__(
        self,
        address: str,
        group: str,
        secret: str = "right",
        *,
        bindings: Sequence[common_pb2.Binding] = (),
        max_in_flight: int = 0,
    ) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = broker_pb2_grpc.BrokerStub(self._channel)
        self._open = broker_pb2.Open(
            groupId=group,
            secretKey=secret,
            clientId="raw",
            bindings=list(bindings),
            maxInFlight=max_in_flight,
            protocolVersion=1,
        )
        self._call: grpc.aio.StreamStreamCall[broker_pb2.ClientFrame, broker_pb2.ServerFrame]
        self._call = self._stub.Session()
        self.store_acks: list[broker_pb2.StoreAck] = []
        self.deliveries: list[common_pb2.Message] = []

    async def __aenter__(self) -> RawSession:
        await self.send(broker_pb2.ClientFrame(open=self._open))
        frame = await asyncio.wait_for(self._call.read(), 10)
        assert isinstance(frame, broker_pb2.ServerFrame)
        assert frame.WhichOneof("kind") == "opened", frame
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._call.cancel()
        await self._channel.close()

    async def send(self, frame: broker_pb2.ClientFrame) -> None:
        await self._call.write(frame)

    async def publish(self, *messages: common_pb2.Message) -> list[broker_pb2.StoreAck]:
        """Publish one batch and return its store-acks (in order)."""
        before = len(self.store_acks)
        await self.send(
            broker_pb2.ClientFrame(publish=broker_pb2.PublishBatch(messages=list(messages)))
        )
        await self.until(lambda: len(self.store_acks) >= before + len(messages))
        return self.store_acks[before : before + len(messages)]

    async def decide(self, *acks: broker_pb2.TxAck) -> None:
        await self.send(broker_pb2.ClientFrame(tx=broker_pb2.TxAckBatch(acks=list(acks))))

    async def until(self, done: Callable[[], bool], timeout: float = 15.0) -> None:
        """Read frames (acking every delivery) until ``done()`` is true."""

        async def read() -> None:
            while not done():
                frame = await self._call.read()
                assert isinstance(frame, broker_pb2.ServerFrame), f"the call ended: {frame}"
                kind = frame.WhichOneof("kind")
                if kind == "storeAcks":
                    self.store_acks.extend(frame.storeAcks.acks)
                elif kind == "deliveries":
                    got = [d.message for d in frame.deliveries.deliveries]
                    self.deliveries.extend(got)
                    acks = [
                        broker_pb2.DeliverAck(messageId=m.header.messageId, status=True)
                        for m in got
                    ]
                    await self.send(
                        broker_pb2.ClientFrame(acks=broker_pb2.DeliverAckBatch(acks=acks))
                    )

        await asyncio.wait_for(read(), timeout)

    def delivered_ids(self) -> list[str]:
        return [m.header.messageId for m in self.deliveries]
