"""A consumer's handlers: how a delivery batch reaches user code and becomes answers.

Async handler: one task per batch, awaited message by message (``concurrency`` at once),
then one ``DeliverAckBatch`` for the batch. Sync handler: the whole batch handed to the
handler thread pool in one hop (split into ``concurrency`` contiguous chunks); finished
chunks come back to the loop together (one wake-up for all that finished meanwhile) and
go to the ``AckWriter``. True or None acks; False or an exception nacks. A batch handler
returns one result per message. With ``AckMode.MANUAL`` the handler answers each delivery
itself (``_acks``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from typing import Final, TypeAlias, TypeVar

from kiteq.client import _tracing, _wire
from kiteq.client._acks import AckMode, AckWriter, AsyncDelivery, Delivery, Ledger
from kiteq.client._channel import Session
from kiteq.core.errors import KiteQError
from kiteq.core.message import ReceivedMessage
from kiteq.core.tasks import TaskSet

__all__ = ["BatchHandler", "Handler", "HandlerRunner", "closing_nack", "is_async"]

logger = logging.getLogger(__name__)

Handler: TypeAlias = Callable[..., "bool | Awaitable[bool | None] | None"]
BatchHandler: TypeAlias = Callable[
    [list[ReceivedMessage]],
    "Sequence[bool | None] | Awaitable[Sequence[bool | None] | None] | None",
]

_FEEDBACK_CHARS: Final = 512

_T = TypeVar("_T")


def is_async(handler: Callable[..., object]) -> bool:
    """True for an ``async def`` function, or an object whose ``__call__`` is one."""
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


def closing_nack(message: ReceivedMessage) -> _wire.DeliveryResult:
    """The answer to a delivery that arrives while the consumer closes: redeliver it."""
    return _wire.DeliveryResult(message.message_id, False, "consumer closing")


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


def _sync_awaitable(result: object, what: str) -> Exception | None:
    # a sync handler that returned an awaitable: close it (never awaited) and say why
    if not inspect.isawaitable(result):
        return None
    if inspect.iscoroutine(result):
        result.close()
    return TypeError(f"a sync {what} returned an awaitable; use async def")


def _handle_whole(
    handler: BatchHandler, messages: Sequence[ReceivedMessage]
) -> list[_wire.DeliveryResult]:
    # handler thread: the batch handler gets the chunk in one call
    try:
        with _tracing.consuming_batch(messages):
            result = handler(list(messages))
    except Exception as exc:  # noqa: BLE001 - the user's handler: nack the chunk and log
        return [_failed(m, exc) for m in messages]
    error = _sync_awaitable(result, "batch handler")
    if error is not None:
        return [_failed(m, error) for m in messages]
    return _batch_verdicts(messages, result)


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
        error = _sync_awaitable(result, "handler")
        results.append(_verdict(message, result) if error is None else _failed(message, error))
    return results


def _nack_failed(delivery: Delivery | AsyncDelivery, exc: Exception) -> None:
    # any thread: a MANUAL handler raised before answering its delivery
    result = _failed(delivery.message, exc)
    if not delivery.settled:
        with contextlib.suppress(KiteQError):  # closed or expired: redelivered anyway
            delivery._nack(0, result.feedback)


class HandlerRunner:
    """Runs a consumer's handler over delivery batches; answers go to the ``AckWriter``.

    Args:
        handler: Called per message (or per delivery with ``AckMode.MANUAL``).
        batch_handler: Instead of *handler*: called per batch (or chunk).
        ack_mode: Whether the handler's result answers, or the handler itself.
        concurrency: Handler calls in progress at once (threads for a sync handler).
        ledger: Issues the deliveries a MANUAL handler answers.
        writer: Where answers go.
    """

    def __init__(
        self,
        handler: Handler | None,
        batch_handler: BatchHandler | None,
        *,
        ack_mode: AckMode,
        concurrency: int,
        ledger: Ledger,
        writer: AckWriter,
    ) -> None:
        called = handler if handler is not None else batch_handler
        self.is_async = called is not None and is_async(called)
        self._handler = handler
        self._batch_handler = batch_handler
        self._ack_mode = ack_mode
        self._concurrency = concurrency
        self._ledger = ledger
        self._writer = writer
        # async handler: one task per batch, joined by close()
        self.batches = TaskSet("kiteq-consumer")
        self._slots = asyncio.Semaphore(concurrency)
        # sync handler: the pool, and the finished chunks (any thread, under _handled_lock)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handled_lock = threading.Lock()
        self._handled: list[tuple[Session, list[_wire.DeliveryResult] | None]] = []
        self._handled_wake = False

    def start(self) -> None:
        """Bind to the running loop; a sync handler gets its threads."""
        self._loop = asyncio.get_running_loop()
        if not self.is_async:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._concurrency, thread_name_prefix="kiteq-handler"
            )

    @property
    def in_handlers(self) -> int:
        """Batches with the handler: async ones running, sync chunks queued or running."""
        return len(self.batches) + self._writer.expected

    def shutdown(self) -> None:
        """Let the handler threads go; chunks not started are dropped (redelivered)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def dispatch(self, session: Session, messages: list[ReceivedMessage]) -> None:
        """Hand a delivery batch to the handler (loop thread)."""
        if self.is_async:
            self.batches.spawn(self._process(session, messages), "batch")
        else:
            self._submit(session, messages)

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
            self._writer.expect()

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
                _nack_failed(delivery, exc)
        return []

    def _take_handled(self) -> None:
        with self._handled_lock:
            handled, self._handled = self._handled, []
            self._handled_wake = False
        writer = self._writer
        for session, results in handled:
            if results:
                writer.queue(session, results)
        writer.arrived(len(handled))

    # -- async handler: one task per batch (loop thread) ---------------------------------

    async def _process(self, session: Session, messages: list[ReceivedMessage]) -> None:
        if self._batch_handler is not None:
            results = await self._run_batch(self._batch_handler, messages)
        elif self._ack_mode is AckMode.MANUAL:
            await self._run_manual(session, messages)
            return
        else:
            results = await self._run_async(messages)
        await self._writer.write(session, results)

    async def _run_batch(
        self, handler: BatchHandler, messages: list[ReceivedMessage]
    ) -> list[_wire.DeliveryResult]:
        result, exc = await self._invoke(handler, messages, _tracing.consuming_batch(messages))
        if exc is not None:
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
        _, exc = await self._invoke(handler, delivery, _tracing.consuming(delivery.message))
        if exc is not None:
            _nack_failed(delivery, exc)

    async def _run_async(self, messages: list[ReceivedMessage]) -> list[_wire.DeliveryResult]:
        if self._concurrency == 1:
            return [await self._handle_async(message) for message in messages]
        return list(await asyncio.gather(*(self._handle_async(m) for m in messages)))

    async def _handle_async(self, message: ReceivedMessage) -> _wire.DeliveryResult:
        handler = self._handler
        assert handler is not None  # noqa: S101 - AUTO with a handler
        result, exc = await self._invoke(handler, message, _tracing.consuming(message))
        return _verdict(message, result) if exc is None else _failed(message, exc)

    async def _invoke(
        self, handler: Callable[[_T], object], arg: _T, trace: AbstractContextManager[object]
    ) -> tuple[object, Exception | None]:
        # under a handler slot, in the trace context; the handler's exception is returned
        async with self._slots:
            try:
                with trace:
                    result = handler(arg)
                    if inspect.isawaitable(result):
                        result = await result
            except Exception as exc:  # noqa: BLE001 - the user's handler: a nack, logged
                return None, exc
        return result, None
