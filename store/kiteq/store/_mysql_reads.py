"""The MySQL store's reads, counts and takeover: everything but the queued writes.

Each method runs on a worker thread; the SQL is built from the layout's table names
(``Tables``) and every value is a driver parameter.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

from sqlalchemy import Connection

from kiteq.core.message import StoredMessage
from kiteq.store import base
from kiteq.store._mysql_engine import Database
from kiteq.store._mysql_rows import (
    _COLUMNS,
    _DLQ_COLUMNS,
    _HISTORY_COLUMNS,
    _MAX_TIME,
    _PRUNE_CHUNK,
    _READ_CHUNK,
    PENDING_COLUMNS,
    _dead_letter,
    _marks,
    _pending_key,
    _record,
    _Row,
    _select_sql,
    _time,
    page_keys_sql,
    uncommitted_keys_sql,
)
from kiteq.store._mysql_schema import DEDUP_TABLE, Layout, _in_names
from kiteq.store._mysql_tx import Tables
from kiteq.store._state import add_counts

__all__ = ["Counts", "Reads"]

_K = TypeVar("_K", str, tuple[str, str])
_T = TypeVar("_T")

# backlog per topic, dead letters per (topic, group)
Counts = tuple[dict[str, int], dict[tuple[str, str], int]]
# list_dlq's filter fields and their columns
_DLQ_FILTER: Final = (
    ("topic", "topic"),
    ("message_type", "message_type"),
    ("dead_reason", "reason"),
    ("group_id", "group"),
)


class Reads:
    __slots__ = ("_page_sql", "_uncommitted_sql", "database", "layout", "owner", "tables")

    def __init__(self, database: Database, layout: Layout, tables: Tables, owner: str) -> None:
        self.database = database
        self.layout = layout
        self.tables = tables
        self.owner = owner
        self._page_sql = page_keys_sql(tables.slots)
        self._uncommitted_sql = uncommitted_keys_sql(tables.slots)

    def counts(self, conn: Connection) -> Counts:
        """This owner's messages per topic (idx_backlog), dead letters per (topic, group)."""
        tables = [table for _, table in self.tables.slots]
        sql = " UNION ALL ".join(
            f"(SELECT topic, COUNT(*) FROM {table} WHERE kite_server = %s GROUP BY topic)"  # noqa: S608
            for table in tables
        )
        backlog: collections.Counter[str] = collections.Counter()
        for topic, count in conn.exec_driver_sql(sql, (self.owner,) * len(tables)):
            backlog[topic] += int(count)
        tables = self.tables.dlq
        sql = " UNION ALL ".join(
            f"(SELECT topic, group_id, COUNT(*) FROM {table} WHERE kite_server = %s "  # noqa: S608
            "GROUP BY topic, group_id)"
            for table in tables
        )
        dead: collections.Counter[tuple[str, str]] = collections.Counter()
        for topic, group, count in conn.exec_driver_sql(sql, (self.owner,) * len(tables)):
            dead[(topic, group)] += int(count)
        return dict(backlog), dict(dead)

    def pending_counts(self) -> base.PendingCounts:
        """``MessageStore.pending_counts``: this owner's rows with delivery state, by id."""
        counts: base.PendingCounts = {}
        for _, table in self.tables.slots:
            sql = (
                f"SELECT {PENDING_COLUMNS} FROM {table} WHERE kite_server = %s "  # noqa: S608
                "AND message_id > %s AND (group_state IS NULL OR group_state <> '{}') "
                f"ORDER BY message_id LIMIT {_READ_CHUNK}"
            )
            after = ""
            while True:

                def read(conn: Connection, after: str = after, sql: str = sql) -> list[_Row]:
                    return [tuple(row) for row in conn.exec_driver_sql(sql, (self.owner, after))]

                rows = self.database.read("pending_counts", read)
                for row in rows:
                    base.count_pending(counts, *_pending_key(row))
                if len(rows) < _READ_CHUNK:
                    break
                after = rows[-1][0]
        return counts

    def get(self, message_id: str) -> StoredMessage | None:
        shard, table = self.layout.route(message_id)
        sql = _select_sql(self.tables.messages[shard][table], _COLUMNS, 1)

        def read(conn: Connection) -> StoredMessage | None:
            row = conn.exec_driver_sql(sql, (message_id,)).first()
            return None if row is None else _record(tuple(row))

        return self.database.read("get", read)

    def page_due(self, now: float, limit: int, after: base.DueCursor | None) -> list[StoredMessage]:
        now = min(now, _MAX_TIME)
        cursor = (-1.0, "") if after is None else (_time(after[0]), after[1])
        params = (self.owner, now, cursor[0], cursor[0], cursor[1], limit) * len(self.tables.slots)
        sql = self._page_sql

        def read(conn: Connection) -> list[StoredMessage]:
            # Both statements in one transaction: one consistent snapshot.
            keys = conn.exec_driver_sql(sql, (*params, limit)).all()
            return self._fetch(conn, [(mid, int(slot)) for _, mid, slot in keys])

        return self.database.read("page_due", read)

    def page_uncommitted(self, limit: int, after: str | None) -> list[StoredMessage]:
        params = (self.owner, after or "", limit) * len(self.tables.slots) + (limit,)
        sql = self._uncommitted_sql

        def read(conn: Connection) -> list[StoredMessage]:
            keys = conn.exec_driver_sql(sql, params).all()
            return self._fetch(conn, [(mid, int(slot)) for mid, slot in keys])

        return self.database.read("page_uncommitted", read)

    def _fetch(self, conn: Connection, keys: Sequence[tuple[str, int]]) -> list[StoredMessage]:
        """The records of *keys* (id, slot), in their order, read in one statement."""
        if not keys:
            return []
        slots = dict(self.tables.slots)
        by_slot: dict[int, list[str]] = {}
        for message_id, slot in keys:
            by_slot.setdefault(slot, []).append(message_id)
        fetch = " UNION ALL ".join(
            f"({_select_sql(slots[slot], _COLUMNS, len(ids))})" for slot, ids in by_slot.items()
        )
        values = tuple(mid for ids in by_slot.values() for mid in ids)
        rows = {row[0]: tuple(row) for row in conn.exec_driver_sql(fetch, values)}
        return [_record(rows[mid]) for mid, _ in keys if mid in rows]

    def list_dlq(
        self, where: base.DlqFilter, limit: int, after: base.DlqKey | None
    ) -> list[base.DeadLetter]:
        conditions = ["kite_server = %s"]
        values: list[object] = [self.owner]
        if after is not None:
            # the first condition is the range idx_dlq is scanned over
            conditions.append("message_id >= %s AND (message_id > %s OR group_id > %s)")
            values += (after[0], after[0], after[1])
        for column, field in _DLQ_FILTER:
            value = getattr(where, field)
            if value:
                conditions.append(f"`{column}` = %s")
                values.append(value)
        condition = " AND ".join(conditions)
        order = "ORDER BY message_id, group_id LIMIT %s"
        branch = "(SELECT {columns} FROM {table} WHERE {condition} {order})"
        tables = self.tables.dlq
        sql = (
            " UNION ALL ".join(
                branch.format(columns=_DLQ_COLUMNS, table=table, condition=condition, order=order)
                for table in tables
            )
            + f" {order}"
        )
        params = (*values, limit) * len(tables) + (limit,)

        def read(conn: Connection) -> list[base.DeadLetter]:
            return [_dead_letter(tuple(row)) for row in conn.exec_driver_sql(sql, params)]

        return self.database.read("list_dlq", read)

    def get_dead_letters(self, message_id: str) -> list[base.DeadLetter]:
        return self._of_message(
            "get_dead_letters", self.tables.dlq, _DLQ_COLUMNS, "group_id", message_id, _dead_letter
        )

    def get_history(self, message_id: str) -> list[base.HistoryEvent]:
        return self._of_message(
            "get_history",
            self.tables.history,
            _HISTORY_COLUMNS,
            "event_time, seq",
            message_id,
            lambda row: base.HistoryEvent(*row),
        )

    def _of_message(
        self,
        action: str,
        tables: list[str],
        columns: str,
        order: str,
        message_id: str,
        convert: Callable[[_Row], _T],
    ) -> list[_T]:
        """The rows of *message_id* in its database's table of *tables*, in *order*."""
        shard, _ = self.layout.route(message_id)
        sql = f"SELECT {columns} FROM {tables[shard]} WHERE message_id = %s ORDER BY {order}"  # noqa: S608

        def read(conn: Connection) -> list[_T]:
            return [convert(tuple(row)) for row in conn.exec_driver_sql(sql, (message_id,))]

        return self.database.read(action, read)

    def prune_history(self, before: float) -> int:
        """Removes in chunks of its own transactions, beside the write queues."""
        return self._prune("prune_history", self.tables.history, "event_time", before)

    def prune_remembered(self, before: float) -> int:
        """Forgets remembered ids, in chunks, through the ``remember_until`` index."""
        return self._prune("prune_remembered", self.tables.dedup, "remember_until", before)

    def remembered_estimate(self) -> int:
        """InnoDB's row estimate of the ``kite_msg_dedup`` tables (information_schema)."""
        sql = _in_names(
            "SELECT COALESCE(SUM(TABLE_ROWS), 0) FROM information_schema.TABLES "
            "WHERE TABLE_NAME = :table AND TABLE_SCHEMA"
        )
        names = self.layout.databases()

        def read(conn: Connection) -> int:
            return int(conn.execute(sql, {"table": DEDUP_TABLE, "names": names}).scalar_one())

        return self.database.read("remembered_estimate", read)

    def _prune(self, action: str, tables: list[str], column: str, before: float) -> int:
        removed = 0
        for table in tables:
            sql = f"DELETE FROM {table} WHERE {column} < %s LIMIT {_PRUNE_CHUNK}"  # noqa: S608
            while True:

                def chunk(conn: Connection, sql: str = sql) -> int:
                    deleted = conn.exec_driver_sql(sql, (before,)).rowcount
                    conn.commit()
                    return deleted

                deleted = self.database.read(action, chunk)
                removed += deleted
                if deleted < _PRUNE_CHUNK:
                    break
        return removed

    def get_meta(self, prefix: str) -> dict[str, bytes]:
        raw = prefix.encode()
        pattern = raw.replace(b"!", b"!!").replace(b"%", b"!%").replace(b"_", b"!_") + b"%"
        sql = (
            f"SELECT meta_key, meta_value FROM {self.tables.meta} WHERE meta_key LIKE %s ESCAPE '!'"  # noqa: S608
        )

        def read(conn: Connection) -> dict[str, bytes]:
            return {
                bytes(key).decode(): bytes(value)
                for key, value in conn.exec_driver_sql(sql, (pattern,))
            }

        return self.database.read("get_meta", read)

    def take_over(
        self, owner: str, batch: int, loop: asyncio.AbstractEventLoop, counts: Counts
    ) -> base.TakenOver:
        """The messages and dead letters of *owner* moved to this store's owner.

        *batch* rows per transaction; each batch's counts are added to *counts* on *loop*
        once committed (see ``MySQLStore.take_over``).
        """
        backlog, dlq = counts
        pending: base.PendingCounts = {}
        moved = 0
        for _, table in self.tables.slots:
            taker = _TakeOver(self, owner, batch, loop, table, "message_id", "topic")
            taker.pending = pending
            moved += taker.run(backlog)
        # by primary key: a batch may end between two dead letters of one message
        dead = sum(
            _TakeOver(self, owner, batch, loop, table, "id", "topic, group_id").run(dlq)
            for table in self.tables.dlq
        )
        return base.TakenOver(moved, dead, pending)


