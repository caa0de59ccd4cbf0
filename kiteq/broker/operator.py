"""Operator reads and actions on the DLQ, transactions, scheduled and other messages.

One implementation behind both operator surfaces: the gRPC ``Admin`` service
(``kiteq.broker.admin_service``) and the console on the ops port
(``kiteq.broker.console_source``). Each surface authenticates, translates its request and
writes the audit line naming its peer; what is read and what moves is decided here.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Sequence
from typing import Final

from kiteq.core.message import StoredMessage, TxStatus
from kiteq.handler.core import BrokerCore
from kiteq.store.base import DeadLetter, DlqFilter, DlqKey, DueCursor, HistoryEvent

logger = logging.getLogger(__name__)

MAX_PAGE = 1000
# A scheduled message due sooner than this is no longer cancelled: the recover scan that
# reads it may have started (it would deliver a message the operator was told is gone).
CANCEL_MARGIN_SECONDS: Final = 1.0
# the due index holds backoff windows and parked messages too: a listing reads at most
# this many pages of them for one page of scheduled messages
_LIST_READS: Final = 20
# the due index's upper bound (kiteq.handler.recover: finite, for MySQL)
_EVERYTHING: Final = 1e300


class CancelOutcome(enum.Enum):
    CANCELLED = "cancelled"
    NOT_FOUND = "not_found"
    NOT_SCHEDULED = "not_scheduled"


@dataclasses.dataclass(frozen=True, slots=True)
class MessageLookup:
    """What the broker knows of one message id.

    ``record``: the live message, else the latest dead letter's copy, else None (gone or
    never seen). ``live``: ``record`` is still in delivery for some group.
    """

    record: StoredMessage | None
    live: bool
    letters: list[DeadLetter]
    history: list[HistoryEvent]

    @property
    def known(self) -> bool:
        return self.record is not None or bool(self.history)


class Operator:
    def __init__(
        self,
        core: BrokerCore,
    ) -> None:
        self._store = core.store
        self._dispatcher = core.dispatcher
        self._history = core.history
        self._transactions = core.transactions
        self._clock = core.clock
        self._scheduled = core.scheduled

    async def lookup(self, message_id: str) -> MessageLookup:
        """The message, its dead letters and its history (stored and not yet flushed)."""
        events = await self._store.get_history(message_id) + self._history.unflushed(message_id)
        events.sort(key=lambda e: e.time)
        record = await self._store.get(message_id)
        # a message still delivered to some groups may be dead-lettered for others
        letters = await self._store.get_dead_letters(message_id)
        if record is None and letters:
            latest = max(letters, key=lambda letter: letter.dead_time)
            return MessageLookup(latest.record, False, letters, events)
        return MessageLookup(record, record is not None, letters, events)

    async def dead_letters(
        self, where: DlqFilter, limit: int, after: DlqKey | None = None
    ) -> list[DeadLetter]:
        return await self._store.list_dlq(where, min(limit, MAX_PAGE), after)

    async def letters_of(self, message_ids: Sequence[str], group: str = "") -> list[DlqKey]:
        """Every group's dead letter of each id, or only *group*'s."""
        return [
            letter.key
            for message_id in message_ids
            for letter in await self._store.get_dead_letters(message_id)
            if not group or letter.group == group
        ]

    async def count(self, where: DlqFilter) -> int:
        """How many dead letters *where* matches (what a redrive by filter would move)."""
        count = 0
        after: DlqKey | None = None
        while True:
            page = await self._store.list_dlq(where, MAX_PAGE, after)
            count += len(page)
            if len(page) < MAX_PAGE:
                return count
            after = page[-1].key

    async def redrive_where(self, where: DlqFilter) -> int:
        """Redrive every dead letter *where* matches; how many moved."""
        redriven = 0
        while True:
            # each page leaves the DLQ, so the next page starts from the beginning again
            page = await self._store.list_dlq(where, MAX_PAGE)
            if not page:
                return redriven
            redriven += await self.redrive([letter.key for letter in page])

    async def redrive(self, keys: list[DlqKey]) -> int:
        """Redrive dead letters; each is delivered again to its own group only."""
        if not keys:
            return 0
        now = self._clock.now()
        records = await self._store.redrive(keys, now)
        groups: dict[str, list[str]] = {}
        for message_id, group in keys:
            groups.setdefault(message_id, []).append(group)
            self._history.record(message_id, now, "redriven", group=group)
            self._history.keep(message_id)
        for record in records:
            if record.message.commit:
                self._dispatcher.redriven(record, groups[record.message_id])
        logger.info("redrove %d dead letters of %d messages", len(keys), len(records))
        return len(keys)

    async def transactions(
        self, limit: int, after: str | None = None, *, unresolved_only: bool = False
    ) -> list[tuple[StoredMessage, bool]]:
        """Uncommitted messages in id order after *after*, each with whether it is unresolved."""
        limit = min(limit, MAX_PAGE)
        found: list[tuple[StoredMessage, bool]] = []
        while len(found) < limit:
            page = await self._store.page_uncommitted(MAX_PAGE, after)
            for record in page:
                unresolved = self._transactions.is_unresolved(record.message_id)
                if unresolved_only and not unresolved:
                    continue
                found.append((record, unresolved))
                if len(found) == limit:
                    break
            if len(page) < MAX_PAGE:
                break
            after = page[-1].message_id
        return found

    async def resolve(self, message_id: str, status: TxStatus) -> bool:
        """An operator's commit or rollback; True if it changed anything."""
        return await self._transactions.decide(message_id, status, "operator")

    async def scheduled(
        self, limit: int, after: DueCursor | None = None, topic: str = ""
    ) -> tuple[list[StoredMessage], DueCursor | None]:
        """Scheduled messages (delivery time ahead), in delivery-time order after *after*.

        Reads the due index from now on (no scan of what is due already); returns the
        page and the cursor of the next one (None: no more).
        """
        limit = min(limit, MAX_PAGE)
        now = self._clock.now()
        cursor: DueCursor = max(after, (now, "")) if after is not None else (now, "")
        found: list[StoredMessage] = []
        for _ in range(_LIST_READS):
            page = await self._store.page_due(_EVERYTHING, MAX_PAGE, cursor)
            for record in page:
                cursor = (record.next_deliver_time, record.message_id)
                message = record.message
                if message.scheduled(now) and (not topic or message.topic == topic):
                    found.append(record)
                    if len(found) == limit:
                        return found, cursor
            if len(page) < MAX_PAGE:
                return found, None
        return found, cursor

    async def cancel(self, message_id: str) -> tuple[CancelOutcome, str]:
        """Remove a scheduled message before its delivery time; the outcome and why."""
        record = await self._store.get(message_id)
        if record is None:
            return CancelOutcome.NOT_FOUND, "no stored message has this id"
        now = self._clock.now()
        message = record.message
        if not message.commit:
            return CancelOutcome.NOT_SCHEDULED, "uncommitted: commit or roll back its transaction"
        if not message.scheduled(now + CANCEL_MARGIN_SECONDS) or self._dispatcher.tracking(
            message_id
        ):
            return CancelOutcome.NOT_SCHEDULED, "not scheduled: due already or being delivered"
        await self._store.delete([record])
        self._scheduled.cancelled(record)
        self._history.record(message_id, now, "cancelled", detail="operator")
        self._history.keep(message_id)
        logger.info("cancelled scheduled message %s (due at %.3f)", message_id, message.deliver_at)
        return CancelOutcome.CANCELLED, ""
