"""One supervised set of background tasks, for every component that runs some.

A task kept only by the event loop can be collected mid-flight, and its exception is then
never seen; a ``TaskSet`` keeps each task alive until it ends, logs a failure with the task's
name and hands it to an optional callback (a producer fails its sends, the broker stops).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["TaskSet"]

logger = logging.getLogger("kiteq.tasks")

_T = TypeVar("_T")


class TaskSet:
    """Background tasks kept alive in a set; a failure is logged and reported, never lost."""

    def __init__(self, owner: str, on_error: Callable[[BaseException], None] | None = None):
        self._owner = owner
        self._on_error = on_error
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, _T], name: str) -> asyncio.Task[_T]:
        """Run *coro* as a task owned by this set."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._owner}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error("background task failed task=%s", task.get_name(), exc_info=exc)
            if self._on_error is not None:
                self._on_error(exc)

    async def join(self, timeout: float) -> bool:
        """Wait up to *timeout* seconds until no task is left; True when none is.

        Tasks spawned while waiting are waited for too.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._tasks:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.wait(set(self._tasks), timeout=remaining)
        return True

    async def cancel(self, timeout: float = 1.0) -> None:
        """Cancel every task and wait (bounded) until they have finished."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
