"""Scheduled delivery (issue #15): the count of scheduled messages, kept in memory.

A scheduled message (``Message.deliver_at`` after now) is stored with its
``next_deliver_time`` at ``deliver_at``, so the store's due index brings it to the recover
scan when it is due and no periodic scan reads it before (``kiteq.handler.recover``);
the dispatcher refuses to start one early whatever path offers it.

The gauge of scheduled messages per topic is counted here, not read from the store on
each scrape: one bucket per (topic, second of the delivery time), dropped as its second
passes, so a scrape costs the buckets that became due, not the backlog. Messages the
intake stores (or a commit makes deliverable) are added; a cancel removes one. What the
store held before this process, or a takeover brought, is counted by a *census*: a full
recover scan reads every stored message and counts the scheduled ones published before
it started; when it gets through the whole index, its count replaces what was counted
before it began (intake counts during the census stay on top of it).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable

from kiteq.core.message import StoredMessage

__all__ = ["ScheduledTally"]

# (topic, the whole second at or after the delivery time)
_Bucket = tuple[str, int]


class _Layer:
    """Counts per bucket, their totals per topic, and the buckets in due order."""

    __slots__ = ("buckets", "due", "totals")

    def __init__(self) -> None:
        self.buckets: dict[_Bucket, int] = {}
        self.due: list[tuple[int, str]] = []
        self.totals: Counter[str] = Counter()

    def add(self, topic: str, deliver_at: float) -> None:
        key = (topic, math.ceil(deliver_at))
        n = self.buckets.get(key, 0)
        if not n:
            heapq.heappush(self.due, (key[1], topic))
        self.buckets[key] = n + 1
        self.totals[topic] += 1

    def remove(self, topic: str, deliver_at: float) -> bool:
        key = (topic, math.ceil(deliver_at))
        n = self.buckets.get(key, 0)
        if not n:
            return False
        if n == 1:
            del self.buckets[key]  # its heap entry is dropped when its second passes
        else:
            self.buckets[key] = n - 1
        self._drop(topic, 1)
        return True

    def expire(self, now: float) -> None:
        due, buckets = self.due, self.buckets
        while due and due[0][0] <= now:
            second, topic = heapq.heappop(due)
            n = buckets.pop((topic, second), 0)
            if n:
                self._drop(topic, n)

    def merge(self, other: _Layer) -> None:
        for (topic, second), n in other.buckets.items():
            key = (topic, second)
            if key not in self.buckets:
                heapq.heappush(self.due, (second, topic))
            self.buckets[key] = self.buckets.get(key, 0) + n
        self.totals.update(other.totals)

    def _drop(self, topic: str, n: int) -> None:
        left = self.totals[topic] - n
        if left > 0:
            self.totals[topic] = left
        else:
            del self.totals[topic]


class ScheduledTally:
    """Scheduled messages not yet due, per topic (module docstring)."""

    def __init__(self) -> None:
        # the oldest first; intake counts go to the newest
        self._layers: list[_Layer] = [_Layer()]
        self._census: _Layer | None = None
        self._census_start = 0.0
        # told each new delivery time (the recover loop: it wakes for it)
        self.on_stored: Callable[[float], None] | None = None

    def stored(self, record: StoredMessage, now: float) -> None:
        """*record* was stored (or committed) and waits for its delivery time."""
        message = record.message
        if message.deliver_at > now:
            self._layers[-1].add(message.topic, message.deliver_at)
            if self.on_stored is not None:
                self.on_stored(message.deliver_at)

    def next_due(self, now: float) -> float | None:
        """The first whole second after *now* at which a counted message becomes due.

        A cancelled message's second may still be named: a scan for nothing, no harm.
        """
        seconds = []
        for layer in self._layers:
            layer.expire(now)
            if layer.due:
                seconds.append(layer.due[0][0])
        return float(min(seconds)) if seconds else None

    def cancelled(self, record: StoredMessage) -> None:
        message = record.message
        for layer in reversed(self._layers):
            if layer.remove(message.topic, message.deliver_at):
                return

    def counts(self, now: float) -> dict[str, int]:
        """Scheduled messages per topic whose delivery time is still ahead of *now*."""
        total: Counter[str] = Counter()
        for layer in self._layers:
            layer.expire(now)
            total.update(layer.totals)
        return dict(total)

    # -- the census: what a full recover scan reads --------------------------------------

    def census_started(self, now: float) -> None:
        if self._census is not None:
            self.census_finished(complete=False)
        self._census = _Layer()
        self._census_start = now
        self._layers.append(_Layer())

    def census_saw(self, record: StoredMessage, now: float) -> None:
        """The full scan read *record* (committed) in its pass over the whole index."""
        census = self._census
        message = record.message
        if (
            census is not None
            and message.deliver_at > now
            and record.publish_time < self._census_start
        ):
            census.add(message.topic, message.deliver_at)

    def census_finished(self, complete: bool) -> None:
        """The full scan got through the whole index (*complete*), or stopped early."""
        census = self._census
        if census is None:
            return
        self._census = None
        if not complete:
            # counted nothing for sure: the next full scan takes a census from the start
            newest = self._layers.pop()
            self._layers[-1].merge(newest)
            return
        # the layer opened when the census began holds what intake counted meanwhile
        self._layers = [census, self._layers[-1]]
