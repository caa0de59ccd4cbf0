"""Two-phase commit: decisions on uncommitted messages and bounded checks (TxAck).

An uncommitted message is stored and never delivered. The producer decides COMMIT or
ROLLBACK after its local transaction; when it does not (it crashed, or answered
UNKNOWN), the broker asks: first ``txCheckDelaySeconds`` after the publish, then every
``txCheckIntervalSeconds``, at most ``txCheckMax`` times, each time to the connection
that published the message if it is still open, else to any open connection of the
publishing group. A message still undecided after its last check is *unresolved*: kept,
listed and counted, never discarded, decided by an operator.

Checks are fire-and-forget frames and answers arrive as decisions, so a producer that
never answers or hangs its checker delays nothing else: every check goes out on time.
Decisions are final: the store commits or rolls back only an uncommitted record, so a
second or late decision (or a late UNKNOWN) changes nothing.

A producer decides only what its own group published (``decide_for``): another group's
id is refused and the message stays pending for its owner. Only an operator
(``decide``) decides any message.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import logging
from collections import Counter
from typing import Final

from kiteq.core.clock import Clock
from kiteq.core.message import StoredMessage, TxStatus
from kiteq.handler.bookkeeper import Bookkeeper
from kiteq.handler.connection import Connection, ConnectionTable
from kiteq.handler.dispatch import Dispatcher
from kiteq.handler.history import History
from kiteq.handler.ordering import keyed_due
from kiteq.handler.schedule import ScheduledTally
from kiteq.store.base import MessageStore

logger = logging.getLogger(__name__)

_PAGE: Final = 1000
# checks sent per pass before the loop yields to the rest of the broker
_CHECK_BATCH: Final = 500


# the history's name for an applied decision
_KINDS: Final = {TxStatus.COMMIT: "committed", TxStatus.ROLLBACK: "rolled_back"}
# the kiteq_transaction_checks_total result of an answer to a check
_RESULTS: Final = {
    TxStatus.COMMIT: "commit",
    TxStatus.ROLLBACK: "rollback",
    TxStatus.UNKNOWN: "unknown",
}


class TxDecision(enum.Enum):
    """What became of one producer decision (one TxAck item)."""

    APPLIED = "applied"
    # UNKNOWN, or nothing pending under this id (absent, or decided already: final)
    IGNORED = "ignored"
    # another group published the message; it stays pending for that group
    DENIED = "denied"


class TxManager:
    def __init__(
        self,
        *,
        store: MessageStore,
        dispatcher: Dispatcher,
        connections: ConnectionTable,
        bookkeeper: Bookkeeper,
        history: History,
        clock: Clock,
        check_delay: float,
        check_interval: float,
        check_max: int,
        scheduled: ScheduledTally | None = None,
    ) -> None:
        self._store = store
        self._scheduled = scheduled
        self._dispatcher = dispatcher
        self._connections = connections
        self._bookkeeper = bookkeeper
        self._history = history
        self._clock = clock
        self._check_delay = check_delay
        self._check_interval = check_interval
        self._check_max = check_max
        # undecided, still being checked: id -> record; (next check, id) heap, lazily pruned
        self._pending: dict[str, StoredMessage] = {}
        self._schedule: list[tuple[float, str]] = []
        self._publisher: dict[str, int] = {}
        # unresolved id -> publishing group (the record itself is not kept)
        self._unresolved: dict[str, str] = {}
        self._wake = asyncio.Event()
        self.checks_sent = 0
        self.unanswered = 0
        # how checked messages ended since the broker last read it ("commit", "rollback",
        # "unknown": a decision that came after a check; "unresolved": checks ran out)
        self.check_results: Counter[str] = Counter()

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def unresolved(self) -> int:
        return len(self._unresolved)

    async def load(self) -> None:
        """Resume the checks of every uncommitted message in the store (after a restart)."""
        after: str | None = None
        while True:
            page = await self._store.page_uncommitted(_PAGE, after)
            for record in page:
                self._watch(record)
            if len(page) < _PAGE:
                break
            after = page[-1].message_id
        if self._pending or self._unresolved:
            logger.info(
                "resumed transaction checks pending=%d unresolved=%d",
                len(self._pending),
                len(self._unresolved),
            )

    def track(self, record: StoredMessage, publisher: Connection | None) -> None:
        """A new uncommitted message was stored; its first check is at next_deliver_time."""
        if publisher is not None:
            self._publisher[record.message_id] = publisher.id
        self._watch(record)

    def _watch(self, record: StoredMessage) -> None:
        if record.deliver_count >= self._check_max:
            self._unresolved[record.message_id] = record.message.group_id
            return
        self._pending[record.message_id] = record
        heapq.heappush(self._schedule, (record.next_deliver_time, record.message_id))
        self._wake.set()

    async def decide_for(
        self, group: str, message_id: str, status: TxStatus, source: str
    ) -> TxDecision:
        """Apply a decision of a producer of *group*, only on a message *group* published.

        An id pending here under another group is refused (its owner still decides it);
        an id not pending here is ignored without asking the store, so no decision can
        reach a record that is being stored and not yet tracked.
        """
        owner = self._owner(message_id)
        if owner is None:
            # absent or decided already: history says so, as for an operator's decision
            kind = "tx_unknown" if status is TxStatus.UNKNOWN else f"{_KINDS[status]}_ignored"
            self._history.record(message_id, self._clock.now(), kind, detail=source)
            return TxDecision.IGNORED
        if owner != group:
            self._history.record(
                message_id, self._clock.now(), "tx_denied", detail=f"{source} of group {group}"
            )
            return TxDecision.DENIED
        record = self._pending.get(message_id)
        if record is not None and record.deliver_count > 0:
            self.check_results[_RESULTS[status]] += 1
        changed = await self.decide(message_id, status, source)
        return TxDecision.APPLIED if changed else TxDecision.IGNORED

    def _owner(self, message_id: str) -> str | None:
        """The publishing group of an undecided message, None if none is pending here."""
        record = self._pending.get(message_id)
        if record is not None:
            return record.message.group_id
        return self._unresolved.get(message_id)

    async def decide(self, message_id: str, status: TxStatus, source: str) -> bool:
        """Apply an operator's (or an owner's) decision; True if it changed anything.

        Not scoped to a group: producers go through ``decide_for``.
        """
        now = self._clock.now()
        if status is TxStatus.UNKNOWN:
            self._history.record(message_id, now, "tx_unknown", detail=source)
            return False
        if status is TxStatus.COMMIT:
            record = await self._store.commit(message_id)
        else:
            record = await self._store.rollback(message_id)
        kind = _KINDS[status]
        if record is None:
            # absent, or decided already: decisions are final
            self._history.record(message_id, now, f"{kind}_ignored", detail=source)
            return False
        self._forget(message_id)
        self._history.record(message_id, now, kind, detail=source)
        if status is TxStatus.COMMIT:
            previous = record.next_deliver_time
            # the counter counted checks; from now on it counts deliveries
            record.deliver_count = 0
            # a scheduled message waits for its delivery time (issue #15); a keyed one is
            # stored out of the periodic scan's way (kiteq.handler.ordering: keyed_due)
            record.next_deliver_time = keyed_due(record.message) or max(
                now, record.message.deliver_at
            )
            self._bookkeeper.reschedule(record, previous)
            if record.message.scheduled(now):
                if self._scheduled is not None:
                    self._scheduled.stored(record, now)
            else:
                self._dispatcher.submit(record)
        else:
            self._history.keep(message_id)
        return True

    def _forget(self, message_id: str) -> None:
        self._pending.pop(message_id, None)
        self._publisher.pop(message_id, None)
        self._unresolved.pop(message_id, None)

    async def run(self) -> None:
        while True:
            wait = self._check_due()
            self._wake.clear()
            if wait is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)

    def _check_due(self) -> float | None:
        """Send the checks that are due; seconds until the next one (None: none left)."""
        now = self._clock.now()
        sent = 0
        while self._schedule and sent < _CHECK_BATCH:
            due, message_id = self._schedule[0]
            record = self._pending.get(message_id)
            if record is None or record.next_deliver_time != due:
                heapq.heappop(self._schedule)  # decided, or rescheduled since
                continue
            if due > now:
                return due - now
            heapq.heappop(self._schedule)
            self._check(record, now)
            sent += 1
        return 0.0 if self._schedule else None

    def _check(self, record: StoredMessage, now: float) -> None:
        message_id = record.message_id
        previous = record.next_deliver_time
        if record.deliver_count >= self._check_max:
            del self._pending[message_id]
            self._publisher.pop(message_id, None)
            self._unresolved[message_id] = record.message.group_id
            self.check_results["unresolved"] += 1
            self._history.record(
                message_id, now, "unresolved", detail=f"{record.deliver_count} checks unanswered"
            )
            self._history.keep(message_id)
            logger.warning(
                "transaction unresolved id=%s group=%s after %d checks",
                message_id,
                record.message.group_id,
                record.deliver_count,
            )
            return
        record.deliver_count += 1
        record.next_deliver_time = now + self._check_interval
        conn = self._target(record)
        if conn is None:
            self.unanswered += 1
            self._history.record(
                message_id, now, "tx_check", attempt=record.deliver_count, detail="no live producer"
            )
        else:
            self.checks_sent += 1
            conn.send_check(record, record.deliver_count)
            self._history.record(
                message_id, now, "tx_check", connection=conn.name, attempt=record.deliver_count
            )
        self._bookkeeper.reschedule(record, previous)
        heapq.heappush(self._schedule, (record.next_deliver_time, message_id))

    def _target(self, record: StoredMessage) -> Connection | None:
        """The publishing connection if still open, else any of the publishing group."""
        conn_id = self._publisher.get(record.message_id)
        if conn_id is not None:
            conn = self._connections.get(conn_id)
            if conn is not None:
                return conn
            del self._publisher[record.message_id]
        return self._connections.any_of(record.message.group_id)

    def is_unresolved(self, message_id: str) -> bool:
        return message_id in self._unresolved
