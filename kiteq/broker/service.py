"""The gRPC ``Broker`` servicer: sessions (publish, deliveries, acks) and unary publish.

Each session is one reader task (client frames) and the handler coroutine itself as the
only writer (gRPC allows one writer per stream). The dispatcher and intake queue work on
the ``Connection``; the writer drains it in batches, so everything queued in one loop
tick leaves in one frame.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import grpc

from kiteq.binding.model import Binding
from kiteq.binding.registry import BindingRegistry
from kiteq.broker import wire
from kiteq.core.clock import Clock
from kiteq.core.codes import AckCode
from kiteq.core.config import ClusterConfig
from kiteq.core.ids import is_message_id
from kiteq.core.limits import (
    MAX_BATCH_BYTES,
    MAX_BATCH_MESSAGES,
    MAX_BODY_BYTES,
    MAX_SECRET_BYTES,
    is_name,
)
from kiteq.core.message import StoredMessage
from kiteq.handler.connection import Connection, ConnectionTable, Outcome
from kiteq.handler.dispatch import Dispatcher
from kiteq.handler.intake import Intake
from kiteq.handler.recover import RecoverLoop
from kiteq.handler.transactions import TxManager, TxStatus
from kiteq.proto.v1 import broker_pb2, broker_pb2_grpc, common_pb2

logger = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = 1
MAX_IN_FLIGHT: Final = 10_000
DEFAULT_IN_FLIGHT: Final = 1000
# publish batches of one connection being persisted at once; beyond it the reader stops
# reading and HTTP/2 flow control pushes back on the client
MAX_CONCURRENT_PUBLISHES: Final = 32
# deliveries per frame, and their approximate byte budget
_FRAME_MESSAGES: Final = 500
_FRAME_BYTES: Final = 4 * 1024 * 1024


def add_to_server(service: BrokerService, server: grpc.aio.Server) -> None:
    """Register *service* like the generated helper does.

    The difference: session frames may be bytes already encoded by ``wire``.
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Session": grpc.stream_stream_rpc_method_handler(
            service.Session,
            request_deserializer=broker_pb2.ClientFrame.FromString,
            response_serializer=wire.serialize_server_frame,
        ),
        "Publish": grpc.unary_unary_rpc_method_handler(
            service.Publish,
            request_deserializer=broker_pb2.PublishRequest.FromString,
            response_serializer=broker_pb2.PublishResponse.SerializeToString,
        ),
    }
    name = broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


