"""Two-phase commit, producer side: outcomes, the ``tx_checker`` runner, the decision outbox.

A transactional send publishes the message uncommitted, runs the local transaction after
the store-ack and sends its decision (``TxAck``) to the broker that stored it. When the
broker hears nothing (the producer died, or decided UNKNOWN) it checks: a ``TxCheck``
reaches a connection of the publishing group, whose ``tx_checker`` answers.

Here: the outcomes, the local transaction, the decision outbox (producer's loop; a sync
producer's decision arrives through ``decide_threadsafe``). The broker's checks are
answered by ``_tx_checks``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Final, TypeAlias

from kiteq.client import _wire
from kiteq.client._channel import Session
from kiteq.core.errors import KiteQError
from kiteq.core.limits import MAX_BATCH_MESSAGES
from kiteq.core.message import Message, ReceivedMessage, TxStatus

__all__ = [
    "LocalTransaction",
    "TxChecker",
    "TxOutbox",
    "TxResult",
    "TxStatus",
    "feedback_of",
    "is_async",
    "run_local_tx",
    "run_local_tx_sync",
    "tx_status",
    "uncommitted",
]

logger = logging.getLogger(__name__)

# Decisions kept while no session to their broker is open; beyond, the oldest go (the
# broker checks them later).
_OUTBOX_LIMIT: Final = 100_000
_FEEDBACK_CHARS: Final = 256


@dataclasses.dataclass(frozen=True, slots=True)
class TxResult:
    """What ``send_transactional`` decided for a stored, uncommitted message.

    Attributes:
        message_id: The id of the message.
        status: The decision sent to the broker. UNKNOWN: the broker checks later and
            the producer group's ``tx_checker`` answers.
        broker: The address of the broker that stored the message.
        error: The exception the local transaction raised (or the ``TypeError`` for a
            return value that is not a ``TxStatus``, a bool or None); None otherwise.
    """

    message_id: str
    status: TxStatus
    broker: str
    error: Exception | None = None


_Outcome: TypeAlias = TxStatus | bool | None

LocalTransaction: TypeAlias = Callable[[Message], _Outcome | Awaitable[_Outcome]]
"""Runs the local transaction of a stored, uncommitted message; returns its outcome.

``TxStatus`` as it is, True for COMMIT, False for ROLLBACK; None, UNKNOWN or an exception
leave the decision to the broker's later check. ``async def`` with ``AsyncProducer``.
"""

TxChecker: TypeAlias = Callable[[ReceivedMessage], _Outcome | Awaitable[_Outcome]]
"""Answers the broker's check of an undecided message (header only: the body is empty).

Returns as a ``LocalTransaction`` does; sync (run on a small thread pool) or ``async def``.
"""


def uncommitted(message: Message, group_id: str) -> Message:
    """The copy of *message* that ``send_transactional`` publishes: uncommitted, grouped.

    Raises:
        TypeError: *message* is not a ``Message``.
    """
    if not isinstance(message, Message):
        raise TypeError(f"expected a kiteq Message, got {type(message).__name__}")
    return dataclasses.replace(message, commit=False, group_id=group_id)


def is_async(fn: Callable[..., object]) -> bool:
    """True for an ``async def`` function, or an object whose ``__call__`` is one."""
    call = getattr(fn, "__call__", None)  # noqa: B004 - a callable object's method
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


def tx_status(outcome: object) -> TxStatus:
    """Map a local transaction's or a checker's return value to a ``TxStatus``.

    Raises:
        TypeError: *outcome* is not a TxStatus, a bool or None.
    """
    if isinstance(outcome, TxStatus):
        return outcome
    if outcome is True:
        return TxStatus.COMMIT
    if outcome is False:
        return TxStatus.ROLLBACK
    if outcome is None:
        return TxStatus.UNKNOWN
    raise TypeError(f"expected a TxStatus, a bool or None, got {outcome!r}")


def feedback_of(exc: BaseException) -> str:
    """A short description of *exc* for a ``TxAck``'s feedback."""
    return f"{type(exc).__name__}: {exc}"[:_FEEDBACK_CHARS]


def _local_failed(message: Message, exc: Exception) -> tuple[TxStatus, Exception]:
    logger.error(
        "local transaction failed id=%s topic=%s: deciding UNKNOWN (the broker checks later)",
        message.message_id,
        message.topic,
        exc_info=exc,
    )
    return TxStatus.UNKNOWN, exc


def run_local_tx_sync(
    local_tx: LocalTransaction, message: Message
) -> tuple[TxStatus, Exception | None]:
    """Run a sync local transaction in this thread; an exception decides UNKNOWN."""
    try:
        outcome = local_tx(message)
    except Exception as exc:  # noqa: BLE001 - the user's code: UNKNOWN, and reported
        return _local_failed(message, exc)
    if inspect.isawaitable(outcome):
        if inspect.iscoroutine(outcome):
            outcome.close()
        error = TypeError("a sync local_tx returned an awaitable; use AsyncProducer")
        return _local_failed(message, error)
    try:
        return tx_status(outcome), None
    except TypeError as exc:
        return _local_failed(message, exc)


