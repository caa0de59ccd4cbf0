"""The gRPC ``Broker`` servicer: sessions (publish, deliveries, acks) and unary publish.

Each session is one reader task (client frames) and the handler coroutine itself as the
only writer (gRPC allows one writer per stream). The dispatcher and intake queue work on
the ``Connection``; the writer drains it in batches, so everything queued in one loop
tick leaves in one frame.

A session acts only for the group it opened with: its messages carry that group (see
``Intake``), its TxAcks decide only that group's messages, its acks settle only its own
deliveries. Input is decoded here, not by gRPC, so a frame that is not protobuf (or not
allowed where it is) ends the call with ``INVALID_ARGUMENT`` and a short reason instead of
gRPC's ``UNKNOWN`` and a traceback per frame; every refusal is counted and logged through
``RejectionLog`` (bounded lines per peer).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple, NoReturn

import grpc
from google.protobuf.message import DecodeError

from kiteq.binding.base import BindingRegistry
from kiteq.binding.model import Binding
from kiteq.broker import wire
from kiteq.broker.credentials import check_credentials
from kiteq.broker.rejections import Rejection, RejectionLog
from kiteq.core.codes import AckCode
from kiteq.core.errors import PermissionDeniedError
from kiteq.core.ids import canonical_message_id, is_message_id
from kiteq.core.limits import (
    MAX_BATCH_BYTES,
    MAX_BATCH_MESSAGES,
    MAX_BODY_BYTES,
    MAX_FRAME_BYTES,
    MAX_PROPERTIES,
    MAX_PROPERTY_KEY_BYTES,
    MAX_PROPERTY_VALUE_BYTES,
)
from kiteq.core.message import TxStatus
from kiteq.handler.connection import Connection, StoreAck
from kiteq.handler.core import BrokerCore
from kiteq.handler.transactions import TxDecision
from kiteq.proto.v1 import broker_pb2, broker_pb2_grpc, common_pb2

if TYPE_CHECKING:
    from kiteq.ops.metrics import BrokerMetrics

logger = logging.getLogger(__name__)

SessionContext = grpc.aio.ServicerContext[bytes, broker_pb2.ServerFrame | bytes]

PROTOCOL_VERSION: Final = 1
MAX_IN_FLIGHT: Final = 10_000
DEFAULT_IN_FLIGHT: Final = 1000
# the receive limit of a client that announces none (gRPC's default), and the least one
# honoured: a header with the maximum properties must fit in one frame
DEFAULT_RECEIVE_BYTES: Final = 4 * 1024 * 1024
MIN_RECEIVE_BYTES: Final = 1024 * 1024
# keepalive policy of the gRPC server (server.py), announced in Opened
KEEPALIVE_TIME_MS: Final = 30_000
KEEPALIVE_TIMEOUT_MS: Final = 10_000
MIN_PING_INTERVAL_MS: Final = 10_000
MAX_PING_STRIKES: Final = 2
# publish batches of one connection being persisted at once; beyond it the reader stops
# reading and HTTP/2 flow control pushes back on the client
MAX_CONCURRENT_PUBLISHES: Final = 32
# how much of a refused id a TxAck answer echoes (an id field may hold anything)
_ECHO_ID_CHARS: Final = 64


class Refusal(NamedTuple):
    """Why the reader stopped reading a session: the call ends with INVALID_ARGUMENT."""

    reason: Rejection
    detail: str


def add_to_server(service: BrokerService, server: grpc.aio.Server) -> None:
    """Register *service* like the generated helper does.

    The differences: session frames may be bytes already encoded by ``wire``, and
    Requests arrive as bytes (no deserializer): the servicer decodes them, so that a
    frame that does not decode is answered with INVALID_ARGUMENT, not gRPC's UNKNOWN.
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Session": grpc.stream_stream_rpc_method_handler(
            service.Session,
            response_serializer=wire.serialize_server_frame,
        ),
        "Publish": grpc.unary_unary_rpc_method_handler(
            service.Publish,
            response_serializer=broker_pb2.PublishResponse.SerializeToString,
        ),
    }
    name = broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


