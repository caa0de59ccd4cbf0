"""The in-process store, for development, tests and brokers that may lose messages on exit.

It is labelled non-durable and, unlike KiteQ's memory store, it never evicts: when
``maxcap`` records are held, ``save`` answers ``StoreFullError`` for the records that do
not fit, so the producer learns that its message was not kept. Records are copied on the
way in and out so callers mutating their objects cannot change what is stored, which
keeps its behaviour identical to the byte-storing backends.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Final

from kiteq.core.errors import StoreFullError, StoreUnavailableError
from kiteq.core.message import StoredMessage
from kiteq.store.base import DueCursor, Rescheduled, Saved, SaveOutcome

__all__ = ["MemoryStore"]

logger = logging.getLogger(__name__)

_CHUNK: Final = 512


def _due_key(ndt: float, message_id: str) -> DueCursor:
    # As in the RocksDB index: negative times and NaN sort as 0.0 (due at once), which
    # also keeps NaN from breaking the sort order.
    return (ndt if ndt > 0.0 else 0.0, message_id)


class _DueIndex:
    """``(next_deliver_time, message_id)`` keys, sorted.

    Kept in chunks of about ``_CHUNK`` keys, so an insert or a removal moves a few hundred
    pointers instead of the whole index.
    """

    def __init__(self) -> None:
        self._chunks: list[list[DueCursor]] = []
        self._maxes: list[DueCursor] = []

    def add(self, key: DueCursor) -> None:
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

    def discard(self, key: DueCursor) -> None:
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

    def after(self, cursor: DueCursor | None) -> Iterator[DueCursor]:
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
    def __init__(self, maxcap: int) -> None:
        if maxcap <= 0:
            raise ValueError(f"maxcap must be positive, got {maxcap}")
        self._maxcap = maxcap
        self._records: dict[str, StoredMessage] = {}
        self._due = _DueIndex()
        self._backlog: dict[str, int] = {}
        self._meta: dict[str, bytes] = {}
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
        self._due = _DueIndex()
        self._backlog.clear()
        self._meta.clear()

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
        for record in records:
            mid = record.message_id
            if mid in self._records:
                outcomes.append(Saved.DUPLICATE)
            elif len(self._records) >= self._maxcap:
                outcomes.append(StoreFullError(f"{self.description} holds {self._maxcap} messages"))
            else:
                stored = dataclasses.replace(record)
                self._records[mid] = stored
                self._backlog[stored.topic] = self._backlog.get(stored.topic, 0) + 1
                if stored.message.commit:
                    self._due.add(_due_key(stored.next_deliver_time, mid))
                outcomes.append(Saved.STORED)
        return outcomes

    async def get(self, message_id: str) -> StoredMessage | None:
        self._check_open()
        stored = self._records.get(message_id)
        return None if stored is None else dataclasses.replace(stored)

    async def reschedule(self, changes: Sequence[Rescheduled]) -> None:
        self._check_open()
        for change in changes:
            new = change.record
            stored = self._records.get(new.message_id)
            if stored is None:
                continue
            if stored.message.commit:
                self._due.discard(_due_key(stored.next_deliver_time, stored.message_id))
                self._due.add(_due_key(new.next_deliver_time, stored.message_id))
            stored.deliver_count = new.deliver_count
            stored.succ_groups = new.succ_groups
            stored.fail_groups = new.fail_groups
            stored.next_deliver_time = new.next_deliver_time

    async def delete(self, records: Sequence[StoredMessage]) -> None:
        self._check_open()
        for record in records:
            stored = self._records.pop(record.message_id, None)
            if stored is None:
                continue
            self._due.discard(_due_key(stored.next_deliver_time, stored.message_id))
            left = self._backlog[stored.topic] - 1
            if left:
                self._backlog[stored.topic] = left
            else:
                del self._backlog[stored.topic]

    async def commit(self, message_id: str) -> StoredMessage | None:
        self._check_open()
        stored = self._records.get(message_id)
        if stored is None:
            return None
        if not stored.message.commit:
            stored.message = dataclasses.replace(stored.message, commit=True)
            self._due.add(_due_key(stored.next_deliver_time, message_id))
        return dataclasses.replace(stored)

    async def page_due(
        self, now: float, limit: int, after: DueCursor | None = None
    ) -> list[StoredMessage]:
        self._check_open()
        page: list[StoredMessage] = []
        if limit <= 0:
            return page
        cursor = None if after is None else _due_key(*after)
        for ndt, mid in self._due.after(cursor):
            if ndt > now:
                break
            page.append(dataclasses.replace(self._records[mid]))
            if len(page) == limit:
                break
        return page

    async def backlog(self) -> dict[str, int]:
        self._check_open()
        return dict(self._backlog)

    async def put_meta(self, key: str, value: bytes | None) -> None:
        self._check_open()
        if value is None:
            self._meta.pop(key, None)
        else:
            self._meta[key] = bytes(value)

    async def get_meta(self, prefix: str) -> Mapping[str, bytes]:
        self._check_open()
        return {k: v for k, v in self._meta.items() if k.startswith(prefix)}
