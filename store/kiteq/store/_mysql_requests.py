"""The MySQL store's write requests: one call's writes to one database, and how they apply.

Each write call of ``MySQLStore`` becomes a ``Call`` and one ``Part`` per database it
touches; the database's group-commit writer (``_mysql_writer``) runs every part queued
meanwhile in one transaction. Inside it, parts of one kind are applied together, by the
class's ``apply``, in ``Kind`` order (``_mysql_writer.segments`` keeps an id's writes in
call order): few statements per table, whatever the number of calls. The parts of
dead letters and redrives are in ``_mysql_dlq_requests``. ``apply`` runs on a worker
thread; everything else on the event loop.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Final, Generic, Self, TypeVar

from sqlalchemy.exc import DBAPIError

from kiteq.core.errors import StoreUnavailableError
from kiteq.core.message import StoredMessage
from kiteq.store._mysql_engine import DUPLICATE_KEY, errno
from kiteq.store._mysql_rows import (
    _COLUMNS,
    _COMMIT,
    _HISTORY_COLUMNS,
    _KITE_SERVER,
    _READ_CHUNK,
    _ROW_OVERHEAD,
    _TOPIC,
    _chunks,
    _commit_sql,
    _delete_meta_sql,
    _record,
    _Row,
)
from kiteq.store._mysql_schema import HISTORY_COLUMNS, MESSAGE_COLUMNS
from kiteq.store._mysql_tx import ShardTx
from kiteq.store._state import settle
from kiteq.store.base import Saved, SaveOutcome

__all__ = [
    "BookkeepingPart",
    "Call",
    "Change",
    "CommitPart",
    "DeletePart",
    "DuplicateKeyError",
    "HistoryPart",
    "Kind",
    "MetaPart",
    "Part",
    "RecordCall",
    "RecordPart",
    "ReschedulePart",
    "RollbackPart",
    "SaveCall",
    "SaveItem",
    "SavePart",
]


class Kind(enum.IntEnum):
    """The order in which a transaction applies its writes (see ``segments``)."""

    SAVE = 0
    REDRIVE = 1
    COMMIT = 2
    ROLLBACK = 3
    RESCHEDULE = 4
    DEAD_LETTER = 5
    DELETE = 6
    HISTORY = 7
    META = 8


class DuplicateKeyError(Exception):
    """A fast-path INSERT hit a stored id: replay the transaction carefully."""


_ItemT = TypeVar("_ItemT", bound=tuple[Any, ...])

# where a message row (``_row``) has its publish time
_PUBLISH_TIME_AT: Final = MESSAGE_COLUMNS.index("publish_time")


# -- calls -----------------------------------------------------------------------------


class Call:
    """One caller's request; its parts (one per database) settle it."""

    __slots__ = ("error", "future", "left")

    def __init__(self) -> None:
        self.future: asyncio.Future[None] | None = None
        self.left = 0
        self.error: StoreUnavailableError | None = None

    def part_done(self) -> None:
        self.left -= 1
        if not self.left:
            settle(self.future, self.error)


class SaveCall(Call):
    __slots__ = ("outcomes",)

    def __init__(self, n: int) -> None:
        super().__init__()
        unset = StoreUnavailableError("not written")
        self.outcomes: list[SaveOutcome] = [unset] * n


class RecordCall(Call):
    """A call answering records by position (commit: one; redrive: one per id)."""

    __slots__ = ("records",)

    def __init__(self, n: int) -> None:
        super().__init__()
        self.records: list[StoredMessage | None] = [None] * n


# -- parts -----------------------------------------------------------------------------


class Part:
    """A call's writes to one database.

    A part's results are kept on it while its transaction runs (``reset`` at the start
    of every attempt) and handed to its call by ``succeed`` once COMMIT returned.
    """

    __slots__ = ("call", "queued", "rows", "shard", "size")
    kind: ClassVar[Kind]
    # Bookkeeping that may wait for flushSeconds, counted against batchUpdateSize or
    # batchDelSize; every other part starts a transaction at once.
    deferred: ClassVar[bool] = False

    def __init__(self, call: Call, shard: int) -> None:
        self.call = call
        self.shard = shard
        self.size = _ROW_OVERHEAD
        self.rows = 1
        self.queued = 0.0

    def ids(self) -> Iterable[str]:
        """Ids whose stored rows this part reads or changes (``segments``)."""
        return ()

    @classmethod
    def apply(cls, tx: ShardTx, parts: Sequence[Self]) -> None:
        """Write *parts* (all of this class, in call order) in the transaction *tx*."""
        raise NotImplementedError

    def reset(self) -> None:
        pass

    def succeed(self) -> None:
        self.call.part_done()

    def fail(self, error: StoreUnavailableError) -> None:
        if self.call.error is None:
            self.call.error = error
        self.call.part_done()


