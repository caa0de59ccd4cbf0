"""Two-phase commit, producer side: outcomes, the ``tx_checker`` runner, the decision outbox.

A transactional send publishes the message uncommitted, runs the local transaction after
the store-ack and sends its decision (``TxAck``) to the broker that stored it. When the
broker hears nothing (the producer died, or decided UNKNOWN) it checks: a ``TxCheck``
reaches a connection of the publishing group, whose ``tx_checker`` answers.

Threads: everything here runs on the producer's loop, except sync checkers, which run on
``CheckerThreads`` (daemon threads, so a checker that hangs forever never keeps the
process from exiting) and hand their result back with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
import logging
import queue
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeAlias

from kiteq.client import _wire
from kiteq.client._channel import Session
from kiteq.core.errors import KiteQError
from kiteq.core.limits import MAX_BATCH_MESSAGES
from kiteq.core.message import Message, ReceivedMessage, TxStatus
from kiteq.core.tasks import TaskSet

__all__ = [
    "CheckRunner",
    "LocalTransaction",
    "TxChecker",
    "TxOutbox",
    "TxResult",
    "TxStatus",
    "is_async",
    "run_local_tx",
    "run_local_tx_sync",
    "tx_status",
]

logger = logging.getLogger(__name__)

# Threads a hung sync checker may strand, beyond tx_check_concurrency.
_SPARE_THREADS: Final = 32
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


_Job = tuple[Callable[[Any], object], object, Callable[[object, BaseException | None], None]]


class CheckerThreads:
    """Daemon threads running sync checkers, never joined: a hung one must not block exit.

    ``run`` reuses an idle thread or starts one, up to ``max_threads``; past that, calls
    wait in a queue. A call that overran its caller's timeout keeps its thread, so the
    caller's concurrency bound lets new calls start new threads meanwhile.
    """

    def __init__(self, name: str, max_threads: int) -> None:
        self._name = name
        self._max = max_threads
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # waiting for a job, not reserved by a queued one
        self._backlog = 0  # queued jobs that found no thread to reserve

    def run(
        self,
        fn: Callable[[Any], object],
        arg: object,
        done: Callable[[object, BaseException | None], None],
    ) -> None:
        """Call ``fn(arg)`` on a thread; then ``done(result, error)`` on that thread."""
        start = False
        with self._lock:
            if self._idle:
                self._idle -= 1
            elif self._threads < self._max:
                self._threads += 1
                start = True
            else:
                self._backlog += 1
        self._jobs.put((fn, arg, done))
        if start:
            threading.Thread(
                target=self._work, name=f"{self._name}-{self._threads}", daemon=True
            ).start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, arg, done = job
            try:
                result, error = fn(arg), None
            except BaseException as exc:  # noqa: BLE001 - handed to done(), never lost
                result, error = None, exc
            try:
                done(result, error)
            except Exception:
                logger.exception("checker result hand-off failed")
            with self._lock:
                if self._backlog:
                    self._backlog -= 1
                else:
                    self._idle += 1

    def shutdown(self) -> None:
        """Let idle threads exit; busy ones exit when their call returns."""
        with self._lock:
            threads, self._threads, self._max = self._threads, 0, 0
        for _ in range(threads):
            self._jobs.put(None)


class CheckRunner:
    """Answers the broker's checks with the producer's ``tx_checker``.

    Each check runs under ``timeout``; at most ``concurrency`` run at once. A checker that
    raises or overruns answers UNKNOWN (and is logged); it never holds up the checks of
    other messages. While a sync checker of a message still runs (it hangs), further
    checks of that message are not started again, so a hang strands one thread per
    message, not one per check. Without a ``tx_checker`` every check is answered UNKNOWN.
    """

    def __init__(
        self,
        checker: TxChecker | None,
        *,
        timeout: float,
        concurrency: int,
        answer: Callable[[str, _wire.TxAnswer], None],
        owner: str,
    ) -> None:
        self.checker = checker
        self._async = checker is not None and is_async(checker)
        self._timeout = timeout
        self._concurrency = concurrency
        self._answer = answer
        self._tasks = TaskSet(owner)
        self._slots = asyncio.Semaphore(concurrency)
        self._threads: CheckerThreads | None = None
        self._running: set[str] = set()
        self._warned = False
        self._closed = False

    def submit(self, address: str, checks: list[_wire.TxCheckRequest]) -> None:
        """Start answering *checks* from the broker at *address* (loop thread)."""
        if self._closed:
            return  # closing: the broker asks another connection, or this one again
        checker = self.checker
        if checker is None:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "answering %d transaction checks from broker=%s UNKNOWN: no tx_checker",
                    len(checks),
                    address,
                )
            for check in checks:
                message = check.message
                self._answer(
                    address,
                    _wire.TxAnswer(
                        message.message_id, message.topic, TxStatus.UNKNOWN, "no tx_checker"
                    ),
                )
            return
        for check in checks:
            message_id = check.message.message_id
            if message_id in self._running:
                logger.info(
                    "check %d of id=%s skipped: the previous check still runs",
                    check.check,
                    message_id,
                )
                continue
            self._running.add(message_id)
            self._tasks.spawn(self._check(address, check.message, checker), "tx-check")

    async def _check(self, address: str, message: ReceivedMessage, checker: TxChecker) -> None:
        feedback = ""
        try:
            async with self._slots:
                deadline = asyncio.timeout(self._timeout)
                try:
                    async with deadline:
                        status = await self._call(checker, message)
                except TimeoutError:
                    if not deadline.expired():
                        raise  # the checker's own TimeoutError: a failure like any other
                    status, feedback = TxStatus.UNKNOWN, f"checker timed out after {self._timeout}s"
                    logger.warning(
                        "tx_checker timed out id=%s after %.1fs: answering UNKNOWN",
                        message.message_id,
                        self._timeout,
                    )
        except Exception as exc:  # the user's checker: UNKNOWN, and logged
            status, feedback = TxStatus.UNKNOWN, feedback_of(exc)
            logger.exception("tx_checker failed id=%s: answering UNKNOWN", message.message_id)
        finally:
            if self._async:
                self._running.discard(message.message_id)
        self._answer(address, _wire.TxAnswer(message.message_id, message.topic, status, feedback))

    async def _call(self, checker: TxChecker, message: ReceivedMessage) -> TxStatus:
        outcome: object
        if self._async:
            outcome = checker(message)
        else:
            outcome = await self._in_thread(checker, message)
        if inspect.isawaitable(outcome):
            outcome = await outcome
        return tx_status(outcome)

    async def _in_thread(self, checker: TxChecker, message: ReceivedMessage) -> object:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        message_id = message.message_id

        def returned(result: object, error: BaseException | None) -> None:
            # loop thread: the checker returned, even if long after its timeout
            self._running.discard(message_id)
            if future.done():
                return
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

        def done(result: object, error: BaseException | None) -> None:
            # checker thread
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(returned, result, error)

        threads = self._threads
        if threads is None:
            threads = self._threads = CheckerThreads(
                "kiteq-tx-checker", self._concurrency + _SPARE_THREADS
            )

        def call(view: ReceivedMessage) -> object:
            # checker thread; a call that waited in the queue past its timeout is skipped
            return None if future.done() else checker(view)

        threads.run(call, message, done)
        return await future

    async def close(self) -> None:
        """Abandon the checks in progress (the broker checks again) and free the threads."""
        self._closed = True
        await self._tasks.cancel()
        if self._threads is not None:
            self._threads.shutdown()
