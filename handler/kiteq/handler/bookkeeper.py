"""Batched delivery bookkeeping: deletes and reschedules reach the store in groups.

The dispatcher settles messages one at a time; writing each result on its own would cost
one store round trip per message. The bookkeeper queues them and one task flushes
everything queued since its previous write.

Reschedules and dead letters carry a snapshot of the record's per-group state: the
dispatcher goes on changing ``record.groups`` in place while a store thread encodes the
write. Deletes read only the id, so the common case copies nothing.

A delete remembers the ids for the idempotency window (``dedupWindowSeconds``): the
store writes them with the delete, so a producer's retry of a settled message is a
duplicate until the window ends.

It also answers the recover scan's question "is a write for this id still settling?":
a scan that read the store before a delete landed must not redeliver that message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence

from kiteq.core.clock import Clock, SystemClock
from kiteq.core.errors import StoreError
from kiteq.core.message import GroupDelivery, StoredMessage
from kiteq.store.base import DeadLetter, HistoryEvent, MessageStore, Rescheduled

logger = logging.getLogger(__name__)

_RETRY_DELAY = 1.0


class Bookkeeper:
    def __init__(
        self, store: MessageStore, *, clock: Clock | None = None, remember_seconds: float = 0.0
    ) -> None:
        self._store = store
        self._clock = clock or SystemClock()
        # the idempotency window; 0: deleted ids are not remembered
        self._remember_seconds = remember_seconds
        self._deletes: list[StoredMessage] = []
        self._reschedules: list[Rescheduled] = []
        self._letters: list[DeadLetter] = []
        self._events: list[HistoryEvent] = []
        # message id -> writes queued or in progress
        self._pending: dict[str, int] = {}
        # message id -> flush epoch its write completed in; kept only while a recover
        # scan is reading the store (nothing else can see a stale read)
        self._done: dict[str, int] = {}
        self._scans = 0
        self._epoch = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # set when a round of writes completes (then replaced): ``landed`` waits on it
        self._round = asyncio.Event()

    def delete(self, record: StoredMessage) -> None:
        self._deletes.append(record)
        self._queued(record.message_id)

    def reschedule(self, record: StoredMessage, previous_due: float) -> None:
        self._reschedules.append(Rescheduled(_snapshot(record), previous_due))
        self._queued(record.message_id)

    def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        """Queue the letters of one message (one per group, agreeing on ``keep``)."""
        if not letters:
            return
        record = _snapshot(letters[0].record)
        for letter in letters:
            self._letters.append(dataclasses.replace(letter, record=record))
            self._queued(record.message_id)

    def history(self, events: list[HistoryEvent]) -> None:
        self._events.extend(events)
        self._idle.clear()
        self._wake.set()

    def _queued(self, message_id: str) -> None:
        self._pending[message_id] = self._pending.get(message_id, 0) + 1
        self._idle.clear()
        self._wake.set()

    def saving(self, message_ids: Sequence[str]) -> None:
        """New messages are being stored (the intake's save is under way).

        A sharded store commits a save's parts one after the other, so a scan may read a
        message before its save returns and the intake hands it to the dispatcher: until
        ``saved``, the scan must leave it to the intake.
        """
        for message_id in message_ids:
            self._pending[message_id] = self._pending.get(message_id, 0) + 1

    def saved(self, message_ids: Sequence[str]) -> None:
        """The save of *message_ids* ended (stored or failed), like a completed write."""
        self._epoch += 1
        for message_id in message_ids:
            self._settle(message_id)

    def settled_since(self, message_id: str, epoch: int) -> bool:
        """True while a write for *message_id* is queued or completed after *epoch*.

        A store read that started at *epoch* may then be stale for it.
        """
        # a write completing moves the epoch to E and records E for its ids; a read that
        # started before saw epoch E - 1
        return message_id in self._pending or self._done.get(message_id, -1) > epoch

    def scan_started(self) -> int:
        """A store read that must not trust writes still settling begins; its epoch."""
        self._scans += 1
        return self._epoch

    def scan_finished(self) -> None:
        self._scans -= 1
        if not self._scans:
            self._done.clear()

    async def flushed(self) -> None:
        """Wait until everything queued so far is written."""
        await self._idle.wait()

    async def landed(self, message_ids: Sequence[str]) -> None:
        """Wait until no write of *message_ids* is queued or in progress.

        Unlike ``flushed``, this ends on a busy broker too: it waits only for the rounds
        that carry these ids' writes (ordered delivery: a key's next message goes only
        once its previous one's ack is durable).
        """
        while any(m in self._pending for m in message_ids):
            await self._round.wait()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            deletes, self._deletes = self._deletes, []
            reschedules, self._reschedules = self._reschedules, []
            letters, self._letters = self._letters, []
            events, self._events = self._events, []
            writes = []
            # issued together, so the store groups them into one write
            if reschedules:
                writes.append(self._store.reschedule(reschedules))
            if letters:
                writes.append(self._store.dead_letter(_agreeing(letters)))
            if deletes:
                until = (
                    self._clock.now() + self._remember_seconds if self._remember_seconds else 0.0
                )
                writes.append(self._store.delete(deletes, until))
            if events:
                writes.append(self._store.append_history(events))
            results = await asyncio.gather(*writes, return_exceptions=True)
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is not None:
                if not isinstance(failure, StoreError):
                    raise failure
                # Nothing is lost: the messages stay stored and due. Retry the same writes
                # (each one is idempotent).
                logger.error(
                    "bookkeeping write failed; retrying in %.1fs: %s", _RETRY_DELAY, failure
                )
                self._deletes[:0] = deletes
                self._reschedules[:0] = reschedules
                self._letters[:0] = letters
                self._events[:0] = events
                await asyncio.sleep(_RETRY_DELAY)
                self._wake.set()
                continue
            self._epoch += 1
            self._round.set()
            self._round = asyncio.Event()
            for record in deletes:
                self._settle(record.message_id)
            for change in reschedules:
                self._settle(change.record.message_id)
            for letter in letters:
                self._settle(letter.record.message_id)
            if not (self._deletes or self._reschedules or self._letters or self._events):
                self._idle.set()
            # not kept alive while waiting for the next wake: a batch can hold thousands
            # of records with their bodies (an idle broker's RSS)
            del deletes, reschedules, letters, events, writes, results

    def _settle(self, message_id: str) -> None:
        left = self._pending.pop(message_id, 1) - 1
        if left > 0:
            self._pending[message_id] = left
        if self._scans:
            self._done[message_id] = self._epoch


def _snapshot(record: StoredMessage) -> StoredMessage:
    """A copy of *record* whose per-group state the dispatcher cannot change any more."""
    return dataclasses.replace(
        record,
        groups={
            g: GroupDelivery(d.state, d.attempts, d.next_deliver_time)
            for g, d in record.groups.items()
        },
    )


def _agreeing(letters: list[DeadLetter]) -> list[DeadLetter]:
    """Letters of one message queued in several rounds, made to agree on the latest state.

    The store writes a message's letters and its stored state in one step (``keep``);
    the latest round knows whether any group still has the message to deliver.
    """
    latest: dict[str, DeadLetter] = {}
    for letter in letters:
        latest[letter.record.message_id] = letter
    if len(latest) == len(letters):
        return letters
    agreed = []
    for letter in letters:
        last = latest[letter.record.message_id]
        if letter.record is not last.record:
            letter = dataclasses.replace(letter, record=last.record, keep=last.keep)
        agreed.append(letter)
    return agreed
