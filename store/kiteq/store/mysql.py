"""The MySQL store: KiteQ's sharded tables on MySQL or MariaDB, written by group commit.

``mysql://user:pw@host:3306?db=kite&shardnum=4&batchUpdateSize=1000&batchDelSize=1000
&flushSeconds=1&maxConn=20`` (every parameter: ``kiteq.store.url.MySQLOptions``). The
layout, the DDL and the routing of ids to databases and tables are in ``_mysql_schema``;
row conversion and SQL in ``_mysql_rows``; the queued-write parts in ``_mysql_writes``.

**Schema.** Created by an explicit command, never silently::

    kiteq-schema 'mysql://root:pw@db:3306?db=kite&shardnum=4'          # create (idempotent)
    kiteq-schema --check 'mysql://root:pw@db:3306?db=kite&shardnum=4'  # exit 1 naming gaps
    python -m kiteq.store.mysql [--check] URL                          # the same

``open`` checks the schema and refuses to start when something is missing or the schema
is older (made before issue #10: the command upgrades it, see ``_mysql_schema``), naming
that command; with ``autoCreate=true`` in the URL it creates or upgrades instead.

**Writes: group commit, one transaction per database.** Each database (shard) has one
writer. Every write call (``save``, ``commit``, ``rollback``, ``reschedule``,
``delete``, ``dead_letter``, ``redrive``, ``append_history``, ``put_meta``) is split by
database and queued; the writer turns everything queued into one transaction and runs it on a worker
thread, while later calls queue for the next one. In a transaction, queued calls keep
their call order where it matters (a delete before a save of the same id stays before
it) and are otherwise grouped into few statements per table:

* saves: one ``executemany`` INSERT, which PyMySQL sends as multi-row INSERTs of up to
  1 MB. Duplicate ids: a unique key violation rolls the transaction back and it is
  replayed after ``SELECT … FOR UPDATE`` finds the stored ids, so one duplicate costs a
  replay and never fails the others;
* commits and rollbacks: the rows are read ``FOR UPDATE``; the undecided ones get one
  ``UPDATE … SET commit = 1 WHERE message_id IN (…)`` (or ``DELETE``), and only the
  first call naming an id gets its record;
* reschedules: one ``UPDATE … SET col = CASE message_id WHEN … END … WHERE message_id
  IN (…)`` per ``batchUpdateSize`` rows (an executemany UPDATE would be one statement
  per row);
* deletes: ``DELETE … WHERE message_id IN (…)`` per ``batchDelSize`` ids;
* dead letters and redrives: rows read ``FOR UPDATE``; a message's dead-letter rows (one
  per (message_id, group_id)) are inserted and its row updated (other groups still have
  it) or deleted in the same transaction; a redrive deletes dead-letter rows and makes
  the groups pending again in the stored row, or inserts the row again for them;
* history events: one ``executemany`` INSERT.

A caller's ``await`` returns when every transaction holding its writes has committed,
so a store-ack (``Saved.STORED``) means COMMIT returned (durable with InnoDB's default
``innodb_flush_log_at_trx_commit=1``). A save spanning databases whose transactions
fail in only one of them reports ``StoreUnavailableError`` for exactly the records of
that database. A record the columns cannot hold (an id longer than 32 characters, a
topic over 255, a body over ``MAX_BODY_BYTES``…) fails alone with a ``StoreError``
before it reaches a transaction. Saves, decisions, redrives and metadata writes start a
transaction at once;
bookkeeping (reschedules, deletes, dead letters, history) may wait up to
``flushSeconds`` (or until ``batchUpdateSize`` / ``batchDelSize`` rows are queued) and
otherwise rides along with the next transaction of its database.

A transaction is retried when nothing of it can have committed: a duplicate key (replayed
as above), a deadlock or lock wait timeout, or a connection lost before COMMIT was sent.
A connection lost during COMMIT makes the outcome unknown: the callers get
``StoreUnavailableError`` (a producer's retry of a save that did commit is a duplicate,
acknowledged without a second dispatch).

**Threads.** Every SQLAlchemy/PyMySQL call runs on the store's own ``ThreadPoolExecutor``
of ``maxConn`` threads, and the connection pool holds ``maxConn`` connections (no
overflow), so a worker never waits for a connection. Connections are pinged on checkout
and recycled hourly, so connections the server dropped are replaced transparently.

**Reads.** ``page_due`` reads the (next_deliver_time, message_id) keys of the 16 slots
in one ``UNION ALL`` over ``idx_recover`` (each branch stops after *limit* keys), then
the rows of the first *limit* keys, both in one snapshot; ``page_uncommitted`` likewise
in id order. ``backlog`` and ``dlq_size``
are counted at open and kept up to date from the writes' row counts. Only rows whose
``kite_server`` is this store's owner (``kiteServer``, by default the host name the
broker stamps) are paged, counted and listed in the DLQ; ``get``, ``commit``,
``rollback``, ``get_dead_letters`` and ``redrive`` address any row by id.

**Takeover.** ``take_over(owner)`` gives this store's owner the rows of another owner
(a dead broker sharing the database; see ``kiteq.handler.takeover``), in batches of
``batchUpdateSize`` rows, one transaction each, idempotent when resumed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import logging
import math
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final, Literal, TypeVar

import pymysql
from sqlalchemy import URL, Connection, Engine, create_engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from kiteq.core.errors import ConfigError, StoreError, StoreUnavailableError
from kiteq.core.message import StoredMessage
from kiteq.store._groups import redrive_groups
from kiteq.store._mysql_rows import (
    _COLUMNS,
    _COMMIT,
    _DEADLOCK,
    _DETAIL_CHARS,
    _DLQ_COLUMNS,
    _DUPLICATE_KEY,
    _HISTORY_COLUMNS,
    _KIND_CHARS,
    _KITE_SERVER,
    _LOCK_WAIT_TIMEOUT,
    _MAX_ATTEMPTS,
    _MAX_FLUSH_BYTES,
    _MAX_NAME,
    _MAX_TIME,
    _PRUNE_CHUNK,
    _READ_CHUNK,
    _REASON_CHARS,
    _RESCHEDULED,
    _ROW_OVERHEAD,
    _T,
    _TOPIC,
    _bookkeeping,
    _chunks,
    _commit_sql,
    _count,
    _dead_letter,
    _delete_meta_sql,
    _delete_sql,
    _groups,
    _insert_sql,
    _marks,
    _problem,
    _record,
    _reschedule_sql,
    _Row,
    _row,
    _select_sql,
    _storable_id,
    _time,
    _Ts,
    page_keys_sql,
    uncommitted_keys_sql,
)
from kiteq.store._mysql_schema import (
    DLQ_COLUMNS,
    DLQ_TABLE,
    HISTORY_COLUMNS,
    HISTORY_TABLE,
    MESSAGE_COLUMNS,
    META_TABLE,
    Layout,
    check_schema,
    create_schema,
)
from kiteq.store._mysql_writes import (
    _Call,
    _Change,
    _CommitPart,
    _DeadLetterPart,
    _DeletePart,
    _DuplicateKeyError,
    _HistoryPart,
    _Kind,
    _Letter,
    _MetaPart,
    _Part,
    _RecordCall,
    _RecordPart,
    _RedrivePart,
    _ReschedulePart,
    _RollbackPart,
    _SaveCall,
    _SaveItem,
    _SavePart,
    _segments,
    _Shard,
    _Transaction,
)
from kiteq.store.base import (
    DeadLetter,
    DlqFilter,
    DlqKey,
    DueCursor,
    HistoryEvent,
    Rescheduled,
    Saved,
    SaveOutcome,
)
from kiteq.store.url import MySQLOptions, mysql_options

_PartT = TypeVar("_PartT", bound=_Part)
_Count = TypeVar("_Count", str, tuple[str, str])
# dead letters per (topic, group)
_DlqCounts = dict[tuple[str, str], int]
# positions of the bookkeeping columns in a MESSAGE_COLUMNS row, in _Bookkeeping order
_BOOKKEEPING: Final = tuple(MESSAGE_COLUMNS.index(c) for c in _RESCHEDULED)
# a dead-letter row read for a move: its primary key first, then DLQ_COLUMNS
_DLQ_ROW: Final = "id, " + _DLQ_COLUMNS
_MESSAGE_ID_AT: Final = 1 + DLQ_COLUMNS.index("message_id")
_GROUP_AT: Final = 1 + DLQ_COLUMNS.index("group_id")
_DEAD_TIME_AT: Final = 1 + DLQ_COLUMNS.index("dead_time")
_DLQ_TOPIC_AT: Final = 1 + DLQ_COLUMNS.index("topic")
_DLQ_OWNER_AT: Final = 1 + DLQ_COLUMNS.index("kite_server")

__all__ = ["MySQLStore", "page_keys_sql", "schema_command", "schema_main"]

logger = logging.getLogger(__name__)


# -- the store -------------------------------------------------------------------------


def _engine(options: MySQLOptions, pool_size: int) -> Engine:
    url = URL.create(
        "mysql+pymysql",
        username=options.user,
        password=options.password or None,
        host=options.host,
        port=options.port,
        query={"charset": "utf8mb4"},
    )
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=options.timeout,
        pool_pre_ping=True,
        pool_recycle=3600,
        # Every connection use ends in COMMIT or in the rollback of Connection.close().
        pool_reset_on_return=None,
        connect_args={
            "connect_timeout": options.timeout,
            "read_timeout": options.timeout,
            "write_timeout": options.timeout,
        },
    )


def _reason(exc: BaseException) -> str:
    """The driver's words for a failure, without the SQL (it would carry bodies)."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    args: tuple[object, ...] = tuple(getattr(orig, "args", ()))
    if len(args) == 2 and isinstance(args[0], int):
        return f"({args[0]}) {args[1]}"
    return str(orig) or type(orig).__name__


