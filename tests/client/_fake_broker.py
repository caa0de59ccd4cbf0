"""An in-process fake broker speaking ``Broker.Session``, for client tests.

It stores messages in memory and can be told to refuse messages (``refuse``), never
store-ack (``silent``), hold store-acks until ``release`` (``hold``), drop the stream on
the next publish frames (``drop_next``), require a secret, push deliveries while
recording the consumer's acks, and send transaction checks (``push_checks``) while
recording the producer's decisions (``tx_acks``, per session).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Final, TypeVar

import grpc

from kiteq.client._loop import LoopThread
from kiteq.core.ids import new_message_id
from kiteq.proto.v1 import broker_pb2, broker_pb2_grpc, common_pb2
from tests.waiting import eventually

_T = TypeVar("_T")

# Answer to a message: None stores it, (code, feedback) refuses it.
Refusal = Callable[[common_pb2.Message, int], "tuple[int, str] | None"]
Context = grpc.aio.ServicerContext[broker_pb2.ClientFrame, broker_pb2.ServerFrame]

_DROP: Final = object()
_END: Final = object()


def pb_message(
    topic: str = "trade", message_type: str = "pay-succ", body: bytes = b"x"
) -> common_pb2.Message:
    """A wire message with a fresh id, as a broker would deliver it."""
    return common_pb2.Message(
        header=common_pb2.Header(
            messageId=new_message_id(),
            topic=topic,
            messageType=message_type,
            groupId="pay-svc",
            commit=True,
            properties={"k": "v"},
            createTime=int(time.time()),
        ),
        body=body,
    )


class FakeSession:
    """One open session as the fake broker sees it."""

    def __init__(self, open_frame: broker_pb2.Open) -> None:
        self.open = open_frame
        self.outbox: asyncio.Queue[object] = asyncio.Queue()
        self.closed = False

    @property
    def consumer(self) -> bool:
        return self.open.maxInFlight > 0


class FakeBroker(broker_pb2_grpc.BrokerServicer):
    """A ``grpc.aio`` server on 127.0.0.1 implementing the session protocol in memory."""

    def __init__(self, *, secret: str | None = None) -> None:
        self.secret = secret
        self.refuse: Refusal | None = None
        self.silent = False
        self.hold = False
        self.held: list[tuple[FakeSession, broker_pb2.ServerFrame]] = []
        self.drop_next = 0
        self.open_error: tuple[grpc.StatusCode, str] | None = None
        self.opens: list[broker_pb2.Open] = []
        self.stored: dict[str, common_pb2.Message] = {}
        self.published_ids: list[str] = []
        self.publishers: dict[str, FakeSession] = {}  # message id -> session of its publish
        self.publish_frames = 0
        self.seen: collections.Counter[str] = collections.Counter()
        self.acks: list[broker_pb2.DeliverAck] = []
        self.ack_frames = 0
        self.tx_acks: list[tuple[FakeSession, broker_pb2.TxAck]] = []
        self.tx_frames = 0
        self.sessions: list[FakeSession] = []
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Serve on a free port, or on the previous one after ``stop`` (a restart)."""
        server = grpc.aio.server()
        broker_pb2_grpc.add_BrokerServicer_to_server(self, server)
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert port, "bind failed"
        self.port = port
        await server.start()
        self._server = server

    async def stop(self, grace: float | None = 0) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)

    async def __aenter__(self) -> FakeBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def wait_for(self, predicate: Callable[[], object], timeout: float = 5.0) -> None:
        """Poll until *predicate* holds."""
        await eventually(predicate, timeout, "a fake broker condition")

    def consumer_sessions(self) -> list[FakeSession]:
        return [s for s in self.sessions if s.consumer and not s.closed]

    def push(self, messages: Iterable[common_pb2.Message], attempt: int = 1) -> None:
        """Deliver *messages* in one frame to the first open consumer session."""
        session = self.consumer_sessions()[0]
        deliveries = [broker_pb2.Delivery(message=m, attempt=attempt) for m in messages]
        session.outbox.put_nowait(
            broker_pb2.ServerFrame(deliveries=broker_pb2.DeliveryBatch(deliveries=deliveries))
        )

    def push_checks(
        self,
        headers: Iterable[common_pb2.Header],
        check: int = 1,
        sessions: Iterable[FakeSession] | None = None,
    ) -> None:
        """Send one ``checks`` frame to *sessions* (default: every open session)."""
        frame = broker_pb2.ServerFrame(
            checks=broker_pb2.TxCheckBatch(
                checks=[broker_pb2.TxCheck(header=h, check=check) for h in headers]
            )
        )
        for session in self.sessions if sessions is None else sessions:
            session.outbox.put_nowait(frame)

    def decisions(self) -> dict[str, list[int]]:
        """The TxAck statuses received so far, by message id, in order."""
        decided: dict[str, list[int]] = {}
        for _, ack in self.tx_acks:
            decided.setdefault(ack.messageId, []).append(ack.status)
        return decided

    def release(self) -> None:
        """Send the store-acks held back while ``hold`` was set."""
        held, self.held = self.held, []
        for session, frame in held:
            session.outbox.put_nowait(frame)

    def drop_sessions(self) -> None:
        """End every open session with UNAVAILABLE."""
        for session in self.sessions:
            session.outbox.put_nowait(_DROP)

    async def Session(  # type: ignore[override]  # noqa: N802 - writes with context.write
        self,
        request_iterator: AsyncIterator[broker_pb2.ClientFrame],
        context: Context,
    ) -> None:
        frames = aiter(request_iterator)
        try:
            first = await anext(frames)
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "open":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be open")
        self.opens.append(first.open)
        if self.secret is not None and first.open.secretKey != self.secret:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong secret")
        if self.open_error is not None:
            await context.abort(*self.open_error)
        session = FakeSession(first.open)
        # Listed before the client can see ``opened``: a test that acts on the sessions
        # as soon as its client has started (``drop_sessions``) must find this one.
        self.sessions.append(session)
        reader = asyncio.create_task(self._read(session, frames))
        try:
            await context.write(
                broker_pb2.ServerFrame(
                    opened=broker_pb2.Opened(
                        broker=self.address,
                        protocolVersion=1,
                        maxBatchMessages=1000,
                        maxBatchBytes=8 * 1024 * 1024,
                        maxBodyBytes=4 * 1024 * 1024,
                    )
                )
            )
            while True:
                item = await session.outbox.get()
                if item is _END:
                    return
                if item is _DROP:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "dropped by the test")
                assert isinstance(item, broker_pb2.ServerFrame)
                await context.write(item)
        finally:
            session.closed = True
            self.sessions.remove(session)
            reader.cancel()

    async def _read(
        self, session: FakeSession, frames: AsyncIterator[broker_pb2.ClientFrame]
    ) -> None:
        try:
            async for frame in frames:
                kind = frame.WhichOneof("kind")
                if kind == "publish":
                    self.publish_frames += 1
                    messages = list(frame.publish.messages)
                    self.published_ids.extend(m.header.messageId for m in messages)
                    self.publishers.update((m.header.messageId, session) for m in messages)
                    if self.drop_next > 0:
                        self.drop_next -= 1
                        session.outbox.put_nowait(_DROP)
                        return
                    if self.silent:
                        continue
                    acks = [self._store(m) for m in messages]
                    reply = broker_pb2.ServerFrame(storeAcks=broker_pb2.StoreAckBatch(acks=acks))
                    if self.hold:
                        self.held.append((session, reply))
                    else:
                        session.outbox.put_nowait(reply)
                elif kind == "acks":
                    self.ack_frames += 1
                    self.acks.extend(frame.acks.acks)
                elif kind == "tx":
                    self.tx_frames += 1
                    self.tx_acks.extend((session, ack) for ack in frame.tx.acks)
        finally:
            session.outbox.put_nowait(_END)

    def _store(self, message: common_pb2.Message) -> broker_pb2.StoreAck:
        message_id = message.header.messageId
        self.seen[message_id] += 1
        refusal = self.refuse(message, self.seen[message_id]) if self.refuse else None
        if refusal is not None:
            code, feedback = refusal
            return broker_pb2.StoreAck(
                messageId=message_id,
                status=False,
                code=common_pb2.ErrorCode.ValueType(code),
                feedback=feedback,
            )
        duplicate = message_id in self.stored
        self.stored[message_id] = message
        return broker_pb2.StoreAck(
            messageId=message_id,
            status=True,
            disposition=broker_pb2.STORE_DISPOSITION_DUPLICATE
            if duplicate
            else broker_pb2.STORE_DISPOSITION_STORED,
        )

    async def Publish(  # noqa: N802 - gRPC method name
        self, request: broker_pb2.PublishRequest, context: Context
    ) -> broker_pb2.PublishResponse:
        return broker_pb2.PublishResponse(acks=[self._store(m) for m in request.messages])


class ThreadedBroker:
    """A ``FakeBroker`` on its own event loop thread, for the blocking facades' tests."""

    def __init__(self, *, secret: str | None = None) -> None:
        self._thread = LoopThread("fake-broker")
        self.broker = FakeBroker(secret=secret)
        self.call(self.broker.start())

    @property
    def address(self) -> str:
        return self.broker.address

    def call(self, coro: Awaitable[_T], timeout: float = 10.0) -> _T:
        async def run() -> _T:
            return await coro

        return self._thread.run(run(), timeout)

    def do(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a plain method of the broker on its loop."""

        async def run() -> None:
            fn(*args)

        self.call(run())

    def wait_for(self, predicate: Callable[[], object], timeout: float = 5.0) -> None:
        self.call(self.broker.wait_for(predicate, timeout), timeout + 1)

    def close(self) -> None:
        self.call(self.broker.stop())
        self._thread.stop()
