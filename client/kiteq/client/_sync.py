"""The blocking clients: ``Producer`` and ``Consumer``, facades on a private loop thread.

Each owns a ``LoopThread`` (``_loop``): grpc.aio objects stay on the loop that made them.
``Producer.send_async`` validates and appends to the accumulator's inbox from the caller's
thread (``Accumulator.submit`` is thread-safe); everything else runs on the loop through
``LoopThread.run`` or ``call_soon_threadsafe``. ``Consumer`` drives an ``AsyncConsumer``
there; its sync handler runs on the handler threads.
"""

from __future__ import annotations

import abc
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Final, Self, Unpack

from kiteq.client._accumulator import Send, SendResult
from kiteq.client._acks import Delivery
from kiteq.client._consumer import AsyncConsumer
from kiteq.client._future import RunningFuture
from kiteq.client._loop import LoopThread
from kiteq.client._options import ConsumerArgs, ConsumerOptions, ProducerArgs, ProducerOptions
from kiteq.client._producer import ProducerCore
from kiteq.client._tx import TxResult, is_async, run_local_tx_sync, uncommitted
from kiteq.core.errors import ClientClosedError, KiteQError, PublishTimeoutError
from kiteq.core.message import Message, TxStatus

__all__ = ["Consumer", "Producer"]

# The facade's own margin over a bounded call, in case the loop is stuck.
_SYNC_MARGIN: Final = 5.0


class _SyncClient(abc.ABC):
    """What both facades share: the loop thread, ``with``, an idempotent ``close``."""

    _role = "client"

    def __init__(self, name: str, close_timeout: float) -> None:
        self._thread = LoopThread(name)
        self._close_timeout = close_timeout
        self._close_lock = threading.Lock()
        self._closed = False

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True once ``close`` has been called."""
        return self._closed

    def close(self, timeout: float | None = None) -> None:
        """Close the client (bounded by *timeout*, default ``close_timeout``); idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        seconds = self._close_timeout if timeout is None else timeout
        self._thread.close_with(self._closing(seconds), seconds + _SYNC_MARGIN, self._role)

    @abc.abstractmethod
    def _closing(self, seconds: float) -> Coroutine[Any, Any, None]:
        """The client's ``close`` coroutine, run on the loop thread."""


