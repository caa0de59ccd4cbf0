"""The private event loop behind the blocking facades (``_sync``: ``Producer``, ``Consumer``).

grpc.aio objects must stay on the loop (and thread) that created them, so each sync
client owns one loop running in a daemon thread and only ever talks to it through
``run`` (blocking, bounded) or thread-safe hand-offs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class LoopThread:
    """An asyncio event loop running forever in a daemon thread until ``stop``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    @property
    def in_loop_thread(self) -> bool:
        """True when called from the loop's own thread (where blocking would deadlock)."""
        return threading.get_ident() == self._thread.ident

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        # loop thread, after stop(): finish what is left so nothing is destroyed pending
        loop = self.loop
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks, timeout=2.0))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None) -> _T:
        """Run *coro* on the loop and wait for its result (at most *timeout* seconds).

        Raises:
            TimeoutError: It did not finish in time (it is cancelled).
            RuntimeError: Called from the loop thread itself, which would deadlock.
        """
        if self.in_loop_thread:
            coro.close()
            raise RuntimeError("a blocking kiteq call was made on the client's own loop thread")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.done():
                # finished as the wait ended, or failed with its own TimeoutError subclass
                return future.result()
            future.cancel()
            raise TimeoutError(f"no result within {timeout}s") from None

    def close_with(self, close: Coroutine[Any, Any, None], timeout: float, what: str) -> None:
        """Run a client's *close* coroutine (bounded by *timeout*), then stop the loop."""
        try:
            self.run(close, timeout=timeout)
        except TimeoutError:
            logger.warning("%s close did not finish in %.1fs", what, timeout)
        finally:
            self.stop()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and join the thread (bounded); idempotent."""
        if not self._thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self.in_loop_thread:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("event loop thread %s did not stop in %.1fs", self._thread.name, timeout)