async def run_local_tx(
    local_tx: LocalTransaction, message: Message
) -> tuple[TxStatus, Exception | None]:
    """Run a sync or async local transaction on the loop; an exception decides UNKNOWN."""
    try:
        outcome = local_tx(message)
        if inspect.isawaitable(outcome):
            outcome = await outcome
        return tx_status(outcome), None
    except Exception as exc:  # noqa: BLE001 - the user's code: UNKNOWN, and reported
        return _local_failed(message, exc)


class TxOutbox:
    """Decisions and check answers waiting to be written, per broker address.

    One writer task sends everything queued for a broker as one ``TxAckBatch`` frame (up
    to the batch limit) on the open session to that broker. Decisions for a broker with
    no open session wait for its next session; a failed write queues them again (a
    decision is idempotent on the broker, so a repeat is harmless).
    """

    def __init__(self, session_for: Callable[[str], Session | None]) -> None:
        self._session_for = session_for
        self._queued: dict[str, collections.deque[_wire.TxAnswer]] = {}
        self._count = 0
        self._ready = asyncio.Event()
        # one pass writes at a time: flush() waits for the writer's, which is then never
        # cancelled in the middle of a write (that would cancel the whole stream)
        self._writing = asyncio.Lock()
        self._closed = False

    def __len__(self) -> int:
        return self._count

    def put(self, address: str, answer: _wire.TxAnswer) -> None:
        """Queue *answer* for the broker at *address* (loop thread)."""
        if self._closed:
            logger.warning(
                "decision not sent id=%s status=%s: producer closed (the broker checks later)",
                answer.message_id,
                TxStatus(answer.status).name,
            )
            return
        answers = self._queued.get(address)
        if answers is None:
            answers = self._queued[address] = collections.deque()
        answers.append(answer)
        self._count += 1
        if self._count > _OUTBOX_LIMIT:
            self._drop_oldest()
        self._ready.set()

    def decide(
        self, address: str, message: Message, status: TxStatus, error: Exception | None
    ) -> None:
        """Queue the decision on *message* for the broker at *address* (loop thread)."""
        # the session that stored it, or a later one to the same broker
        feedback = "" if error is None else feedback_of(error)
        self.put(address, _wire.TxAnswer(message.message_id, message.topic, status, feedback))

    def decide_threadsafe(
        self,
        loop: asyncio.AbstractEventLoop | None,
        address: str,
        message: Message,
        status: TxStatus,
        error: Exception | None,
    ) -> None:
        """``decide`` from another thread, through the producer's *loop*."""
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self.decide, address, message, status, error)
                return
        except RuntimeError:  # the loop has closed
            pass
        logger.warning(
            "decision not sent id=%s status=%s: producer closed (the broker checks later)",
            message.message_id,
            status.name,
        )

    def wake(self) -> None:
        """A session opened: what waited for it may go now."""
        if self._count:
            self._ready.set()

    def _drop_oldest(self) -> None:
        address = max(self._queued, key=lambda a: len(self._queued[a]))
        dropped = self._queued[address].popleft()
        self._count -= 1
        logger.warning(
            "dropping decision id=%s for broker=%s: %d decisions wait for a session "
            "(the broker checks later)",
            dropped.message_id,
            address,
            _OUTBOX_LIMIT,
        )

    async def run(self) -> None:
        """Write queued answers as they come (the writer task)."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            async with self._writing:
                await self._write_all()

    async def _write_all(self) -> None:
        progress = True
        while progress:
            progress = False
            for address in list(self._queued):
                answers = self._queued.get(address)
                session = self._session_for(address)
                if not answers or session is None or not session.alive:
                    continue
                count = min(len(answers), MAX_BATCH_MESSAGES)
                batch = [answers.popleft() for _ in range(count)]
                self._count -= count
                if not answers:
                    del self._queued[address]
                try:
                    await session.send_tx(batch)
                except KiteQError as exc:
                    logger.info("decisions not sent broker=%s error=%s: kept", address, exc)
                    kept = self._queued.setdefault(address, collections.deque())
                    kept.extendleft(reversed(batch))
                    self._count += count
                else:
                    progress = True

    async def flush(self, timeout: float) -> None:
        """Write what can be written within *timeout*; then refuse further answers."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._writing:
                await self._write_all()
        self._closed = True
        if self._count:
            logger.warning(
                "producer closing with %d transaction decisions unsent (the broker checks later)",
                self._count,
            )
        self._queued.clear()
        self._count = 0
