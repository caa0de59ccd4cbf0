"""Two-phase commit, the broker's checks: the ``tx_checker`` runner and its threads.

The broker checks a message it heard no decision for (the producer died, or decided
UNKNOWN): a ``TxCheck`` reaches a connection of the publishing group, whose
``tx_checker`` answers through the ``TxOutbox``. Everything here runs on the producer's
loop, except sync checkers, which run on ``CheckerThreads`` (daemon threads, so a checker
that hangs forever never keeps the process from exiting) and hand their result back with
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Final

from kiteq.client import _wire
from kiteq.client._tx import TxChecker, feedback_of, is_async, tx_status
from kiteq.core.message import ReceivedMessage, TxStatus
from kiteq.core.tasks import TaskSet

__all__ = ["CheckRunner", "CheckerThreads"]

logger = logging.getLogger(__name__)

# Threads a hung sync checker may strand, beyond tx_check_concurrency.
_SPARE_THREADS: Final = 32


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
