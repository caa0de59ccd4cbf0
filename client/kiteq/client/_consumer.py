"""Consumers: one session per broker, deliveries handed to the handler a batch at a time.

Data path::

    session reader ─► on_deliveries(batch)
        async handler: one task per batch, awaited message by message (``concurrency``
                       at once) ─► one DeliverAckBatch per batch
        sync handler:  the whole batch handed to the handler thread pool in one hop
                       (split into ``concurrency`` contiguous chunks); finished chunks
                       come back to the loop together (one wake-up for all that finished
                       meanwhile) ─► the ack writer: one DeliverAckBatch per session for
                       everything answered since its last write

True or None from the handler acks; False or an exception nacks (the broker redelivers).
A ``batch_handler`` gets each delivery batch (a chunk of it per thread) and returns one
result per message. Without a handler the consumer is iterated (``async for``); there, and
with ``AckMode.MANUAL``, the code answers each delivery itself (``_acks``). The broker keeps
at most ``max_in_flight`` unacked deliveries per session, which bounds what this process
holds: unanswered deliveries use up credit, so the broker stops pushing (never a drop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import math
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self, TypeAlias

from kiteq.binding.model import Binding
from kiteq.client import _tracing, _wire
from kiteq.client._acks import AckMode, AsyncDelivery, Delivery, Ledger, Ticket
from kiteq.client._channel import (
    Link,
    Session,
    check_positive,
    fresh_error,
    open_params,
)
from kiteq.client._discovery import BrokerDirectory, is_zookeeper, resolve
from kiteq.client._sync import LoopThread
from kiteq.client._tls import Transport
from kiteq.core.errors import ClientClosedError, ConfigError, KiteQError
from kiteq.core.message import ReceivedMessage
from kiteq.core.tasks import TaskSet
from kiteq.core.tls import TlsOptions

__all__ = ["AsyncConsumer", "BatchHandler", "Consumer", "Handler"]

if TYPE_CHECKING:
    from kiteq.client._zk_directory import ZkDirectory

logger = logging.getLogger(__name__)

Handler: TypeAlias = Callable[..., "bool | Awaitable[bool | None] | None"]
_BatchResult: TypeAlias = "Sequence[bool | None] | None"
BatchHandler: TypeAlias = Callable[
    [list[ReceivedMessage]],
    "Sequence[bool | None] | Awaitable[Sequence[bool | None] | None] | None",
]

_MAX_IN_FLIGHT: Final = 100_000
_FEEDBACK_CHARS: Final = 512
_SYNC_MARGIN: Final = 5.0


def _is_async(handler: Callable[..., object]) -> bool:
    call = getattr(handler, "__call__", None)  # noqa: B004 - a callable object's method
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


def _verdict(message: ReceivedMessage, result: object) -> _wire.DeliveryResult:
    if result is False:
        return _wire.DeliveryResult(message.message_id, False, "handler returned False")
    return _wire.DeliveryResult(message.message_id, True)


def _failed(message: ReceivedMessage, exc: Exception) -> _wire.DeliveryResult:
    logger.error(
        "handler failed id=%s topic=%s type=%s attempt=%d",
        message.message_id,
        message.topic,
        message.message_type,
        message.attempt,
        exc_info=exc,
    )
    feedback = f"{type(exc).__name__}: {exc}"[:_FEEDBACK_CHARS]
    return _wire.DeliveryResult(message.message_id, False, feedback)


def _batch_verdicts(
    messages: Sequence[ReceivedMessage], result: object
) -> list[_wire.DeliveryResult]:
    """One result per message from a batch handler's return value (None: all acked)."""
    if result is None:
        return [_wire.DeliveryResult(m.message_id, True) for m in messages]
    if isinstance(result, (str, bytes)) or not isinstance(result, Sequence):
        error: Exception = TypeError(f"a batch handler returned {type(result).__name__}")
    elif len(result) != len(messages):
        error = ValueError(f"a batch handler returned {len(result)} results for {len(messages)}")
    else:
        return [_verdict(m, r) for m, r in zip(messages, result, strict=True)]
    return [_failed(m, error) for m in messages]


def _handle_whole(
    handler: BatchHandler, messages: Sequence[ReceivedMessage]
) -> list[_wire.DeliveryResult]:
    # handler thread: the batch handler gets the chunk in one call
    try:
        with _tracing.consuming_batch(messages):
            result = handler(list(messages))
    except Exception as exc:  # noqa: BLE001 - the user's handler: nack the chunk and log
        return [_failed(m, exc) for m in messages]
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        error = TypeError("a sync batch handler returned an awaitable; use async def")
        return [_failed(m, error) for m in messages]
    return _batch_verdicts(messages, result)


def _closing_nack(message: ReceivedMessage) -> _wire.DeliveryResult:
    return _wire.DeliveryResult(message.message_id, False, "consumer closing")


