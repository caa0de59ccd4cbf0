"""The RocksDB store (rocksdict, raw mode): durable on one node, fast when writes are grouped.

rocksdict holds the GIL through ``write()``, fsync included (PERF-BASELINE.md §3.1), so
neither threads nor RocksDB's own write grouping help: one fsync'ed write per message
caps a broker near 5k msg/s. Throughput comes from **group commit** done here: every
write-type call (``save``, ``reschedule``, ``delete``, ``commit``, ``rollback``,
``dead_letter``, ``redrive``, ``append_history``, ``put_meta``) is queued as a request
object (``kiteq.store._rocksdb_requests``); one writer at a time applies the whole queue to
a single ``WriteBatch`` on the store's own thread, and calls arriving meanwhile form the
next batch. Callers return only when their batch is written. ``fsync``
picks what "written" means:

* ``batch`` (default): each WriteBatch holding a save, a transaction decision (commit,
  rollback), a dead-letter move, a redrive or a metadata write is written with
  ``sync=True``; a ``Saved.STORED`` (or a returned decision) means the WAL is on disk and
  survives an OS crash or power loss. One fsync per batch. A batch of only delivery
  bookkeeping (deletes, reschedules, history events) is not fsynced on its own: the WAL
  is sequential, so the next synced batch makes it durable too, and until then an OS
  crash can only undo the latest bookkeeping, i.e. redeliver a message, never lose one.
  (fsync holds the GIL here; halving the fsyncs is worth it.)
* ``always``: each call is its own fsync'ed WriteBatch, nothing is grouped across calls.
  Same guarantee as ``batch``, far slower; for comparing and for paranoid setups.
* ``never``: WAL written without fsync. Survives a crash of the broker process (the OS
  has the data), not an OS crash or power loss (KiteQ's own pebble store behaves so).
  The store still reports ``durable``: only the memory store loses messages on exit.

Every rocksdict call, reads and open/close included, runs on that one thread: none is
made from the event loop, and reads see every write that has returned. (The loop still
pauses while ``write()`` holds the GIL, which is why there must be few, large batches.)

Column families (all keys and values are raw bytes, readable by any RocksDB tool):

* ``msg``: message id -> message value (``codec.encode_message``), written once;
* ``state``: message id -> state value (``codec.encode_state``): topic, committed flag,
  delivery bookkeeping; present exactly when ``msg`` is;
* ``due``: big-endian IEEE-754 ``next_deliver_time`` (seconds, exact, order-preserving
  for times >= 0) + message id -> b"", only for committed messages: the recover index;
* ``uncommitted``: message id -> b"", exactly for the stored messages not yet committed
  (``page_uncommitted``: the transaction checks). Save puts it, commit and rollback remove
  it in the batch that decides; rollback also deletes ``msg`` and ``state`` (the history
  stays). The one-byte key ``0xff`` (sorting after every id) marks the index complete: a
  database without it, new or older than the index, is indexed from ``state`` at open;
* ``meta``: UTF-8 key -> value, small broker metadata;
* ``dlq``: message id + ``0x00`` + group -> dead-letter value (``codec.encode_dead_entry``:
  reason, dead time, group, then the record's state and message values verbatim), so
  keys sort as (message_id, group) and one message's letters are adjacent. A
  dead-letter call puts a message's entries and, in the same WriteBatch, rewrites its
  ``state`` (other groups still have it: ``keep``) or deletes ``msg``/``state``/``due``
  (or ``uncommitted``); a redrive deletes entries and, in one WriteBatch, makes the
  groups pending again on the stored record or stores the record again. Entries
  written before issue #10 (key: the message id; one value naming several groups) are
  rewritten at open as one entry per group, one WriteBatch per chunk, each message
  whole in one;
* ``history``: message id + big-endian IEEE-754 event time (as in ``due``) + big-endian
  u32 sequence -> event value (``codec.encode_event``), so one message's events are
  adjacent and in time order, events of the same time in the order they were appended.
  The one-byte key ``0xff`` (never the start of a UTF-8 id, and sorting last) holds the
  next sequence number, written in the same batch as the events.

A record's ``due`` key is always derived from its stored state, so a caller holding a
stale ``next_deliver_time`` cannot leave an orphaned index entry behind. A database made
before ``dlq``, ``history`` and ``uncommitted`` existed gets them at open.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final, Literal, TypeVar, TypeVarTuple, cast

from rocksdict import (
    BlockBasedOptions,
    ColumnFamily,
    DBRecoveryMode,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
    WriteOptions,
)

from kiteq.core.errors import StoreUnavailableError
from kiteq.core.message import StoredMessage
from kiteq.store._rocksdb_requests import (
    _DUE_TIME,
    _HISTORY_SEQ_KEY,
    _SEQ,
    _AppendHistory,
    _Batch as _Batch,  # re-exported: tests look into the layout
    _Commit,
    _DeadLetter,
    _Delete,
    _due_time as _due_time,  # re-exported, as _Batch
    _PutMeta,
    _Redrive,
    _Request,
    _Reschedule,
    _Rollback,
    _Save,
)
from kiteq.store.base import (
    DeadLetter,
    DlqFilter,
    DlqKey,
    DueCursor,
    HistoryEvent,
    Rescheduled,
    SaveOutcome,
)
from kiteq.store.codec import (
    DLQ_KEY_SEPARATOR,
    dead_entry_key,
    dead_entry_topic_group,
    decode_dead_letter,
    decode_event,
    decode_legacy_dead_letters,
    decode_message,
    decode_state,
    encode_dead_entry,
    encode_message,
    is_legacy_dead_entry,
    state_of,
)

__all__ = ["FSYNC_MODES", "Fsync", "RocksDBStore"]

logger = logging.getLogger(__name__)

Fsync = Literal["batch", "always", "never"]
FSYNC_MODES: Final[tuple[Fsync, ...]] = ("batch", "always", "never")

# One WriteBatch carries at most this many bytes of values (a single larger call still
# goes alone), so a burst of huge calls cannot build an unbounded batch.
_MAX_BATCH_BYTES: Final = 16 * 1024 * 1024
# history key suffix: 8-byte time + 4-byte sequence
_EVENT_SUFFIX: Final = _DUE_TIME.size + _SEQ.size
# In ``uncommitted`` (sorting after every UTF-8 id): the index holds every uncommitted record.
_INDEX_COMPLETE_KEY: Final = b"\xff"
# Entries one store-thread job looks at in a scan (list_dlq, prune_history): writes
# queued meanwhile run between two jobs instead of waiting for the whole scan.
_SCAN_CHUNK: Final = 4096

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")
_Count = TypeVar("_Count", str, tuple[str, str])
# dead letters per (topic, group)
_DlqCounts = dict[tuple[str, str], int]


class _Column:
    """A column family in raw mode: typed reads through its view, writes via its handle."""

    __slots__ = ("handle", "view")

    def __init__(self, db: Rdict, name: str) -> None:
        self.view = db.get_column_family(name)
        self.handle: ColumnFamily = db.get_column_family_handle(name)

    def get(self, key: bytes) -> bytes | None:
        return cast("bytes | None", self.view.get(key))

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        return cast("list[bytes | None]", self.view.get(list(keys)))

    def keys(self, start: bytes, read: ReadOptions | None = None) -> Iterator[bytes]:
        return cast("Iterator[bytes]", self.view.keys(from_key=start, read_opt=read))

    def items(self, start: bytes, read: ReadOptions | None = None) -> Iterator[tuple[bytes, bytes]]:
        return cast("Iterator[tuple[bytes, bytes]]", self.view.items(from_key=start, read_opt=read))

    def values(self) -> Iterator[bytes]:
        return cast("Iterator[bytes]", self.view.values())

    def release(self) -> None:
        # The database stays open (and locked) while any view or handle is alive.
        del self.view, self.handle


class _DB:
    __slots__ = ("dlq", "due", "history", "meta", "msg", "rdict", "state", "uncommitted")

    def __init__(self, path: str) -> None:
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.create_missing_column_families(True)
        options.set_wal_recovery_mode(DBRecoveryMode.point_in_time())
        options.set_max_background_jobs(2)
        options.set_keep_log_file_num(10)
        lookups = BlockBasedOptions()
        lookups.set_bloom_filter(10, False)
        by_id = Options(raw_mode=True)
        by_id.set_block_based_table_factory(lookups)
        due = Options(raw_mode=True)
        # Every delivered message leaves a tombstone at the head of the recover index;
        # compact files full of them so the next scan does not walk over them.
        due.add_compact_on_deletion_collector_factory(1024, 512, 0.5)
        # prune_history deletes old events in bulk
        history = Options(raw_mode=True)
        history.add_compact_on_deletion_collector_factory(1024, 512, 0.5)
        self.rdict = Rdict(
            path,
            options,
            column_families={
                "msg": by_id,
                "state": by_id,
                "due": due,
                "meta": Options(raw_mode=True),
                "dlq": by_id,
                "history": history,
                # every decision leaves a tombstone, as in due
                "uncommitted": due,
            },
        )
        self.msg = _Column(self.rdict, "msg")
        self.state = _Column(self.rdict, "state")
        self.due = _Column(self.rdict, "due")
        self.meta = _Column(self.rdict, "meta")
        self.dlq = _Column(self.rdict, "dlq")
        self.history = _Column(self.rdict, "history")
        self.uncommitted = _Column(self.rdict, "uncommitted")

    def close(self) -> None:
        for column in (
            self.msg,
            self.state,
            self.due,
            self.meta,
            self.dlq,
            self.history,
            self.uncommitted,
        ):
            column.release()
        self.rdict.close()


class RocksDBStore:
    def __init__(self, path: str, fsync: Fsync = "batch") -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, got {fsync!r}")
        if not path:
            raise ValueError("path must not be empty")
        self._path = path
        self._fsync: Fsync = fsync
        # Writes never ask RocksDB to sync: a synced write() keeps the GIL through the
        # fsync (measured: the event loop ran at 44% of its speed beside it), while
        # write() + flush_wal(sync=True) syncs the same WAL and lets the loop run (87%).
        # Callers are answered only after the sync, so the guarantee is the same; the
        # data is visible to reads a moment before it is durable, which is harmless here
        # (nothing is acknowledged before the sync).
        self._write_options = WriteOptions()
        self._sync_saves = fsync != "never"
        self._sync_bookkeeping = fsync == "always"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiteq-store")
        self._db: _DB | None = None
        self._status: Literal["new", "opening", "open", "closed"] = "new"
        self._closing: asyncio.Future[None] | None = None
        self._pending: collections.deque[_Request] = collections.deque()
        # True from the first queued write until the queue is empty and written.
        self._writing = False
        self._drained: asyncio.Future[None] | None = None
        self._backlog: dict[str, int] = {}
        self._dlq: _DlqCounts = {}
        # Sequence of the next history event; assigned on the loop, in call order.
        self._history_seq = 0
        self._prune_options = WriteOptions()
        self._prune_options.sync = False
        self._write_batches = 0

    @property
    def durable(self) -> bool:
        return True

    @property
    def description(self) -> str:
        return f"rocksdb://{self._path}?fsync={self._fsync}"

    @property
    def write_batches(self) -> int:
        """WriteBatches handed to RocksDB so far: with group commit, far fewer than calls."""
        return self._write_batches

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        if self._status == "open":
            return
        if self._status != "new":
            raise self._not_open()
        self._status = "opening"
        started = time.monotonic()
        try:
            backlog, dlq, self._history_seq = await self._run(self._open_sync)
        except BaseException:
            if self._closing is None:
                self._status = "new"
            raise
        if self._closing is not None:
            # close() ran meanwhile; its job, queued after ours, closes the database.
            raise self._not_open()
        self._backlog = backlog
        self._dlq = dlq
        self._status = "open"
        logger.info(
            "store opened %s messages=%d topics=%d dead_letters=%d in %.3fs",
            self.description,
            sum(self._backlog.values()),
            len(self._backlog),
            sum(self._dlq.values()),
            time.monotonic() - started,
        )

    async def close(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._status = "closed"
        if self._writing:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        try:
            # Queued behind everything already submitted, an open still running included.
            if await self._run(self._close_sync):
                logger.info("store closed %s", self.description)
        finally:
            self._executor.shutdown(wait=False)

    def _open_sync(self) -> tuple[dict[str, int], _DlqCounts, int]:
        """Open (unless an earlier, cancelled or failed, open did) and load the counters.

        Returns the backlog per topic, the dead letters per (topic, group), and the next
        history sequence.
        """
        with self._translated("open"):
            if self._db is None:
                os.makedirs(self._path, exist_ok=True)
                self._db = _DB(self._path)
            db = self._db
            if db.uncommitted.get(_INDEX_COMPLETE_KEY) is None:
                topics = self._build_uncommitted_index(db)
            else:
                topics = collections.Counter(
                    decode_state(value).topic for value in db.state.values()
                )
            dead = self._count_dead_letters(db)
            seq = db.history.get(_HISTORY_SEQ_KEY)
            return dict(topics), dead, 0 if seq is None else _SEQ.unpack(seq)[0]

    def _count_dead_letters(self, db: _DB) -> _DlqCounts:
        """Dead letters per (topic, group); entries from before issue #10 are migrated."""
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        legacy: list[tuple[bytes, bytes]] = []
        migrated = 0
        for key, value in db.dlq.items(b""):
            if is_legacy_dead_entry(value):
                legacy.append((key, value))
                if len(legacy) == _SCAN_CHUNK:
                    migrated += self._migrate_dead_letters(db, legacy, counts)
                    legacy = []
            else:
                counts[dead_entry_topic_group(value)] += 1
        if legacy:
            migrated += self._migrate_dead_letters(db, legacy, counts)
        if migrated:
            logger.info("dead letters migrated to one per group %s: %d", self.description, migrated)
        return dict(counts)

    def _migrate_dead_letters(
        self,
        db: _DB,
        entries: list[tuple[bytes, bytes]],
        counts: collections.Counter[tuple[str, str]],
    ) -> int:
        """Rewrite version-1 dead letters (one per message) as one entry per group.

        One WriteBatch: each message's old entry and its new ones go together. Returns
        how many messages' entries were rewritten.
        """
        wb = WriteBatch(raw_mode=True)
        for key, value in entries:
            for letter in decode_legacy_dead_letters(value):
                record = letter.record
                entry = encode_dead_entry(
                    encode_message(record),
                    state_of(record),
                    letter.reason,
                    letter.dead_time,
                    letter.group,
                )
                wb.put(dead_entry_key(record.message_id, letter.group), entry, db.dlq.handle)
                counts[(record.topic, letter.group)] += 1
            wb.delete(key, db.dlq.handle)
        # not counted in write_batches, which counts the batches of calls
        db.rdict.write(wb, self._write_options)
        if self._sync_saves:
            db.rdict.flush_wal(True)
        return len(entries)

    def _build_uncommitted_index(self, db: _DB) -> collections.Counter[str]:
        """Index the uncommitted records of a new database or one older than the index.

        Written in one batch with the marker that says the index is complete, so a crash
        halfway leaves no marker and the next open builds it again. Returns the backlog.
        """
        topics: collections.Counter[str] = collections.Counter()
        wb = WriteBatch(raw_mode=True)
        indexed = 0
        for key, value in db.state.items(b""):
            state = decode_state(value)
            topics[state.topic] += 1
            if not state.committed:
                wb.put(key, b"", db.uncommitted.handle)
                indexed += 1
        wb.put(_INDEX_COMPLETE_KEY, b"", db.uncommitted.handle)
        # not counted in write_batches, which counts the batches of calls
        db.rdict.write(wb, self._write_options)
        if self._sync_saves:
            db.rdict.flush_wal(True)
        if indexed:
            logger.info("uncommitted index built %s entries=%d", self.description, indexed)
        return topics

    def _close_sync(self) -> bool:
        db = self._db
        if db is None:
            return False
        self._db = None
        with self._translated("close"):
            db.close()
        return True

    # -- writes: group commit ----------------------------------------------------------

    async def save(self, records: Sequence[StoredMessage]) -> list[SaveOutcome]:
        if not records:
            return []
        if self._status != "open":
            return [self._not_open()] * len(records)
        request = _Save(records)
        try:
            await self._submit(request)
        except StoreUnavailableError as exc:
            return [exc] * len(records)
        return request.outcomes

    async def reschedule(self, changes: Sequence[Rescheduled]) -> None:
        if changes:
            await self._submit(_Reschedule(changes))

    async def delete(self, records: Sequence[StoredMessage]) -> None:
        if records:
            await self._submit(_Delete(records))

    async def commit(self, message_id: str) -> StoredMessage | None:
        request = _Commit(message_id)
        await self._submit(request)
        return request.record

    async def rollback(self, message_id: str) -> StoredMessage | None:
        request = _Rollback(message_id)
        await self._submit(request)
        return request.record

    async def put_meta(self, key: str, value: bytes | None) -> None:
        await self._submit(_PutMeta(key, value))

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        if letters:
            await self._submit(_DeadLetter(letters))

    async def redrive(self, keys: Sequence[DlqKey], now: float) -> list[StoredMessage]:
        if not keys:
            self._check_open()
            return []
        request = _Redrive(keys, now)
        await self._submit(request)
        return request.records

    async def append_history(self, events: Sequence[HistoryEvent]) -> None:
        if not events:
            return
        self._check_open()
        request = _AppendHistory(events, self._history_seq)
        self._history_seq = request.next_seq
        await self._submit(request)

    async def _submit(self, request: _Request) -> None:
        if self._status != "open":
            raise self._not_open()
        loop = asyncio.get_running_loop()
        request.future = loop.create_future()
        self._pending.append(request)
        if not self._writing:
            self._writing = True
            # Start on the next loop iteration, so every call made until then joins in.
            loop.call_soon(self._write_next, loop)
        await request.future

    # The writer is a chain of callbacks rather than a task: there is nothing a caller or
    # the loop's shutdown could cancel halfway, so every queued call is always answered.

    def _write_next(self, loop: asyncio.AbstractEventLoop) -> None:
        requests = self._next_batch()
        job = loop.run_in_executor(self._executor, self._write_sync, requests)
        job.add_done_callback(functools.partial(self._written, loop, requests))

    def _written(
        self,
        loop: asyncio.AbstractEventLoop,
        requests: list[_Request],
        job: asyncio.Future[tuple[dict[str, int], _DlqCounts]],
    ) -> None:
        try:
            backlog, dlq = job.result()
        except Exception as exc:
            # _write_sync answers rocksdict failures itself; this is a bug, so say so loudly.
            logger.exception("store writer failed %s", self.description)
            error = StoreUnavailableError(f"{self.description}: writer failed: {exc!r}")
            error.__cause__ = exc
            for request in requests:
                request.error = error
        else:
            _add_counts(self._backlog, backlog)
            _add_counts(self._dlq, dlq)
        for request in requests:
            request.resolve()
        if self._pending:
            self._write_next(loop)
            return
        self._writing = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _next_batch(self) -> list[_Request]:
        pending = self._pending
        batch = [pending.popleft()]
        size = batch[0].size
        while pending and size + pending[0].size <= _MAX_BATCH_BYTES:
            request = pending.popleft()
            batch.append(request)
            size += request.size
        return batch

    def _write_sync(self, requests: list[_Request]) -> tuple[dict[str, int], _DlqCounts]:
        """Runs on the store thread: build and write one WriteBatch per group.

        Returns the backlog (per topic) and dead-letter (per topic and group) count
        changes of what was written.
        """
        backlog: dict[str, int] = {}
        dlq: _DlqCounts = {}
        groups = [[r] for r in requests] if self._fsync == "always" else [requests]
        for group in groups:
            try:
                with self._translated("write"):
                    batch = _Batch(self._require_db(), group)
                    for request in group:
                        request.apply(batch)
                    if batch.wb.is_empty():
                        continue
                    self._write_batches += 1
                    rdict = batch.db.rdict
                    rdict.write(batch.wb, self._write_options)
                    if self._sync_bookkeeping or (
                        self._sync_saves and any(request.needs_sync for request in group)
                    ):
                        rdict.flush_wal(True)
            except StoreUnavailableError as exc:
                for request in group:
                    request.error = exc
            else:
                _add_counts(backlog, batch.backlog)
                _add_counts(dlq, batch.dlq)
        return backlog, dlq

    # -- reads -----------------------------------------------------------------------

    async def get(self, message_id: str) -> StoredMessage | None:
        self._check_open()
        return await self._run(self._get_sync, message_id.encode())

    def _get_sync(self, key: bytes) -> StoredMessage | None:
        db = self._require_db()
        with self._translated("get"):
            state = db.state.get(key)
            if state is None:
                return None
            value = db.msg.get(key)
            return None if value is None else decode_message(value, decode_state(state))

    async def page_due(
        self, now: float, limit: int, after: DueCursor | None = None
    ) -> list[StoredMessage]:
        self._check_open()
        if limit <= 0:
            return []
        return await self._run(self._page_due_sync, now, limit, after)

    def _page_due_sync(
        self, now: float, limit: int, after: DueCursor | None
    ) -> list[StoredMessage]:
        db = self._require_db()
        start = b"" if after is None else _due_time(after[0]) + after[1].encode()
        # Exclusive upper bound: the next representable time after *now*.
        bound = (int.from_bytes(_due_time(now), "big") + 1).to_bytes(8, "big")
        read = ReadOptions()
        read.set_iterate_upper_bound(bound)
        keys: list[bytes] = []
        with self._translated("page_due"):
            for due_key in db.due.keys(start, read):
                if due_key == start:
                    continue
                keys.append(due_key[8:])
                if len(keys) == limit:
                    break
            if not keys:
                return []
            states = db.state.get_many(keys)
            values = db.msg.get_many(keys)
            page: list[StoredMessage] = []
            for key, state, value in zip(keys, states, values, strict=True):
                if state is None or value is None:
                    logger.warning("due entry without message id=%s: skipped", key.decode())
                    continue
                page.append(decode_message(value, decode_state(state)))
        return page

    async def page_uncommitted(self, limit: int, after: str | None = None) -> list[StoredMessage]:
        self._check_open()
        if limit <= 0:
            return []
        return await self._run(self._page_uncommitted_sync, limit, after)

    def _page_uncommitted_sync(self, limit: int, after: str | None) -> list[StoredMessage]:
        db = self._require_db()
        start = b"" if after is None else after.encode()
        read = ReadOptions()
        read.set_iterate_upper_bound(_INDEX_COMPLETE_KEY)
        keys: list[bytes] = []
        with self._translated("page_uncommitted"):
            for key in db.uncommitted.keys(start, read):
                if key == start:
                    continue
                keys.append(key)
                if len(keys) == limit:
                    break
            if not keys:
                return []
            states = db.state.get_many(keys)
            values = db.msg.get_many(keys)
            page: list[StoredMessage] = []
            for key, state, value in zip(keys, states, values, strict=True):
                if state is None or value is None:
                    logger.warning("uncommitted entry without message id=%s: skipped", key.decode())
                    continue
                page.append(decode_message(value, decode_state(state)))
        return page

    async def backlog(self) -> dict[str, int]:
        self._check_open()
        return dict(self._backlog)

    async def dlq_size(self) -> dict[tuple[str, str], int]:
        self._check_open()
        return dict(self._dlq)

    async def take_over(self, owner: str) -> int:
        """Always 0: nothing to take over.

        This store is never shared between brokers, so no other broker's rows are in it
        (backlog takeover needs the MySQL store).
        """
        self._check_open()
        return 0

    async def list_dlq(
        self, where: DlqFilter, limit: int, after: DlqKey | None = None
    ) -> list[DeadLetter]:
        self._check_open()
        found: list[DeadLetter] = []
        if limit <= 0:
            return found
        cursor = None if after is None else dead_entry_key(*after)
        while True:
            page, cursor = await self._run(self._list_dlq_sync, where, limit - len(found), cursor)
            found += page
            if cursor is None or len(found) >= limit:
                return found
            self._check_open()

    def _list_dlq_sync(
        self, where: DlqFilter, want: int, after: bytes | None
    ) -> tuple[list[DeadLetter], bytes | None]:
        """Up to *want* matches among the next ``_SCAN_CHUNK`` entries after *after*.

        Returns them and the last key looked at (None when the end was reached).
        """
        db = self._require_db()
        page: list[DeadLetter] = []
        scanned = 0
        with self._translated("list_dlq"):
            for key, value in db.dlq.items(b"" if after is None else after):
                if key == after:
                    continue
                letter = decode_dead_letter(value)
                if where.matches(letter):
                    page.append(letter)
                    if len(page) == want:
                        return page, key
                scanned += 1
                if scanned == _SCAN_CHUNK:
                    return page, key
        return page, None

    async def get_dead_letters(self, message_id: str) -> list[DeadLetter]:
        self._check_open()
        return await self._run(self._get_dead_letters_sync, message_id.encode())

    def _get_dead_letters_sync(self, message_id: bytes) -> list[DeadLetter]:
        db = self._require_db()
        prefix = message_id + DLQ_KEY_SEPARATOR
        found: list[DeadLetter] = []
        with self._translated("get_dead_letters"):
            for key, value in db.dlq.items(prefix):
                if not key.startswith(prefix):
                    break
                found.append(decode_dead_letter(value))
        return found

    async def get_history(self, message_id: str) -> list[HistoryEvent]:
        self._check_open()
        return await self._run(self._get_history_sync, message_id)

    def _get_history_sync(self, message_id: str) -> list[HistoryEvent]:
        db = self._require_db()
        prefix = message_id.encode()
        size = len(prefix) + _EVENT_SUFFIX
        events: list[HistoryEvent] = []
        with self._translated("get_history"):
            for key, value in db.history.items(prefix):
                if not key.startswith(prefix):
                    break
                # another id that starts with this one
                if len(key) == size:
                    events.append(decode_event(message_id, value))
        return events

    async def prune_history(self, before: float) -> int:
        self._check_open()
        removed = 0
        cursor: bytes | None = b""
        while cursor is not None:
            count, cursor = await self._run(self._prune_history_sync, before, cursor)
            removed += count
            if cursor is not None:
                self._check_open()
        return removed

    def _prune_history_sync(self, before: float, start: bytes) -> tuple[int, bytes | None]:
        """Delete the events older than *before* among ``_SCAN_CHUNK`` keys from *start*.

        Returns how many, and the key to go on from (None when the end was reached).
        """
        db = self._require_db()
        read = ReadOptions()
        read.set_iterate_upper_bound(_HISTORY_SEQ_KEY)
        wb = WriteBatch(raw_mode=True)
        removed = 0
        scanned = 0
        last: bytes | None = None
        unpack_time = _DUE_TIME.unpack_from
        with self._translated("prune_history"):
            for key in db.history.keys(start, read):
                if scanned == _SCAN_CHUNK:
                    last = key
                    break
                scanned += 1
                if (
                    len(key) >= _EVENT_SUFFIX
                    and unpack_time(key, len(key) - _EVENT_SUFFIX)[0] < before
                ):
                    wb.delete(key, db.history.handle)
                    removed += 1
            if removed:
                # Bookkeeping: a prune lost in an OS crash is done again by the next one.
                self._write_batches += 1
                db.rdict.write(wb, self._prune_options)
        return removed, last

    async def get_meta(self, prefix: str) -> Mapping[str, bytes]:
        self._check_open()
        return await self._run(self._get_meta_sync, prefix.encode())

    def _get_meta_sync(self, prefix: bytes) -> dict[str, bytes]:
        db = self._require_db()
        found: dict[str, bytes] = {}
        with self._translated("get_meta"):
            for key, value in db.meta.items(prefix):
                if not key.startswith(prefix):
                    break
                found[key.decode()] = value
        return found

    # -- plumbing --------------------------------------------------------------------

    async def _run(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _not_open(self) -> StoreUnavailableError:
        state = {"closed": "closed", "opening": "still opening"}.get(self._status, "not open")
        return StoreUnavailableError(f"{self.description} is {state}")

    def _check_open(self) -> None:
        if self._status != "open":
            raise self._not_open()

    def _require_db(self) -> _DB:
        if self._db is None:
            raise self._not_open()
        return self._db

    @contextlib.contextmanager
    def _translated(self, action: str) -> Iterator[None]:
        """The one place where rocksdict failures become ``StoreUnavailableError``."""
        try:
            yield
        except StoreUnavailableError:
            raise
        except Exception as exc:
            raise StoreUnavailableError(f"{self.description}: {action} failed: {exc}") from exc


def _add_counts(counts: dict[_Count, int], deltas: Mapping[_Count, int]) -> None:
    for key, delta in deltas.items():
        count = counts.get(key, 0) + delta
        if count:
            counts[key] = count
        else:
            counts.pop(key, None)
