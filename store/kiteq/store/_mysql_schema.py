"""The MySQL store's layout and DDL: 16 slots, ``shardnum`` databases, KiteQ's tables.

Routing (frozen: changing it strands stored rows). A message id's **slot** is the value of
its last character read as a hex digit (0-15, either case; any other character counts as
its code point modulo 16). With ``S = shardnum`` databases and ``T = 16 / S`` tables per
database, slot ``h`` lives in database ``{db}_{h // T}``, table ``kite_msg_{h % T}``.
This is KiteQ's ``kite_mysql_shard.go``: for ``shardnum=4``, ids ending in ``0``-``3``
go to ``kite_0.kite_msg_0``-``3``, ids ending in ``c``-``f`` to ``kite_3``.

Every database also holds ``kite_msg_dlq``, the dead-letter queue of its slots (KiteQ's
table plus ``dead_reason``, ``dead_time``, ``group_id`` (the group it is dead for: one row
per (message_id, group_id)) and ``dead_groups``, the JSON array naming that group), and
``kite_msg_history``, the events of its slots' messages, and ``kite_msg_dedup``, the ids
of its slots remembered after their delete (the idempotency window: ``message_id``
primary key, ``remember_until`` indexed so a prune reads only what expired); the first
database holds ``kite_meta`` (broker metadata, ``put_meta``).

Columns are KiteQ's, with these deliberate differences:

* ``message_id`` is ``VARCHAR(32) ascii_bin``: ids compare exactly (``AB…`` and ``ab…``
  are different ids, as in the other stores) and the indexes stay small;
* text columns are ``utf8mb4_bin`` so topic and owner comparisons are exact;
* ``publish_time`` and ``next_deliver_time`` are ``DOUBLE`` Unix seconds (KiteQ: integer
  seconds), so fractional times and the page cursor round-trip exactly;
* ``header`` holds the header fields that have no column of their own, as a UTF-8 JSON
  object with KiteQ's field names, defaults omitted:
  ``{"createTime": 1700000000, "fly": true, "snappy": true, "properties": {"k": "v"},
  "deliverAt": 1700000060.5, "orderingKey": "order-17"}`` (``deliverAt``: scheduled
  delivery, issue #15; ``orderingKey``: ordered delivery, issue #16)
  (KiteQ stores the protobuf header here; the wire schema is kept out of storage);
* ``fail_groups`` / ``succ_groups`` are JSON arrays as in KiteQ, in ``MEDIUMTEXT`` so
  any number of groups fits. Since issue #10 they are derived (still filled for KiteQ's
  tools): the delivery state is ``group_state``, a JSON object
  ``{"group": ["pending"|"acked"|"dead", attempts, next_deliver_time]}`` (``{}`` when no
  group has had an attempt), and ``only_groups``, a JSON array or NULL (no restriction);
* **upgrade** (issue #10): a schema made before has neither column and one dead-letter
  row per message. ``create_schema`` (``kiteq-schema``) adds the columns (a NULL
  ``group_state`` marks a row written before: read from ``succ_groups``/``fail_groups``,
  every failed group with the message's ``deliver_count`` and ``next_deliver_time``),
  replaces the DLQ's unique ``idx_message_id`` by ``idx_dlq_key (message_id, group_id)``
  after splitting each old dead letter into one row per group it names, and widens
  ``idx_dlq``; each step is idempotent and the schema is reported incomplete until the
  last one, so an interrupted upgrade is finished by running the command again;
* the recover index is ``idx_recover (kite_server, commit, next_deliver_time,
  message_id)``, the order ``page_due`` reads in, and it exists: KiteQ's query forces an
  ``idx_recover`` its DDL never creates (it creates ``idx_recover_a``);
* ``idx_backlog (kite_server, topic)`` counts a broker's backlog without a table scan;
  in the DLQ, ``idx_dlq (kite_server, message_id, group_id)`` pages dead letters by
  (message_id, group_id).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    TextClause,
    bindparam,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.schema import CreateColumn

__all__ = [
    "DEDUP_TABLE",
    "DLQ_COLUMNS",
    "DLQ_TABLE",
    "HISTORY_COLUMNS",
    "HISTORY_TABLE",
    "MESSAGE_COLUMNS",
    "META_TABLE",
    "SHARDNUMS",
    "SLOTS",
    "Layout",
    "check_schema",
    "create_schema",
    "slot_of",
]

SLOTS: Final = 16
SHARDNUMS: Final = (1, 2, 4, 8, 16)
DLQ_TABLE: Final = "kite_msg_dlq"
HISTORY_TABLE: Final = "kite_msg_history"
DEDUP_TABLE: Final = "kite_msg_dedup"
META_TABLE: Final = "kite_meta"

# KiteQ's column order (kite_sql_wrapper.go), used by every INSERT and SELECT.
MESSAGE_COLUMNS: Final = (
    "message_id",
    "header",
    "body",
    "msg_type",
    "topic",
    "message_type",
    "publish_group",
    "commit",
    "publish_time",
    "expired_time",
    "deliver_count",
    "deliver_limit",
    "kite_server",
    "fail_groups",
    "succ_groups",
    "next_deliver_time",
    # ours, issue #10 (added to older schemas by create_schema)
    "group_state",
    "only_groups",
)

DLQ_COLUMNS: Final = (*MESSAGE_COLUMNS, "dead_reason", "dead_time", "dead_groups", "group_id")
# Columns create_schema adds to a table made before them (every other missing column is
# only reported): nullable or with a default, so existing rows need no value.
ADDED_COLUMNS: Final = frozenset({"group_state", "only_groups", "group_id"})
HISTORY_COLUMNS: Final = (
    "message_id",
    "event_time",
    "kind",
    "group_name",
    "connection",
    "attempt",
    "detail",
)

_Indexes = dict[str, tuple[bool, tuple[str, ...]]]
# name -> (unique, columns); PRIMARY is the auto-increment id.
MESSAGE_INDEXES: Final[_Indexes] = {
    "PRIMARY": (True, ("id",)),
    "idx_message_id": (True, ("message_id",)),
    "idx_recover": (False, ("kite_server", "commit", "next_deliver_time", "message_id")),
    "idx_backlog": (False, ("kite_server", "topic")),
}
DLQ_INDEXES: Final[_Indexes] = {
    "PRIMARY": (True, ("id",)),
    "idx_dlq_key": (True, ("message_id", "group_id")),
    "idx_dlq": (False, ("kite_server", "message_id", "group_id")),
    "idx_backlog": (False, ("kite_server", "topic")),
}
# indexes of a schema made before issue #10, dropped by create_schema: a unique
# message_id allowed one dead letter per message
OBSOLETE_DLQ_INDEXES: Final = ("idx_message_id",)
# rows split into one per group by create_schema
_UNSPLIT_CHUNK: Final = 1000
HISTORY_INDEXES: Final[_Indexes] = {
    "PRIMARY": (True, ("seq",)),
    "idx_history": (False, ("message_id", "event_time", "seq")),
    "idx_event_time": (False, ("event_time",)),
}
META_INDEXES: Final[_Indexes] = {
    "PRIMARY": (True, ("meta_key",)),
}
DEDUP_INDEXES: Final[_Indexes] = {
    "PRIMARY": (True, ("message_id",)),
    "idx_dedup_until": (False, ("remember_until",)),
}

_HEX: Final = {c: int(c, 16) for c in "0123456789abcdefABCDEF"}


def slot_of(message_id: str) -> int:
    """The id's slot, 0-15: its last character as a hex digit (see the module doc)."""
    if not message_id:
        return 0
    last = message_id[-1]
    slot = _HEX.get(last)
    return ord(last) % SLOTS if slot is None else slot


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    """Where each slot lives: ``shardnum`` databases named ``{prefix}_{i}``."""

    prefix: str
    shardnum: int

    def __post_init__(self) -> None:
        if self.shardnum not in SHARDNUMS:
            raise ValueError(f"shardnum must divide 16 (one of {SHARDNUMS}), got {self.shardnum}")

    @property
    def tables_per_shard(self) -> int:
        return SLOTS // self.shardnum

    def database(self, shard: int) -> str:
        return f"{self.prefix}_{shard}"

    def databases(self) -> list[str]:
        return [self.database(i) for i in range(self.shardnum)]

    def place(self, slot: int) -> tuple[int, int]:
        """(shard, table number) of *slot*."""
        return divmod(slot, self.tables_per_shard)

    def route(self, message_id: str) -> tuple[int, int]:
        """(shard, table number) holding *message_id*."""
        return self.place(slot_of(message_id))

    def table_name(self, table: int) -> str:
        return f"kite_msg_{table}"

    def slots(self) -> Iterator[tuple[int, int, int]]:
        """(slot, shard, table number) for the 16 slots."""
        for slot in range(SLOTS):
            shard, table = self.place(slot)
            yield slot, shard, table

    def expected_tables(self) -> dict[tuple[str, str], _Indexes]:
        """(database, table) -> expected indexes, for every table of the layout."""
        expected: dict[tuple[str, str], _Indexes] = {}
        for shard in range(self.shardnum):
            database = self.database(shard)
            for table in range(self.tables_per_shard):
                expected[(database, self.table_name(table))] = MESSAGE_INDEXES
            expected[(database, DLQ_TABLE)] = DLQ_INDEXES
            expected[(database, HISTORY_TABLE)] = HISTORY_INDEXES
            expected[(database, DEDUP_TABLE)] = DEDUP_INDEXES
        expected[(self.database(0), META_TABLE)] = META_INDEXES
        return expected

    def metadata(self) -> MetaData:
        """SQLAlchemy tables of the whole layout (schema = database)."""
        metadata = MetaData()
        for (database, name), indexes in self.expected_tables().items():
            if indexes is META_INDEXES:
                columns = _meta_columns()
            elif indexes is HISTORY_INDEXES:
                columns = _history_columns()
            elif indexes is DEDUP_INDEXES:
                columns = _dedup_columns()
            else:
                columns = _message_columns(dlq=indexes is DLQ_INDEXES)
            table = Table(name, metadata, *columns, schema=database, **_TABLE_OPTIONS)
            for index, (unique, names) in indexes.items():
                if index != "PRIMARY":
                    Index(index, *(table.c[c] for c in names), unique=unique)
        return metadata


