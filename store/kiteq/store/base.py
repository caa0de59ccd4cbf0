"""The ``MessageStore`` protocol: the broker's durable state between accept and final ack.

Durability contract: when ``save`` returns ``Saved.STORED`` for a record, the record
survives what the backend promises (RocksDB ``fsync=batch``: an OS crash; MySQL: COMMIT).
The broker sends the store-ack only after that.

All methods are coroutines; backends on blocking drivers (rocksdict, PyMySQL) run them on
a backend-owned thread, so callers never block the event loop. Writes arriving while a
previous write is in progress are grouped into one durable write (group commit).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from kiteq.core.errors import StoreError
from kiteq.core.message import StoredMessage

__all__ = [
    "DeadLetter",
    "DlqFilter",
    "DlqKey",
    "DueCursor",
    "HistoryEvent",
    "MessageStore",
    "PendingCounts",
    "PendingKey",
    "Rescheduled",
    "SaveOutcome",
    "Saved",
    "TakenOver",
    "count_pending",
]


class Saved(enum.Enum):
    STORED = "stored"
    # The id was already stored: nothing was written; the publish is acknowledged anyway
    # (idempotent retries) but must not be dispatched twice.
    DUPLICATE = "duplicate"


SaveOutcome = Saved | StoreError


@dataclasses.dataclass(frozen=True, slots=True)
class Rescheduled:
    """New delivery bookkeeping for ``record``.

    ``previous_due`` is the next_deliver_time the caller last saw; backends that keep their
    own copy of the state may ignore it.
    """

    record: StoredMessage
    previous_due: float


# Position in the due order: (next_deliver_time, message_id) of the last row returned.
DueCursor = tuple[float, str]


# (topic, group, publish second): the key of the counts of stored messages a group has a
# recorded pending state for (``MessageStore.pending_counts``)
PendingKey = tuple[str, str, int]
PendingCounts = dict[PendingKey, int]


def count_pending(
    counts: PendingCounts, topic: str, publish_time: float, groups: Iterable[str]
) -> None:
    """Add a stored message's pending groups (``StoredMessage.pending_groups``) to *counts*."""
    second = int(publish_time)
    for group in groups:
        key = (topic, group, second)
        counts[key] = counts.get(key, 0) + 1


@dataclasses.dataclass(frozen=True, slots=True)
class TakenOver:
    """What a backlog takeover moved: rows, and the pending groups of its messages."""

    messages: int = 0
    dead_letters: int = 0
    pending: PendingCounts = dataclasses.field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.messages + self.dead_letters