class _TakeOver:
    """Moves one table's rows of *owner* in batches by *key*.

    *counted* names the columns of the counts' keys (one: a str, two: a tuple).
    """

    def __init__(
        self,
        reads: Reads,
        owner: str,
        size: int,
        loop: asyncio.AbstractEventLoop,
        table: str,
        key: str,
        counted: str,
    ) -> None:
        self.reads = reads
        self.owner = owner
        self.size = size
        self.loop = loop
        self.select = (
            f"SELECT {key}, {counted} FROM {table} WHERE kite_server = %s "  # noqa: S608
            f"LIMIT {size} FOR UPDATE"
        )
        self.update = f"UPDATE {table} SET kite_server = %s WHERE kite_server = %s AND {key} IN "  # noqa: S608
        self.table = table
        # a message table's: the pending groups of the moved messages are counted here
        self.pending: base.PendingCounts | None = None
        self.counted: base.PendingCounts = {}

    def batch(self, conn: Connection) -> _Row:
        found: _Row = tuple(conn.exec_driver_sql(self.select, (self.owner,)).all())
        if found:
            conn.exec_driver_sql(
                f"{self.update}({_marks(len(found))})",
                (self.reads.owner, self.owner, *(row[0] for row in found)),
            )
            if self.pending is not None:
                self._count_pending(conn, [row[0] for row in found])
        conn.commit()
        return found

    def _count_pending(self, conn: Connection, ids: list[str]) -> None:
        sql = _select_sql(self.table, PENDING_COLUMNS, len(ids))
        batch: base.PendingCounts = {}
        for row in conn.exec_driver_sql(sql, tuple(ids)):
            base.count_pending(batch, *_pending_key(tuple(row)))
        # kept apart until the commit: a batch that is retried is counted once
        self.counted = batch

    def run(self, counts: dict[_K, int]) -> int:
        """How many rows moved; each batch is counted in *counts* (on the loop)."""
        total = 0
        while True:
            rows = self.reads.database.retried("take_over", self.batch)
            if rows:
                keys = [row[1] if len(row) == 2 else tuple(row[1:]) for row in rows]
                # on the loop (FIFO: before the call returns), even if a later batch fails
                self.loop.call_soon_threadsafe(add_counts, counts, dict(collections.Counter(keys)))
                if self.pending is not None:
                    add_counts(self.pending, self.counted)
                total += len(rows)
            if len(rows) < self.size:
                return total