# every table: InnoDB, and exact (binary) comparison of its text columns
_TABLE_OPTIONS: Final[dict[str, Any]] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}


def _message_id() -> Column[str]:
    return Column(
        "message_id", mysql.VARCHAR(32, charset="ascii", collation="ascii_bin"), nullable=False
    )


def _message_columns(*, dlq: bool) -> list[Column[Any]]:
    dead: list[Column[Any]] = (
        [
            Column("dead_reason", mysql.VARCHAR(64), nullable=False),
            Column("dead_time", mysql.DOUBLE, nullable=False),
            Column("dead_groups", mysql.MEDIUMTEXT, nullable=False),
            Column("group_id", mysql.VARCHAR(255), nullable=False, server_default=""),
        ]
        if dlq
        else []
    )
    return [
        Column("id", BigInteger, primary_key=True, autoincrement=True),
        _message_id(),
        Column("header", mysql.MEDIUMBLOB, nullable=False),
        Column("body", mysql.MEDIUMBLOB, nullable=False),
        Column("msg_type", mysql.TINYINT(unsigned=True), nullable=False),
        Column("topic", mysql.VARCHAR(255), nullable=False),
        Column("message_type", mysql.VARCHAR(255), nullable=False),
        Column("publish_group", mysql.VARCHAR(255), nullable=False),
        Column("commit", mysql.TINYINT(1), nullable=False, quote=True),
        Column("publish_time", mysql.DOUBLE, nullable=False),
        Column("expired_time", BigInteger, nullable=False),
        Column("deliver_count", Integer, nullable=False),
        Column("deliver_limit", Integer, nullable=False),
        Column("kite_server", mysql.VARCHAR(255), nullable=False),
        Column("fail_groups", mysql.MEDIUMTEXT, nullable=False),
        Column("succ_groups", mysql.MEDIUMTEXT, nullable=False),
        Column("next_deliver_time", mysql.DOUBLE, nullable=False),
        Column("group_state", mysql.MEDIUMTEXT, nullable=True),
        Column("only_groups", mysql.MEDIUMTEXT, nullable=True),
        *dead,
    ]