def _handle_batch(
    handler: Handler, messages: Sequence[ReceivedMessage]
) -> list[_wire.DeliveryResult]:
    # handler thread: one call per batch (or chunk), so one hop per batch
    results = []
    for message in messages:
        try:
            with _tracing.consuming(message):
                result = handler(message)
        except Exception as exc:  # noqa: BLE001 - the user's handler: nack and log
            results.append(_failed(message, exc))
            continue
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            results.append(
                _failed(message, TypeError("a sync handler returned an awaitable; use async def"))
            )
        else:
            results.append(_verdict(message, result))
    return results


class AsyncConsumer:
    """Consumes the messages bound to one consumer group (asyncio).

    Connects to every broker serving the bindings' topics and keeps each session open,
    reconnecting with bounded, jittered backoff. A wrong secret or a refused binding is not
    retried: ``start`` raises it, or ``wait`` does when it happens later.

    With ``registry="zk://..."`` the consumer writes its bindings to the persistent
    ``/kiteq/sub/{topic}/{group}-bind`` nodes (KiteQ's JSON; only when they differ) before
    opening its streams, finds the brokers of its topics under ``/kiteq/server/{topic}``
    and follows them: new brokers are dialled, removed ones closed. While ZooKeeper is
    unreachable the last known brokers are kept.

    Args:
        brokers: Broker addresses (``"host:port"``); give this or ``registry``.
        registry: ``"file://path/to/registry.toml"`` or
            ``"zk://h1:2181,h2:2181[/chroot][?timeout=S&digest=user:password]"``.
        group_id: The consumer group; each message goes to one consumer of the group.
        secret_key: The group's secret.
        bindings: What the group consumes (``Binding.direct/regex/fanout``).
        handler: Called with each ``ReceivedMessage``; sync or ``async def``. True or None
            acks; False or an exception nacks, and the broker redelivers. With
            ``ack_mode=AckMode.MANUAL`` it gets an ``AsyncDelivery`` (async handler) or a
            ``Delivery`` (sync handler) instead and answers it itself, then or later.
            Neither handler: iterate the consumer (``async for msg in consumer``), which
            yields ``AsyncDelivery`` objects to answer.
        batch_handler: Instead of ``handler``: called with a list of messages (a delivery
            batch, split among the handler threads) and returns one True/None (ack) or
            False (nack) per message, or None to ack them all; an exception nacks them all.
        ack_mode: ``AckMode.AUTO`` (the handler's result) or ``AckMode.MANUAL``.
        max_in_flight: Unacked deliveries the broker may push to each session.
        warmup_seconds: The broker ramps this consumer's share up over this many seconds.
        max_concurrency: Handler calls in progress at once (threads for a sync handler);
            ``concurrency`` is its older name.
        client_id: A name for this client in broker logs; default host:pid:random.
        connect_timeout: Seconds to open a session.
        reconnect_max_delay: Upper bound of the reconnect backoff (from 0.1 s, doubling).
        tls: Connect to the brokers with TLS (``TlsOptions(ca=..., cert=..., key=...)``);
            None connects in plaintext. A broker that refuses the connection at the TLS
            layer fails the client with ``TlsError`` (not retried).
        close_timeout: Seconds ``close`` waits for running handlers and their acks.

    Raises:
        ConfigError: An option or binding is invalid.

    Examples:
        >>> async def handle(message: ReceivedMessage) -> bool:
        ...     print(message.topic, message.body)
        ...     return True
        >>> async def consume() -> None:
        ...     async with AsyncConsumer(brokers=["127.0.0.1:13800"], group_id="acct-svc",
        ...                              secret_key="s3cret",
        ...                              bindings=[Binding.direct("trade", "pay-succ")],
        ...                              handler=handle) as consumer:
        ...         await consumer.wait()
        >>> async def iterate() -> None:  # no handler: answer each delivery yourself
        ...     async with AsyncConsumer(brokers=["127.0.0.1:13800"], group_id="acct-svc",
        ...                              bindings=[Binding.direct("trade", "pay-succ")],
        ...                              max_in_flight=100) as consumer:
        ...         async for msg in consumer:
        ...             await msg.ack()  # or: await msg.nack(delay=30); msg.in_progress()
    """

    def __init__(
        self,
        *,
        brokers: Sequence[str] | None = None,
        registry: str | None = None,
        group_id: str,
        secret_key: str = "",
        bindings: Iterable[Binding],
        handler: Handler | None = None,
        batch_handler: BatchHandler | None = None,
        ack_mode: AckMode = AckMode.AUTO,
        max_in_flight: int = 1000,
        warmup_seconds: float = 0,
        max_concurrency: int | None = None,
        concurrency: int | None = None,
        client_id: str | None = None,
        connect_timeout: float = 5.0,
        reconnect_max_delay: float = 30.0,
        close_timeout: float = 10.0,
        tls: TlsOptions | None = None,
    ) -> None:
        for name, given in (("handler", handler), ("batch_handler", batch_handler)):
            if given is not None and not callable(given):
                raise ConfigError(f"{name} must be callable, got {given!r}")
        if handler is not None and batch_handler is not None:
            raise ConfigError("give handler or batch_handler, not both")
        if not isinstance(ack_mode, AckMode):
            raise ConfigError(f"ack_mode must be an AckMode, got {ack_mode!r}")
        if batch_handler is not None and ack_mode is AckMode.MANUAL:
            raise ConfigError("a batch_handler answers through its results: use AckMode.AUTO")
        if max_concurrency is not None and concurrency not in (None, max_concurrency):
            raise ConfigError("max_concurrency and concurrency (its old name) differ")
        if max_concurrency is None:
            max_concurrency = 1 if concurrency is None else concurrency
        concurrency = max_concurrency
        for name, count in (("max_in_flight", max_in_flight), ("max_concurrency", concurrency)):
            check_positive(name, count, integer=True)
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("reconnect_max_delay", reconnect_max_delay),
        ):
            check_positive(name, value)
        check_positive("close_timeout", close_timeout, allow_zero=True)
        if max_in_flight > _MAX_IN_FLIGHT:
            raise ConfigError(f"max_in_flight must be <= {_MAX_IN_FLIGHT}, got {max_in_flight}")
        binding_list = list(bindings)
        if not binding_list:
            raise ConfigError("a consumer needs at least one binding")
        self._params = open_params(
            group_id=group_id,
            secret_key=secret_key,
            client_id=client_id,
            warmup_seconds=warmup_seconds,
            bindings=binding_list,
            max_in_flight=max_in_flight,
        )
        self._transport = Transport(tls)
        self._directory: BrokerDirectory | ZkDirectory = resolve(brokers, registry)
        self._group_id = group_id
        self._handler = handler
        self._batch_handler = batch_handler
        # no handler: the consumer is iterated, and the iterating code answers
        self._iterated = handler is None and batch_handler is None
        self._ack_mode = AckMode.MANUAL if self._iterated else ack_mode
        called = handler if handler is not None else batch_handler
        self._async_handler = called is not None and _is_async(called)
        self._concurrency = concurrency
        self._connect_timeout = float(connect_timeout)
        self._reconnect_max_delay = float(reconnect_max_delay)
        self._close_timeout = float(close_timeout)

        self._started = False
        self._closing = False
        self._closed = False
        self._error: KiteQError | None = None
        self._stopped = asyncio.Event()
        self._closed_event = asyncio.Event()
        self._handler_slots = asyncio.Semaphore(concurrency)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # sync handler: chunks in the executor whose results the loop has not taken yet
        # (loop thread), and the finished ones (any thread, under _handled_lock)
        self._in_handlers = 0
        self._handled_lock = threading.Lock()
        self._handled: list[tuple[Session, list[_wire.DeliveryResult] | None]] = []
        self._handled_wake = False
        # answers not yet written, per session (loop thread); the ack writer task sends them
        self._acks: dict[Session, list[_wire.DeliveryResult]] = {}
        self._acks_ready = asyncio.Event()
        self._acks_writing = False
        self._quiet = asyncio.Event()  # nothing in handlers, nothing left to write
        self._quiet.set()
        self._links: list[Link] = []
        self._batches = TaskSet("kiteq-consumer")
        self._link_tasks = TaskSet("kiteq-consumer", self._task_failed)
        self._tasks = TaskSet("kiteq-consumer")
        self._tx_warned = False
        self._ledger = Ledger(self._answer_from_any_thread)
        self._loop_thread = 0
        # iteration: tickets not yet taken by the iterating code (loop thread)
        self._inbox: deque[Ticket] = deque()
        self._inbox_ready = asyncio.Event()
        self._paused = False
        # deliveries that arrived while paused (before the broker saw the Flow frame)
        self._held: list[tuple[Session, list[ReceivedMessage]]] = []

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """True once ``close`` has been called."""
        return self._closed

    @property
    def error(self) -> KiteQError | None:
        """The non-retriable error that stopped the consumer, if any."""
        return self._error

    @property
    def connected_brokers(self) -> list[str]:
        """Addresses of the brokers with an open session right now."""
        return [link.address for link in self._links if link.session is not None]

    async def start(self) -> None:
        """Connect to the brokers and start consuming; idempotent.

        Waits for the first connection attempt to every broker (bounded by
        ``connect_timeout``). Brokers that are down are retried in the background.

        Raises:
            AuthenticationError: The group's secret was refused.
            ConfigError: A broker refused the bindings, or no broker serves their topics.
            ClientClosedError: The consumer was closed.

        Examples:
            >>> async def main(consumer: AsyncConsumer) -> None:
            ...     await consumer.start()
        """
        if self._closed:
            raise ClientClosedError("consumer is closed")
        if self._started:
            return
        topics = dict.fromkeys(binding.topic for binding in self._params.bindings)
        directory = self._directory
        if is_zookeeper(directory):
            try:
                # the bindings first, so a broker has them before the stream opens
                await directory.write_bindings(
                    self._group_id, self._params.bindings, self._connect_timeout
                )
                await directory.watch(topics, self._connect_timeout)
            except BaseException:
                await directory.close()
                raise
        addresses = directory.brokers_for_any(topics)
        if not addresses:
            if is_zookeeper(directory):
                logger.warning(
                    "no broker registered yet for the topics %s group=%s: waiting for one",
                    ", ".join(topics),
                    self._group_id,
                )
            else:
                raise ConfigError(f"no broker serves the topics {', '.join(topics)}")
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if not self._async_handler and not self._iterated:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._concurrency, thread_name_prefix="kiteq-handler"
            )
        # with the links: a failure of the ack writer (a bug) stops the consumer
        self._link_tasks.spawn(self._write_acks(), "acks")
        for address in addresses:
            self._add_link(address)
        directory.add_listener(self._on_brokers_changed)
        try:
            async with asyncio.timeout(self._connect_timeout + 1.0):
                for link in self._links:
                    await link.attempted.wait()
        except TimeoutError:
            logger.debug("first connection attempts still running group=%s", self._group_id)
        if self._error is not None:
            error = fresh_error(self._error)
            await self.close()
            raise error
        if not self.connected_brokers:
            logger.warning(
                "no broker reachable yet group=%s brokers=%s: retrying in the background",
                self._group_id,
                ",".join(addresses),
            )

    async def wait(self) -> None:
        """Wait until the consumer is closed, or stopped by a non-retriable error.

        Raises:
            AuthenticationError: The secret was refused after a reconnect.
            ConfigError: A broker refused the bindings after a reconnect.

        Examples:
            >>> async def main(consumer: AsyncConsumer) -> None:
            ...     await consumer.wait()  # until another task calls close()
        """
        await self._stopped.wait()
        if self._error is not None:
            raise fresh_error(self._error)

    async def close(self, timeout: float | None = None) -> None:
        """Stop consuming after running handlers finish and their acks are sent; idempotent.

        Deliveries that arrive meanwhile are nacked so the broker redelivers them to
        another consumer. Handlers still running after *timeout* seconds (default
        ``close_timeout``) are abandoned; the broker redelivers their messages.

        Examples:
            >>> async def main(consumer: AsyncConsumer) -> None:
            ...     await consumer.close(timeout=5.0)
        """
        if self._closed:
            await self._closed_event.wait()
            return
        self._closed = True
        self._closing = True
        self._ledger.close()
        self._inbox_ready.set()
        # taken by no code yet: back to the broker at once
        while self._inbox:
            ticket = self._inbox.popleft()
            self._queue_acks(ticket.session, [_closing_nack(ticket.message)])
        held, self._held = self._held, []
        for session, messages in held:
            self._queue_acks(session, [_closing_nack(m) for m in messages])
        seconds = self._close_timeout if timeout is None else timeout
        try:
            if self._started:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + seconds
                joined = await self._batches.join(seconds)
                if not (joined and await self._wait_quiet(deadline - loop.time())):
                    logger.warning(
                        "consumer closing with %d batches still in handlers after %.1fs",
                        len(self._batches) + self._in_handlers,
                        seconds,
                    )
                    await self._batches.cancel()
                await asyncio.gather(*(link.stop(1.0) for link in self._links))
                await self._link_tasks.cancel()
                await self._tasks.cancel()
                if self._executor is not None:
                    self._executor.shutdown(wait=False, cancel_futures=True)
        finally:
            try:
                await self._directory.close()
            finally:
                self._stopped.set()
                self._closed_event.set()

    def _add_link(self, address: str) -> None:
        link = Link(
            address,
            self._params,
            self,
            connect_timeout=self._connect_timeout,
            max_delay=self._reconnect_max_delay,
            transport=self._transport,
        )
        self._links.append(link)
        link.start(self._link_tasks)

    def _on_brokers_changed(self) -> None:
        """zk://: connect to brokers that appeared, close those gone (loop thread)."""
        if self._closing or self._error is not None:
            return
        topics = dict.fromkeys(binding.topic for binding in self._params.bindings)
        wanted = self._directory.brokers_for_any(topics)
        current = {link.address for link in self._links}
        for link in [link for link in self._links if link.address not in wanted]:
            logger.info("broker left the registry: closing its session broker=%s", link.address)
            self._links.remove(link)
            self._tasks.spawn(link.stop(1.0), f"retire:{link.address}")
        for address in wanted:
            if address not in current:
                logger.info("broker joined the registry broker=%s", address)
                self._add_link(address)

    def _task_failed(self, exc: BaseException) -> None:
        # a link crashed (a bug, not a network error): stop and report it through wait()
        if self._error is None:
            self._error = exc if isinstance(exc, KiteQError) else KiteQError(repr(exc))
        self._stopped.set()
        self._inbox_ready.set()

    async def _wait_quiet(self, timeout: float) -> bool:
        if self._quiet.is_set():
            return True
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                await self._quiet.wait()
        except TimeoutError:
            return False
        return True

    def _update_quiet(self) -> None:
        if not self._in_handlers and not self._acks and not self._acks_writing:
            self._quiet.set()

    # -- sync handler: chunks in the executor (loop thread, but _handle_chunk) -----------

    def _submit(self, session: Session, messages: list[ReceivedMessage]) -> None:
        executor = self._executor
        if executor is None or not messages:
            return
        parts = min(self._concurrency, len(messages))
        if parts <= 1:
            chunks = [messages]
        else:
            size = math.ceil(len(messages) / parts)
            chunks = [messages[i : i + size] for i in range(0, len(messages), size)]
        for chunk in chunks:
            try:
                executor.submit(self._handle_chunk, session, chunk)
            except RuntimeError:  # the interpreter is shutting down: the broker redelivers
                logger.warning("dropping %d deliveries: no handler thread", len(chunk))
                continue
            self._in_handlers += 1
            self._quiet.clear()

    def _handle_chunk(self, session: Session, messages: list[ReceivedMessage]) -> None:
        # handler thread: one call per chunk; the results go back to the loop in bulk
        results: list[_wire.DeliveryResult] | None = None
        try:
            if self._batch_handler is not None:
                results = _handle_whole(self._batch_handler, messages)
            elif self._ack_mode is AckMode.MANUAL:
                results = self._handle_manual(session, messages)
            else:
                assert self._handler is not None  # noqa: S101 - no handler: iterated
                results = _handle_batch(self._handler, messages)
        except BaseException:  # the handler's Exceptions are nacks already; this is not one
            logger.exception("handler thread failed on %d messages (redelivered)", len(messages))
        with self._handled_lock:
            self._handled.append((session, results))
            wake = not self._handled_wake
            self._handled_wake = True
        loop = self._loop
        if wake and loop is not None:
            # RuntimeError: the loop has closed; nobody acks, the broker redelivers
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._take_handled)

    def _handle_manual(
        self, session: Session, messages: list[ReceivedMessage]
    ) -> list[_wire.DeliveryResult]:
        # handler thread, AckMode.MANUAL: the handler answers; an exception nacks
        handler = self._handler
        assert handler is not None  # noqa: S101 - MANUAL with a handler
        for message in messages:
            delivery = Delivery(self._ledger.issue(session, message), self._ledger)
            try:
                with _tracing.consuming(message):
                    handler(delivery)
            except Exception as exc:  # noqa: BLE001 - the user's handler: nack and log
                self._nack_failed(delivery, exc)
        return []

    def _nack_failed(self, delivery: Delivery | AsyncDelivery, exc: Exception) -> None:
        # any thread: a MANUAL handler raised before answering its delivery
        result = _failed(delivery.message, exc)
        if not delivery.settled:
            with contextlib.suppress(KiteQError):  # closed or expired: redelivered anyway
                delivery._nack(0, result.feedback)

    def _take_handled(self) -> None:
        with self._handled_lock:
            handled, self._handled = self._handled, []
            self._handled_wake = False
        self._in_handlers -= len(handled)
        for session, results in handled:
            if results:
                self._queue_acks(session, results)
        self._update_quiet()

    # -- acks (loop thread) -------------------------------------------------------------

    def _queue_acks(self, session: Session, results: list[_wire.DeliveryResult]) -> None:
        queued = self._acks.get(session)
        if queued is None:
            self._acks[session] = results
        else:
            queued.extend(results)
        self._quiet.clear()
        self._acks_ready.set()

    async def _write_acks(self) -> None:
        # one frame per session for everything answered since the previous write
        acks = self._acks
        while True:
            await self._acks_ready.wait()
            self._acks_ready.clear()
            while acks:
                session = next(iter(acks))
                results = acks.pop(session)
                self._acks_writing = True
                try:
                    await self._answer(session, results)
                finally:
                    self._acks_writing = False
            self._update_quiet()

    # -- async handler: one task per batch (loop thread) ---------------------------------

    async def _process(self, session: Session, messages: list[ReceivedMessage]) -> None:
        if self._batch_handler is not None:
            results = await self._run_batch(self._batch_handler, messages)
        elif self._ack_mode is AckMode.MANUAL:
            await self._run_manual(session, messages)
            return
        else:
            results = await self._run_async(messages)
        await self._answer(session, results)

    async def _run_batch(
        self, handler: BatchHandler, messages: list[ReceivedMessage]
    ) -> list[_wire.DeliveryResult]:
        async with self._handler_slots:
            try:
                with _tracing.consuming_batch(messages):
                    result = handler(messages)
                    if inspect.isawaitable(result):
                        result = await result
            except Exception as exc:  # noqa: BLE001 - the user's handler: nack and log
                return [_failed(m, exc) for m in messages]
        return _batch_verdicts(messages, result)

    async def _run_manual(self, session: Session, messages: list[ReceivedMessage]) -> None:
        ledger = self._ledger
        deliveries = [AsyncDelivery(ledger.issue(session, m), ledger) for m in messages]
        if self._concurrency == 1:
            for delivery in deliveries:
                await self._handle_manual_async(delivery)
        else:
            await asyncio.gather(*(self._handle_manual_async(d) for d in deliveries))

    async def _handle_manual_async(self, delivery: AsyncDelivery) -> None:
        handler = self._handler
        assert handler is not None  # noqa: S101 - MANUAL with a handler
        async with self._handler_slots:
            try:
                with _tracing.consuming(delivery.message):
                    result = handler(delivery)
                    if inspect.isawaitable(result):
                        await result
            except Exception as exc:  # noqa: BLE001 - the user's handler: nack and log
                self._nack_failed(delivery, exc)

    async def _run_async(self, messages: list[ReceivedMessage]) -> list[_wire.DeliveryResult]:
        if self._concurrency == 1:
            return [await self._handle_async(message) for message in messages]
        return list(await asyncio.gather(*(self._handle_async(m) for m in messages)))

    async def _handle_async(self, message: ReceivedMessage) -> _wire.DeliveryResult:
        handler = self._handler
        assert handler is not None  # noqa: S101 - AUTO with a handler
        async with self._handler_slots:
            try:
                with _tracing.consuming(message):
                    result = handler(message)
                    if inspect.isawaitable(result):
                        result = await result
            except Exception as exc:  # noqa: BLE001 - the user's handler: nack and log
                return _failed(message, exc)
        return _verdict(message, result)

    async def _answer(self, session: Session, results: list[_wire.DeliveryResult]) -> None:
        if not session.alive:
            logger.info(
                "dropping %d acks: session to broker=%s is gone (it redelivers)",
                len(results),
                session.address,
            )
            return
        try:
            await session.send_acks(results)
        except KiteQError as exc:
            logger.info("acks not sent broker=%s error=%s (it redelivers)", session.address, exc)

    # -- SessionListener (loop thread) ------------------------------------------------

    def on_opened(self, session: Session) -> None:
        """A session is open; deliveries follow (unless the consumer is paused)."""
        logger.debug("consumer session open group=%s broker=%s", self._group_id, session.address)
        if self._paused:
            self._tasks.spawn(self._send_flow(session, _wire.FlowState.FLOW_STATE_PAUSED), "flow")

    def on_lost(self, session: Session, reason: KiteQError) -> None:
        """A session ended; its link reconnects and the broker redelivers what was unacked."""
        logger.debug("consumer session lost broker=%s reason=%s", session.address, reason)

    def on_failed(self, address: str, error: KiteQError) -> None:
        """A non-retriable error: stop every link and report it through ``wait``."""
        logger.error("consumer failed group=%s broker=%s error=%s", self._group_id, address, error)
        if self._error is None:
            self._error = error
        self._stopped.set()
        self._inbox_ready.set()
        for link in self._links:
            if link.address != address:
                self._tasks.spawn(link.stop(0), f"stop:{link.address}")

    def on_store_acks(self, session: Session, results: list[_wire.StoreResult]) -> None:
        """A consumer publishes nothing; store-acks here are a broker bug."""
        logger.warning("ignoring %d store-acks on a consumer session", len(results))

    def on_deliveries(self, session: Session, messages: list[ReceivedMessage]) -> None:
        """Hand the batch to the handler in one hop; nack it when closing."""
        if self._closing:
            self._queue_acks(session, [_closing_nack(m) for m in messages])
        elif self._paused:
            self._held.append((session, messages))
        elif self._iterated:
            issue = self._ledger.issue
            self._inbox.extend(issue(session, m) for m in messages)
            self._inbox_ready.set()
        elif self._async_handler:
            self._batches.spawn(self._process(session, messages), "batch")
        else:
            self._submit(session, messages)

    # -- iteration, manual answers, pause (loop thread unless said) -----------------------

    def __aiter__(self) -> AsyncIterator[AsyncDelivery]:
        return _AsyncDeliveries(self, self._ledger)

    async def next_ticket(self) -> Ticket | None:
        """The next delivery for the iterating code; None once the consumer is closed.

        Raises:
            ConfigError: The consumer has a handler (it is not iterated).
            AuthenticationError, ConfigError: The error that stopped the consumer.
        """
        if not self._iterated:
            raise ConfigError("a consumer with a handler is not iterated")
        if not self._started:
            await self.start()
        while True:
            if self._inbox and not self._closing:
                return self._inbox.popleft()
            if self._error is not None:
                raise fresh_error(self._error)
            if self._closing or self._stopped.is_set():
                return None
            self._inbox_ready.clear()
            await self._inbox_ready.wait()

    def wrap_sync(self, ticket: Ticket) -> Delivery:
        """A ``Delivery`` (blocking answers) for *ticket* (the sync facade's iterator)."""
        _tracing.received(ticket.message)
        return Delivery(ticket, self._ledger)

    @property
    def paused(self) -> bool:
        """True between ``pause`` and ``resume``."""
        return self._paused

    @property
    def unanswered(self) -> int:
        """Deliveries handed to code (iteration, AckMode.MANUAL) and not answered yet."""
        return self._ledger.open

    async def pause(self) -> None:
        """Stop deliveries without closing: the brokers push nothing until ``resume``.

        Deliveries already in flight stay unacknowledged and may still be answered; any
        that arrive before a broker has read the pause are held here until ``resume``.

        Examples:
            >>> async def main(consumer: AsyncConsumer) -> None:
            ...     await consumer.pause()
        """
        self._paused = True
        await self._flow_all(_wire.FlowState.FLOW_STATE_PAUSED)

    async def resume(self) -> None:
        """Start deliveries again after ``pause``; idempotent.

        Examples:
            >>> async def main(consumer: AsyncConsumer) -> None:
            ...     await consumer.resume()
        """
        if not self._paused:
            return
        self._paused = False
        held, self._held = self._held, []
        for session, messages in held:
            self.on_deliveries(session, messages)
        await self._flow_all(_wire.FlowState.FLOW_STATE_RUNNING)

    async def _flow_all(self, state: _wire.FlowState.ValueType) -> None:
        sessions = [link.session for link in self._links if link.session is not None]
        await asyncio.gather(*(self._send_flow(s, state) for s in sessions))

    async def _send_flow(self, session: Session, state: _wire.FlowState.ValueType) -> None:
        try:
            await session.send_flow(state)
        except KiteQError as exc:  # the session is gone; a new one is told on_opened
            logger.info("flow frame not sent broker=%s error=%s", session.address, exc)

    def _answer_from_any_thread(self, session: Session, result: _wire.DeliveryResult) -> None:
        # any thread: an explicit answer goes to the ack writer on the loop
        if threading.get_ident() == self._loop_thread:
            self._queue_acks(session, [result])
            return
        loop = self._loop
        if loop is not None:
            # RuntimeError: the loop has closed; the broker redelivers
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._queue_acks, session, [result])

    def on_tx_checks(self, session: Session, checks: list[_wire.TxCheckRequest]) -> None:
        """Transaction checks are for producers; ignored here."""
        if not self._tx_warned:
            self._tx_warned = True
            logger.warning(
                "ignoring %d transaction checks on a consumer session broker=%s",
                len(checks),
                session.address,
            )


