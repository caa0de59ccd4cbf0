"""Stored messages each group still has to settle, counted from the broker's own writes.

A message waiting in the store for one group — parked while that group is offline, in
the group's backoff window, or redriven to it — has a pending state for that group in
its stored record (``StoredMessage.pending_groups``). The store counts those once, when
the broker starts (``MessageStore.pending_counts``); from then on the broker is the only
writer of its records' delivery state, so every write that changes a record's pending
groups changes these counts by the difference. A flight knows what the store holds for
its record (``Flight.stored``), so the difference costs nothing on the common path: a
new message delivered and acked by every group has no pending state stored before or
after.

Counts are kept per (topic, group) and, for the oldest message's age, per publish-time
bucket of ``BUCKET_SECONDS``: the age is known to that resolution without keeping a
time per message. Messages no group has tried yet (new, or not yet read back after a
start) are in the topic's backlog, not here; those in memory are the dispatcher's
(``Dispatcher.group_gauges``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from kiteq.store.base import PendingCounts

__all__ = ["BUCKET_SECONDS", "StoredBacklog"]

BUCKET_SECONDS: Final = 10

_Key = tuple[str, str]


class StoredBacklog:
    def __init__(self) -> None:
        self._counts: dict[_Key, int] = {}
        # (topic, group) -> publish-time bucket -> messages
        self._buckets: dict[_Key, dict[int, int]] = {}

    def load(self, counts: PendingCounts) -> None:
        """Add counts read from the store (at start, or moved by a takeover)."""
        for (topic, group, second), n in counts.items():
            self._add((topic, group), second // BUCKET_SECONDS, n)

    def changed(
        self, topic: str, publish_time: float, before: frozenset[str], after: frozenset[str]
    ) -> None:
        """A write changed a stored record's pending groups from *before* to *after*."""
        if before == after:
            return
        bucket = int(publish_time) // BUCKET_SECONDS
        for group in after - before:
            self._add((topic, group), bucket, 1)
        for group in before - after:
            self._add((topic, group), bucket, -1)

    def counts(self) -> Mapping[_Key, int]:
        return self._counts

    def oldest_ages(self, now: float) -> dict[_Key, float]:
        """Per (topic, group), seconds since the start of its oldest message's bucket."""
        return {key: max(0.0, now - min(b) * BUCKET_SECONDS) for key, b in self._buckets.items()}

    def _add(self, key: _Key, bucket: int, n: int) -> None:
        buckets = self._buckets.setdefault(key, {})
        had = buckets.get(bucket, 0)
        # a removal of more than the bucket holds (a write counted without its read)
        # removes what is there: a count never goes below zero
        now = max(0, had + n)
        if now:
            buckets[bucket] = now
        else:
            buckets.pop(bucket, None)
        if buckets:
            self._counts[key] = self._counts.get(key, 0) + now - had
        else:
            self._counts.pop(key, None)
            del self._buckets[key]