def _history_columns() -> list[Column[Any]]:
    return [
        Column("seq", BigInteger, primary_key=True, autoincrement=True),
        _message_id(),
        Column("event_time", mysql.DOUBLE, nullable=False),
        Column("kind", mysql.VARCHAR(32), nullable=False),
        Column("group_name", mysql.VARCHAR(255), nullable=False),
        Column("connection", mysql.VARCHAR(255), nullable=False),
        Column("attempt", Integer, nullable=False),
        Column("detail", Text, nullable=False),
    ]


def _dedup_columns() -> list[Column[Any]]:
    return [
        Column(
            "message_id",
            mysql.VARCHAR(32, charset="ascii", collation="ascii_bin"),
            primary_key=True,
        ),
        Column("remember_until", mysql.DOUBLE, nullable=False),
    ]


def _meta_columns() -> list[Column[Any]]:
    return [
        Column("meta_key", mysql.VARBINARY(1024), primary_key=True),
        Column("meta_value", mysql.MEDIUMBLOB, nullable=False),
    ]


def _in_names(select: str) -> TextClause:
    """*select* followed by ``IN :names`` (an expanding bind parameter)."""
    return text(select + " IN :names").bindparams(bindparam("names", expanding=True))


@dataclasses.dataclass(frozen=True, slots=True)
class _Catalog:
    """What information_schema says about the layout's databases."""

    databases: set[str]
    # (database, table) -> column names
    columns: dict[tuple[str, str], set[str]]
    # (database, table, index) -> [(position, column, non_unique)]
    indexes: dict[tuple[str, str, str], list[tuple[int, str, int]]]

    def index_columns(self, database: str, table: str, index: str) -> tuple[str, ...]:
        return tuple(c for _, c, _ in sorted(self.indexes.get((database, table, index), [])))


