"""Connections to brokers: one ``Broker.Session`` stream per broker, kept open by a ``Link``.

Everything here runs on one event loop (the caller's for the asyncio classes, the private
loop thread for the sync facades): grpc.aio objects must stay on the loop that made them.
gRPC failures become ``kiteq.core.errors`` in exactly one place, ``mapped_rpc_errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import os
import random
import socket
from collections.abc import Iterable, Iterator
from typing import Final, Protocol

import grpc

from kiteq.binding.model import Binding
from kiteq.client import _wire
from kiteq.client._tls import PLAINTEXT, Transport
from kiteq.core.errors import (
    AuthenticationError,
    ConfigError,
    KiteQError,
    NotConnectedError,
    ProtocolError,
)
from kiteq.core.ids import new_message_id
from kiteq.core.limits import MAX_FRAME_BYTES, MAX_SECRET_BYTES, is_name
from kiteq.core.message import Message, ReceivedMessage
from kiteq.core.tasks import TaskSet
from kiteq.proto.v1 import broker_pb2, broker_pb2_grpc

__all__ = [
    "CHANNEL_OPTIONS",
    "Link",
    "Session",
    "SessionListener",
    "backoff_delay",
    "check_positive",
    "fresh_error",
    "mapped_rpc_errors",
    "open_params",
]

logger = logging.getLogger(__name__)


# Keepalive must agree with the broker's min_recv_ping_interval (10 s) or it answers GOAWAY
# "too_many_pings"; it replaces KiteQ's HeartBeat packet.
CHANNEL_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_FRAME_BYTES),
    ("grpc.max_send_message_length", MAX_FRAME_BYTES),
)

INITIAL_BACKOFF: Final = 0.1

# Status codes that no reconnect can fix; everything else is a lost connection.
_FATAL_STATUS: Final[dict[grpc.StatusCode, type[KiteQError]]] = {
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.INVALID_ARGUMENT: ConfigError,
    grpc.StatusCode.FAILED_PRECONDITION: ConfigError,
    grpc.StatusCode.UNIMPLEMENTED: ProtocolError,
}


@contextlib.contextmanager
def mapped_rpc_errors(address: str) -> Iterator[None]:
    """Translate gRPC failures on the stream to *address* into the kiteq hierarchy.

    Raises:
        AuthenticationError: The broker refused the group's secret (not retriable).
        ConfigError: The broker refused the open frame (bad group, binding or pattern).
        ProtocolError: The broker does not implement the session protocol.
        NotConnectedError: Any other failure: the connection is lost (retriable).
    """
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        details = exc.details() or code.name
        fatal = _FATAL_STATUS.get(code)
        if fatal is not None:
            raise fatal(f"broker {address}: {details}") from exc
        raise NotConnectedError(f"broker {address}: {code.name}: {details}") from exc
    except (asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
        # grpc.aio raises these for a write on a finished call or a closed channel
        raise NotConnectedError(f"broker {address}: the session has ended") from exc


def open_params(
    *,
    group_id: str,
    secret_key: str,
    client_id: str | None,
    warmup_seconds: float = 0,
    bindings: Iterable[Binding] = (),
    max_in_flight: int = 0,
) -> _wire.OpenParams:
    """Validate the connection options shared by producers and consumers.

    Raises:
        ConfigError: An option is invalid; the message names it.
    """
    if not _is_str(group_id) or not is_name(group_id):
        raise ConfigError(f"group_id {group_id!r} must match [A-Za-z0-9._-]{{1,249}}")
    if not _is_str(secret_key) or len(secret_key.encode()) > MAX_SECRET_BYTES:
        raise ConfigError(f"secret_key must be a string of at most {MAX_SECRET_BYTES} bytes")
    if client_id is None:
        client_id = f"{socket.gethostname()}:{os.getpid()}:{new_message_id()[-8:]}"
    checked: list[Binding] = []
    for binding in bindings:
        if not isinstance(binding, Binding):
            raise ConfigError(f"bindings must be Binding objects, got {binding!r}")
        bound = binding.with_group(group_id)
        try:
            bound.check()
        except ValueError as exc:
            raise ConfigError(f"bindings: {exc}") from exc
        checked.append(bound)
    check_positive("warmup_seconds", warmup_seconds, allow_zero=True)
    return _wire.OpenParams(
        group_id=group_id,
        secret_key=secret_key,
        client_id=client_id[:200],
        warmup_seconds=math.ceil(warmup_seconds),
        bindings=tuple(checked),
        max_in_flight=max_in_flight,
    )


def _is_str(value: object) -> bool:
    # options arrive from untyped callers too: a wrong type is a ConfigError, not a crash
    return isinstance(value, str)


def check_positive(
    name: str, value: object, *, allow_zero: bool = False, integer: bool = False
) -> None:
    """Raise ConfigError unless *value* is a number above zero (or zero when allowed)."""
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or math.isnan(value):
        raise ConfigError(
            f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}"
        )
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def fresh_error(error: KiteQError) -> KiteQError:
    """A copy of *error* with no traceback, to raise or hand to one more waiter.

    Raising one instance again and again (a fatal error shared by many sends) would grow
    its traceback without bound. Classes whose constructor cannot be replayed from
    ``args`` are returned as they are.
    """
    try:
        clone = copy.copy(error)
    except TypeError:
        return error
    clone.__cause__ = error.__cause__
    return clone.with_traceback(None)


def backoff_delay(delay: float) -> float:
    """*delay* with jitter: uniformly between half of it and all of it."""
    return delay / 2 + random.uniform(0.0, delay / 2)  # noqa: S311 - jitter, not crypto


class SessionListener(Protocol):
    """What a producer or consumer is told about its sessions; called on the loop thread."""

    def on_opened(self, session: Session) -> None:
        """*session* is open and may carry frames."""

    def on_lost(self, session: Session, reason: KiteQError) -> None:
        """*session* has ended; its link reconnects unless *reason* is not retriable."""

    def on_failed(self, address: str, error: KiteQError) -> None:
        """The link to *address* gave up: *error* is not retriable (auth, config)."""

    def on_store_acks(self, session: Session, results: list[_wire.StoreResult]) -> None:
        """Store-acks arrived for messages published on *session*."""

    def on_deliveries(self, session: Session, messages: list[ReceivedMessage]) -> None:
        """The broker pushed a batch of messages; answer on the same *session*."""

    def on_tx_checks(self, session: Session, checks: list[_wire.TxCheckRequest]) -> None:
        """The broker asks about uncommitted messages."""


class Session:
    """One ``Broker.Session`` stream to one broker, on its own channel.

    A fresh channel per session keeps the reconnect schedule ours (``Link``) instead of
    gRPC's own backoff, which can reach two minutes.
    """

    def __init__(
        self, address: str, params: _wire.OpenParams, *, transport: Transport = PLAINTEXT
    ) -> None:
        self.address = address
        self._transport = transport
        self.limits = _wire.BrokerLimits(address, 0, 0, 0)
        self.alive = False
        self._params = params
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall[broker_pb2.ClientFrame, broker_pb2.ServerFrame]
        self._write_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<Session {self.address} alive={self.alive}>"

    async def open(self, timeout: float) -> None:
        """Open the stream, send ``open`` and wait for ``opened``.

        Raises:
            TlsError: The broker refused the connection at the TLS layer (plaintext against
                TLS, untrusted or missing certificate); not retriable.
            KiteQError: Mapped by ``mapped_rpc_errors``; NotConnectedError on a timeout.
        """
        self._channel = self._transport.channel(self.address, CHANNEL_OPTIONS)
        self._call = broker_pb2_grpc.BrokerStub(self._channel).Session()
        try:
            with mapped_rpc_errors(self.address):
                async with asyncio.timeout(timeout):
                    await self._call.write(_wire.open_frame(self._params))
                    frame = await self._call.read()
        except TimeoutError:
            await self.close()
            raise NotConnectedError(f"broker {self.address}: no answer within {timeout}s") from None
        except NotConnectedError as exc:
            await self.close()
            cause = exc.__cause__
            if isinstance(cause, grpc.aio.AioRpcError):
                tls_error = await self._transport.explain(self.address, cause)
                if tls_error is not None:
                    raise tls_error from cause
            raise
        except BaseException:
            await self.close()
            raise
        event = (
            _wire.decode_server_frame(frame) if isinstance(frame, broker_pb2.ServerFrame) else None
        )
        if not isinstance(event, _wire.BrokerLimits):
            await self.close()
            raise NotConnectedError(f"broker {self.address}: no 'opened' frame")
        self.limits = event
        self.alive = True

    async def run(self, listener: SessionListener) -> KiteQError:
        """Read frames and hand them to *listener* until the stream ends; return why."""
        try:
            with mapped_rpc_errors(self.address):
                while True:
                    frame = await self._call.read()
                    if not isinstance(frame, broker_pb2.ServerFrame):  # grpc.aio.EOF
                        return NotConnectedError(f"broker {self.address} ended the session")
                    self._dispatch(frame, listener)
        except KiteQError as exc:
            return exc
        except asyncio.CancelledError:
            if _cancelling():
                raise
            return NotConnectedError(f"broker {self.address}: session closed")
        finally:
            self.alive = False

    def _dispatch(self, frame: broker_pb2.ServerFrame, listener: SessionListener) -> None:
        event = _wire.decode_server_frame(frame)
        if isinstance(event, _wire.StoreAcks):
            listener.on_store_acks(self, event.results)
        elif isinstance(event, _wire.Deliveries):
            listener.on_deliveries(self, event.messages)
        elif isinstance(event, _wire.TxChecks):
            listener.on_tx_checks(self, event.checks)
        else:
            logger.debug("ignoring frame broker=%s kind=%s", self.address, type(event).__name__)

    async def publish(self, messages: Iterable[Message], group_id: str) -> None:
        """Write one ``PublishBatch`` frame.

        Raises:
            NotConnectedError: The session is gone.
        """
        await self._write(_wire.publish_frame(messages, group_id))

    async def send_acks(self, results: Iterable[_wire.DeliveryResult]) -> None:
        """Write one ``DeliverAckBatch`` frame.

        Raises:
            NotConnectedError: The session is gone.
        """
        await self._write(_wire.acks_frame(results))

    async def send_flow(self, state: broker_pb2.FlowState.ValueType) -> None:
        """Write one ``Flow`` frame (pause or resume deliveries to this session).

        Raises:
            NotConnectedError: The session is gone.
        """
        await self._write(_wire.flow_frame(state))

    async def send_tx(self, answers: Iterable[_wire.TxAnswer]) -> None:
        """Write one ``TxAckBatch`` frame (transaction decisions and check answers).

        Raises:
            NotConnectedError: The session is gone.
        """
        await self._write(_wire.tx_frame(answers))

    async def _write(self, frame: broker_pb2.ClientFrame) -> None:
        if not self.alive:
            raise NotConnectedError(f"broker {self.address}: not connected")
        # grpc.aio allows one write in progress per call
        async with self._write_lock:
            try:
                with mapped_rpc_errors(self.address):
                    await self._call.write(frame)
            except asyncio.CancelledError:
                if _cancelling():
                    raise
                raise NotConnectedError(f"broker {self.address}: session closed") from None

    async def finish(self, grace: float) -> None:
        """Half-close the stream so the broker answers what it has, then close.

        The broker finishes the publishes it has read, sends their store-acks and ends the
        stream; the reader sees that end. Waits at most *grace* seconds.
        """
        if self.alive:
            try:
                async with asyncio.timeout(grace), self._write_lock:
                    await self._call.done_writing()
            except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
                logger.debug("half-close failed broker=%s", self.address)
        await self.close(grace)

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; active calls are cancelled after *grace* seconds."""
        self.alive = False
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(grace)


