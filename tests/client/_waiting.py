"""Waiting on the test's event loop for something the code under test does, or fail.

The asyncio twin of ``tests.waiting.wait_until``: the client tests run on the loop the
client and the fake brokers share, where a blocking poll would stop them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["eventually"]


async def eventually(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "the condition"
) -> None:
    """Poll *predicate* every 5 ms until it is true; fail the test after *timeout* seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