def _catalog(conn: Connection, layout: Layout) -> _Catalog:
    names = {"names": layout.databases()}
    databases = {
        row[0]
        for row in conn.execute(
            _in_names("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME"),
            names,
        )
    }
    columns: dict[tuple[str, str], set[str]] = {}
    for schema, table, column in conn.execute(
        _in_names(
            "SELECT TABLE_SCHEMA, TABLE_NAME, COLUMN_NAME FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA"
        ),
        names,
    ):
        columns.setdefault((schema, table), set()).add(column)
    indexes: dict[tuple[str, str, str], list[tuple[int, str, int]]] = {}
    for schema, table, index, non_unique, seq, column in conn.execute(
        _in_names(
            "SELECT TABLE_SCHEMA, TABLE_NAME, INDEX_NAME, NON_UNIQUE, SEQ_IN_INDEX, COLUMN_NAME "
            "FROM information_schema.STATISTICS WHERE TABLE_SCHEMA"
        ),
        names,
    ):
        indexes.setdefault((schema, table, index), []).append((int(seq), column, int(non_unique)))
    return _Catalog(databases, columns, indexes)


def check_schema(conn: Connection, layout: Layout) -> list[str]:
    """What is missing or wrong, one line each (empty: the schema is complete).

    A line starting with ``upgrade`` is a change of a schema made before issue #10 (the
    others name what is missing: columns, indexes, tables).
    """
    found = _catalog(conn, layout)
    problems = [f"database {name}" for name in layout.databases() if name not in found.databases]
    metadata = layout.metadata()
    for (database, name), indexes in layout.expected_tables().items():
        if database not in found.databases:
            continue
        have = found.columns.get((database, name))
        if have is None:
            problems.append(f"table {database}.{name}")
            continue
        table = metadata.tables[f"{database}.{name}"]
        problems += _table_problems(found, table, have, indexes)
    return problems


def _table_problems(found: _Catalog, table: Table, have: set[str], indexes: _Indexes) -> list[str]:
    """What an existing *table* lacks (it has the columns *have*)."""
    database, name = str(table.schema), table.name
    where = f"{database}.{name}"
    problems = [f"column {where}.{c.name}" for c in table.columns if c.name not in have]
    for index, (unique, cols) in indexes.items():
        got = sorted(found.indexes.get((database, name, index), []))
        if not got:
            problems.append(f"index {where}.{index} ({', '.join(cols)})")
        elif tuple(c for _, c, _ in got) != cols or (got[0][2] == 0) != unique:
            problems.append(
                f"index {where}.{index} is ({', '.join(c for _, c, _ in got)}), "
                f"expected {'unique ' if unique else ''}({', '.join(cols)})"
            )
    if indexes is DLQ_INDEXES:
        problems += [
            f"upgrade of {where}: drop index {index} "
            "(one dead letter per message, before issue #10)"
            for index in OBSOLETE_DLQ_INDEXES
            if (database, name, index) in found.indexes
        ]
    return problems