def _cancelling() -> bool:
    # grpc.aio raises CancelledError from read()/write() when close() cancelled the call;
    # only a cancellation of the running task itself may propagate as one
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Link:
    """Keeps one session to one broker open: reconnects with bounded, jittered backoff.

    The delay starts at 0.1 s, doubles after each failure up to ``max_delay`` and is reset
    by a successful open. A non-retriable error (wrong secret, refused binding) stops the
    link and is reported to the listener instead of being retried forever.
    """

    def __init__(
        self,
        address: str,
        params: _wire.OpenParams,
        listener: SessionListener,
        *,
        connect_timeout: float,
        max_delay: float,
        transport: Transport = PLAINTEXT,
    ) -> None:
        self.address = address
        self.session: Session | None = None
        self._transport = transport
        self.last_error: KiteQError | None = None
        self.attempted = asyncio.Event()
        self._params = params
        self._listener = listener
        self._connect_timeout = connect_timeout
        self._max_delay = max_delay
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, tasks: TaskSet) -> None:
        """Start connecting in a task owned by *tasks*."""
        self._task = tasks.spawn(self._run(), name=f"link:{self.address}")

    async def _run(self) -> None:
        delay = INITIAL_BACKOFF
        while not self._stopping.is_set():
            session = Session(self.address, self._params, transport=self._transport)
            try:
                await session.open(self._connect_timeout)
            except KiteQError as exc:
                reason: KiteQError = exc
            else:
                delay = INITIAL_BACKOFF
                self.session = session
                self.last_error = None
                self.attempted.set()
                logger.info("session opened broker=%s", self.address)
                self._listener.on_opened(session)
                reason = await session.run(self._listener)
                self.session = None
                self._listener.on_lost(session, reason)
                await session.close(0)
                if self._stopping.is_set():
                    return
                logger.warning("session lost broker=%s reason=%s", self.address, reason)
            self.last_error = reason
            self.attempted.set()
            if not reason.retriable:
                logger.error("giving up on broker=%s error=%s", self.address, reason)
                self._listener.on_failed(self.address, reason)
                return
            logger.info("reconnecting broker=%s in %.2fs after %s", self.address, delay, reason)
            await asyncio.sleep(backoff_delay(delay))
            delay = min(delay * 2, self._max_delay)

    async def stop(self, grace: float) -> None:
        """Stop reconnecting; half-close the open session, waiting at most *grace* seconds."""
        self._stopping.set()
        task = self._task
        session = self.session
        if session is None:
            # connecting or waiting to reconnect: nothing to drain
            if task is not None:
                task.cancel()
        else:
            await session.finish(grace)
        if task is not None and not task.done():
            done, _ = await asyncio.wait({task}, timeout=grace)
            if not done:
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
