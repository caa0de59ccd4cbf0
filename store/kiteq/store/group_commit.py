"""Group commit: one writer per queue turns every request queued meanwhile into one write.

Both durable stores need it for the same reason: a durable write (a RocksDB WriteBatch
with its fsync, a MySQL COMMIT) costs about as much for one call as for a thousand, so
calls that arrive while a write runs are queued and written together by the next one.
The store decides what a request is and how a batch is written (``write``, on the
store's executor) and settled (``written`` / ``failed``, on the event loop); this module
owns the queue, the one-write-at-a-time rule, the size bound of a batch, waiting
(``Deferral``) and draining at close.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from typing import Generic, Protocol, TypeVar

from kiteq.core.errors import StoreUnavailableError

__all__ = ["Deferral", "GroupCommitWriter", "Sized"]

logger = logging.getLogger(__name__)


class Sized(Protocol):
    """A queued request: ``size`` is what it adds to a batch, in bytes (roughly)."""

    @property
    def size(self) -> int: ...


_R = TypeVar("_R", bound=Sized)
_R_contra = TypeVar("_R_contra", bound=Sized, contravariant=True)
_D = TypeVar("_D")


class Deferral(Protocol[_R_contra]):
    """When a queue may wait before its next write (so bookkeeping rides along)."""

    def queued(self, request: _R_contra, sign: int) -> None:
        """*request* joined (+1) or left (-1) the queue."""
        ...

    def deadline(self, pending: Iterable[_R_contra], now: float) -> float | None:
        """The loop time the next write must start by; None: start it now."""
        ...


class GroupCommitWriter(Generic[_R, _D]):
    """One queue and its writer: at most one ``write`` of it runs at a time.

    Args:
        executor: Where ``write`` runs (the store's own threads).
        write: Writes a batch (called on the executor); its result goes to ``written``.
            It raises ``StoreUnavailableError`` when nothing of the batch was written.
        written: Settles a batch ``write`` returned for (on the loop).
        failed: Settles a batch whose ``write`` raised (on the loop).
        max_bytes: Most ``size`` a batch holds; a single larger request goes alone.
        name: Names the queue in logs.
        deferral: Lets requests wait (None: every write starts at once).
    """

    # The writer is a chain of callbacks rather than a task: there is nothing a caller or
    # the loop's shutdown could cancel halfway, so every queued request is always settled.

    def __init__(
        self,
        *,
        executor: Executor,
        write: Callable[[list[_R]], _D],
        written: Callable[[list[_R], _D], None],
        failed: Callable[[list[_R], StoreUnavailableError], None],
        max_bytes: int,
        name: str,
        deferral: Deferral[_R] | None = None,
    ) -> None:
        self._executor = executor
        self._write = write
        self._written = written
        self._failed = failed
        self._max_bytes = max_bytes
        self._name = name
        self._deferral = deferral
        self._pending: collections.deque[_R] = collections.deque()
        # True from the start of a write's scheduling until it is settled
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._draining = False
        self._drained: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def idle(self) -> bool:
        """Nothing queued and no write running."""
        return not (self._busy or self._pending)

    def submit(self, requests: Sequence[_R]) -> None:
        """Queue *requests* (on the loop); the store answers their callers when settled."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        deferral = self._deferral
        for request in requests:
            self._pending.append(request)
            if deferral is not None:
                deferral.queued(request, 1)
        self._kick()

    async def drain(self) -> None:
        """Write everything queued at once, and return when it is settled."""
        self._draining = True
        self._kick()
        if self.idle:
            return
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        await self._drained

    def _kick(self) -> None:
        """Start the next write if it is due, or arm the timer for when it is."""
        loop = self._loop  # set by the first submit, so by the time anything is pending
        if self._busy or not self._pending or loop is None:
            return
        deadline = None
        if self._deferral is not None and not self._draining:
            deadline = self._deferral.deadline(self._pending, loop.time())
        if deadline is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._busy = True
            # On the next iteration, so every call made until then joins in.
            loop.call_soon(self._start, loop)
        elif self._timer is None:
            self._timer = loop.call_at(deadline, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._kick()

    def _take(self) -> list[_R]:
        pending = self._pending
        deferral = self._deferral
        batch: list[_R] = []
        size = 0
        while pending and (not batch or size + pending[0].size <= self._max_bytes):
            request = pending.popleft()
            batch.append(request)
            size += request.size
            if deferral is not None:
                deferral.queued(request, -1)
        return batch

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._take()
        if not batch:
            self._settled()
            return
        job = loop.run_in_executor(self._executor, self._write, batch)
        job.add_done_callback(functools.partial(self._done, batch))

    def _done(self, batch: list[_R], job: asyncio.Future[_D]) -> None:
        try:
            result = job.result()
        except StoreUnavailableError as exc:
            logger.warning("store write failed %s: %s", self._name, exc)
            self._failed(batch, exc)
        except Exception as exc:
            # write translates backend failures itself: this is a bug, so say so loudly.
            logger.exception("store writer failed %s", self._name)
            error = StoreUnavailableError(f"{self._name}: writer failed: {exc!r}")
            error.__cause__ = exc
            self._failed(batch, error)
        else:
            self._written(batch, result)
        self._settled()

    def _settled(self) -> None:
        self._busy = False
        self._kick()
        if self.idle and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