def create_schema(conn: Connection, layout: Layout) -> list[str]:
    """Create what is missing (databases, tables, indexes) and upgrade; idempotent.

    Returns what it created or changed. The upgrade of a schema made before issue #10
    (module doc) is the only change to existing tables: ``ADDED_COLUMNS``, the DLQ's
    indexes and the split of its old rows. Any other difference (a column missing or of
    another type, an index on other columns) is left for ``check_schema`` to report.
    """
    if not check_schema(conn, layout):
        return []
    created: list[str] = []
    for database in layout.databases():
        exists = conn.execute(
            text("SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = :d"),
            {"d": database},
        ).first()
        if exists is None:
            conn.execute(
                text(
                    f"CREATE DATABASE IF NOT EXISTS `{database}` "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                )
            )
            created.append(f"database {database}")
    before = check_schema(conn, layout)
    metadata = layout.metadata()
    upgraded = _upgrade(conn, layout, metadata)
    metadata.create_all(conn, checkfirst=True)
    missing = set(check_schema(conn, layout))
    for table in metadata.tables.values():
        for index in table.indexes:
            cols = ", ".join(c.name for c in index.columns)
            if f"index {table.schema}.{table.name}.{index.name} ({cols})" in missing:
                index.create(conn)
    after = set(check_schema(conn, layout))
    fixed = [problem for problem in before if problem not in after]
    return list(dict.fromkeys([*created, *upgraded, *fixed]))


def _upgrade(conn: Connection, layout: Layout, metadata: MetaData) -> list[str]:
    """Bring tables made before issue #10 to today's layout; what it did, one line each.

    In this order, so a run stopped anywhere leaves the schema reported incomplete (the
    unique ``idx_dlq_key`` is created last, by the caller) and the next run goes on.
    """
    found = _catalog(conn, layout)
    done: list[str] = []
    for (database, name), expected in layout.expected_tables().items():
        have = found.columns.get((database, name))
        if have is None:
            continue  # a new table: create_all makes it whole
        table = metadata.tables[f"{database}.{name}"]
        quoted = f"`{database}`.`{name}`"
        missing = [c for c in table.columns if c.name in ADDED_COLUMNS and c.name not in have]
        if missing:
            adds = ", ".join(
                f"ADD COLUMN {CreateColumn(c).compile(dialect=conn.dialect)}" for c in missing
            )
            conn.execute(text(f"ALTER TABLE {quoted} {adds}"))
            done += [f"column {database}.{name}.{c.name}" for c in missing]
        if expected is not DLQ_INDEXES:
            continue
        for index in OBSOLETE_DLQ_INDEXES:
            if (database, name, index) in found.indexes:
                # reported by check_schema before, so the caller lists it as done
                conn.execute(text(f"ALTER TABLE {quoted} DROP INDEX `{index}`"))
        split = _split_dead_letters(conn, quoted)
        if split:
            done.append(
                f"upgrade of {database}.{name}: split {split} dead letter(s) into one per group"
            )
        got = found.index_columns(database, name, "idx_dlq")
        if got and got != DLQ_INDEXES["idx_dlq"][1]:
            # the caller creates it again with today's columns
            conn.execute(text(f"ALTER TABLE {quoted} DROP INDEX `idx_dlq`"))
    return done


def _split_dead_letters(conn: Connection, table: str) -> int:
    """One row per group for each dead letter written before issue #10; how many.

    Such a row has ``group_id`` '' (the column's default) and names its groups in
    ``dead_groups``: it becomes the row of its first group, copies are inserted for the
    others, each batch in one transaction (a row is split whole or not at all).
    ``dead_groups`` keeps every name, so each copy reads its record with all of them
    ``DEAD``, as the old row meant.
    """
    copied = ", ".join(f"`{c}`" for c in DLQ_COLUMNS if c != "group_id")
    select = text(
        f"SELECT id, dead_groups FROM {table} WHERE group_id = '' AND dead_groups <> '[]' "  # noqa: S608
        f"ORDER BY id LIMIT {_UNSPLIT_CHUNK} FOR UPDATE"
    )
    update = text(
        f"UPDATE {table} SET group_id = :g, dead_groups = :d WHERE id = :id"  # noqa: S608
    )
    copy = text(
        f"INSERT INTO {table} ({copied}, `group_id`) SELECT {copied}, :g FROM {table} "  # noqa: S608
        "WHERE id = :id"
    )
    split = 0
    while rows := conn.execute(select).all():
        for row_id, dead_groups in rows:
            # a group named "" cannot be told from "not split yet": it is the letter of ""
            groups = [g for g in json.loads(dead_groups) if g]
            if not groups:
                conn.execute(update, {"g": "", "d": "[]", "id": row_id})
                continue
            conn.execute(update, {"g": groups[0], "d": dead_groups, "id": row_id})
            for group in groups[1:]:
                conn.execute(copy, {"g": group, "id": row_id})
        conn.commit()
        split += len(rows)
    return split
