"""MySQL store internals: queued writes and how a flush turns them into statements."""

from __future__ import annotations

import asyncio
import collections
import enum
from collections.abc import Iterable, Sequence
from typing import Final

from kiteq.core.errors import StoreUnavailableError
from kiteq.core.message import StoredMessage
from kiteq.store._mysql_rows import (
    _ROW_OVERHEAD,
    _Bookkeeping,
    _Row,
)
from kiteq.store.base import (
    Saved,
    SaveOutcome,
)

# -- queued writes ---------------------------------------------------------------------


class _Kind(enum.IntEnum):
    """The order in which a transaction applies its writes (see ``_segments``)."""

    SAVE = 0
    REDRIVE = 1
    COMMIT = 2
    ROLLBACK = 3
    RESCHEDULE = 4
    DEAD_LETTER = 5
    DELETE = 6
    HISTORY = 7
    META = 8


# Bookkeeping: may wait for flushSeconds; counted against batchUpdateSize (updates) or
# batchDelSize (deletes).
_UPDATES: Final = frozenset({_Kind.RESCHEDULE, _Kind.HISTORY})
_DELETES: Final = frozenset({_Kind.DELETE, _Kind.DEAD_LETTER})


class _Call:
    """One caller's request; its parts (one per database) settle it."""

    __slots__ = ("error", "future", "left")

    def __init__(self) -> None:
        self.future: asyncio.Future[None] | None = None
        self.left = 0
        self.error: StoreUnavailableError | None = None

    def part_done(self) -> None:
        self.left -= 1
        if self.left or self.future is None or self.future.done():
            return
        if self.error is None:
            self.future.set_result(None)
        else:
            self.future.set_exception(self.error)


class _SaveCall(_Call):
    __slots__ = ("outcomes",)

    def __init__(self, n: int) -> None:
        super().__init__()
        unset = StoreUnavailableError("not written")
        self.outcomes: list[SaveOutcome] = [unset] * n


class _RecordCall(_Call):
    """A call answering records by position (commit: one; redrive: one per id)."""

    __slots__ = ("records",)

    def __init__(self, n: int) -> None:
        super().__init__()
        self.records: list[StoredMessage | None] = [None] * n


class _Part:
    """A call's writes to one database.

    A part's results are kept on it while its transaction runs (``reset`` at the start
    of every attempt) and handed to its call by ``succeed`` once COMMIT returned.
    """

    __slots__ = ("call", "queued", "rows", "shard", "size")
    kind: _Kind

    def __init__(self, call: _Call, shard: int) -> None:
        self.call = call
        self.shard = shard
        self.size = _ROW_OVERHEAD
        self.rows = 1
        self.queued = 0.0

    def ids(self) -> Iterable[str]:
        """Ids whose stored rows this part reads or changes (``_segments``)."""
        return ()

    def reset(self) -> None:
        pass

    def succeed(self) -> None:
        self.call.part_done()

    def fail(self, error: StoreUnavailableError) -> None:
        if self.call.error is None:
            self.call.error = error
        self.call.part_done()


class _SaveItem:
    __slots__ = ("message_id", "owned", "position", "row", "table", "topic")

    def __init__(
        self, position: int, table: int, message_id: str, row: _Row, topic: str, owned: bool
    ) -> None:
        self.position = position
        self.table = table
        self.message_id = message_id
        self.row = row
        self.topic = topic
        self.owned = owned


class _SavePart(_Part):
    __slots__ = ("items", "outcomes", "save")
    kind = _Kind.SAVE

    def __init__(self, call: _SaveCall, shard: int) -> None:
        super().__init__(call, shard)
        self.save = call
        self.items: list[_SaveItem] = []
        self.outcomes: list[Saved] = []

    def ids(self) -> Iterable[str]:
        return (item.message_id for item in self.items)

    def reset(self) -> None:
        self.outcomes = [Saved.DUPLICATE] * len(self.items)

    def succeed(self) -> None:
        outcomes = self.save.outcomes
        for item, outcome in zip(self.items, self.outcomes, strict=True):
            outcomes[item.position] = outcome
        self.call.part_done()

    def fail(self, error: StoreUnavailableError) -> None:
        # A save answers per record; the call itself does not raise.
        for item in self.items:
            self.save.outcomes[item.position] = error
        self.call.part_done()


class _RecordPart(_Part):
    """Parts that name ids and answer records: (position, table number, message id)."""

    __slots__ = ("found", "items", "records")

    def __init__(self, call: _RecordCall, shard: int) -> None:
        super().__init__(call, shard)
        self.records = call
        self.items: list[tuple[int, int, str]] = []
        self.found: dict[int, StoredMessage] = {}  # position -> record

    def ids(self) -> Iterable[str]:
        return (item[2] for item in self.items)

    def reset(self) -> None:
        self.found = {}

    def succeed(self) -> None:
        for position, record in self.found.items():
            self.records.records[position] = record
        self.call.part_done()