class BrokerService(broker_pb2_grpc.BrokerServicer):
    def __init__(
        self,
        *,
        config: ClusterConfig,
        advertised: str,
        intake: Intake,
        dispatcher: Dispatcher,
        connections: ConnectionTable,
        registry: BindingRegistry,
        recover: RecoverLoop,
        transactions: TxManager,
        clock: Clock,
    ) -> None:
        self._config = config
        self._advertised = advertised
        self._intake = intake
        self._dispatcher = dispatcher
        self._connections = connections
        self._registry = registry
        self._recover = recover
        self._transactions = transactions
        self._clock = clock

    async def Session(  # type: ignore[override]  # writes with context.write, not yield
        self,
        request_iterator: AsyncIterator[broker_pb2.ClientFrame],
        context: grpc.aio.ServicerContext[broker_pb2.ClientFrame, broker_pb2.ServerFrame | bytes],
    ) -> None:
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "open":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be 'open'")
        conn = await self._open(first.open, context)
        await context.write(
            broker_pb2.ServerFrame(
                opened=broker_pb2.Opened(
                    broker=self._advertised,
                    protocolVersion=PROTOCOL_VERSION,
                    maxBatchMessages=MAX_BATCH_MESSAGES,
                    maxBatchBytes=MAX_BATCH_BYTES,
                    maxBodyBytes=MAX_BODY_BYTES,
                )
            )
        )
        self._connections.add(conn)
        logger.info(
            "session opened conn=%d group=%s client=%s peer=%s in_flight=%d",
            conn.id,
            conn.group,
            conn.client_id,
            conn.peer,
            conn.max_in_flight,
        )
        if conn.consumer:
            self._dispatcher.connection_opened(conn)
            self._recover.wake()
        reader = asyncio.create_task(self._read(conn, request_iterator))
        reader.add_done_callback(lambda _: conn.wake.set())
        try:
            await self._write(conn, context, reader)
        finally:
            reader.cancel()
            try:
                await reader
            except asyncio.CancelledError:
                pass
            except Exception:
                logger.exception("session reader failed conn=%d", conn.id)
            self._dispatcher.connection_closed(conn)
            logger.info("session closed conn=%d group=%s", conn.id, conn.group)

    async def _open(
        self,
        meta: broker_pb2.Open,
        context: grpc.aio.ServicerContext[broker_pb2.ClientFrame, broker_pb2.ServerFrame | bytes],
    ) -> Connection:
        group = meta.groupId
        if not is_name(group):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid group id {group!r}")
        if len(meta.secretKey) > MAX_SECRET_BYTES or not self._config.check_secret(
            group, meta.secretKey
        ):
            logger.warning("authentication failed group=%s peer=%s", group, context.peer())
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"wrong secret for group {group!r}"
            )
        bindings = [wire.binding_from_pb(b).with_group(group) for b in meta.bindings]
        await self._declare(group, bindings, context)
        in_flight = min(meta.maxInFlight, MAX_IN_FLIGHT)
        if bindings and in_flight == 0:
            in_flight = DEFAULT_IN_FLIGHT
        return Connection(
            group=group,
            client_id=meta.clientId[:200],
            peer=context.peer(),
            max_in_flight=in_flight,
            warmup_seconds=max(0, meta.warmingupSec),
            opened_at=self._clock.monotonic(),
        )

    async def _declare(
        self,
        group: str,
        bindings: Sequence[Binding],
        context: grpc.aio.ServicerContext[broker_pb2.ClientFrame, broker_pb2.ServerFrame | bytes],
    ) -> None:
        for binding in bindings:
            try:
                binding.check()
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if not self._config.serves(binding.topic):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"binding topic {binding.topic!r} is not served by this broker",
                )
        if not bindings:
            return
        try:
            await self._registry.declare(group, bindings)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _read(self, conn: Connection, frames: AsyncIterator[broker_pb2.ClientFrame]) -> None:
        slots = asyncio.Semaphore(MAX_CONCURRENT_PUBLISHES)
        tasks: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            slots.release()
            if not task.cancelled() and task.exception() is not None:
                logger.error("publish task failed conn=%d", conn.id, exc_info=task.exception())

        try:
            async for frame in frames:
                kind = frame.WhichOneof("kind")
                if kind == "publish":
                    await slots.acquire()
                    task = asyncio.create_task(self._publish(conn, frame.publish.messages))
                    tasks.add(task)
                    task.add_done_callback(finished)
                elif kind == "acks":
                    self._dispatcher.acked(conn, [(a.messageId, a.status) for a in frame.acks.acks])
                elif kind == "tx":
                    await slots.acquire()
                    task = asyncio.create_task(self._decide(conn, frame.tx.acks))
                    tasks.add(task)
                    task.add_done_callback(finished)
                else:
                    logger.warning("ignoring unexpected %s frame conn=%d", kind, conn.id)
        finally:
            # publishes already read finish and queue their acks
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _decide(self, conn: Connection, acks: Sequence[broker_pb2.TxAck]) -> None:
        """A producer's transaction decisions, or its answers to checks."""
        source = f"producer {conn.name}"
        for ack in acks:
            if not is_message_id(ack.messageId):
                logger.warning("ignoring TxAck with invalid id from %s", conn.name)
                continue
            await self._transactions.decide(ack.messageId, TxStatus(int(ack.status)), source)

    async def _publish(self, conn: Connection, batch: Sequence[common_pb2.Message]) -> None:
        outcomes = await self._publish_batch(batch, conn)
        if not conn.closed:
            conn.send_acks(outcomes)

    async def _publish_batch(
        self, batch: Sequence[common_pb2.Message], origin: Connection | None = None
    ) -> list[Outcome]:
        if len(batch) > MAX_BATCH_MESSAGES:
            reason = f"batch of {len(batch)} messages exceeds {MAX_BATCH_MESSAGES}"
            return [Outcome(m.header.messageId, AckCode.INVALID_ARGUMENT, reason) for m in batch]
        return await self._intake.publish([wire.message_from_pb(m) for m in batch], batch, origin)

    async def _write(
        self,
        conn: Connection,
        context: grpc.aio.ServicerContext[broker_pb2.ClientFrame, broker_pb2.ServerFrame | bytes],
        reader: asyncio.Task[None],
    ) -> None:
        while True:
            await conn.wake.wait()
            conn.wake.clear()
            acks, deliveries = conn.drain()
            if acks:
                for start in range(0, len(acks), MAX_BATCH_MESSAGES):
                    await context.write(
                        wire.store_acks_frame(acks[start : start + MAX_BATCH_MESSAGES])
                    )
            if deliveries:
                for chunk in _chunks(deliveries):
                    await context.write(wire.deliveries_frame(chunk))
            checks = conn.drain_checks()
            if checks:
                await context.write(wire.checks_frame(checks))
            if reader.done() and not conn.wake.is_set():
                return

    async def Publish(
        self,
        request: broker_pb2.PublishRequest,
        context: grpc.aio.ServicerContext[broker_pb2.PublishRequest, broker_pb2.PublishResponse],
    ) -> broker_pb2.PublishResponse:
        group = request.groupId
        if not is_name(group):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid group id {group!r}")
        if not self._config.check_secret(group, request.secretKey):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"wrong secret for group {group!r}"
            )
        outcomes = await self._publish_batch(request.messages)
        return broker_pb2.PublishResponse(acks=wire.store_acks(outcomes))


def _chunks(items: list[tuple[StoredMessage, int]]) -> list[list[tuple[StoredMessage, int]]]:
    """Split deliveries into frames of bounded count and size."""
    chunks: list[list[tuple[StoredMessage, int]]] = []
    current: list[tuple[StoredMessage, int]] = []
    size = 0
    for item in items:
        body = len(item[0].message.body)
        if current and (len(current) >= _FRAME_MESSAGES or size + body > _FRAME_BYTES):
            chunks.append(current)
            current, size = [], 0
        current.append(item)
        size += body
    if current:
        chunks.append(current)
    return chunks
