"""One attempt of a MySQL write transaction: the connection, the shard's tables, counts.

The write requests (``_mysql_requests``, ``_mysql_dlq_requests``) apply themselves to a
``ShardTx``; its helpers are the statements several of them share.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Final

from sqlalchemy import Connection

from kiteq.store._mysql_rows import (
    _COLUMNS,
    _DLQ_COLUMNS,
    _READ_CHUNK,
    _RESCHEDULED,
    _chunks,
    _delete_sql,
    _insert_sql,
    _marks,
    _reschedule_sql,
    _Row,
    _select_sql,
)
from kiteq.store._mysql_schema import (
    DEDUP_TABLE,
    DLQ_COLUMNS,
    DLQ_TABLE,
    HISTORY_TABLE,
    MESSAGE_COLUMNS,
    META_TABLE,
    Layout,
)

__all__ = ["DEAD_TIME_AT", "GROUP_AT", "MESSAGE_ID_AT", "ShardTx", "Tables"]

# a dead-letter row read for a move: its primary key first, then DLQ_COLUMNS
_DLQ_ROW: Final = "id, " + _DLQ_COLUMNS


# positions in a dead-letter row read by ShardTx.locked_dead
MESSAGE_ID_AT: Final = 1 + DLQ_COLUMNS.index("message_id")
GROUP_AT: Final = 1 + DLQ_COLUMNS.index("group_id")
DEAD_TIME_AT: Final = 1 + DLQ_COLUMNS.index("dead_time")
_TOPIC_AT: Final = 1 + DLQ_COLUMNS.index("topic")
_OWNER_AT: Final = 1 + DLQ_COLUMNS.index("kite_server")


class Tables:
    """The quoted names of a layout's tables: ``` `database`.`table` ```."""

    __slots__ = ("dedup", "dlq", "history", "messages", "meta", "slots")

    def __init__(self, layout: Layout) -> None:
        def name(shard: int, table: str) -> str:
            return f"`{layout.database(shard)}`.`{table}`"

        shards = range(layout.shardnum)
        # [shard][table number] -> `database`.`kite_msg_N`
        self.messages = [
            [name(shard, layout.table_name(t)) for t in range(layout.tables_per_shard)]
            for shard in shards
        ]
        self.dlq = [name(shard, DLQ_TABLE) for shard in shards]
        self.history = [name(shard, HISTORY_TABLE) for shard in shards]
        self.dedup = [name(shard, DEDUP_TABLE) for shard in shards]
        self.meta = name(0, META_TABLE)
        # (slot, its message table) for the 16 slots
        self.slots = [(slot, self.messages[shard][table]) for slot, shard, table in layout.slots()]