class SaveItem:
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


class SavePart(Part):
    __slots__ = ("items", "outcomes", "save")
    kind = Kind.SAVE

    def __init__(self, call: SaveCall, shard: int) -> None:
        super().__init__(call, shard)
        self.save = call
        self.items: list[SaveItem] = []
        self.outcomes: list[Saved] = []

    def ids(self) -> Iterable[str]:
        return (item.message_id for item in self.items)

    @classmethod
    def apply(cls, tx: ShardTx, parts: Sequence[Self]) -> None:
        """One INSERT per table; a duplicate id replays the transaction ``careful``ly."""
        by_table: dict[int, list[tuple[SavePart, int, SaveItem]]] = {}
        seen: set[str] = set()
        for part in parts:
            for k, item in enumerate(part.items):
                if item.message_id in seen:
                    continue  # repeated in this transaction: the first one wins
                seen.add(item.message_id)
                by_table.setdefault(item.table, []).append((part, k, item))
        # the idempotency window: one read for the whole transaction
        remembered = tx.remembered(list(seen)) if seen else {}
        for table, entries in by_table.items():
            name = tx.tables[table]
            stored: set[str] = set()
            if tx.careful:
                stored = tx.locked_ids(name, [item.message_id for _, _, item in entries])
            rows: list[_Row] = []
            for saving, k, item in entries:
                if item.message_id in stored or (
                    remembered.get(item.message_id, 0.0) > item.row[_PUBLISH_TIME_AT]
                ):
                    continue
                rows.append(item.row)
                saving.outcomes[k] = Saved.STORED
                if item.owned:
                    tx.backlog[item.topic] += 1
            if not rows:
                continue
            try:
                tx.insert_messages(name, rows)
            except DBAPIError as exc:
                if not tx.careful and errno(exc) == DUPLICATE_KEY:
                    raise DuplicateKeyError from exc
                raise

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


class RecordPart(Part):
    """Parts that name ids and answer records: (position, table number, message id)."""

    __slots__ = ("found", "items", "records")

    def __init__(self, call: RecordCall, shard: int) -> None:
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


class _DecisionPart(RecordPart):
    """COMMIT or ROLLBACK of uncommitted messages.

    Only the first call of the run that names an id gets its record: a repeated
    decision finds it decided and gets None.
    """

    __slots__ = ()
    commits: ClassVar[bool]

    @classmethod
    def apply(cls, tx: ShardTx, parts: Sequence[Self]) -> None:
        first: dict[str, tuple[int, RecordPart, int]] = {}
        for part in parts:
            for position, table, message_id in part.items:
                first.setdefault(message_id, (table, part, position))
        by_table: dict[int, list[str]] = {}
        for message_id, (table, _, _) in first.items():
            by_table.setdefault(table, []).append(message_id)
        for table, ids in by_table.items():
            name = tx.tables[table]
            stored = tx.locked_rows(name, _COLUMNS, ids)
            undecided = [mid for mid, row in stored.items() if not row[_COMMIT]]
            if not undecided:
                continue
            if cls.commits:
                for chunk in _chunks(undecided, tx.batch_update_size):
                    tx.conn.exec_driver_sql(_commit_sql(name, len(chunk)), tuple(chunk))
            else:
                tx.delete_ids(name, undecided)
            for message_id in undecided:
                row = list(stored[message_id])
                if cls.commits:
                    row[_COMMIT] = 1
                elif row[_KITE_SERVER] == tx.owner:
                    tx.backlog[row[_TOPIC]] -= 1
                _, decider, position = first[message_id]
                decider.found[position] = _record(tuple(row))


class CommitPart(_DecisionPart):
    __slots__ = ()
    kind = Kind.COMMIT
    commits = True


class RollbackPart(_DecisionPart):
    __slots__ = ()
    kind = Kind.ROLLBACK
    commits = False


# (table, message_id, then the _Bookkeeping columns)
Change = tuple[int, str, int, str, str, str, str | None, float]
# (table, message_id, topic, owned by this store)
Deletion = tuple[int, str, str, bool]