class Producer(_SyncClient):
    """Publishes messages for one producer group (blocking API).

    A facade over the producer's parts (``ProducerCore``) running on a private event loop in a daemon thread;
    ``send_async`` only appends to a buffer, so it is cheap to call in a loop. Options are
    those of ``AsyncProducer``; a ``tx_checker`` may be sync (run on a small thread
    pool) or ``async def`` (run on the private loop).

    Raises:
        ConfigError: An option is invalid.
        AuthenticationError: With a ``tx_checker``: the group's secret was refused.

    Examples:
        >>> with Producer(brokers=["127.0.0.1:13800"], group_id="pay-svc",
        ...               secret_key="s3cret") as producer:
        ...     result = producer.send(Message(topic="trade", message_type="pay-succ", body=b"1"))
        ...     future = producer.send_async(
        ...         Message(topic="trade", message_type="pay-succ", body=b"2"))
        ...     print(result.message_id, future.result().message_id)
    """

    _role = "producer"

    def __init__(self, **options: Unpack[ProducerArgs]) -> None:
        opts = ProducerOptions(**options)
        self._core = ProducerCore(opts)
        self._timeout = opts.timeout
        super().__init__("kiteq-producer", opts.close_timeout)
        # with a tx_checker, start() waits for the first connection attempts
        waits = opts.connect_timeout + _SYNC_MARGIN if opts.tx_checker else 0
        try:
            self._thread.run(self._core.start(), timeout=_SYNC_MARGIN + waits)
        except BaseException:
            self._closed = True
            self._thread.stop()
            raise

    def __enter__(self) -> Self:
        return self

    def _closing(self, seconds: float) -> Coroutine[Any, Any, None]:
        return self._core.close(seconds)

    @property
    def waiting_for_room(self) -> int:
        """Sends waiting right now because ``max_pending`` sends are unacknowledged."""
        return self._core.accumulator.waiting_for_room

    def send(self, message: Message, *, timeout: float | None = None) -> SendResult:
        """Send one message and block until the broker has made it durable.

        Args:
            message: The message; its ``group_id`` is replaced by the producer's group.
            timeout: Seconds until the store-ack, retries included.

        Returns:
            The store result (message id, broker, duplicate flag).

        Raises:
            KiteQError: As ``AsyncProducer.send``: ``InvalidMessageError`` (nothing sent),
                ``MessageRejectedError`` subclasses, ``StoreFullError``,
                ``StoreUnavailableError``, ``NotConnectedError``, ``PublishTimeoutError``,
                ``AuthenticationError``, ``ClientClosedError``.

        Examples:
            >>> def publish(producer: Producer) -> str:
            ...     result = producer.send(Message(topic="trade", message_type="pay-succ",
            ...                                    body=b"42"))
            ...     return result.message_id
        """
        seconds = self._timeout if timeout is None else timeout
        future = self.send_async(message, timeout=seconds)
        try:
            return future.result(seconds + _SYNC_MARGIN)
        except TimeoutError:
            if future.done():
                return future.result()
            raise PublishTimeoutError(
                f"no outcome for message {message.message_id} within {seconds}s"
            ) from None

    def send_async(
        self, message: Message, *, timeout: float | None = None
    ) -> concurrent.futures.Future[SendResult]:
        """Queue one message; return a ``concurrent.futures.Future`` of its ``SendResult``.

        Blocks only while ``max_pending`` sends are unacknowledged. The future's callbacks
        run on the producer's loop thread: keep them short and never block in them.

        Raises:
            InvalidMessageError: The message is invalid; nothing was sent.
            PublishTimeoutError: ``max_pending`` sends stayed unacknowledged for ``timeout``.
            ClientClosedError: The producer was closed.

        Examples:
            >>> def burst(producer: Producer, messages: list[Message]) -> None:
            ...     futures = [producer.send_async(m) for m in messages]
            ...     for future in futures:
            ...         future.result()
        """
        seconds = self._timeout if timeout is None else timeout
        accumulator = self._core.accumulator
        prepared = accumulator.prepare(message)
        future: concurrent.futures.Future[SendResult] = RunningFuture()
        # waits while max_pending sends are unacknowledged (never on the loop thread)
        accumulator.submit(Send(prepared, seconds, future, True), seconds)
        return future

    def send_transactional(
        self,
        message: Message,
        local_tx: Callable[[Message], TxStatus | bool | None],
        *,
        timeout: float | None = None,
    ) -> TxResult:
        """Publish *message* uncommitted, run *local_tx* in this thread, then decide.

        As ``AsyncProducer.send_transactional``; *local_tx* must be a sync callable. It
        runs in the calling thread after the store-ack; True or ``TxStatus.COMMIT``
        commits, False or ``TxStatus.ROLLBACK`` rolls back; None, UNKNOWN or an
        exception send UNKNOWN and the broker asks this group's ``tx_checker`` later.

        Returns:
            The decision (message id, status, broker, the local transaction's exception).

        Raises:
            TypeError: *local_tx* is not a sync callable; nothing was sent.
            KiteQError: The publish failed, as ``send`` does; ``local_tx`` was not run.

        Examples:
            >>> def pay(producer: Producer, order: str) -> TxResult:
            ...     def debit(message: Message) -> TxStatus:
            ...         ok = ledger.debit(message.properties["order"])
            ...         return TxStatus.COMMIT if ok else TxStatus.ROLLBACK
            ...     message = Message(topic="trade", message_type="pay-succ", body=b"42",
            ...                       properties={"order": order})
            ...     return producer.send_transactional(message, debit)
        """
        if not callable(local_tx):
            raise TypeError(f"local_tx must be callable, got {local_tx!r}")
        if is_async(local_tx):
            raise TypeError(
                f"local_tx must be sync (use AsyncProducer for async def), got {local_tx!r}"
            )
        core = self._core
        pending = uncommitted(message, core.group_id)
        stored = self.send(pending, timeout=timeout)
        status, error = run_local_tx_sync(local_tx, pending)
        core.outbox.decide_threadsafe(core.pool.loop, stored.broker, pending, status, error)
        return TxResult(pending.message_id, status, stored.broker, error)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking sends, flush the pending ones and wait for their acks; idempotent.

        Never blocks much longer than *timeout* (default ``close_timeout``): sends still
        unacknowledged then fail with ``ClientClosedError``. Transaction decisions
        already made are written first.

        Examples:
            >>> def shutdown(producer: Producer) -> None:
            ...     producer.close(timeout=2.0)
        """
        super().close(timeout)


class Consumer(_SyncClient):
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

    _role = "consumer"

    def __init__(self, **options: Unpack[ConsumerArgs]) -> None:
        opts = ConsumerOptions(**options)
        self._consumer = AsyncConsumer(**opts.as_args())
        self._connect_timeout = opts.connect_timeout
        super().__init__("kiteq-consumer", opts.close_timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def _closing(self, seconds: float) -> Coroutine[Any, Any, None]:
        return self._consumer.close(seconds)

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
        super().close(timeout)
