"""Waiting for something another process, thread or task does: poll until true, or fail.

``wait_until`` blocks (threads, processes); ``eventually`` is its asyncio twin, for tests on
the loop the code under test shares, where a blocking poll would stop it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["eventually", "wait_until"]


def wait_until(
    predicate: Callable[[], object], timeout: float = 30.0, what: str = "the condition"
) -> None:
    """Poll *predicate* every 50 ms until it is true; fail the test after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


async def eventually(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "the condition"
) -> None:
    """Poll *predicate* every 5 ms on the running loop until true; fail after *timeout* s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