class BrokerService(broker_pb2_grpc.BrokerServicer):
    def __init__(
        self,
        *,
        core: BrokerCore,
        advertised: str,
        registry: BindingRegistry,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self._config = core.config
        self._advertised = advertised
        self._intake = core.intake
        self._dispatcher = core.dispatcher
        self._connections = core.connections
        self._registry = registry
        self._recover = core.recover
        self._transactions = core.transactions
        self._clock = core.clock
        self._rejections = RejectionLog(core.clock, metrics)
        self._metrics = metrics

    async def Session(  # type: ignore[override]  # writes with context.write, not yield
        self,
        request_iterator: AsyncIterator[bytes],
        context: SessionContext,
    ) -> None:
        try:
            data = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            return
        first = _decode_frame(data)
        if first is None:
            await self._refuse(context, Rejection.UNDECODABLE, "the frame is not a ClientFrame")
        if first.WhichOneof("kind") != "open":
            await self._refuse(context, Rejection.UNEXPECTED, "the first frame must be 'open'")
        conn = await self._open(first.open, context)
        send_limit = _receive_limit(first.open.maxReceiveBytes)
        await context.write(
            broker_pb2.ServerFrame(
                opened=broker_pb2.Opened(
                    broker=self._advertised,
                    protocolVersion=PROTOCOL_VERSION,
                    maxBatchMessages=MAX_BATCH_MESSAGES,
                    maxBatchBytes=MAX_BATCH_BYTES,
                    maxBodyBytes=MAX_BODY_BYTES,
                    maxFrameBytes=MAX_FRAME_BYTES,
                    sendFrameBytes=send_limit,
                    maxProperties=MAX_PROPERTIES,
                    maxPropertyKeyBytes=MAX_PROPERTY_KEY_BYTES,
                    maxPropertyValueBytes=MAX_PROPERTY_VALUE_BYTES,
                    maxInFlight=conn.max_in_flight,
                    keepaliveTimeMs=KEEPALIVE_TIME_MS,
                    keepaliveTimeoutMs=KEEPALIVE_TIMEOUT_MS,
                    minPingIntervalMs=MIN_PING_INTERVAL_MS,
                    maxPingStrikes=MAX_PING_STRIKES,
                    deliverySeconds=int(self._config.delivery_seconds),
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
            self._recover.nudge()
        opened = self._clock.monotonic()
        reader = asyncio.create_task(self._read(conn, request_iterator))
        reader.add_done_callback(lambda _: conn.wake.set())
        refusal: Refusal | None = None
        # a reader cancelled by us (the stream ended, the broker stops) leaves "cancelled"
        reason = "cancelled"
        try:
            await self._write(conn, context, reader, send_limit)
        finally:
            ended_by_client = reader.done() and not reader.cancelled()
            reader.cancel()
            try:
                refusal = await reader
                if ended_by_client:
                    reason = "client_closed"
            except asyncio.CancelledError:
                pass
            except Exception:
                reason = "error"
                logger.exception("session reader failed conn=%d", conn.id)
            if refusal is not None:
                reason = "refused"
            self._dispatcher.connection_closed(conn)
            if self._metrics is not None:
                self._metrics.session_closed(reason)
            logger.info(
                "session closed conn=%d group=%s client=%s reason=%s%s duration_s=%.1f",
                conn.id,
                conn.group,
                conn.client_id,
                reason,
                f" ({refusal.reason.value})" if refusal is not None else "",
                self._clock.monotonic() - opened,
            )
        if refusal is not None:
            await self._refuse(context, refusal.reason, refusal.detail)

    async def _refuse(
        self, context: grpc.aio.ServicerContext[Any, Any], reason: Rejection, detail: str
    ) -> NoReturn:
        """End the call with INVALID_ARGUMENT and *detail*; counted, logged rate-limited."""
        self._rejections.note(context.peer(), reason, detail)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, detail)

    async def _authenticate(
        self, group: str, secret: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Refuse the call unless *secret* is *group*'s: INVALID_ARGUMENT or UNAUTHENTICATED."""
        refused = check_credentials(self._config, group, secret)
        if refused is Rejection.INVALID_OPEN:
            await self._refuse(context, Rejection.INVALID_OPEN, f"invalid group id {group[:64]!r}")
        if refused is not None:
            self._rejections.note(context.peer(), Rejection.UNAUTHENTICATED, f"group={group}")
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, f"wrong secret for group {group!r}"
            )

    async def _open(self, meta: broker_pb2.Open, context: SessionContext) -> Connection:
        group = meta.groupId
        await self._authenticate(group, meta.secretKey, context)
        if meta.protocolVersion != PROTOCOL_VERSION:
            await self._refuse(
                context,
                Rejection.INVALID_OPEN,
                f"protocolVersion {meta.protocolVersion} is not supported: this broker speaks "
                f"{PROTOCOL_VERSION}",
            )
        try:
            bindings = [wire.binding_from_pb(b).with_group(group) for b in meta.bindings]
        except ValueError as exc:  # an enum value the protocol does not define
            await self._refuse(context, Rejection.INVALID_OPEN, f"invalid binding: {exc}")
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
        context: SessionContext,
    ) -> None:
        for binding in bindings:
            try:
                binding.check()
            except ValueError as exc:
                await self._refuse(context, Rejection.INVALID_OPEN, str(exc))
            if not self._config.serves(binding.topic):
                await self._refuse(
                    context,
                    Rejection.INVALID_OPEN,
                    f"binding topic {binding.topic!r} is not served by this broker",
                )
        if not bindings:
            return
        try:
            await self._registry.declare(group, bindings)
        except ValueError as exc:
            await self._refuse(context, Rejection.INVALID_OPEN, str(exc))
        except PermissionDeniedError as exc:  # the cluster's acl: only authenticated peers
            logger.warning("bindings refused peer=%s: %s", context.peer(), exc.reason)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, exc.reason)

    async def _read(self, conn: Connection, frames: AsyncIterator[bytes]) -> Refusal | None:
        """Read *conn*'s frames until the client half-closes (None) or sends one it may not."""
        slots = asyncio.Semaphore(MAX_CONCURRENT_PUBLISHES)
        tasks: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            slots.release()
            if not task.cancelled() and task.exception() is not None:
                logger.error("publish task failed conn=%d", conn.id, exc_info=task.exception())

        async def spawn(work: Callable[[], Coroutine[Any, Any, None]]) -> None:
            # at most MAX_CONCURRENT_PUBLISHES batches of this session are handled at once
            await slots.acquire()
            task = asyncio.create_task(work())
            tasks.add(task)
            task.add_done_callback(finished)

        try:
            async for data in frames:
                frame = _decode_frame(data)
                if frame is None:
                    return Refusal(Rejection.UNDECODABLE, "the frame is not a ClientFrame")
                kind = frame.WhichOneof("kind")
                if kind == "publish":
                    await spawn(functools.partial(self._publish, conn, frame.publish.messages))
                elif kind == "acks":
                    self._acked(conn, frame.acks.acks)
                elif kind == "flow":
                    paused = frame.flow.state == broker_pb2.FLOW_STATE_PAUSED
                    self._dispatcher.flow(conn, paused)
                elif kind == "tx":
                    await spawn(functools.partial(self._decide, conn, frame.tx.acks))
                elif kind == "open":
                    return Refusal(Rejection.UNEXPECTED, "a second 'open' frame on a session")
                else:  # empty, or a kind this protocol version does not know
                    return Refusal(Rejection.UNEXPECTED, "unexpected empty frame")
            return None
        finally:
            # publishes already read finish and queue their acks
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    def _acked(self, conn: Connection, acks: Sequence[broker_pb2.DeliverAck]) -> None:
        results = []
        delays: dict[str, float] | None = None
        extended: list[str] | None = None
        for a in acks:
            message_id = canonical_message_id(a.messageId)
            # delays and deadline extensions (issue #17) are rare: plain acks stay cheap
            if a.action == broker_pb2.DELIVER_ACTION_IN_PROGRESS:
                if extended is None:
                    extended = []
                extended.append(message_id)
                continue
            if a.delayMs and not a.status:
                if delays is None:
                    delays = {}
                delays[message_id] = a.delayMs / 1000
            results.append((message_id, a.status))
        stray = self._dispatcher.extend(conn, extended) if extended else 0
        stray += self._dispatcher.acked(conn, results, delays)
        if stray:
            # late after a timeout, twice, or naming another session's delivery: none of
            # them settles anything
            self._rejections.note(
                conn.peer,
                Rejection.STRAY_ACK,
                f"conn={conn.id} group={conn.group}: {stray} acks name no delivery in flight",
                stray,
            )

    async def _decide(self, conn: Connection, acks: Sequence[broker_pb2.TxAck]) -> None:
        """A producer's transaction decisions, or its answers to checks, each on its own.

        An item refused (bad id or status, or a message of another group) is answered with
        a failed store-ack naming it; the items around it are applied all the same.
        """
        source = f"producer {conn.name}"
        refused: list[StoreAck] = []
        for ack in acks:
            sent_id = ack.messageId
            message_id = canonical_message_id(sent_id)
            if not is_message_id(message_id):
                refused.append(
                    StoreAck(
                        sent_id[:_ECHO_ID_CHARS],
                        AckCode.INVALID_ARGUMENT,
                        "tx: message id must be 32 hex characters",
                    )
                )
                continue
            try:
                status = TxStatus(ack.status)
            except ValueError:
                refused.append(
                    StoreAck(sent_id, AckCode.INVALID_ARGUMENT, f"tx: unknown status {ack.status}")
                )
                continue
            decision = await self._transactions.decide_for(conn.group, message_id, status, source)
            if decision is TxDecision.DENIED:
                refused.append(
                    StoreAck(
                        sent_id,
                        AckCode.PERMISSION_DENIED,
                        f"tx: group {conn.group!r} did not publish this message",
                    )
                )
        if not refused:
            return
        denied = sum(1 for o in refused if o.code is AckCode.PERMISSION_DENIED)
        for reason, n in (
            (Rejection.DENIED_TX, denied),
            (Rejection.INVALID_TX, len(refused) - denied),
        ):
            if n:
                self._rejections.note(
                    conn.peer, reason, f"conn={conn.id} group={conn.group}: {n} TxAck items", n
                )
        if not conn.closed:
            conn.send_acks(refused)

    async def _publish(self, conn: Connection, batch: Sequence[common_pb2.Message]) -> None:
        outcomes = await self._publish_batch(batch, conn.group, conn)
        if not conn.closed:
            conn.send_acks(outcomes)

    async def _publish_batch(
        self, batch: Sequence[common_pb2.Message], group: str, origin: Connection | None = None
    ) -> list[StoreAck]:
        if len(batch) > MAX_BATCH_MESSAGES:
            reason = f"batch of {len(batch)} messages exceeds {MAX_BATCH_MESSAGES}"
            return [StoreAck(m.header.messageId, AckCode.INVALID_ARGUMENT, reason) for m in batch]
        refused = _refused_in_batch(batch)
        if not refused:
            return await self._intake.publish(
                [wire.message_from_pb(m) for m in batch], group=group, wires=batch, origin=origin
            )
        taken = [m for i, m in enumerate(batch) if i not in refused]
        outcomes = iter(
            await self._intake.publish(
                [wire.message_from_pb(m) for m in taken], group=group, wires=taken, origin=origin
            )
            if taken
            else ()
        )
        return [refused[i] if i in refused else next(outcomes) for i in range(len(batch))]

    async def _write(
        self,
        conn: Connection,
        context: SessionContext,
        reader: asyncio.Task[Refusal | None],
        send_limit: int,
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
                for data in wire.delivery_frames(deliveries, send_limit):
                    await context.write(data)
            checks = conn.drain_checks()
            if checks:
                for frame in wire.checks_frames(checks, send_limit):
                    await context.write(frame)
            if reader.done() and not conn.wake.is_set():
                return

    async def Publish(  # type: ignore[override]  # decodes its request itself
        self,
        request: bytes,
        context: grpc.aio.ServicerContext[bytes, broker_pb2.PublishResponse],
    ) -> broker_pb2.PublishResponse:
        try:
            decoded = broker_pb2.PublishRequest.FromString(request)
        except DecodeError:
            await self._refuse(
                context, Rejection.UNDECODABLE, "the request is not a PublishRequest"
            )
        group = decoded.groupId
        await self._authenticate(group, decoded.secretKey, context)
        outcomes = await self._publish_batch(decoded.messages, group)
        return broker_pb2.PublishResponse(acks=wire.store_acks(outcomes))


def _decode_frame(data: bytes) -> broker_pb2.ClientFrame | None:
    """*data* as a ClientFrame; None when it is not one (bad wire format, invalid UTF-8)."""
    try:
        return broker_pb2.ClientFrame.FromString(data)
    except DecodeError:
        return None


def _receive_limit(announced: int) -> int:
    """The frame size the broker keeps under for a client that announced *announced*."""
    if announced == 0:
        return DEFAULT_RECEIVE_BYTES
    return min(max(announced, MIN_RECEIVE_BYTES), MAX_FRAME_BYTES)


def _refused_in_batch(batch: Sequence[common_pb2.Message]) -> dict[int, StoreAck]:
    """Messages of *batch* refused before intake, by position.

    Those past the batch's body budget (maxBatchBytes), and snappy ones.
    """
    refused: dict[int, StoreAck] = {}
    total = 0
    for i, m in enumerate(batch):
        total += len(m.body)
        if total > MAX_BATCH_BYTES:
            refused[i] = StoreAck(
                m.header.messageId,
                AckCode.BATCH_TOO_LARGE,
                f"the batch's bodies exceed maxBatchBytes ({MAX_BATCH_BYTES}); send it again",
            )
            total -= len(m.body)
        elif m.header.snappy:
            refused[i] = StoreAck(
                m.header.messageId,
                AckCode.INVALID_ARGUMENT,
                "snappy is not part of the protocol: nothing would decompress the body",
            )
    return refused
