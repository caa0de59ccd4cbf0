"""The blocking producer: a facade over ``AsyncProducer`` on a private event loop thread.

``send_async`` validates and appends to the async producer's inbox from the caller's
thread (``AsyncProducer._submit`` is thread-safe); everything else runs on the loop
through ``LoopThread.run`` or ``call_soon_threadsafe``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Final, Self

from kiteq.client._future import RunningFuture
from kiteq.client._producer import AsyncProducer, SendResult, _Send, uncommitted
from kiteq.client._sync import LoopThread
from kiteq.client._tx import TxChecker, TxResult, is_async, run_local_tx_sync
from kiteq.core.errors import PublishTimeoutError
from kiteq.core.message import Message, TxStatus
from kiteq.core.tls import TlsOptions

__all__ = ["Producer"]

logger = logging.getLogger(__name__)

# The facade's own margin over a send's deadline, in case the loop is stuck.
_SYNC_MARGIN: Final = 5.0


class Producer:
    """Publishes messages for one producer group (blocking API).

    A facade over ``AsyncProducer`` running on a private event loop in a daemon thread;
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

    def __init__(
        self,
        *,
        brokers: Sequence[str] | None = None,
        registry: str | None = None,
        group_id: str,
        secret_key: str = "",
        client_id: str | None = None,
        timeout: float = 5.0,
        linger: float = 0.002,
        max_batch: int = 500,
        max_batch_bytes: int = 1024 * 1024,
        max_pending: int = 10_000,
        retries: int = 3,
        connect_timeout: float = 5.0,
        reconnect_max_delay: float = 30.0,
        close_timeout: float = 10.0,
        tx_checker: TxChecker | None = None,
        tx_check_timeout: float = 10.0,
        tx_check_concurrency: int = 4,
        tls: TlsOptions | None = None,
    ) -> None:
        self._producer = AsyncProducer(
            brokers=brokers,
            registry=registry,
            group_id=group_id,
            secret_key=secret_key,
            client_id=client_id,
            timeout=timeout,
            linger=linger,
            max_batch=max_batch,
            max_batch_bytes=max_batch_bytes,
            max_pending=max_pending,
            retries=retries,
            connect_timeout=connect_timeout,
            reconnect_max_delay=reconnect_max_delay,
            close_timeout=close_timeout,
            tx_checker=tx_checker,
            tx_check_timeout=tx_check_timeout,
            tx_check_concurrency=tx_check_concurrency,
            tls=tls,
        )
        self._timeout = float(timeout)
        self._close_timeout = float(close_timeout)
        self._close_lock = threading.Lock()
        self._closed = False
        self._thread = LoopThread("kiteq-producer")
        # with a tx_checker, start() waits for the first connection attempts
        start_timeout = _SYNC_MARGIN + (connect_timeout + _SYNC_MARGIN if tx_checker else 0)
        try:
            self._thread.run(self._producer.start(), timeout=start_timeout)
        except BaseException:
            self._closed = True
            self._thread.stop()
            raise

    def __enter__(self) -> Self:
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
        producer = self._producer
        prepared = producer._prepare(message)
        future: concurrent.futures.Future[SendResult] = RunningFuture()
        # waits while max_pending sends are unacknowledged (never on the loop thread)
        producer._submit(_Send(prepared, seconds, future, True), seconds)
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
        producer = self._producer
        pending = uncommitted(message, producer._group_id)
        stored = self.send(pending, timeout=timeout)
        status, error = run_local_tx_sync(local_tx, pending)
        producer._decide_threadsafe(stored.broker, pending, status, error)
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
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        seconds = self._close_timeout if timeout is None else timeout
        self._thread.close_with(self._producer.close(seconds), seconds + _SYNC_MARGIN, "producer")
