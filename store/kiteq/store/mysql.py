"""The MySQL store: KiteQ's sharded tables on MySQL or MariaDB, written by group commit.

``mysql://user:pw@host:3306?db=kite&shardnum=4&batchUpdateSize=1000&batchDelSize=1000
&flushSeconds=1&maxConn=20`` (every parameter: ``kiteq.store.options.MySQLOptions``). The
layout, the DDL and the routing of ids to databases and tables are in ``_mysql_schema``;
row conversion and SQL in ``_mysql_rows``; the engine and its errors in ``_mysql_engine``;
the write requests, each applying itself, in ``_mysql_requests`` and
``_mysql_dlq_requests``; the transactions in ``_mysql_writer`` (on ``_mysql_tx``); the
reads and the takeover in ``_mysql_reads``; the schema command in ``_mysql_admin``. This
module is the store those parts make.

**Schema.** Created by an explicit command, never silently::

    kiteq-schema 'mysql://root:pw@db:3306?db=kite&shardnum=4'          # create (idempotent)
    kiteq-schema --check 'mysql://root:pw@db:3306?db=kite&shardnum=4'  # exit 1 naming gaps
    python -m kiteq.store.mysql [--check] URL                          # the same

``open`` checks the schema and refuses to start when something is missing or the schema
is older (made before issue #10: the command upgrades it, see ``_mysql_schema``), naming
that command; with ``autoCreate=true`` in the URL it creates or upgrades instead.

**Writes: group commit, one transaction per database.** Each database (shard) has one
writer (``kiteq.store.group_commit``). Every write call (``save``, ``commit``, ``rollback``, ``reschedule``,
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

import asyncio
import functools
import logging
import math
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from kiteq.core.errors import StoreError, StoreUnavailableError
from kiteq.core.message import StoredMessage
from kiteq.store import base
from kiteq.store._mysql_admin import ensure_schema, schema_command, schema_main
from kiteq.store._mysql_dlq_requests import DeadLetterPart, RedrivePart
from kiteq.store._mysql_engine import Database, engine
from kiteq.store._mysql_reads import Counts, Reads
from kiteq.store._mysql_requests import (
    Call,
    CommitPart,
    DeletePart,
    HistoryPart,
    MetaPart,
    Part,
    RecordCall,
    ReschedulePart,
    RollbackPart,
    SaveCall,
    SaveItem,
    SavePart,
    UrgentDeletePart,
    UrgentReschedulePart,
)
from kiteq.store._mysql_rows import (
    _DETAIL_CHARS,
    _KIND_CHARS,
    _MAX_FLUSH_BYTES,
    _MAX_NAME,
    _MAX_TIME,
    _REASON_CHARS,
    _ROW_OVERHEAD,
    _bookkeeping,
    _count,
    _problem,
    _row,
    _storable_id,
    _time,
    _Ts,
    page_keys_sql,
)
from kiteq.store._mysql_schema import Layout
from kiteq.store._mysql_tx import ShardTx, Tables
from kiteq.store._mysql_writer import ShardDeferral, ShardWriter
from kiteq.store._state import CountedStore, Lifecycle, Status, add_counts
from kiteq.store.group_commit import GroupCommitWriter
from kiteq.store.options import MySQLOptions

__all__ = ["MySQLStore", "page_keys_sql", "schema_command", "schema_main"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_PartT = TypeVar("_PartT", bound=Part)


class MySQLStore(CountedStore):
    def __init__(self, options: MySQLOptions) -> None:
        self._options = options
        self._layout = layout = Layout(options.db, options.shardnum)
        self._owner = socket.gethostname() if options.kite_server is None else options.kite_server
        self._state = Lifecycle(options.description)
        # Built now (no I/O): tests hook engine events before open.
        self._engine = engine(options, options.max_conn)
        self._executor = ThreadPoolExecutor(
            max_workers=options.max_conn, thread_name_prefix="kiteq-store"
        )
        self._database = database = Database(self._engine, options.description)
        tables = Tables(layout)
        self._slots = tables.slots
        self._reads = Reads(database, layout, tables, self._owner)
        shards = ShardWriter(
            database, tables, self._owner, (options.batch_update_size, options.batch_del_size)
        )
        self._writers = [
            GroupCommitWriter[Part, ShardTx](
                executor=self._executor,
                write=functools.partial(shards.write, shard),
                written=self._written,
                failed=self._failed,
                max_bytes=_MAX_FLUSH_BYTES,
                name=f"{options.description} shard={shard}",
                deferral=ShardDeferral(
                    options.batch_update_size, options.batch_del_size, options.flush_seconds
                ),
            )
            for shard in range(options.shardnum)
        ]
        self._opening: asyncio.Future[Counts] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backlog: dict[str, int] = {}
        self._dlq: dict[tuple[str, str], int] = {}
        self._foreign: set[str] = set()
        self._transactions = 0

    @property
    def owner(self) -> str:
        """The ``kite_server`` whose rows this store pages and counts."""
        return self._owner

    @property
    def write_transactions(self) -> int:
        """Write transactions committed so far: with group commit, far fewer than calls."""
        return self._transactions

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        if not self._state.begin_open():
            return
        self._loop = loop = asyncio.get_running_loop()
        started = time.monotonic()
        self._opening = loop.run_in_executor(self._executor, self._open_sync)
        self._backlog, self._dlq = await self._state.opened(self._opening)
        logger.info(
            "store opened %s owner=%s messages=%d dead=%d topics=%d in %.3fs",
            self.description,
            self._owner,
            sum(self._backlog.values()),
            sum(self._dlq.values()),
            len(self._backlog),
            time.monotonic() - started,
        )

    def _open_sync(self) -> Counts:
        with self._database.translated("open"), self._engine.connect() as conn:
            ensure_schema(conn, self._layout, self._options)
            return self._reads.counts(conn)

    async def close(self) -> None:
        await self._state.close(self._close)

    async def _close(self) -> None:
        await asyncio.gather(*(writer.drain() for writer in self._writers))
        try:
            if self._opening is not None:
                await asyncio.wait([self._opening])
            await asyncio.get_running_loop().run_in_executor(self._executor, self._engine.dispose)
            logger.info("store closed %s", self.description)
        finally:
            self._executor.shutdown(wait=False)

    # -- writes ----------------------------------------------------------------------

    async def save(self, records: Sequence[StoredMessage]) -> list[base.SaveOutcome]:
        if not records:
            return []
        if self._state.status is not Status.OPEN:
            return [self._state.not_open()] * len(records)
        call = SaveCall(len(records))
        parts: dict[int, SavePart] = {}
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
                part = parts[shard] = SavePart(call, shard)
            owned = record.kite_server == owner
            if not owned:
                self._warn_foreign(record.kite_server)
            item = SaveItem(position, table, message_id, _row(record), record.topic, owned)
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
        return await self._decide(CommitPart, message_id)

    async def rollback(self, message_id: str) -> StoredMessage | None:
        return await self._decide(RollbackPart, message_id)

    async def _decide(
        self, kind: type[CommitPart | RollbackPart], message_id: str
    ) -> StoredMessage | None:
        call = RecordCall(1)
        shard, table = self._layout.route(message_id)
        part = kind(call, shard)
        if _storable_id(message_id):  # any other id cannot be stored: None
            part.items.append((0, table, message_id))
        await self._submit(call, [part] if part.items else [])
        return call.records[0]

    async def redrive(self, keys: Sequence[base.DlqKey], now: float) -> list[StoredMessage]:
        if not keys:
            self._state.check_open()
            return []
        call = RecordCall(len(keys))
        parts: dict[int, RedrivePart] = {}
        for position, (message_id, group) in enumerate(keys):
            if not _storable_id(message_id):
                continue
            part, table = self._part(
                parts, message_id, lambda shard_: RedrivePart(call, shard_, now)
            )
            part.items.append((position, table, message_id))
            part.groups.append(group[:_MAX_NAME])
        await self._submit(call, list(parts.values()))
        return [record for record in call.records if record is not None]

    async def reschedule(self, changes: Sequence[base.Rescheduled]) -> None:
        if not changes:
            return
        call = Call()
        parts: dict[int, ReschedulePart] = {}
        # an ordering key waits for this write: not deferred by flushSeconds
        kind = (
            UrgentReschedulePart
            if any(c.record.message.ordering_key for c in changes)
            else ReschedulePart
        )
        for change in changes:
            record = change.record
            if not _storable_id(record.message_id):
                continue
            part, table = self._part(parts, record.message_id, lambda shard_: kind(call, shard_))
            part.items.append((table, record.message_id, *_bookkeeping(record)))
        await self._submit(call, self._sized(parts))

    async def delete(self, records: Sequence[StoredMessage], remember_until: float = 0.0) -> None:
        if not records:
            return
        call = Call()
        parts: dict[int, DeletePart] = {}
        until = min(remember_until, _MAX_TIME)
        # an ordering key waits for this write: not deferred by flushSeconds
        kind = UrgentDeletePart if any(r.message.ordering_key for r in records) else DeletePart
        for record in records:
            if not _storable_id(record.message_id):
                continue
            part, table = self._part(
                parts, record.message_id, lambda shard_: kind(call, shard_, until)
            )
            owned = record.kite_server == self._owner
            part.items.append((table, record.message_id, record.topic, owned))
        await self._submit(call, self._sized(parts))

    async def dead_letter(self, letters: Sequence[base.DeadLetter]) -> None:
        if not letters:
            return
        call = Call()
        parts: dict[int, DeadLetterPart] = {}
        for letter in letters:
            record = letter.record
            if not _storable_id(record.message_id):
                continue
            part, table = self._part(
                parts, record.message_id, lambda shard_: DeadLetterPart(call, shard_)
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

    async def append_history(self, events: Sequence[base.HistoryEvent]) -> None:
        if not events:
            return
        call = Call()
        parts: dict[int, HistoryPart] = {}
        for event in events:
            if not _storable_id(event.message_id):
                continue
            part, _ = self._part(parts, event.message_id, lambda shard_: HistoryPart(call, shard_))
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

    async def put_meta(self, key: str, value: bytes | None) -> None:
        call = Call()
        await self._submit(
            call, [MetaPart(call, key.encode(), None if value is None else bytes(value))]
        )

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
    def _sized(parts: Mapping[int, Part]) -> list[Part]:
        for part in parts.values():
            n = len(getattr(part, "items", ()))
            part.rows = n
            part.size = _ROW_OVERHEAD * (n + 1)
        return list(parts.values())

    def _submit(self, call: Call, parts: list[Part]) -> asyncio.Future[None]:
        self._state.check_open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        call.future = future
        call.left = len(parts)
        if not parts:
            future.set_result(None)
        now = loop.time()
        for part in parts:
            part.queued = now
            self._writers[part.shard].submit((part,))
        return future

    def _written(self, parts: list[Part], tx: ShardTx) -> None:
        self._transactions += 1
        add_counts(self._backlog, tx.backlog)
        add_counts(self._dlq, tx.dlq)
        for part in parts:
            part.succeed()

    @staticmethod
    def _failed(parts: list[Part], error: StoreUnavailableError) -> None:
        for part in parts:
            part.fail(error)

    # -- reads -----------------------------------------------------------------------

    async def get(self, message_id: str) -> StoredMessage | None:
        self._state.check_open()
        return await self._run(self._reads.get, message_id)

    async def page_due(
        self, now: float, limit: int, after: base.DueCursor | None = None
    ) -> list[StoredMessage]:
        self._state.check_open()
        if limit <= 0 or math.isnan(now):
            return []
        return await self._run(self._reads.page_due, now, limit, after)

    async def page_uncommitted(self, limit: int, after: str | None = None) -> list[StoredMessage]:
        self._state.check_open()
        if limit <= 0:
            return []
        return await self._run(self._reads.page_uncommitted, limit, after)

    async def list_dlq(
        self, where: base.DlqFilter, limit: int, after: base.DlqKey | None = None
    ) -> list[base.DeadLetter]:
        self._state.check_open()
        if limit <= 0:
            return []
        return await self._run(self._reads.list_dlq, where, limit, after)

    async def get_dead_letters(self, message_id: str) -> list[base.DeadLetter]:
        self._state.check_open()
        return await self._run(self._reads.get_dead_letters, message_id)

    async def get_history(self, message_id: str) -> list[base.HistoryEvent]:
        self._state.check_open()
        return await self._run(self._reads.get_history, message_id)

    async def prune_history(self, before: float) -> int:
        """Removes in chunks of its own transactions, beside the write queues."""
        self._state.check_open()
        if not before > 0.0:
            return 0
        return await self._run(self._reads.prune_history, min(before, _MAX_TIME))

    async def prune_remembered(self, before: float) -> int:
        """Removes in chunks of its own transactions, by the ``remember_until`` index."""
        self._state.check_open()
        if not before > 0.0:
            return 0
        return await self._run(self._reads.prune_remembered, min(before, _MAX_TIME))

    async def remembered_estimate(self) -> int:
        self._state.check_open()
        return await self._run(self._reads.remembered_estimate)

    async def release_memory(self) -> None:
        """Nothing: the buffers are the MySQL server's."""

    async def get_meta(self, prefix: str) -> Mapping[str, bytes]:
        self._state.check_open()
        return await self._run(self._reads.get_meta, prefix)

    async def pending_counts(self) -> base.PendingCounts:
        self._state.check_open()
        return await self._run(self._reads.pending_counts)

    async def take_over(self, owner: str) -> base.TakenOver:
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
        self._state.check_open()
        if owner == self._owner:
            return base.TakenOver()
        loop = asyncio.get_running_loop()
        batch = max(1, self._options.batch_update_size)
        counts = (self._backlog, self._dlq)
        taken = await self._run(self._reads.take_over, owner, batch, loop, counts)
        if taken.rows:
            logger.info(
                "took over kite_server=%r: messages=%d dead=%d (now owner %r)",
                owner,
                taken.messages,
                taken.dead_letters,
                self._owner,
            )
        return taken

    async def _run(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


if __name__ == "__main__":
    raise SystemExit(schema_main())
