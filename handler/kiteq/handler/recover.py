"""The recover scan: every ``recoverSeconds``, offer due messages to the dispatcher.

It brings back messages whose backoff window has passed, messages parked because their
group was offline or had no binding yet, messages the dispatcher had no room for, and —
after a restart — every message that was stored but not fully delivered. The store's
due index has one time per message (its earliest pending group); the dispatcher offers
each message only to the groups that are due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from kiteq.core.clock import Clock
from kiteq.handler.bookkeeper import Bookkeeper
from kiteq.handler.dispatch import Dispatcher
from kiteq.store.base import DueCursor, MessageStore

logger = logging.getLogger(__name__)

PAGE_SIZE: Final = 500


class RecoverLoop:
    def __init__(
        self,
        *,
        store: MessageStore,
        dispatcher: Dispatcher,
        bookkeeper: Bookkeeper,
        clock: Clock,
        period: float,
    ) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._bookkeeper = bookkeeper
        self._clock = clock
        self._period = period
        self._wake = asyncio.Event()
        self.scans = 0

    def wake(self) -> None:
        """Scan now instead of at the end of the period (a consumer or binding appeared)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self.scan()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._period)
            self._wake.clear()

    async def scan(self) -> int:
        """One pass over the due messages; returns how many were offered."""
        now = self._clock.now()
        cursor: DueCursor | None = None
        offered = 0
        while self._dispatcher.has_room:
            epoch = self._bookkeeper.scan_started()
            try:
                page = await self._store.page_due(now, PAGE_SIZE, cursor)
                for record in page:
                    message_id = record.message_id
                    # A message in flight joins with its groups that are due (the flight has
                    # the current state); otherwise a write still settling makes the read
                    # stale for it.
                    if not self._dispatcher.tracking(message_id) and self._bookkeeper.settled_since(
                        message_id, epoch
                    ):
                        continue
                    self._dispatcher.submit(record)
                    offered += 1
            finally:
                self._bookkeeper.scan_finished()
            if len(page) < PAGE_SIZE:
                break
            cursor = (page[-1].next_deliver_time, page[-1].message_id)
        self.scans += 1
        if offered:
            logger.debug("recover scan offered %d due messages", offered)
        return offered
