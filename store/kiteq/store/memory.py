"""The in-process store, for development, tests and brokers that may lose messages on exit.

It is labelled non-durable and, unlike KiteQ's memory store, it never evicts: when
``maxcap`` records are held (dead letters included, as they take memory too), ``save``
answers ``StoreFullError`` for the records that do not fit, so the producer learns that
its message was not kept. Records are copied on the way in and out so callers mutating
their objects cannot change what is stored, which keeps its behaviour identical to the
byte-storing backends.

History is bounded instead: the events of at most ``history_messages`` messages are
kept, and the messages whose first event is oldest are forgotten first.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Final, Generic, TypeVar

from kiteq.core.errors import StoreFullError, StoreUnavailableError
from kiteq.core.message import StoredMessage
from kiteq.store._groups import copy_groups, redrive_groups
from kiteq.store.base import (
    DeadLetter,
    DlqFilter,
    DlqKey,
    DueCursor,
    HistoryEvent,
    PendingCounts,
    Rescheduled,
    Saved,
    SaveOutcome,
    TakenOver,
    count_pending,
)

__all__ = ["MemoryStore"]

logger = logging.getLogger(__name__)

_CHUNK: Final = 512
DEFAULT_HISTORY_MESSAGES: Final = 100_000

_K = TypeVar("_K", DueCursor, DlqKey, str)
_T = TypeVar("_T")


def _time_key(time: float) -> float:
    # As in the RocksDB keys: negative times and NaN sort as 0.0 (due at once), which
    # also keeps NaN from breaking the sort order.
    return time if time > 0.0 else 0.0


def _due_key(ndt: float, message_id: str) -> DueCursor:
    return (_time_key(ndt), message_id)


def _first(limit: int, items: Iterator[_T]) -> Iterator[_T]:
    """At most *limit* of *items* (none for a *limit* <= 0), taking no more than that."""
    return itertools.islice(items, max(limit, 0))


class _SortedKeys(Generic[_K]):
    """Distinct keys, sorted: the due index and the dead-letter keys.

    Kept in chunks of about ``_CHUNK`` keys, so an insert or a removal moves a few hundred
    pointers instead of the whole index.
    """

    def __init__(self) -> None:
        self._chunks: list[list[_K]] = []
        self._maxes: list[_K] = []

    def add(self, key: _K) -> None:
        if not self._chunks:
            self._chunks.append([key])
            self._maxes.append(key)
            return
        i = min(bisect.bisect_left(self._maxes, key), len(self._maxes) - 1)
        chunk = self._chunks[i]
        bisect.insort(chunk, key)
        self._maxes[i] = chunk[-1]
        if len(chunk) > 2 * _CHUNK:
            self._chunks[i : i + 1] = [chunk[:_CHUNK], chunk[_CHUNK:]]
            self._maxes[i : i + 1] = [chunk[_CHUNK - 1], chunk[-1]]

    def discard(self, key: _K) -> None:
        i = bisect.bisect_left(self._maxes, key)
        if i == len(self._maxes):
            return
        chunk = self._chunks[i]
        j = bisect.bisect_left(chunk, key)
        if j == len(chunk) or chunk[j] != key:
            return
        del chunk[j]
        if chunk:
            self._maxes[i] = chunk[-1]
        else:
            del self._chunks[i]
            del self._maxes[i]

    def after(self, cursor: _K | None) -> Iterator[_K]:
        """Keys strictly after *cursor* (all keys for None), in order."""
        i = 0 if cursor is None else bisect.bisect_right(self._maxes, cursor)
        if i == len(self._chunks):
            return
        chunk = self._chunks[i]
        j = 0 if cursor is None else bisect.bisect_right(chunk, cursor)
        yield from chunk[j:]
        for chunk in self._chunks[i + 1 :]:
            yield from chunk


class MemoryStore:
    def __init__(self, maxcap: int, *, history_messages: int = DEFAULT_HISTORY_MESSAGES) -> None:
        if maxcap <= 0:
            raise ValueError(f"maxcap must be positive, got {maxcap}")
        if history_messages <= 0:
            raise ValueError(f"history_messages must be positive, got {history_messages}")
        self._maxcap = maxcap
        self._records: dict[str, StoredMessage] = {}
        self._due: _SortedKeys[DueCursor] = _SortedKeys()
        # ids of the stored records not yet committed (the transaction checks)
        self._uncommitted: _SortedKeys[str] = _SortedKeys()
        self._backlog: dict[str, int] = {}
        # The dead letters own their records (copies); _dead_keys orders them for list_dlq.
        self._dead: dict[DlqKey, DeadLetter] = {}
        self._dead_keys: _SortedKeys[DlqKey] = _SortedKeys()
        self._dlq: dict[tuple[str, str], int] = {}
        # message id -> events in append order; dict order is first-event order
        self._history: dict[str, list[HistoryEvent]] = {}
        self._history_messages = history_messages
        self._meta: dict[str, bytes] = {}
        # the idempotency window: id -> remembered until; the heap orders the prune (an id
        # remembered again leaves its older entry there, skipped when popped)
        self._remembered: dict[str, float] = {}
        self._remembered_order: list[tuple[float, str]] = []
        self._open = False
        self._closed = False

    @property
    def durable(self) -> bool:
        return False

    @property
    def description(self) -> str:
        return f"memory://?maxcap={self._maxcap}"

    async def open(self) -> None:
        if self._closed:
            raise self._not_open()
        self._open = True
        logger.info("store opened %s (not durable)", self.description)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._open = False
        logger.info("store closed %s: %d messages dropped", self.description, len(self._records))
        self._records.clear()
        self._due = _SortedKeys()
        self._uncommitted = _SortedKeys()
        self._backlog.clear()
        self._dead.clear()
        self._dead_keys = _SortedKeys()
        self._dlq.clear()
        self._history.clear()
        self._meta.clear()
        self._remembered.clear()
        self._remembered_order.clear()

    def _not_open(self) -> StoreUnavailableError:
        state = "closed" if self._closed else "not open"
        return StoreUnavailableError(f"{self.description} is {state}")

    def _check_open(self) -> None:
        if not self._open:
            raise self._not_open()

    async def save(self, records: Sequence[StoredMessage]) -> list[SaveOutcome]:
        if not self._open:
            return [self._not_open()] * len(records)
        outcomes: list[SaveOutcome] = []
        remembered = self._remembered
        for record in records:
            mid = record.message_id
            if mid in self._records or remembered.get(mid, 0.0) > record.publish_time:
                outcomes.append(Saved.DUPLICATE)
            elif len(self._records) + len(self._dead) >= self._maxcap:
                outcomes.append(StoreFullError(f"{self.description} holds {self._maxcap} messages"))
            else:
                stored = _copy_record(record)
                self._records[mid] = stored
                self._link(stored)
                outcomes.append(Saved.STORED)
        return outcomes

    async def get(self, message_id: str) -> StoredMessage | None:
        self._check_open()
        stored = self._records.get(message_id)
        return None if stored is None else _copy_record(stored)

    async def reschedule(self, changes: Sequence[Rescheduled]) -> None:
        self._check_open()
        records, due = self._records, self._due
        # inlined _take_bookkeeping: reschedules come in large batches
        for change in changes:
            new = change.record
            mid = new.message_id
            stored = records.get(mid)
            if stored is None:
                continue
            if stored.message.commit:
                due.discard(_due_key(stored.next_deliver_time, mid))
                due.add(_due_key(new.next_deliver_time, mid))
            stored.next_deliver_time = new.next_deliver_time
            stored.deliver_count = new.deliver_count
            groups = new.groups
            stored.groups = copy_groups(groups) if groups else {}
            stored.only_groups = tuple(new.only_groups)

    async def delete(self, records: Sequence[StoredMessage], remember_until: float = 0.0) -> None:
        self._check_open()
        for record in records:
            stored = self._records.pop(record.message_id, None)
            if stored is not None:
                self._unlink(stored)
            if remember_until > 0.0:
                self._remembered[record.message_id] = remember_until
                heapq.heappush(self._remembered_order, (remember_until, record.message_id))

    async def prune_remembered(self, before: float) -> int:
        self._check_open()
        order, remembered = self._remembered_order, self._remembered
        removed = 0
        while order and order[0][0] < before:
            until, mid = heapq.heappop(order)
            if remembered.get(mid) == until:
                del remembered[mid]
                removed += 1
        return removed

    def _take_bookkeeping(self, stored: StoredMessage, new: StoredMessage) -> None:
        """Write *new*'s delivery state to the stored record, keeping the due index."""
        due_before = stored.next_deliver_time
        stored.next_deliver_time = new.next_deliver_time
        self._reindex(stored, due_before)
        _copy_bookkeeping(stored, new)

    def _reindex(self, stored: StoredMessage, due_before: float) -> None:
        """Move a stored record whose next_deliver_time was *due_before* in the due index."""
        if stored.message.commit:
            self._due.discard(_due_key(due_before, stored.message_id))
            self._due.add(_due_key(stored.next_deliver_time, stored.message_id))

    def _link(self, stored: StoredMessage) -> None:
        """Index a record just put in ``_records``: due or uncommitted, and backlog."""
        if stored.message.commit:
            self._due.add(_due_key(stored.next_deliver_time, stored.message_id))
        else:
            self._uncommitted.add(stored.message_id)
        _add(self._backlog, stored.topic, 1)

    def _unlink(self, stored: StoredMessage) -> None:
        """Drop a record just removed from ``_records`` from its index and the backlog."""
        if stored.message.commit:
            self._due.discard(_due_key(stored.next_deliver_time, stored.message_id))
        else:
            self._uncommitted.discard(stored.message_id)
        _add(self._backlog, stored.topic, -1)

    def _undecided(self, message_id: str) -> StoredMessage | None:
        stored = self._records.get(message_id)
        return None if stored is None or stored.message.commit else stored

    async def commit(self, message_id: str) -> StoredMessage | None:
        self._check_open()
        stored = self._undecided(message_id)
        if stored is None:
            return None
        self._uncommitted.discard(message_id)
        stored.message = dataclasses.replace(stored.message, commit=True)
        self._due.add(_due_key(stored.next_deliver_time, message_id))
        return _copy_record(stored)

    async def rollback(self, message_id: str) -> StoredMessage | None:
        self._check_open()
        stored = self._undecided(message_id)
        if stored is None:
            return None
        # the history stays, to show what happened
        del self._records[message_id]
        self._unlink(stored)
        return stored

    async def page_uncommitted(self, limit: int, after: str | None = None) -> list[StoredMessage]:
        self._check_open()
        ids = self._uncommitted.after(after)
        return [_copy_record(self._records[mid]) for mid in _first(limit, ids)]

    async def page_due(
        self, now: float, limit: int, after: DueCursor | None = None
    ) -> list[StoredMessage]:
        self._check_open()
        cursor = None if after is None else _due_key(*after)
        # "not >": a NaN *now* stops nothing
        due = itertools.takewhile(lambda key: not key[0] > now, self._due.after(cursor))
        return [_copy_record(self._records[mid]) for _, mid in _first(limit, due)]

    async def backlog(self) -> dict[str, int]:
        self._check_open()
        return dict(self._backlog)

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        self._check_open()
        by_message: dict[str, list[DeadLetter]] = {}
        for letter in letters:
            by_message.setdefault(letter.record.message_id, []).append(letter)
        for mid, mine in by_message.items():
            stored = self._records.get(mid)
            if stored is None:
                continue
            for letter in mine:
                # The caller's bookkeeping is the latest (as in reschedule); the message and
                # its committed flag are the stored ones.
                dead = _copy_record(stored)
                dead.wire = None
                dead.next_deliver_time = letter.record.next_deliver_time
                _copy_bookkeeping(dead, letter.record)
                # keep is an instruction to this call, not part of the letter (see base)
                self._put_dead(dataclasses.replace(letter, record=dead, keep=False))
            if mine[-1].keep:
                self._take_bookkeeping(stored, mine[-1].record)
            else:
                del self._records[mid]
                self._unlink(stored)

    def _put_dead(self, letter: DeadLetter) -> None:
        key = letter.key
        replaced = self._dead.get(key)
        if replaced is None:
            self._dead_keys.add(key)
        else:
            _add(self._dlq, (replaced.record.topic, key[1]), -1)
        self._dead[key] = letter
        _add(self._dlq, (letter.record.topic, key[1]), 1)

    def _pop_dead(self, key: DlqKey) -> DeadLetter | None:
        letter = self._dead.pop(key, None)
        if letter is not None:
            self._dead_keys.discard(key)
            _add(self._dlq, (letter.record.topic, key[1]), -1)
        return letter

    async def list_dlq(
        self, where: DlqFilter, limit: int, after: DlqKey | None = None
    ) -> list[DeadLetter]:
        self._check_open()
        letters = (self._dead[key] for key in self._dead_keys.after(after))
        return [_copy(letter) for letter in _first(limit, filter(where.matches, letters))]

    async def get_dead_letters(self, message_id: str) -> list[DeadLetter]:
        self._check_open()
        first = (message_id, "")
        found = [_copy(self._dead[first])] if first in self._dead else []
        for key in self._dead_keys.after(first):
            if key[0] != message_id:
                break
            found.append(_copy(self._dead[key]))
        return found

    async def redrive(self, keys: Sequence[DlqKey], now: float) -> list[StoredMessage]:
        self._check_open()
        # message id -> (its latest dead letter, the groups redriven), in first-key order
        revived: dict[str, tuple[DeadLetter, list[str]]] = {}
        for key in keys:
            letter = self._pop_dead(key)
            if letter is None:
                continue
            mid, group = key
            latest, groups = revived.get(mid, (letter, []))
            groups.append(group)
            # the latest letter has the latest state of the message's other groups
            revived[mid] = (letter if letter.dead_time >= latest.dead_time else latest, groups)
        due: list[StoredMessage] = []
        for mid, (letter, groups) in revived.items():
            stored = self._records.get(mid)
            if stored is not None:
                due_before = stored.next_deliver_time
                redrive_groups(stored, groups, now, still_stored=True)
                self._reindex(stored, due_before)
                record = stored
            else:
                record = letter.record
                redrive_groups(record, groups, now, still_stored=False)
                self._records[mid] = record
                self._link(record)
            if record.message.commit:
                due.append(_copy_record(record))
        return due

    async def dlq_size(self) -> dict[tuple[str, str], int]:
        self._check_open()
        return dict(self._dlq)

    async def pending_counts(self) -> PendingCounts:
        self._check_open()
        counts: PendingCounts = {}
        for record in self._records.values():
            if record.groups:
                count_pending(counts, record.topic, record.publish_time, record.pending_groups())
        return counts

    async def take_over(self, owner: str) -> TakenOver:
        """Nothing to take over.

        This store is never shared between brokers, so no other broker's rows are in it
        (backlog takeover needs the MySQL store).
        """
        self._check_open()
        return TakenOver()

    async def append_history(self, events: Sequence[HistoryEvent]) -> None:
        self._check_open()
        history = self._history
        for event in events:
            kept = history.get(event.message_id)
            if kept is None:
                kept = history[event.message_id] = []
                if len(history) > self._history_messages:
                    # dicts keep insertion order: the first key has the oldest first event
                    del history[next(iter(history))]
            kept.append(event)

    async def get_history(self, message_id: str) -> list[HistoryEvent]:
        self._check_open()
        # Stable: events of the same time stay in append order, as the RocksDB keys keep them.
        return sorted(self._history.get(message_id, ()), key=lambda e: _time_key(e.time))

    async def prune_history(self, before: float) -> int:
        self._check_open()
        removed = 0
        for mid, events in list(self._history.items()):
            kept = [e for e in events if not _time_key(e.time) < before]
            if len(kept) == len(events):
                continue
            removed += len(events) - len(kept)
            if kept:
                self._history[mid] = kept
            else:
                del self._history[mid]
        return removed

    async def remembered_estimate(self) -> int:
        self._check_open()
        return len(self._remembered)

    async def release_memory(self) -> None:
        """Nothing: the messages are this store's memory."""

    async def put_meta(self, key: str, value: bytes | None) -> None:
        self._check_open()
        if value is None:
            self._meta.pop(key, None)
        else:
            self._meta[key] = bytes(value)

    async def get_meta(self, prefix: str) -> Mapping[str, bytes]:
        self._check_open()
        return {k: v for k, v in self._meta.items() if k.startswith(prefix)}


_Count = TypeVar("_Count", str, tuple[str, str])


def _add(counts: dict[_Count, int], key: _Count, delta: int) -> None:
    count = counts.get(key, 0) + delta
    if count:
        counts[key] = count
    else:
        del counts[key]


def _copy_bookkeeping(stored: StoredMessage, new: StoredMessage) -> None:
    """Everything of *new*'s delivery state but next_deliver_time (the due index's)."""
    stored.deliver_count = new.deliver_count
    stored.groups = copy_groups(new.groups)
    stored.only_groups = tuple(new.only_groups)


def _copy_record(record: StoredMessage) -> StoredMessage:
    # Built field by field: dataclasses.replace would share the groups dict and its
    # entries, and costs more than this on every save and read.
    return StoredMessage(
        message=record.message,
        publish_time=record.publish_time,
        deliver_count=record.deliver_count,
        groups=copy_groups(record.groups),
        next_deliver_time=record.next_deliver_time,
        only_groups=record.only_groups,
        kite_server=record.kite_server,
        wire=record.wire,
    )


def _copy(letter: DeadLetter) -> DeadLetter:
    return dataclasses.replace(letter, record=_copy_record(letter.record))