def _errno(exc: DBAPIError) -> int | None:
    args = getattr(exc.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def schema_command(options: MySQLOptions) -> str:
    """The command that creates the schema for *options* (a password shows as ***)."""
    auth = f"{options.user}:***@" if options.password else f"{options.user}@"
    host = f"[{options.host}]" if ":" in options.host else options.host
    url = f"mysql://{auth}{host}:{options.port}?db={options.db}&shardnum={options.shardnum}"
    return f"kiteq-schema '{url}' (or: python -m kiteq.store.mysql '{url}')"


class MySQLStore:
    def __init__(self, options: MySQLOptions) -> None:
        self._options = options
        self._layout = layout = Layout(options.db, options.shardnum)
        self._owner = socket.gethostname() if options.kite_server is None else options.kite_server
        self._description = options.description
        self._flush_seconds = options.flush_seconds
        # Built now (no I/O): tests hook engine events before open.
        self._engine = _engine(options, options.max_conn)
        self._executor = ThreadPoolExecutor(
            max_workers=options.max_conn, thread_name_prefix="kiteq-store"
        )

        def name(shard: int, table: str) -> str:
            return f"`{layout.database(shard)}`.`{table}`"

        # [shard][table number] -> `database`.`kite_msg_N`
        self._tables = [
            [name(shard, layout.table_name(t)) for t in range(layout.tables_per_shard)]
            for shard in range(options.shardnum)
        ]
        self._dlq_tables = [name(shard, DLQ_TABLE) for shard in range(options.shardnum)]
        self._history_tables = [name(shard, HISTORY_TABLE) for shard in range(options.shardnum)]
        self._meta = name(0, META_TABLE)
        self._slots = [(slot, self._tables[shard][table]) for slot, shard, table in layout.slots()]
        self._page_sql = page_keys_sql(self._slots)
        self._uncommitted_sql = uncommitted_keys_sql(self._slots)
        self._status: Literal["new", "opening", "open", "closed"] = "new"
        self._opening: asyncio.Future[tuple[dict[str, int], _DlqCounts]] | None = None
        self._closing: asyncio.Future[None] | None = None
        self._shards = [_Shard(i) for i in range(options.shardnum)]
        self._draining = False
        self._drained: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backlog: dict[str, int] = {}
        self._dlq: _DlqCounts = {}
        self._foreign: set[str] = set()
        self._transactions = 0

    @property
    def durable(self) -> bool:
        return True

    @property
    def description(self) -> str:
        return self._description

    @property
    def owner(self) -> str:
        """The ``kite_server`` whose rows this store pages and counts."""
        return self._owner

    @property
    def layout(self) -> Layout:
        return self._layout

    @property
    def write_transactions(self) -> int:
        """Write transactions committed so far: with group commit, far fewer than calls."""
        return self._transactions

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        if self._status == "open":
            return
        if self._status != "new":
            raise self._not_open()
        self._status = "opening"
        self._loop = loop = asyncio.get_running_loop()
        started = time.monotonic()
        self._opening = loop.run_in_executor(self._executor, self._open_sync)
        try:
            backlog, dlq = await asyncio.shield(self._opening)
        except BaseException:
            if self._closing is None:
                self._status = "new"
            raise
        if self._closing is not None:
            raise self._not_open()
        self._backlog, self._dlq = backlog, dlq
        self._status = "open"
        logger.info(
            "store opened %s owner=%s messages=%d dead=%d topics=%d in %.3fs",
            self.description,
            self._owner,
            sum(backlog.values()),
            sum(dlq.values()),
            len(backlog),
            time.monotonic() - started,
        )

    def _open_sync(self) -> tuple[dict[str, int], _DlqCounts]:
        with self._translated("open"), self._engine.connect() as conn:
            if self._options.auto_create:
                created = create_schema(conn, self._layout)
                conn.commit()
                if created:
                    logger.info("store schema created: %s", "; ".join(created))
            problems = check_schema(conn, self._layout)
            if problems:
                shown = "; ".join(problems[:6]) + (
                    f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
                )
                raise StoreUnavailableError(
                    f"{self.description}: the schema is incomplete or from an older "
                    f"version (needs: {shown}); create or upgrade it with "
                    f"{schema_command(self._options)}, or add autoCreate=true to the store URL"
                )
            return self._count(conn), self._count_dead(conn)

    def _count(self, conn: Connection) -> dict[str, int]:
        """Messages of this owner per topic (idx_backlog)."""
        tables = [table for _, table in self._slots]
        sql = " UNION ALL ".join(
            f"(SELECT topic, COUNT(*) FROM {table} WHERE kite_server = %s GROUP BY topic)"  # noqa: S608
            for table in tables
        )
        counts: collections.Counter[str] = collections.Counter()
        for topic, count in conn.exec_driver_sql(sql, (self._owner,) * len(tables)):
            counts[topic] += int(count)
        return dict(counts)

    def _count_dead(self, conn: Connection) -> _DlqCounts:
        """Dead letters of this owner per (topic, group)."""
        tables = self._dlq_tables
        sql = " UNION ALL ".join(
            f"(SELECT topic, group_id, COUNT(*) FROM {table} WHERE kite_server = %s "  # noqa: S608
            "GROUP BY topic, group_id)"
            for table in tables
        )
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for topic, group, count in conn.exec_driver_sql(sql, (self._owner,) * len(tables)):
            counts[(topic, group)] += int(count)
        return dict(counts)

    async def close(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._status = "closed"
        self._draining = True
        for shard in self._shards:
            self._kick(shard)
        if any(shard.busy or shard.pending for shard in self._shards):
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        try:
            if self._opening is not None:
                await asyncio.wait([self._opening])
            await asyncio.get_running_loop().run_in_executor(self._executor, self._engine.dispose)
            logger.info("store closed %s", self.description)
        finally:
            self._executor.shutdown(wait=False)

    # -- writes ----------------------------------------------------------------------

    async def save(self, records: Sequence[StoredMessage]) -> list[SaveOutcome]:
        if not records:
            return []
        if self._status != "open":
            return [self._not_open()] * len(records)
        call = _SaveCall(len(records))
        parts: dict[int, _SavePart] = {}
        route = self._layout.route
        owner = self._owner
        for position, record in enumerate(records):
            message_id = record.message_id
            problem = _problem(record)
            if problem is not None:
                call.outcomes[position] = StoreError(
                    f"{self.description}: message {message_id[:40]!r} not stored: {problem}"
                )
                continue
            shard, table = route(message_id)
            part = parts.get(shard)
            if part is None:
                part = parts[shard] = _SavePart(call, shard)
            owned = record.kite_server == owner
            if not owned:
                self._warn_foreign(record.kite_server)
            item = _SaveItem(position, table, message_id, _row(record), record.topic, owned)
            part.items.append(item)
            part.size += len(record.message.body) + _ROW_OVERHEAD
        for part in parts.values():
            part.rows = len(part.items)
        if parts:
            await self._submit(call, list(parts.values()))
        return call.outcomes

    def _warn_foreign(self, owner: str) -> None:
        if owner not in self._foreign:
            self._foreign.add(owner)
            logger.warning(
                "saving records of kite_server=%r; this store (owner %r) neither redelivers "
                "nor counts them (set kiteServer in the store URL to the broker's name)",
                owner,
                self._owner,
            )

    async def commit(self, message_id: str) -> StoredMessage | None:
        return await self._decide(_CommitPart, message_id)

    async def rollback(self, message_id: str) -> StoredMessage | None:
        return await self._decide(_RollbackPart, message_id)

    async def _decide(
        self, kind: type[_CommitPart | _RollbackPart], message_id: str
    ) -> StoredMessage | None:
        call = _RecordCall(1)
        shard, table = self._layout.route(message_id)
        part = kind(call, shard)
        if _storable_id(message_id):  # any other id cannot be stored: None
            part.items.append((0, table, message_id))
        await self._submit(call, [part] if part.items else [])
        return call.records[0]

    async def redrive(self, keys: Sequence[DlqKey], now: float) -> list[StoredMessage]:
        if not keys:
            self._check_open()
            return []
        call = _RecordCall(len(keys))
        parts: dict[int, _RedrivePart] = {}
        for position, (message_id, group) in enumerate(keys):
            if not _storable_id(message_id):
                continue
            part, table = self._part(
                parts, message_id, lambda shard_: _RedrivePart(call, shard_, now)
            )
            part.items.append((position, table, message_id))
            part.groups.append(group[:_MAX_NAME])
        await self._submit(call, list(parts.values()))
        return [record for record in call.records if record is not None]

    async def reschedule(self, changes: Sequence[Rescheduled]) -> None:
        if not changes:
            return
        call = _Call()
        parts: dict[int, _ReschedulePart] = {}
        for change in changes:
            record = change.record
            if not _storable_id(record.message_id):
                continue
            part, table = self._part(
                parts, record.message_id, lambda shard_: _ReschedulePart(call, shard_)
            )
            part.items.append((table, record.message_id, *_bookkeeping(record)))
        await self._submit(call, self._sized(parts))

    async def delete(self, records: Sequence[StoredMessage]) -> None:
        if not records:
            return
        call = _Call()
        parts: dict[int, _DeletePart] = {}
        for record in records:
            if not _storable_id(record.message_id):
                continue
            part, table = self._part(
                parts, record.message_id, lambda shard_: _DeletePart(call, shard_)
            )
            owned = record.kite_server == self._owner
            part.items.append((table, record.message_id, record.topic, owned))
        await self._submit(call, self._sized(parts))

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        call = _Call()
        parts: dict[int, _DeadLetterPart] = {}
        for letter in letters:
            record = letter.record
            if not _storable_id(record.message_id):
                continue
            part, table = self._part(
                parts, record.message_id, lambda shard_: _DeadLetterPart(call, shard_)
            )
            part.items.append(
                (
                    table,
                    record.message_id,
                    _bookkeeping(record),
                    letter.reason[:_REASON_CHARS],
                    _time(letter.dead_time),
                    letter.group[:_MAX_NAME],
                    letter.keep,
                )
            )
        await self._submit(call, self._sized(parts))

    async def append_history(self, events: Sequence[HistoryEvent]) -> None:
        if not events:
            return
        call = _Call()
        parts: dict[int, _HistoryPart] = {}
        for event in events:
            if not _storable_id(event.message_id):
                continue
            shard, _ = self._layout.route(event.message_id)
            part = parts.get(shard)
            if part is None:
                part = parts[shard] = _HistoryPart(call, shard)
            # cut to the columns' sizes: one odd event must not fail its transaction
            part.items.append(
                (
                    event.message_id,
                    _time(event.time),
                    event.kind[:_KIND_CHARS],
                    event.group[:_MAX_NAME],
                    event.connection[:_MAX_NAME],
                    _count(event.attempt),
                    event.detail[:_DETAIL_CHARS],
                )
            )
        await self._submit(call, self._sized(parts))

    def _part(
        self, parts: dict[int, _PartT], message_id: str, make: Callable[[int], _PartT]
    ) -> tuple[_PartT, int]:
        """The part of *parts* for *message_id*'s database (made when missing), and its table."""
        shard, table = self._layout.route(message_id)
        part = parts.get(shard)
        if part is None:
            part = parts[shard] = make(shard)
        return part, table

    @staticmethod
    def _sized(parts: Mapping[int, _Part]) -> list[_Part]:
        for part in parts.values():
            n = len(getattr(part, "items", ()))
            part.rows = n
            part.size = _ROW_OVERHEAD * (n + 1)
        return list(parts.values())

    async def put_meta(self, key: str, value: bytes | None) -> None:
        call = _Call()
        part = _MetaPart(call, key.encode(), None if value is None else bytes(value))
        part.size += len(part.key) + (0 if value is None else len(value))
        await self._submit(call, [part])

    def _submit(self, call: _Call, parts: list[_Part]) -> asyncio.Future[None]:
        if self._status != "open":
            raise self._not_open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        call.future = future
        call.left = len(parts)
        if not parts:
            future.set_result(None)
        now = loop.time()
        for part in parts:
            part.queued = now
            shard = self._shards[part.shard]
            shard.pending.append(part)
            shard.count(part, 1)
            self._kick(shard)
        return future

    # The writers are chains of callbacks rather than tasks: nothing a caller or the
    # loop's shutdown could cancel halfway, so every queued call is always answered.

    def _kick(self, shard: _Shard) -> None:
        """Start the shard's next transaction if it is due, or arm the flushSeconds timer."""
        if shard.busy or not shard.pending:
            return
        loop = self._event_loop()
        oldest = shard.oldest_deferred()
        if (
            oldest is None
            or shard.urgent > 0
            or self._draining
            or shard.updates >= self._options.batch_update_size
            or shard.deletes >= self._options.batch_del_size
            or loop.time() >= oldest + self._flush_seconds
        ):
            if shard.timer is not None:
                shard.timer.cancel()
                shard.timer = None
            shard.busy = True
            # On the next iteration, so every call made until then joins in.
            loop.call_soon(self._flush, shard)
        elif shard.timer is None:
            shard.timer = loop.call_at(oldest + self._flush_seconds, self._timer_fired, shard)

    def _timer_fired(self, shard: _Shard) -> None:
        shard.timer = None
        self._kick(shard)

    def _take(self, shard: _Shard) -> list[_Part]:
        pending = shard.pending
        parts: list[_Part] = []
        size = 0
        while pending and (not parts or size + pending[0].size <= _MAX_FLUSH_BYTES):
            part = pending.popleft()
            parts.append(part)
            size += part.size
            shard.count(part, -1)
        return parts

    def _flush(self, shard: _Shard) -> None:
        parts = self._take(shard)
        if not parts:
            shard.busy = False
            self._check_drained()
            return
        job = self._event_loop().run_in_executor(
            self._executor, self._flush_sync, shard.index, parts
        )
        job.add_done_callback(functools.partial(self._flushed, shard, parts))

    def _flushed(
        self, shard: _Shard, parts: list[_Part], job: asyncio.Future[_Transaction]
    ) -> None:
        try:
            done = job.result()
        except StoreUnavailableError as exc:
            logger.warning("store write failed shard=%d: %s", shard.index, exc)
            for part in parts:
                part.fail(exc)
        except Exception as exc:
            # _flush_sync translates database failures itself: this is a bug, say so loudly.
            logger.exception("store writer failed %s", self.description)
            error = StoreUnavailableError(f"{self.description}: writer failed: {exc!r}")
            error.__cause__ = exc
            for part in parts:
                part.fail(error)
        else:
            self._transactions += 1
            _apply_counts(self._backlog, done.backlog)
            _apply_counts(self._dlq, done.dlq)
            for part in parts:
                part.succeed()
        shard.busy = False
        self._kick(shard)
        self._check_drained()

    def _check_drained(self) -> None:
        if self._drained is None or self._drained.done():
            return
        if not any(shard.busy or shard.pending for shard in self._shards):
            self._drained.set_result(None)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise self._not_open()
        return self._loop

    # -- the transaction (worker thread) ---------------------------------------------

    def _flush_sync(self, shard: int, parts: list[_Part]) -> _Transaction:
        careful = False
        error: BaseException = RuntimeError("no attempt made")
        for _ in range(_MAX_ATTEMPTS):
            tx = _Transaction()
            for part in parts:
                part.reset()
            try:
                with self._engine.connect() as conn:
                    for segment in _segments(parts):
                        self._apply(conn, shard, [parts[i] for i in segment], tx, careful)
                    tx.committing = True
                    conn.commit()
            except _DuplicateKeyError as exc:
                careful = True
                error = exc.__cause__ or exc
                continue
            except DBAPIError as exc:
                error = exc
                if _errno(exc) in (_DEADLOCK, _LOCK_WAIT_TIMEOUT) or (
                    exc.connection_invalidated and not tx.committing
                ):
                    logger.info("store write retried shard=%d: %s", shard, _reason(exc))
                    continue
                raise self._unavailable("write", exc) from exc
            except (SQLAlchemyError, pymysql.Error, OSError) as exc:
                raise self._unavailable("write", exc) from exc
            return tx
        raise self._unavailable(f"write (gave up after {_MAX_ATTEMPTS} attempts)", error) from error

    def _apply(
        self, conn: Connection, shard: int, parts: list[_Part], tx: _Transaction, careful: bool
    ) -> None:
        """One run of ``_segments``: every kind of write, in ``_Kind`` order."""
        kinds = {part.kind for part in parts}
        if _Kind.SAVE in kinds:
            saves = [p for p in parts if isinstance(p, _SavePart)]
            self._apply_saves(conn, shard, saves, tx, careful)
        if _Kind.REDRIVE in kinds:
            self._apply_redrives(conn, shard, [p for p in parts if isinstance(p, _RedrivePart)], tx)
        if _Kind.COMMIT in kinds:
            commits = [p for p in parts if isinstance(p, _CommitPart)]
            self._apply_decisions(conn, shard, commits, tx, commit=True)
        if _Kind.ROLLBACK in kinds:
            rollbacks = [p for p in parts if isinstance(p, _RollbackPart)]
            self._apply_decisions(conn, shard, rollbacks, tx, commit=False)
        if _Kind.RESCHEDULE in kinds:
            changes = [p for p in parts if isinstance(p, _ReschedulePart)]
            self._apply_reschedules(conn, shard, changes)
        if _Kind.DEAD_LETTER in kinds:
            letters = [p for p in parts if isinstance(p, _DeadLetterPart)]
            self._apply_dead_letters(conn, shard, letters, tx)
        if _Kind.DELETE in kinds:
            self._apply_deletes(conn, shard, [p for p in parts if isinstance(p, _DeletePart)], tx)
        if _Kind.HISTORY in kinds:
            self._apply_history(conn, shard, [p for p in parts if isinstance(p, _HistoryPart)])
        if _Kind.META in kinds:
            self._apply_metas(conn, [p for p in parts if isinstance(p, _MetaPart)])

    def _apply_saves(
        self,
        conn: Connection,
        shard: int,
        saves: list[_SavePart],
        tx: _Transaction,
        careful: bool,
    ) -> None:
        by_table: dict[int, list[tuple[_SavePart, int, _SaveItem]]] = {}
        seen: set[str] = set()
        for part in saves:
            for k, item in enumerate(part.items):
                if item.message_id in seen:
                    continue  # repeated in this transaction: the first one wins
                seen.add(item.message_id)
                by_table.setdefault(item.table, []).append((part, k, item))
        for table, entries in by_table.items():
            name = self._tables[shard][table]
            stored: set[str] = set()
            if careful:
                stored = self._locked_ids(conn, name, [item.message_id for _, _, item in entries])
            rows: list[_Row] = []
            for part, k, item in entries:
                if item.message_id in stored:
                    continue
                rows.append(item.row)
                part.outcomes[k] = Saved.STORED
                if item.owned:
                    tx.backlog[item.topic] += 1
            if not rows:
                continue
            try:
                conn.exec_driver_sql(_insert_sql(name, _COLUMNS, len(MESSAGE_COLUMNS)), rows)
            except DBAPIError as exc:
                if not careful and _errno(exc) == _DUPLICATE_KEY:
                    raise _DuplicateKeyError from exc
                raise

    def _locked_ids(self, conn: Connection, table: str, ids: Sequence[str]) -> set[str]:
        """Which of *ids* are stored in *table*, locking them (and the gaps) until COMMIT."""
        return set(self._locked_rows(conn, table, "message_id", ids))

    def _locked_rows(
        self, conn: Connection, table: str, columns: str, ids: Sequence[str]
    ) -> dict[str, _Row]:
        """Map each stored id of *ids* to its *columns* (message_id first), locked."""
        found: dict[str, _Row] = {}
        for chunk in _chunks(ids, _READ_CHUNK):
            sql = _select_sql(table, columns, len(chunk), lock=True)
            for row in conn.exec_driver_sql(sql, tuple(chunk)):
                found[row[0]] = tuple(row)
        return found

    def _delete_ids(self, conn: Connection, table: str, ids: Sequence[str]) -> int:
        deleted = 0
        for chunk in _chunks(ids, self._options.batch_del_size):
            deleted += conn.exec_driver_sql(_delete_sql(table, len(chunk)), tuple(chunk)).rowcount
        return deleted

    def _locked_dead(self, conn: Connection, dlq: str, ids: Sequence[str]) -> list[_Row]:
        """The dead-letter rows (``_DLQ_ROW``) of the messages *ids*, locked until COMMIT."""
        found: list[_Row] = []
        for chunk in _chunks(ids, _READ_CHUNK):
            sql = _select_sql(dlq, _DLQ_ROW, len(chunk), lock=True)
            found += (tuple(row) for row in conn.exec_driver_sql(sql, tuple(chunk)))
        return found

    def _delete_dead(
        self, conn: Connection, dlq: str, rows: Sequence[_Row], tx: _Transaction
    ) -> None:
        """Delete dead-letter rows read by ``_locked_dead``, by primary key, and uncount them."""
        for chunk in _chunks(rows, self._options.batch_del_size):
            conn.exec_driver_sql(
                f"DELETE FROM {dlq} WHERE id IN ({_marks(len(chunk))})",  # noqa: S608
                tuple(row[0] for row in chunk),
            )
        for row in rows:
            if row[_DLQ_OWNER_AT] == self._owner:
                tx.dlq[(row[_DLQ_TOPIC_AT], row[_GROUP_AT])] -= 1

    def _apply_redrives(
        self, conn: Connection, shard: int, redrives: list[_RedrivePart], tx: _Transaction
    ) -> None:
        # id -> (table, now) of its first key in this run: later keys of a message join
        # its redrive, keys repeated find no dead letter left
        first: dict[str, tuple[int, float]] = {}
        # key -> (call, position) of each call naming it
        wanted: dict[DlqKey, list[tuple[_RedrivePart, int]]] = {}
        for part in redrives:
            for (position, table, message_id), group in zip(part.items, part.groups, strict=True):
                first.setdefault(message_id, (table, part.now))
                wanted.setdefault((message_id, group), []).append((part, position))
        dlq = self._dlq_tables[shard]
        dead = [
            row
            for row in self._locked_dead(conn, dlq, list(first))
            if (row[_MESSAGE_ID_AT], row[_GROUP_AT]) in wanted
        ]
        if not dead:
            return
        self._delete_dead(conn, dlq, dead, tx)
        # id -> (its latest dead-letter row, the groups redriven)
        revived: dict[str, tuple[_Row, list[str]]] = {}
        # id -> each call that redrove one of its letters, at its first such key
        answers: dict[str, dict[_RedrivePart, int]] = {}
        for row in dead:
            message_id = row[_MESSAGE_ID_AT]
            for part, position in wanted[(message_id, row[_GROUP_AT])]:
                found = answers.setdefault(message_id, {})
                found[part] = min(position, found.get(part, position))
            latest, groups = revived.get(message_id, (row, []))
            groups.append(row[_GROUP_AT])
            # the latest letter has the latest state of the message's other groups
            revived[message_id] = (
                row if row[_DEAD_TIME_AT] >= latest[_DEAD_TIME_AT] else latest,
                groups,
            )
        by_table: dict[int, list[str]] = {}
        for message_id in revived:
            by_table.setdefault(first[message_id][0], []).append(message_id)
        for table, ids in by_table.items():
            name = self._tables[shard][table]
            live = self._locked_rows(conn, name, _COLUMNS, ids)
            rows: list[_Row] = []
            updates: list[tuple[object, ...]] = []
            for message_id in ids:
                latest, groups = revived[message_id]
                _, now = first[message_id]
                stored = live.get(message_id)
                record = _record(stored) if stored is not None else _dead_letter(latest[1:]).record
                redrive_groups(record, groups, now, still_stored=stored is not None)
                if stored is None:
                    rows.append(_row(record))
                    if record.kite_server == self._owner:
                        tx.backlog[record.topic] += 1
                else:
                    updates.append((*_bookkeeping(record), record.message.expired_time, message_id))
                if record.message.commit:
                    for part, position in answers[message_id].items():
                        part.found[position] = record
            if rows:
                conn.exec_driver_sql(_insert_sql(name, _COLUMNS, len(MESSAGE_COLUMNS)), rows)
            if updates:
                sets = ", ".join(f"`{c}` = %s" for c in (*_RESCHEDULED, "expired_time"))
                conn.exec_driver_sql(
                    f"UPDATE {name} SET {sets} WHERE message_id = %s",  # noqa: S608
                    updates,
                )

    def _apply_decisions(
        self,
        conn: Connection,
        shard: int,
        parts: Sequence[_RecordPart],
        tx: _Transaction,
        *,
        commit: bool,
    ) -> None:
        """Commit (or roll back) the uncommitted ones among the parts' ids.

        Only the first call of the run that names an id gets its record: a repeated
        decision finds it decided and gets None.
        """
        first: dict[str, tuple[int, _RecordPart, int]] = {}
        for part in parts:
            for position, table, message_id in part.items:
                first.setdefault(message_id, (table, part, position))
        by_table: dict[int, list[str]] = {}
        for message_id, (table, _, _) in first.items():
            by_table.setdefault(table, []).append(message_id)
        for table, ids in by_table.items():
            name = self._tables[shard][table]
            stored = self._locked_rows(conn, name, _COLUMNS, ids)
            undecided = [mid for mid, row in stored.items() if not row[_COMMIT]]
            if not undecided:
                continue
            if commit:
                for chunk in _chunks(undecided, self._options.batch_update_size):
                    conn.exec_driver_sql(_commit_sql(name, len(chunk)), tuple(chunk))
            else:
                self._delete_ids(conn, name, undecided)
            for message_id in undecided:
                row = list(stored[message_id])
                if commit:
                    row[_COMMIT] = 1
                elif row[_KITE_SERVER] == self._owner:
                    tx.backlog[row[_TOPIC]] -= 1
                _, part, position = first[message_id]
                part.found[position] = _record(tuple(row))

    def _apply_reschedules(
        self, conn: Connection, shard: int, parts: list[_ReschedulePart]
    ) -> None:
        latest: dict[str, _Change] = {}
        for part in parts:
            for item in part.items:
                latest[item[1]] = item  # the last change of an id wins
        by_table: dict[int, list[_Change]] = {}
        for item in latest.values():
            by_table.setdefault(item[0], []).append(item)
        for table, items in by_table.items():
            self._update_bookkeeping(conn, self._tables[shard][table], items)

    def _update_bookkeeping(self, conn: Connection, name: str, items: Sequence[_Change]) -> None:
        """Write the bookkeeping columns of *items* (one id each).

        ``batchUpdateSize`` rows per statement.
        """
        columns = range(2, 2 + len(_RESCHEDULED))
        for chunk in _chunks(items, self._options.batch_update_size):
            params: list[object] = []
            for column in columns:
                for item in chunk:
                    params += (item[1], item[column])
            params += (item[1] for item in chunk)
            conn.exec_driver_sql(_reschedule_sql(name, len(chunk)), tuple(params))

    def _apply_dead_letters(
        self, conn: Connection, shard: int, parts: list[_DeadLetterPart], tx: _Transaction
    ) -> None:
        # id -> its letters in call order; table of the id
        letters: dict[str, list[_Letter]] = {}
        for part in parts:
            for item in part.items:
                letters.setdefault(item[1], []).append(item)
        by_table: dict[int, list[str]] = {}
        for message_id, mine in letters.items():
            by_table.setdefault(mine[0][0], []).append(message_id)
        dlq = self._dlq_tables[shard]
        for table, ids in by_table.items():
            name = self._tables[shard][table]
            live = self._locked_rows(conn, name, _COLUMNS, ids)
            if not live:
                continue
            keys: set[DlqKey] = {
                (message_id, item[5]) for message_id in live for item in letters[message_id]
            }
            # a letter of a key already there (say, an id saved again) replaces it
            replaced = [
                row
                for row in self._locked_dead(conn, dlq, list(live))
                if (row[_MESSAGE_ID_AT], row[_GROUP_AT]) in keys
            ]
            self._delete_dead(conn, dlq, replaced, tx)
            rows: list[_Row] = []
            kept: list[_Change] = []
            removed: list[str] = []
            for message_id, stored in live.items():
                mine = letters[message_id]
                owned = stored[_KITE_SERVER] == self._owner
                # the last letter of a key wins
                final = {item[5]: item for item in mine}
                for _, _, bookkeeping, reason, dead_time, group, _ in final.values():
                    row = list(stored)
                    # The caller's bookkeeping is the latest (as in reschedule); the message
                    # and its committed flag are the stored ones.
                    for at, value in zip(_BOOKKEEPING, bookkeeping, strict=True):
                        row[at] = value
                    rows.append((*row, reason, dead_time, _groups([group] if group else ()), group))
                    if owned:
                        tx.dlq[(stored[_TOPIC], group)] += 1
                last = mine[-1]
                if last[6]:
                    kept.append((table, message_id, *last[2]))
                else:
                    removed.append(message_id)
                    if owned:
                        tx.backlog[stored[_TOPIC]] -= 1
            conn.exec_driver_sql(_insert_sql(dlq, _DLQ_COLUMNS, len(DLQ_COLUMNS)), rows)
            if kept:
                self._update_bookkeeping(conn, name, kept)
            if removed:
                self._delete_ids(conn, name, removed)

    def _apply_deletes(
        self, conn: Connection, shard: int, parts: list[_DeletePart], tx: _Transaction
    ) -> None:
        groups: dict[tuple[int, str, bool], dict[str, None]] = {}
        seen: set[str] = set()
        for part in parts:
            for table, message_id, topic, owned in part.items:
                if message_id not in seen:
                    seen.add(message_id)
                    groups.setdefault((table, topic, owned), {})[message_id] = None
        for (table, topic, owned), ids in groups.items():
            deleted = self._delete_ids(conn, self._tables[shard][table], list(ids))
            if owned:
                tx.backlog[topic] -= deleted

    def _apply_history(self, conn: Connection, shard: int, parts: list[_HistoryPart]) -> None:
        rows = [row for part in parts for row in part.items]
        table = self._history_tables[shard]
        conn.exec_driver_sql(_insert_sql(table, _HISTORY_COLUMNS, len(HISTORY_COLUMNS)), rows)

    def _apply_metas(self, conn: Connection, parts: list[_MetaPart]) -> None:
        final: dict[bytes, bytes | None] = {}
        for part in parts:
            final.pop(part.key, None)  # keep call order among keys
            final[part.key] = part.value
        puts = [(k, v) for k, v in final.items() if v is not None]
        gone = [k for k, v in final.items() if v is None]
        if puts:
            conn.exec_driver_sql(
                f"INSERT INTO {self._meta} (meta_key, meta_value) VALUES (%s, %s) "  # noqa: S608
                "ON DUPLICATE KEY UPDATE meta_value = VALUES(meta_value)",
                puts,
            )
        for chunk in _chunks(gone, _READ_CHUNK):
            conn.exec_driver_sql(_delete_meta_sql(self._meta, len(chunk)), tuple(chunk))

    # -- reads -----------------------------------------------------------------------

    async def get(self, message_id: str) -> StoredMessage | None:
        self._check_open()
        shard, table = self._layout.route(message_id)
        sql = _select_sql(self._tables[shard][table], _COLUMNS, 1)

        def read(conn: Connection) -> StoredMessage | None:
            row = conn.exec_driver_sql(sql, (message_id,)).first()
            return None if row is None else _record(tuple(row))

        return await self._run(self._read_sync, "get", read)

    async def page_due(
        self, now: float, limit: int, after: DueCursor | None = None
    ) -> list[StoredMessage]:
        self._check_open()
        if limit <= 0 or math.isnan(now):
            return []
        now = min(now, _MAX_TIME)
        cursor = (-1.0, "") if after is None else (_time(after[0]), after[1])
        params = (self._owner, now, cursor[0], cursor[0], cursor[1], limit) * len(self._slots)
        sql = self._page_sql
        slots = dict(self._slots)

        def read(conn: Connection) -> list[StoredMessage]:
            # Both statements in one transaction: one consistent snapshot.
            keys = conn.exec_driver_sql(sql, (*params, limit)).all()
            return self._fetch(conn, slots, [(mid, int(slot)) for _, mid, slot in keys])

        return await self._run(self._read_sync, "page_due", read)

    async def page_uncommitted(self, limit: int, after: str | None = None) -> list[StoredMessage]:
        self._check_open()
        if limit <= 0:
            return []
        params = (self._owner, after or "", limit) * len(self._slots) + (limit,)
        sql = self._uncommitted_sql
        slots = dict(self._slots)

        def read(conn: Connection) -> list[StoredMessage]:
            keys = conn.exec_driver_sql(sql, params).all()
            return self._fetch(conn, slots, [(mid, int(slot)) for mid, slot in keys])

        return await self._run(self._read_sync, "page_uncommitted", read)

    @staticmethod
    def _fetch(
        conn: Connection, slots: Mapping[int, str], keys: Sequence[tuple[str, int]]
    ) -> list[StoredMessage]:
        """The records of *keys* (id, slot), in their order, read in one statement."""
        if not keys:
            return []
        by_slot: dict[int, list[str]] = {}
        for message_id, slot in keys:
            by_slot.setdefault(slot, []).append(message_id)
        fetch = " UNION ALL ".join(
            f"({_select_sql(slots[slot], _COLUMNS, len(ids))})" for slot, ids in by_slot.items()
        )
        values = tuple(mid for ids in by_slot.values() for mid in ids)
        rows = {row[0]: tuple(row) for row in conn.exec_driver_sql(fetch, values)}
        return [_record(rows[mid]) for mid, _ in keys if mid in rows]

    async def backlog(self) -> dict[str, int]:
        self._check_open()
        return dict(self._backlog)

    async def dlq_size(self) -> dict[tuple[str, str], int]:
        self._check_open()
        return dict(self._dlq)

    async def list_dlq(
        self, where: DlqFilter, limit: int, after: DlqKey | None = None
    ) -> list[DeadLetter]:
        self._check_open()
        if limit <= 0:
            return []
        conditions = ["kite_server = %s"]
        values: list[object] = [self._owner]
        if after is not None:
            # the first condition is the range idx_dlq is scanned over
            conditions.append("message_id >= %s AND (message_id > %s OR group_id > %s)")
            values += (after[0], after[0], after[1])
        for column, value in (
            ("topic", where.topic),
            ("message_type", where.message_type),
            ("dead_reason", where.reason),
            ("group_id", where.group),
        ):
            if value:
                conditions.append(f"`{column}` = %s")
                values.append(value)
        condition = " AND ".join(conditions)
        order = "ORDER BY message_id, group_id LIMIT %s"
        branch = "(SELECT {columns} FROM {table} WHERE {condition} {order})"
        sql = (
            " UNION ALL ".join(
                branch.format(columns=_DLQ_COLUMNS, table=table, condition=condition, order=order)
                for table in self._dlq_tables
            )
            + f" {order}"
        )
        params = (*values, limit) * len(self._dlq_tables) + (limit,)

        def read(conn: Connection) -> list[DeadLetter]:
            return [_dead_letter(tuple(row)) for row in conn.exec_driver_sql(sql, params)]

        return await self._run(self._read_sync, "list_dlq", read)

    async def get_dead_letters(self, message_id: str) -> list[DeadLetter]:
        self._check_open()
        shard, _ = self._layout.route(message_id)
        sql = (
            f"SELECT {_DLQ_COLUMNS} FROM {self._dlq_tables[shard]} "  # noqa: S608
            "WHERE message_id = %s ORDER BY group_id"
        )

        def read(conn: Connection) -> list[DeadLetter]:
            return [_dead_letter(tuple(row)) for row in conn.exec_driver_sql(sql, (message_id,))]

        return await self._run(self._read_sync, "get_dead_letters", read)

    async def get_history(self, message_id: str) -> list[HistoryEvent]:
        self._check_open()
        shard, _ = self._layout.route(message_id)
        sql = (
            f"SELECT {_HISTORY_COLUMNS} FROM {self._history_tables[shard]} "  # noqa: S608
            "WHERE message_id = %s ORDER BY event_time, seq"
        )

        def read(conn: Connection) -> list[HistoryEvent]:
            return [
                HistoryEvent(mid, event_time, kind, group, connection, attempt, detail)
                for mid, event_time, kind, group, connection, attempt, detail in conn.exec_driver_sql(
                    sql, (message_id,)
                )
            ]

        return await self._run(self._read_sync, "get_history", read)

    async def prune_history(self, before: float) -> int:
        """Removes in chunks of its own transactions, beside the write queues."""
        self._check_open()
        if not before > 0.0:
            return 0
        before = min(before, _MAX_TIME)
        return await self._run(self._prune_sync, before)

    def _prune_sync(self, before: float) -> int:
        removed = 0
        for table in self._history_tables:
            sql = f"DELETE FROM {table} WHERE event_time < %s LIMIT {_PRUNE_CHUNK}"  # noqa: S608
            while True:

                def chunk(conn: Connection, sql: str = sql) -> int:
                    deleted = conn.exec_driver_sql(sql, (before,)).rowcount
                    conn.commit()
                    return deleted

                deleted = self._read_sync("prune_history", chunk)
                removed += deleted
                if deleted < _PRUNE_CHUNK:
                    break
        return removed

    async def get_meta(self, prefix: str) -> Mapping[str, bytes]:
        self._check_open()
        raw = prefix.encode()
        pattern = raw.replace(b"!", b"!!").replace(b"%", b"!%").replace(b"_", b"!_") + b"%"
        sql = f"SELECT meta_key, meta_value FROM {self._meta} WHERE meta_key LIKE %s ESCAPE '!'"  # noqa: S608

        def read(conn: Connection) -> dict[str, bytes]:
            return {
                bytes(key).decode(): bytes(value)
                for key, value in conn.exec_driver_sql(sql, (pattern,))
            }

        return await self._run(self._read_sync, "get_meta", read)

    async def take_over(self, owner: str) -> int:
        """Backlog takeover: ``kite_server = owner`` rows become this store's owner's.

        Every message table and every DLQ table, ``batchUpdateSize`` rows per
        transaction (``SELECT … LIMIT n FOR UPDATE`` on ``idx_recover`` / ``idx_dlq``, then
        ``UPDATE … SET kite_server = me WHERE kite_server = owner AND message_id IN
        (…)``), beside the write queues. Each batch commits on its own, so an
        interrupted takeover leaves every row with exactly one owner and a second call
        moves the rest; two stores taking over the same owner at once never move a row
        twice (the row lock and the ``kite_server`` condition). ``backlog`` and
        ``dlq_size`` count the moved rows when this returns.
        """
        self._check_open()
        if owner == self._owner:
            return 0
        loop = self._event_loop()
        moved, dead = await self._run(self._take_over_sync, owner, loop)
        if moved or dead:
            logger.info(
                "took over kite_server=%r: messages=%d dead=%d (now owner %r)",
                owner,
                moved,
                dead,
                self._owner,
            )
        return moved + dead

    def _take_over_sync(self, owner: str, loop: asyncio.AbstractEventLoop) -> tuple[int, int]:
        """(messages, dead letters) moved; each batch's counts are applied once committed."""
        moved = sum(
            self._take_over_table(owner, loop, table, "message_id", "topic", self._backlog)
            for _, table in self._slots
        )
        # by primary key: a batch may end between two dead letters of one message
        dead = sum(
            self._take_over_table(owner, loop, table, "id", "topic, group_id", self._dlq)
            for table in self._dlq_tables
        )
        return moved, dead

    def _take_over_table(
        self,
        owner: str,
        loop: asyncio.AbstractEventLoop,
        table: str,
        key: str,
        counted: str,
        counts: dict[_Count, int],
    ) -> int:
        """Move *table*'s rows of *owner* in batches by *key*; how many.

        *counted* names the columns of the counts' keys (one: a str, two: a tuple).
        """
        size = max(1, self._options.batch_update_size)
        select = (
            f"SELECT {key}, {counted} FROM {table} WHERE kite_server = %s "  # noqa: S608
            f"LIMIT {size} FOR UPDATE"
        )
        update = f"UPDATE {table} SET kite_server = %s WHERE kite_server = %s AND {key} IN "  # noqa: S608

        def batch(conn: Connection) -> _Row:
            found: _Row = tuple(conn.exec_driver_sql(select, (owner,)).all())
            if found:
                conn.exec_driver_sql(
                    f"{update}({_marks(len(found))})",
                    (self._owner, owner, *(row[0] for row in found)),
                )
            conn.commit()
            return found

        total = 0
        while True:
            rows = self._retried_sync("take_over", batch)
            if rows:
                keys = [row[1] if len(row) == 2 else tuple(row[1:]) for row in rows]
                # on the loop (FIFO: before this call returns), even if a later batch fails
                loop.call_soon_threadsafe(_apply_counts, counts, dict(collections.Counter(keys)))
                total += len(rows)
            if len(rows) < size:
                return total

    def _retried_sync(self, action: str, work: Callable[[Connection], _T]) -> _T:
        """``_read_sync``, also retried on a deadlock or a lock wait timeout."""
        for attempt in range(_MAX_ATTEMPTS):
            try:
                return self._read_sync(action, work)
            except StoreUnavailableError as exc:
                cause = exc.__cause__
                if (
                    attempt + 1 < _MAX_ATTEMPTS
                    and isinstance(cause, DBAPIError)
                    and _errno(cause) in (_DEADLOCK, _LOCK_WAIT_TIMEOUT)
                ):
                    logger.info("store %s retried: %s", action, _reason(cause))
                    continue
                raise
        raise AssertionError("unreachable")

    def _read_sync(self, action: str, read: Callable[[Connection], _T]) -> _T:
        """Run *read* on a pooled connection; once more on a fresh one if it was dropped."""
        for attempt in range(2):
            try:
                with self._engine.connect() as conn:
                    return read(conn)
            except DBAPIError as exc:
                if attempt == 0 and exc.connection_invalidated:
                    continue
                raise self._unavailable(action, exc) from exc
            except (SQLAlchemyError, pymysql.Error, OSError) as exc:
                raise self._unavailable(action, exc) from exc
        raise AssertionError("unreachable")

    # -- plumbing --------------------------------------------------------------------

    async def _run(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _not_open(self) -> StoreUnavailableError:
        state = {"closed": "closed", "opening": "still opening"}.get(self._status, "not open")
        return StoreUnavailableError(f"{self.description} is {state}")

    def _check_open(self) -> None:
        if self._status != "open":
            raise self._not_open()

    def _unavailable(self, action: str, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(f"{self.description}: {action} failed: {_reason(exc)}")

    @contextlib.contextmanager
    def _translated(self, action: str) -> Iterator[None]:
        """Database failures outside the write and read paths become one error type."""
        try:
            yield
        except StoreUnavailableError:
            raise
        except (SQLAlchemyError, pymysql.Error, OSError) as exc:
            raise self._unavailable(action, exc) from exc


def _apply_counts(counts: dict[_Count, int], deltas: Mapping[_Count, int]) -> None:
    for key, delta in deltas.items():
        if not delta:
            continue
        count = counts.get(key, 0) + delta
        if count > 0:
            counts[key] = count
        else:
            counts.pop(key, None)


# -- the schema command ------------------------------------------------------------------


def schema_main(argv: Sequence[str] | None = None) -> int:
    """``kiteq-schema [--check] URL``: create (idempotent) or check the MySQL schema.

    Exit status: 0 complete, 1 something is missing (named) or the server failed,
    2 bad arguments or URL.
    """
    parser = argparse.ArgumentParser(
        prog="kiteq-schema",
        description="Create the MySQL store's databases, tables and indexes (idempotent), "
        "or with --check only verify them.",
    )
    parser.add_argument("url", help="the store URL, as in the cluster's db setting")
    parser.add_argument(
        "--check", action="store_true", help="only check; exit 1 naming what is missing"
    )
    args = parser.parse_args(argv)
    out, err = sys.stdout, sys.stderr
    try:
        options = mysql_options(args.url)
    except ConfigError as exc:
        err.write(f"kiteq-schema: {exc}\n")
        return 2
    layout = Layout(options.db, options.shardnum)
    engine = _engine(options, 1)
    try:
        with engine.connect() as conn:
            created: list[str] = []
            if not args.check:
                created = create_schema(conn, layout)
                conn.commit()
            problems = check_schema(conn, layout)
    except (SQLAlchemyError, pymysql.Error, OSError) as exc:
        err.write(f"kiteq-schema: {options.description}: {_reason(exc)}\n")
        return 1
    finally:
        engine.dispose()
    for line in created:
        out.write(f"{line}\n" if line.startswith("upgrade") else f"created {line}\n")
    if problems:
        for line in problems:
            err.write(f"{line}\n" if line.startswith("upgrade") else f"missing {line}\n")
        hint = (
            ""
            if args.check
            else " (existing tables are altered only to upgrade a schema from before issue #10)"
        )
        err.write(f"kiteq-schema: schema incomplete: {len(problems)} problem(s){hint}\n")
        return 1
    out.write(
        f"schema complete: {options.shardnum} database(s) {', '.join(layout.databases())}, "
        f"{len(layout.expected_tables())} tables\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(schema_main())
