"""The recover scan: every ``recoverSeconds``, offer due messages to the dispatcher.

It brings back messages whose backoff window has passed, messages parked because their
group was offline or had no binding yet, messages the dispatcher had no room for, and —
after a restart — every message that was stored but not fully delivered. The store's
due index has one time per message (its earliest pending group); the dispatcher offers
each message only to the groups that are due.

A message parked for a persistent group that has no live consumer is due at its expiry
(``flight.parked_until``): the periodic scan reads only what is due, so an offline
group's backlog costs nothing while it is away. The scan after a group gets its first
consumer, after a wake (a binding changed) and the first scan after a start read every
stored message, parked ones included, until one of them gets through the whole index.

A scheduled message (issue #15) is stored due at its delivery time: the periodic scan
reads it only once it is due, and a full scan reads it but skips it as it skips any
message in its backoff window (its count for the metrics is taken there:
``kiteq.handler.schedule``). The loop wakes at the next delivery time the tally knows
(``due_at``, ``ScheduledTally.next_due``), so a scheduled message comes within a second
of its time rather than up to a period later.

Ordered delivery (issue #16): a full scan enters the keyed messages it skips (in their
backoff window) in their lanes, and the first complete full scan after a start releases
the lanes (``kiteq.handler.ordering``): by then every stored keyed message is in its lane,
so a lane's head is its earliest stored message whatever the due order was. So does the
first complete full scan after a binding change or a takeover (``Lanes.hold``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from kiteq.core.clock import Clock
from kiteq.core.message import StoredMessage
from kiteq.handler.bookkeeper import Bookkeeper
from kiteq.handler.dispatch import Dispatcher
from kiteq.handler.flight import has_parked
from kiteq.handler.schedule import ScheduledTally
from kiteq.store.base import DueCursor, MessageStore

logger = logging.getLogger(__name__)

PAGE_SIZE: Final = 500
# the upper due bound of a full scan: after every expiry (finite: MySQL has no infinity)
_EVERYTHING: Final = 1e300


class RecoverLoop:
    def __init__(
        self,
        *,
        store: MessageStore,
        dispatcher: Dispatcher,
        bookkeeper: Bookkeeper,
        clock: Clock,
        period: float,
        scheduled: ScheduledTally | None = None,
    ) -> None:
        self._store = store
        self._scheduled = scheduled
        self._dispatcher = dispatcher
        self._bookkeeper = bookkeeper
        self._clock = clock
        self._period = period
        self._wake = asyncio.Event()
        # wall time the loop plans its next scan for (a sooner delivery time wakes it)
        self._next_scan = 0.0
        self.scans = 0
        # read parked messages too in the next scan (a start reads everything)
        self._full = True
        self._arrivals = dispatcher.arrivals

    def wake(self) -> None:
        """Scan now instead of at the end of the period (a consumer or binding appeared).

        That scan reads parked messages too: a binding change can end a group's parking.
        """
        self._full = True
        self._wake.set()

    def nudge(self) -> None:
        """Scan now; a full one only if a group got its first live consumer since the last.

        For a consumer that connected: only a group's first live consumer can end the
        parking of its messages (``Dispatcher.arrivals``, which ``scan`` checks); one more
        consumer of a group already served needs no read of the whole index.
        """
        self._wake.set()

    def due_at(self, when: float) -> None:
        """A scheduled message becomes due at *when*: scan then, not a period later."""
        if when < self._next_scan:
            self._next_scan = when
            self._wake.set()  # the loop plans again; the scan it runs first is cheap

    async def run(self) -> None:
        while True:
            await self.scan()
            now = self._clock.now()
            wait = self._period
            if self._scheduled is not None:
                due = self._scheduled.next_due(now)
                if due is not None:
                    wait = min(wait, max(0.0, due - now))
            self._next_scan = now + wait
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()

    async def scan(self) -> int:
        """One pass over the due messages; returns how many were offered."""
        now = self._clock.now()
        arrivals = self._dispatcher.arrivals
        if arrivals != self._arrivals:
            self._arrivals = arrivals
            self._full = True
        full = self._full
        generation = self._dispatcher.lanes.generation
        bound = _EVERYTHING if full else now
        cursor: DueCursor | None = None
        offered = 0
        # a full scan that skipped a message with a write still settling reads it next time
        stale = False
        census = self._scheduled if full else None
        complete = False
        if census is not None:
            census.census_started(now)
        while self._dispatcher.has_room:
            epoch = self._bookkeeper.scan_started()
            try:
                page = await self._store.page_due(bound, PAGE_SIZE, cursor)
                n, skipped = self._offer(page, now, epoch, full, census)
                offered += n
                stale |= skipped
            finally:
                self._bookkeeper.scan_finished()
            if len(page) < PAGE_SIZE:
                complete = True
                if full:
                    self._dispatcher.lanes.release(generation)
                if full and not stale and self._dispatcher.arrivals == arrivals:
                    self._full = False  # through the whole index: parked ones were offered
                break
            cursor = (page[-1].next_deliver_time, page[-1].message_id)
        if census is not None:
            census.census_finished(complete)
        self.scans += 1
        if offered:
            logger.debug("recover scan offered %d due messages", offered)
        return offered

    def _offer(
        self,
        page: list[StoredMessage],
        now: float,
        epoch: int,
        full: bool,
        census: ScheduledTally | None,
    ) -> tuple[int, bool]:
        """Offer one page's due messages; (how many, whether one was skipped as stale)."""
        offered = 0
        stale = False
        for record in page:
            if census is not None:
                census.census_saw(record, now)
            if full and record.next_deliver_time > now and not has_parked(record):
                # read for the parked ones: in its backoff window
                if record.message.ordering_key:
                    self._dispatcher.lanes.enter(record)
                continue
            message_id = record.message_id
            # A message in flight joins with its groups that are due (the flight has
            # the current state); otherwise a write still settling makes the read
            # stale for it.
            if not self._dispatcher.tracking(message_id) and self._bookkeeper.settled_since(
                message_id, epoch
            ):
                stale = True
                continue
            self._dispatcher.submit(record)
            offered += 1
        return offered, stale