# A dead letter is one (message_id, group): each group dead-letters a message on its own.
DlqKey = tuple[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message moved out of delivery for one group, with why and when.

    ``reason`` is one of ``expired``, ``deliver_limit``, ``no_binding`` (kept longer than
    noBindingRetentionSeconds without any binding) or another short word the broker
    documents. ``group`` is the group it was dead-lettered for; ``""`` only when no
    group was bound (``no_binding``, or ``expired`` before any binding appeared).
    ``record`` is the message with its per-group state at the move.

    ``keep``: other groups still have the message to deliver, so ``dead_letter`` writes
    ``record``'s bookkeeping to the stored message (its ``groups`` with this group
    ``DEAD``) instead of removing it. Letters of one message in one call agree on it.
    It is an instruction to that call, not stored: letters read back have it False.
    """

    record: StoredMessage
    reason: str
    dead_time: float
    group: str = ""
    keep: bool = False

    @property
    def key(self) -> DlqKey:
        return (self.record.message_id, self.group)


@dataclasses.dataclass(frozen=True, slots=True)
class DlqFilter:
    """Selects dead letters; empty fields match everything."""

    topic: str = ""
    message_type: str = ""
    group: str = ""
    reason: str = ""

    def matches(self, letter: DeadLetter) -> bool:
        message = letter.record.message
        return (
            (not self.topic or message.topic == self.topic)
            and (not self.message_type or message.message_type == self.message_type)
            and (not self.group or letter.group == self.group)
            and (not self.reason or letter.reason == self.reason)
        )


@dataclasses.dataclass(frozen=True, slots=True)
class HistoryEvent:
    """One thing that happened to a message.

    ``kind``: ``published``, ``delivered`` (a push: group, connection, attempt),
    ``acked`` / ``nacked`` / ``timeout`` / ``disconnected`` (its result), ``skipped`` (a
    non-persistent group was offline), ``rescheduled``, ``dead_lettered`` (detail: the
    reason), ``unblocked`` (a dead-lettered head of an ordering key let the next one go),
    ``redriven``, ``committed``, ``rolled_back``, ``deleted``.
    """

    message_id: str
    time: float
    kind: str
    group: str = ""
    connection: str = ""
    attempt: int = 0
    detail: str = ""


class MessageStore(Protocol):
    @property
    def durable(self) -> bool:
        """False for stores that lose everything on a process exit (memory)."""
        ...

    @property
    def description(self) -> str:
        """The store URL without credentials, for logs and stats."""
        ...

    async def open(self) -> None:
        """Create or open the backing storage."""
        ...

    async def close(self) -> None:
        """Flush pending writes and release resources; idempotent."""
        ...

    async def save(self, records: Sequence[StoredMessage]) -> list[SaveOutcome]:
        """Persist *records* durably, one outcome per record in order.

        A record whose id is already stored (or repeated earlier in *records*), or
        remembered after its delete until a time later than the record's ``publish_time``
        (``delete``'s *remember_until*), yields ``Saved.DUPLICATE`` and is not written. A failure yields a ``StoreError``
        (``StoreFullError`` when at capacity, ``StoreUnavailableError`` on I/O failure).
        """
        ...

    async def get(self, message_id: str) -> StoredMessage | None:
        """The stored record with its body, or None."""
        ...

    async def reschedule(self, changes: Sequence[Rescheduled]) -> None:
        """Record delivery results.

        Writes deliver_count, the per-group ``groups`` state, ``only_groups`` and the
        message-level next_deliver_time (the due index).
        """
        ...

    async def delete(self, records: Sequence[StoredMessage], remember_until: float = 0.0) -> None:
        """Remove records (every group has settled them). Missing ids are ignored.

        With *remember_until* > 0 each id of *records* is remembered until then (the
        idempotency window, ``dedupWindowSeconds``), in the same durable write as the
        delete, so the id is never gone without being remembered: a ``save`` of it with a
        ``publish_time`` before *remember_until* answers ``Saved.DUPLICATE``. Remembering
        an id again moves its time. Entries stay until ``prune_remembered`` removes them.
        """
        ...

    async def prune_remembered(self, before: float) -> int:
        """Forget remembered ids whose time is before *before*; returns how many.

        Walks the expiry order, never the whole window (entries = delete rate x window).
        """
        ...

    async def remembered_estimate(self) -> int:
        """About how many ids are remembered, for a gauge; never a scan of the window.

        Exact for memory; RocksDB's and InnoDB's own estimates otherwise.
        """
        ...

    async def release_memory(self) -> None:
        """Give back memory a busy spell left in the backend's write buffers.

        Called when the broker goes quiet, before it trims its heap; it must not hold up
        the writes that follow. Nothing for backends whose memory is their data.
        """
        ...

    async def commit(self, message_id: str) -> StoredMessage | None:
        """Mark an uncommitted message committed and due at its next_deliver_time.

        Returns the record when this call committed it; None when the id is absent or was
        committed already (so a repeated COMMIT never delivers twice).
        """
        ...

    async def rollback(self, message_id: str) -> StoredMessage | None:
        """Remove an uncommitted message and return it.

        None when the id is absent or already committed: a ROLLBACK after a COMMIT changes
        nothing.
        """
        ...

    async def page_uncommitted(self, limit: int, after: str | None = None) -> list[StoredMessage]:
        """Uncommitted records, at most *limit*, ordered by id, ids strictly after *after*.

        Their ``deliver_count`` counts transaction checks and ``next_deliver_time`` is the
        next check; ``reschedule`` updates both.
        """
        ...

    async def page_due(
        self, now: float, limit: int, after: DueCursor | None = None
    ) -> list[StoredMessage]:
        """Committed records with ``next_deliver_time <= now``, at most *limit*.

        Ordered by (next_deliver_time, message_id), strictly after *after*.
        """
        ...

    async def backlog(self) -> dict[str, int]:
        """Stored (not yet fully delivered) messages per topic."""
        ...

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        """Add each letter to the dead-letter queue under its (message_id, group).

        Atomic per message: its DLQ entries are added and, in the same write, the stored
        message is updated to the letter's record (``keep``) or removed (no group has it
        left to deliver). A message is never lost between the two. An entry already there
        for the same key is replaced (also by a later letter of the same key in the same
        call). Ids not stored are ignored.
        """
        ...

    async def list_dlq(
        self, where: DlqFilter, limit: int, after: DlqKey | None = None
    ) -> list[DeadLetter]:
        """Dead letters matching *where*, at most *limit*.

        Ordered by (message_id, group), keys strictly greater than *after*.
        """
        ...

    async def get_dead_letters(self, message_id: str) -> list[DeadLetter]:
        """The dead letters of one message (one per group), ordered by group."""
        ...

    async def redrive(self, keys: Sequence[DlqKey], now: float) -> list[StoredMessage]:
        """Move dead letters back to delivery, for their group only, due at *now*.

        For each key the DLQ entry is removed and the group is pending again with 0
        attempts, due at *now*. When the message is still stored (other groups had not
        finished it) only that group's state changes (and the message's
        ``next_deliver_time`` becomes at most *now*; a non-empty ``only_groups`` gains
        the group). Otherwise the message is stored
        again with ``only_groups`` naming the redriven groups, so no other group gets it
        a second time; a redriven ``no_binding`` letter (group ``""``: no group ever had
        the message) is stored again for every group. An expiry already past becomes
        now + 7 days (redriving an expired message is an operator's decision to deliver
        it). Returns the committed records now due again, one per message (an
        uncommitted one goes back to its transaction checks); unknown keys are ignored.
        """
        ...

    async def dlq_size(self) -> dict[tuple[str, str], int]:
        """Dead letters per (topic, group)."""
        ...

    async def pending_counts(self) -> PendingCounts:
        """Stored messages per (topic, group, publish second) with that group pending.

        Counts the groups ``StoredMessage.pending_groups`` names: a group parked while it
        is offline, in a backoff window, or redriven. Reads every stored message that has
        delivery state, so the broker calls it once, at start, before any traffic, and
        then keeps the counts itself from the writes it makes.
        """
        ...

    async def take_over(self, owner: str) -> TakenOver:
        """Make this store's owner the owner of every record and dead letter of *owner*.

        Backlog takeover (a broker sharing this store died): afterwards ``page_due``,
        ``page_uncommitted``, ``backlog``, ``list_dlq`` and ``dlq_size`` include them.
        Batched, one transaction per batch; safe to interrupt and to call again (a
        repeated call moves what is left, usually nothing). Returns what moved, with the
        moved messages' pending groups as ``pending_counts`` counts them. Stores that
        cannot be shared between brokers (memory, RocksDB) move nothing.
        """
        ...

    async def append_history(self, events: Sequence[HistoryEvent]) -> None:
        """Durably record *events* (grouped with other writes; no fsync of their own)."""
        ...

    async def get_history(self, message_id: str) -> list[HistoryEvent]:
        """The recorded events of one message, oldest first."""
        ...

    async def prune_history(self, before: float) -> int:
        """Forget events older than *before*; returns how many were removed."""
        ...

    async def put_meta(self, key: str, value: bytes | None) -> None:
        """Durably set (or with None, delete) a small broker metadata value."""
        ...

    async def get_meta(self, prefix: str) -> Mapping[str, bytes]:
        """All metadata values whose key starts with *prefix*."""
        ...
