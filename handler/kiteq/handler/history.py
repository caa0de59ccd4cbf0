"""Per-message history: what happened to a message, by id.

Recording has to be cheap because every message has a history: events go into a bounded
in-memory table (insertion order, oldest messages forgotten first). A message that
leaves the happy path — rescheduled after failures, dead-lettered, skipped for an offline
group, redriven — has its history written to the store, and from then on every new event
of it too, so what matters survives a restart. A message delivered and acked at once
keeps its history only in memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from kiteq.store.base import HistoryEvent

__all__ = ["History"]

DEFAULT_CAPACITY: Final = 100_000
_MAX_EVENTS_PER_MESSAGE: Final = 64


# (time, kind, group, connection, attempt, detail): tuples are far cheaper to make than
# HistoryEvent objects, which are built only when events are written or read
_Event = tuple[float, str, str, str, int, str]


class _Entry:
    __slots__ = ("events", "flushed", "persisted")

    def __init__(self) -> None:
        self.events: list[_Event] = []
        self.flushed = 0
        self.persisted = False


class History:
    def __init__(
        self,
        persist: Callable[[list[HistoryEvent]], None],
        *,
        capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        self._persist = persist
        self._capacity = capacity
        # OrderedDict, not dict: evicting a plain dict's first key is O(n) once many keys
        # were deleted from its front (iteration skips the dead slots), which made
        # recording a quarter of the broker's time
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def record(
        self,
        message_id: str,
        time: float,
        kind: str,
        *,
        group: str = "",
        connection: str = "",
        attempt: int = 0,
        detail: str = "",
    ) -> None:
        entry = self._entries.get(message_id)
        if entry is None:
            entry = self._entries[message_id] = _Entry()
            if len(self._entries) > self._capacity:
                self._entries.popitem(last=False)  # the oldest message
        event = (time, kind, group, connection, attempt, detail)
        if len(entry.events) >= _MAX_EVENTS_PER_MESSAGE:
            # keep the first events (publish, first attempts) and the latest ones
            del entry.events[_MAX_EVENTS_PER_MESSAGE // 2]
            entry.flushed = min(entry.flushed, len(entry.events))
        entry.events.append(event)
        if entry.persisted:
            self.flush(message_id)

    def keep(self, message_id: str) -> None:
        """From now on, write *message_id*'s history to the store (it left the happy path)."""
        entry = self._entries.get(message_id)
        if entry is None:
            entry = self._entries[message_id] = _Entry()
        entry.persisted = True
        self.flush(message_id)

    def flush(self, message_id: str) -> None:
        entry = self._entries.get(message_id)
        if entry is None or entry.flushed >= len(entry.events):
            return
        self._persist([HistoryEvent(message_id, *e) for e in entry.events[entry.flushed :]])
        entry.flushed = len(entry.events)

    def unflushed(self, message_id: str) -> list[HistoryEvent]:
        """Events of *message_id* known only to memory (the store has the others)."""
        entry = self._entries.get(message_id)
        if entry is None:
            return []
        return [HistoryEvent(message_id, *e) for e in entry.events[entry.flushed :]]