class ShardTx:
    """One attempt of one database's transaction (on a worker thread).

    ``backlog`` and ``dlq`` collect what it changes in the store's counts (rows of this
    store's owner only); ``committing`` is set when COMMIT is sent.
    """

    __slots__ = (
        "backlog",
        "batch_del_size",
        "batch_update_size",
        "careful",
        "committing",
        "conn",
        "dedup_table",
        "dlq",
        "dlq_table",
        "history_table",
        "meta_table",
        "owner",
        "tables",
    )

    def __init__(
        self,
        conn: Connection,
        tables: Tables,
        shard: int,
        owner: str,
        batch_sizes: tuple[int, int],
        *,
        careful: bool,
    ) -> None:
        self.conn = conn
        self.tables = tables.messages[shard]
        self.dlq_table = tables.dlq[shard]
        self.history_table = tables.history[shard]
        self.dedup_table = tables.dedup[shard]
        self.meta_table = tables.meta
        self.owner = owner
        self.batch_update_size, self.batch_del_size = batch_sizes
        # a replay after a duplicate key: saves look for stored ids first
        self.careful = careful
        self.backlog: collections.Counter[str] = collections.Counter()
        # per (topic, group)
        self.dlq: collections.Counter[tuple[str, str]] = collections.Counter()
        self.committing = False

    def insert(self, table: str, columns: str, width: int, rows: Sequence[_Row]) -> None:
        self.conn.exec_driver_sql(_insert_sql(table, columns, width), rows)

    def insert_messages(self, table: str, rows: Sequence[_Row]) -> None:
        self.insert(table, _COLUMNS, len(MESSAGE_COLUMNS), rows)

    def locked_ids(self, table: str, ids: Sequence[str]) -> set[str]:
        """Which of *ids* are stored in *table*, locking them (and the gaps) until COMMIT."""
        return set(self.locked_rows(table, "message_id", ids))

    def locked_rows(self, table: str, columns: str, ids: Sequence[str]) -> dict[str, _Row]:
        """Map each stored id of *ids* to its *columns* (message_id first), locked."""
        found: dict[str, _Row] = {}
        for chunk in _chunks(ids, _READ_CHUNK):
            sql = _select_sql(table, columns, len(chunk), lock=True)
            for row in self.conn.exec_driver_sql(sql, tuple(chunk)):
                found[row[0]] = tuple(row)
        return found

    def remembered(self, ids: Sequence[str]) -> dict[str, float]:
        """The ids of *ids* in the idempotency window, with the time each is remembered until."""
        found: dict[str, float] = {}
        for chunk in _chunks(ids, _READ_CHUNK):
            sql = _select_sql(self.dedup_table, "message_id, remember_until", len(chunk))
            found.update((row[0], row[1]) for row in self.conn.exec_driver_sql(sql, tuple(chunk)))
        return found

    def remember(self, items: Sequence[tuple[str, float]]) -> None:
        """Remember each (id, until); an id remembered already gets the new time."""
        for chunk in _chunks(items, self.batch_del_size):
            self.conn.exec_driver_sql(
                f"INSERT INTO {self.dedup_table} (message_id, remember_until) VALUES (%s, %s) "  # noqa: S608
                "ON DUPLICATE KEY UPDATE remember_until = VALUES(remember_until)",
                list(chunk),
            )

    def delete_ids(self, table: str, ids: Sequence[str]) -> int:
        deleted = 0
        for chunk in _chunks(ids, self.batch_del_size):
            sql = _delete_sql(table, len(chunk))
            deleted += self.conn.exec_driver_sql(sql, tuple(chunk)).rowcount
        return deleted

    def locked_dead(self, ids: Sequence[str]) -> list[_Row]:
        """The dead-letter rows (id, then DLQ_COLUMNS) of the messages *ids*, locked."""
        found: list[_Row] = []
        for chunk in _chunks(ids, _READ_CHUNK):
            sql = _select_sql(self.dlq_table, _DLQ_ROW, len(chunk), lock=True)
            found += (tuple(row) for row in self.conn.exec_driver_sql(sql, tuple(chunk)))
        return found

    def delete_dead(self, rows: Sequence[_Row]) -> None:
        """Delete dead-letter rows read by ``locked_dead``, by primary key, and uncount them."""
        for chunk in _chunks(rows, self.batch_del_size):
            self.conn.exec_driver_sql(
                f"DELETE FROM {self.dlq_table} WHERE id IN ({_marks(len(chunk))})",  # noqa: S608
                tuple(row[0] for row in chunk),
            )
        for row in rows:
            if row[_OWNER_AT] == self.owner:
                self.dlq[(row[_TOPIC_AT], row[GROUP_AT])] -= 1

    def update_bookkeeping(self, table: str, items: Sequence[tuple[object, ...]]) -> None:
        """Write the bookkeeping columns of *items* (table, id, then the columns; one id each).

        ``batchUpdateSize`` rows per statement.
        """
        columns = range(2, 2 + len(_RESCHEDULED))
        for chunk in _chunks(items, self.batch_update_size):
            params: list[object] = []
            for column in columns:
                for item in chunk:
                    params += (item[1], item[column])
            params += (item[1] for item in chunk)
            self.conn.exec_driver_sql(_reschedule_sql(table, len(chunk)), tuple(params))