class _CommitPart(_RecordPart):
    __slots__ = ()
    kind = _Kind.COMMIT


class _RollbackPart(_RecordPart):
    __slots__ = ()
    kind = _Kind.ROLLBACK


class _RedrivePart(_RecordPart):
    """Redrives of (message_id, group) keys.

    ``items[i]`` names the id and ``groups[i]`` the group; ``found`` holds a record at
    the position of its message's first key.
    """

    __slots__ = ("groups", "now")
    kind = _Kind.REDRIVE

    def __init__(self, call: _RecordCall, shard: int, now: float) -> None:
        super().__init__(call, shard)
        self.now = now
        self.groups: list[str] = []


# (table, message_id, then the _Bookkeeping columns)
_Change = tuple[int, str, int, str, str, str, str | None, float]


class _ReschedulePart(_Part):
    __slots__ = ("items",)
    kind = _Kind.RESCHEDULE

    def __init__(self, call: _Call, shard: int) -> None:
        super().__init__(call, shard)
        self.items: list[_Change] = []

    def ids(self) -> Iterable[str]:
        return (item[1] for item in self.items)


class _DeletePart(_Part):
    __slots__ = ("items",)
    kind = _Kind.DELETE

    def __init__(self, call: _Call, shard: int) -> None:
        super().__init__(call, shard)
        # (table, message_id, topic, owned by this store)
        self.items: list[tuple[int, str, str, bool]] = []

    def ids(self) -> Iterable[str]:
        return (item[1] for item in self.items)


# (table, message_id, the record's bookkeeping, reason, dead_time, group, keep)
_Letter = tuple[int, str, _Bookkeeping, str, float, str, bool]


class _DeadLetterPart(_Part):
    __slots__ = ("items",)
    kind = _Kind.DEAD_LETTER

    def __init__(self, call: _Call, shard: int) -> None:
        super().__init__(call, shard)
        self.items: list[_Letter] = []

    def ids(self) -> Iterable[str]:
        return (item[1] for item in self.items)


class _HistoryPart(_Part):
    __slots__ = ("items",)
    kind = _Kind.HISTORY

    def __init__(self, call: _Call, shard: int) -> None:
        super().__init__(call, shard)
        self.items: list[_Row] = []  # HISTORY_COLUMNS values


class _MetaPart(_Part):
    __slots__ = ("key", "value")
    kind = _Kind.META

    def __init__(self, call: _Call, key: bytes, value: bytes | None) -> None:
        super().__init__(call, 0)
        self.key = key
        self.value = value


def _segments(parts: Sequence[_Part]) -> list[list[int]]:
    """Split a transaction's parts (in call order) into runs that may be regrouped.

    Inside a run, writes are applied by kind in ``_Kind`` order. A part starts a new run
    when one of its ids was touched earlier in the run by a write of a later kind (a
    delete then a save of the same id), so every id sees its writes in call order.
    """
    segments: list[list[int]] = []
    current: list[int] = []
    touched: dict[str, int] = {}
    for index, part in enumerate(parts):
        kind = part.kind
        ids = list(part.ids())
        if current and any(touched.get(mid, -1) > kind for mid in ids):
            segments.append(current)
            current = []
            touched = {}
        current.append(index)
        for mid in ids:
            if touched.get(mid, -1) < kind:
                touched[mid] = kind
    if current:
        segments.append(current)
    return segments


class _Shard:
    """One database's write queue; at most one transaction of it runs at a time."""

    __slots__ = ("busy", "deletes", "index", "pending", "timer", "updates", "urgent")

    def __init__(self, index: int) -> None:
        self.index = index
        self.pending: collections.deque[_Part] = collections.deque()
        self.busy = False
        self.timer: asyncio.TimerHandle | None = None
        self.urgent = 0  # queued parts that never wait
        self.updates = 0  # queued rows counted against batchUpdateSize
        self.deletes = 0  # queued rows counted against batchDelSize

    def count(self, part: _Part, sign: int) -> None:
        if part.kind in _UPDATES:
            self.updates += sign * part.rows
        elif part.kind in _DELETES:
            self.deletes += sign * part.rows
        else:
            self.urgent += sign

    def oldest_deferred(self) -> float | None:
        for part in self.pending:
            if part.kind in _UPDATES or part.kind in _DELETES:
                return part.queued
        return None


class _Transaction:
    """What one transaction changed in the counts, and whether COMMIT was sent."""

    __slots__ = ("backlog", "committing", "dlq")

    def __init__(self) -> None:
        self.backlog: collections.Counter[str] = collections.Counter()
        # per (topic, group)
        self.dlq: collections.Counter[tuple[str, str]] = collections.Counter()
        self.committing = False


class _DuplicateKeyError(Exception):
    """A fast-path INSERT hit a stored id: replay the transaction carefully."""