class _AsyncDeliveries:
    """``async for`` over a consumer.

    An iterator object, not an async generator: a cancelled ``anext`` (a timeout around
    it) leaves the iteration usable.
    """

    def __init__(self, consumer: AsyncConsumer, ledger: Ledger) -> None:
        self._consumer = consumer
        self._ledger = ledger

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> AsyncDelivery:
        ticket = await self._consumer.next_ticket()
        if ticket is None:
            raise StopAsyncIteration
        _tracing.received(ticket.message)
        return AsyncDelivery(ticket, self._ledger)


class Consumer:
    """Consumes the messages bound to one consumer group (blocking API).

    A facade over ``AsyncConsumer`` running on a private event loop in a daemon thread.
    The handler runs on ``max_concurrency`` worker threads; each delivery batch reaches them
    in one hand-off. Options are those of ``AsyncConsumer``. ``with`` (or ``start``)
    connects. Without a handler, iterate it (``for msg in consumer``): it yields
    ``Delivery`` objects, to answer with ``ack()``/``nack()``/``in_progress()`` from any
    thread, in any order.

    Examples:
        >>> def handle(message: ReceivedMessage) -> bool:
        ...     print(message.message_id, message.body)
        ...     return True
        >>> with Consumer(brokers=["127.0.0.1:13800"], group_id="acct-svc",
        ...               secret_key="s3cret", handler=handle,
        ...               bindings=[Binding.direct("trade", "pay-succ"),
        ...                         Binding.regex("trade", "pay-.*"),
        ...                         Binding.fanout("user")]) as consumer:
        ...     consumer.wait(timeout=60.0)
    """

    def __init__(
        self,
        *,
        brokers: Sequence[str] | None = None,
        registry: str | None = None,
        group_id: str,
        secret_key: str = "",
        bindings: Iterable[Binding],
        handler: Handler | None = None,
        batch_handler: BatchHandler | None = None,
        ack_mode: AckMode = AckMode.AUTO,
        max_in_flight: int = 1000,
        warmup_seconds: float = 0,
        max_concurrency: int | None = None,
        concurrency: int | None = None,
        client_id: str | None = None,
        connect_timeout: float = 5.0,
        reconnect_max_delay: float = 30.0,
        close_timeout: float = 10.0,
        tls: TlsOptions | None = None,
    ) -> None:
        self._consumer = AsyncConsumer(
            brokers=brokers,
            registry=registry,
            group_id=group_id,
            secret_key=secret_key,
            bindings=bindings,
            handler=handler,
            batch_handler=batch_handler,
            ack_mode=ack_mode,
            max_in_flight=max_in_flight,
            warmup_seconds=warmup_seconds,
            max_concurrency=max_concurrency,
            concurrency=concurrency,
            client_id=client_id,
            connect_timeout=connect_timeout,
            reconnect_max_delay=reconnect_max_delay,
            close_timeout=close_timeout,
            tls=tls,
        )
        self._connect_timeout = float(connect_timeout)
        self._close_timeout = float(close_timeout)
        self._thread = LoopThread("kiteq-consumer")
        self._close_lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True once ``close`` has been called."""
        return self._closed

    @property
    def error(self) -> KiteQError | None:
        """The non-retriable error that stopped the consumer, if any."""
        return self._consumer.error

    def start(self) -> None:
        """Connect to the brokers and start consuming; idempotent.

        Raises:
            AuthenticationError: The group's secret was refused.
            ConfigError: A broker refused the bindings, or no broker serves their topics.
            ClientClosedError: The consumer was closed.

        Examples:
            >>> def main(consumer: Consumer) -> None:
            ...     consumer.start()
        """
        if self._closed:
            raise ClientClosedError("consumer is closed")
        try:
            self._thread.run(
                self._consumer.start(), timeout=self._connect_timeout + 2 * _SYNC_MARGIN
            )
        except BaseException:
            self.close()
            raise

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the consumer is closed (from another thread) or stopped by an error.

        Returns:
            True when it has stopped, False when *timeout* seconds passed first.

        Raises:
            AuthenticationError: The secret was refused after a reconnect.
            ConfigError: A broker refused the bindings after a reconnect.

        Examples:
            >>> def main(consumer: Consumer) -> None:
            ...     while not consumer.wait(timeout=1.0):
            ...         pass  # check for shutdown requests here
        """
        if self._closed:
            return True
        try:
            self._thread.run(self._consumer.wait(), timeout=timeout)
        except TimeoutError:
            return False
        return True

    def __iter__(self) -> Iterator[Delivery]:
        """Deliveries, as they arrive, until the consumer is closed (from another thread).

        Raises:
            ConfigError: The consumer has a handler (it is not iterated).
            AuthenticationError, ConfigError: The error that stopped the consumer.
        """
        consumer = self._consumer
        while not self._closed:
            ticket = self._thread.run(consumer.next_ticket(), timeout=None)
            if ticket is None:
                return
            yield consumer.wrap_sync(ticket)

    @property
    def paused(self) -> bool:
        """True between ``pause`` and ``resume``."""
        return self._consumer.paused

    @property
    def unanswered(self) -> int:
        """Deliveries handed to code (iteration, AckMode.MANUAL) and not answered yet."""
        return self._consumer.unanswered

    def pause(self) -> None:
        """Stop deliveries without closing, until ``resume`` (see ``AsyncConsumer.pause``)."""
        self._thread.run(self._consumer.pause(), timeout=self._connect_timeout + _SYNC_MARGIN)

    def resume(self) -> None:
        """Start deliveries again after ``pause``; idempotent."""
        self._thread.run(self._consumer.resume(), timeout=self._connect_timeout + _SYNC_MARGIN)

    def close(self, timeout: float | None = None) -> None:
        """Stop consuming after running handlers finish and their acks are sent; idempotent.

        Never blocks much longer than *timeout* (default ``close_timeout``).

        Examples:
            >>> def shutdown(consumer: Consumer) -> None:
            ...     consumer.close(timeout=5.0)
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        seconds = self._close_timeout if timeout is None else timeout
        self._thread.close_with(self._consumer.close(seconds), seconds + _SYNC_MARGIN, "consumer")