class BookkeepingPart(Part, Generic[_ItemT]):
    """Delivery bookkeeping of stored ids, items ``(table number, message id, …)``.

    It may wait for flushSeconds (``deferred``).
    """

    __slots__ = ("items",)
    deferred = True

    def __init__(self, call: Call, shard: int) -> None:
        super().__init__(call, shard)
        self.items: list[_ItemT] = []

    def ids(self) -> Iterable[str]:
        return (item[1] for item in self.items)


class ReschedulePart(BookkeepingPart[Change]):
    __slots__ = ()
    kind = Kind.RESCHEDULE

    @classmethod
    def apply(cls, tx: ShardTx, parts: Sequence[Self]) -> None:
        latest: dict[str, Change] = {}
        for part in parts:
            for item in part.items:
                latest[item[1]] = item  # the last change of an id wins
        by_table: dict[int, list[Change]] = {}
        for item in latest.values():
            by_table.setdefault(item[0], []).append(item)
        for table, items in by_table.items():
            tx.update_bookkeeping(tx.tables[table], items)


class DeletePart(BookkeepingPart[Deletion]):
    __slots__ = ("remember_until",)
    kind = Kind.DELETE

    def __init__(self, call: Call, shard: int, remember_until: float = 0.0) -> None:
        super().__init__(call, shard)
        self.remember_until = remember_until

    @classmethod
    def apply(cls, tx: ShardTx, parts: Sequence[Self]) -> None:
        groups: dict[tuple[int, str, bool], dict[str, None]] = {}
        seen: set[str] = set()
        for part in parts:
            for table, message_id, topic, owned in part.items:
                if message_id not in seen:
                    seen.add(message_id)
                    groups.setdefault((table, topic, owned), {})[message_id] = None
        for (table, topic, owned), ids in groups.items():
            deleted = tx.delete_ids(tx.tables[table], list(ids))
            if owned:
                tx.backlog[topic] -= deleted
        # in the deletes' transaction: an id is never gone and forgotten
        remembered = {
            item[1]: part.remember_until
            for part in parts
            if part.remember_until > 0.0
            for item in part.items
        }
        if remembered:
            tx.remember(list(remembered.items()))


class UrgentReschedulePart(ReschedulePart):
    """A reschedule an ordering key waits for (issue #16): written at once."""

    __slots__ = ()
    deferred = False


class UrgentDeletePart(DeletePart):
    """A delete an ordering key waits for (issue #16): written at once.

    Not after ``flushSeconds``: the key's next message is pushed only once it has landed.
    """

    __slots__ = ()
    deferred = False


class HistoryPart(Part):
    __slots__ = ("items",)
    kind = Kind.HISTORY
    deferred = True

    def __init__(self, call: Call, shard: int) -> None:
        super().__init__(call, shard)
        self.items: list[_Row] = []  # HISTORY_COLUMNS values

    @classmethod
    def apply(cls, tx: ShardTx, parts: Sequence[Self]) -> None:
        rows = [row for part in parts for row in part.items]
        tx.insert(tx.history_table, _HISTORY_COLUMNS, len(HISTORY_COLUMNS), rows)


class MetaPart(Part):
    __slots__ = ("key", "value")
    kind = Kind.META

    def __init__(self, call: Call, key: bytes, value: bytes | None) -> None:
        super().__init__(call, 0)
        self.key = key
        self.value = value
        self.size += len(key) + (0 if value is None else len(value))

    @classmethod
    def apply(cls, tx: ShardTx, parts: Sequence[Self]) -> None:
        final: dict[bytes, bytes | None] = {}
        for part in parts:
            final.pop(part.key, None)  # keep call order among keys
            final[part.key] = part.value
        puts = [(k, v) for k, v in final.items() if v is not None]
        gone = [k for k, v in final.items() if v is None]
        if puts:
            tx.conn.exec_driver_sql(
                f"INSERT INTO {tx.meta_table} (meta_key, meta_value) VALUES (%s, %s) "  # noqa: S608
                "ON DUPLICATE KEY UPDATE meta_value = VALUES(meta_value)",
                puts,
            )
        for chunk in _chunks(gone, _READ_CHUNK):
            tx.conn.exec_driver_sql(_delete_meta_sql(tx.meta_table, len(chunk)), tuple(chunk))


# Bookkeeping kinds counted against batchUpdateSize (the others: batchDelSize).
UPDATES: Final = frozenset({Kind.RESCHEDULE, Kind.HISTORY})
