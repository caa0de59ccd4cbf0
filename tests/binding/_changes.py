"""``Changes``: follows a ``BindingTable`` through its listener, for every registry's tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from kiteq.binding.match import BindingTable

__all__ = ["Changes"]


class Changes:
    """Follows a ``BindingTable`` through its listener: tests wait on changes, not clocks."""

    def __init__(self, table: BindingTable) -> None:
        # the (topic, group) of each change, in order
        self.log: list[tuple[str, str]] = []
        self._event = asyncio.Event()
        table.add_listener(self._changed)

    def _changed(self, topic: str, group: str) -> None:
        self.log.append((topic, group))
        self._event.set()

    async def until(self, predicate: Callable[[], bool], timeout: float = 2.0) -> None:
        """Wait until *predicate* holds, re-checked at each change."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._event.clear()
                await self._event.wait()
