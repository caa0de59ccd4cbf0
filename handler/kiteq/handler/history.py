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
# messages whose history is written to the store, remembered at most
_KEPT_CAPACITY: Final = 1_000_000


# A message's events are one flat tuple, (time, kind, group, connection, attempt, detail)
# after each other: a tuple of tuples in a list cost 424 bytes for the usual three events,
# this 256 (the strings are shared), and it is cheaper to build. HistoryEvent objects are
# made only when events are written or read.
_FIELDS: Final = 6
_Events = tuple[float | str | int, ...]


def _events_of(message_id: str, events: _Events, start: int) -> list[HistoryEvent]:
    """*message_id*'s events from the *start*-th on."""
    return [
        HistoryEvent(message_id, *events[i : i + _FIELDS])  # type: ignore[arg-type]
        for i in range(start * _FIELDS, len(events), _FIELDS)
    ]


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
        self._events: OrderedDict[str, _Events] = OrderedDict()
        # kept messages -> how many of their in-memory events are written already; it
        # outlives the events' eviction so a kept message's later events are still written
        self._kept: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._events)

    def record(
        self,
        message_id: str,
        time: float,
        kind: str,
        group: str = "",
        connection: str = "",
        attempt: int = 0,
        detail: str = "",
    ) -> None:
        event = (time, kind, group, connection, attempt, detail)
        events = self._events.get(message_id)
        if events is None:
            self._events[message_id] = event
            if len(self._events) > self._capacity:
                oldest, _ = self._events.popitem(last=False)
                if oldest in self._kept:
                    self._kept[oldest] = 0
        else:
            if len(events) >= _MAX_EVENTS_PER_MESSAGE * _FIELDS:
                # keep the first events (publish, first attempts) and the latest ones
                drop = _MAX_EVENTS_PER_MESSAGE // 2
                events = events[: drop * _FIELDS] + events[(drop + 1) * _FIELDS :]
                written = self._kept.get(message_id)
                if written is not None and written > drop:
                    self._kept[message_id] = written - 1
            # a value replaced in place keeps the message's place in the eviction order
            self._events[message_id] = events + event
        if message_id in self._kept:
            self.flush(message_id)

    def keep(self, message_id: str) -> None:
        """From now on, write *message_id*'s history to the store (it left the happy path)."""
        if message_id not in self._kept:
            self._kept[message_id] = 0
            if len(self._kept) > _KEPT_CAPACITY:
                self._kept.popitem(last=False)
        self.flush(message_id)

    def flush(self, message_id: str) -> None:
        events = self._events.get(message_id)
        written = self._kept.get(message_id, 0)
        if events is None or written * _FIELDS >= len(events):
            return
        self._persist(_events_of(message_id, events, written))
        self._kept[message_id] = len(events) // _FIELDS

    def unflushed(self, message_id: str) -> list[HistoryEvent]:
        """Events of *message_id* known only to memory (the store has the others)."""
        events = self._events.get(message_id)
        if events is None:
            return []
        return _events_of(message_id, events, self._kept.get(message_id, 0))
