"""The RocksDB store (rocksdict, raw mode): durable on one node, fast when writes are grouped.

rocksdict holds the GIL through ``write()``, fsync included (PERF-BASELINE.md §3.1), so
neither threads nor RocksDB's own write grouping help: one fsync'ed write per message
caps a broker near 5k msg/s. Throughput comes from **group commit** done here: every
write-type call (``save``, ``reschedule``, ``delete``, ``commit``, ``rollback``,
``dead_letter``, ``redrive``, ``append_history``, ``put_meta``) is queued as a request
object (``kiteq.store._rocksdb_requests``); the group-commit writer
(``kiteq.store.group_commit``) hands the whole queue to the store's own thread, which
applies it to a single ``WriteBatch``, and calls arriving meanwhile form the next batch. Callers return only when their batch is written. ``fsync``
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
* ``dedup``: message id -> big-endian IEEE-754 time it is remembered until (the
  idempotency window, ``delete``'s ``remember_until``), written in the delete's
  WriteBatch; ``dedup_expiry``: that time + message id -> b"", the order
  ``prune_remembered`` walks (only the expired head). A save reads ``dedup`` with one
  multi-get per WriteBatch, and not at all while the store has never remembered an id;
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
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Final, Literal, TypeVar, TypeVarTuple

from rocksdict import WriteOptions

from kiteq.core.errors import StoreUnavailableError
from kiteq.core.message import StoredMessage
from kiteq.store import _rocksdb_reads as reads, base
from kiteq.store._rocksdb_db import DB, DEFAULT_BLOCK_CACHE_MB, Counters, load
from kiteq.store._rocksdb_requests import (
    _AppendHistory,
    _Batch,
    _Commit,
    _DeadLetter,
    _Delete,
    _PutMeta,
    _Redrive,
    _Request,
    _Reschedule,
    _Rollback,
    _Save,
)
from kiteq.store._rocksdb_states import StateCache
from kiteq.store._state import CountedStore, Lifecycle, Status, add_counts, translated
from kiteq.store.codec import dead_entry_key
from kiteq.store.group_commit import GroupCommitWriter

__all__ = ["DEFAULT_BLOCK_CACHE_MB", "FSYNC_MODES", "Fsync", "RocksDBStore"]

logger = logging.getLogger(__name__)

Fsync = Literal["batch", "always", "never"]
FSYNC_MODES: Final[tuple[Fsync, ...]] = ("batch", "always", "never")

# One WriteBatch carries at most this many bytes of values (a single larger call still
# goes alone), so a burst of huge calls cannot build an unbounded batch.
_MAX_BATCH_BYTES: Final = 16 * 1024 * 1024

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")
# (backlog, dead letters) count changes of a written batch
_Written = tuple[dict[str, int], dict[tuple[str, str], int]]


class RocksDBStore(CountedStore):
    def __init__(
        self, path: str, fsync: Fsync = "batch", *, cache_mb: int = DEFAULT_BLOCK_CACHE_MB
    ) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, got {fsync!r}")
        if not path:
            raise ValueError("path must not be empty")
        if cache_mb < 1:
            raise ValueError(f"cache_mb must be at least 1, got {cache_mb!r}")
        self._path = path
        self._fsync: Fsync = fsync
        self._cache_mb = cache_mb
        cache = "" if cache_mb == DEFAULT_BLOCK_CACHE_MB else f"&cacheMB={cache_mb}"
        self._state = Lifecycle(f"rocksdb://{path}?fsync={fsync}{cache}")
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
        self._db: DB | None = None
        # the states the store thread wrote last (only that thread touches it)
        self._states = StateCache()
        self._writer: GroupCommitWriter[_Request, _Written] = GroupCommitWriter(
            executor=self._executor,
            # looked up at every write, so a test can replace it
            write=lambda requests: self._write_sync(requests),
            written=self._written,
            failed=self._failed,
            max_bytes=_MAX_BATCH_BYTES,
            name=self._state.description,
        )
        self._backlog: dict[str, int] = {}
        self._dlq: dict[tuple[str, str], int] = {}
        # Sequence of the next history event; assigned on the loop, in call order.
        self._history_seq = 0
        self._prune_options = WriteOptions()
        self._prune_options.sync = False
        self._write_batches = 0
        # a running release_memory flush, which close waits for
        self._releasing: asyncio.Future[None] | None = None

    @property
    def write_batches(self) -> int:
        """WriteBatches handed to RocksDB so far: with group commit, far fewer than calls."""
        return self._write_batches

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        if not self._state.begin_open():
            return
        started = time.monotonic()
        job = asyncio.get_running_loop().run_in_executor(self._executor, self._open_sync)
        backlog, dlq, self._history_seq = await self._state.opened(job)
        self._backlog = backlog
        self._dlq = dlq
        logger.info(
            "store opened %s messages=%d topics=%d dead_letters=%d in %.3fs",
            self.description,
            sum(self._backlog.values()),
            len(self._backlog),
            sum(self._dlq.values()),
            time.monotonic() - started,
        )

    async def close(self) -> None:
        await self._state.close(self._close)

    async def _close(self) -> None:
        await self._writer.drain()
        if self._releasing is not None:
            await asyncio.wait([self._releasing])
        try:
            # Queued behind everything already submitted, an open still running included.
            if await self._run(self._close_sync):
                logger.info("store closed %s", self.description)
        finally:
            self._executor.shutdown(wait=False)

    def _open_sync(self) -> Counters:
        """Open (unless an earlier, cancelled or failed, open did) and load the counters."""
        with self._translated("open"):
            if self._db is None:
                os.makedirs(self._path, exist_ok=True)
                self._db = DB(self._path, self._cache_mb)
            return load(self._db, self._write_options, self._sync_saves, self.description)

    def _close_sync(self) -> bool:
        db = self._db
        if db is None:
            return False
        self._db = None
        with self._translated("close"):
            db.close()
        return True

    # -- writes: group commit ----------------------------------------------------------

    async def save(self, records: Sequence[StoredMessage]) -> list[base.SaveOutcome]:
        if not records:
            return []
        if self._state.status is not Status.OPEN:
            return [self._state.not_open()] * len(records)
        request = _Save(records)
        try:
            await self._submit(request)
        except StoreUnavailableError as exc:
            return [exc] * len(records)
        return request.outcomes

    async def reschedule(self, changes: Sequence[base.Rescheduled]) -> None:
        if changes:
            await self._submit(_Reschedule(changes))

    async def delete(self, records: Sequence[StoredMessage], remember_until: float = 0.0) -> None:
        if records:
            await self._submit(_Delete(records, remember_until))

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

    async def dead_letter(self, letters: Sequence[base.DeadLetter]) -> None:
        if letters:
            await self._submit(_DeadLetter(letters))

    async def redrive(self, keys: Sequence[base.DlqKey], now: float) -> list[StoredMessage]:
        if not keys:
            self._state.check_open()
            return []
        request = _Redrive(keys, now)
        await self._submit(request)
        return request.records

    async def append_history(self, events: Sequence[base.HistoryEvent]) -> None:
        if not events:
            return
        self._state.check_open()
        request = _AppendHistory(events, self._history_seq)
        self._history_seq = request.next_seq
        await self._submit(request)

    async def _submit(self, request: _Request) -> None:
        self._state.check_open()
        request.future = asyncio.get_running_loop().create_future()
        self._writer.submit((request,))
        await request.future

    def _written(self, requests: list[_Request], counts: _Written) -> None:
        add_counts(self._backlog, counts[0])
        add_counts(self._dlq, counts[1])
        for request in requests:
            request.resolve()

    @staticmethod
    def _failed(requests: list[_Request], error: StoreUnavailableError) -> None:
        for request in requests:
            request.error = error
            request.resolve()

    def _write_sync(self, requests: list[_Request]) -> _Written:
        """Runs on the store thread: build and write one WriteBatch per group.

        Returns the backlog (per topic) and dead-letter (per topic and group) count
        changes of what was written.
        """
        backlog: collections.Counter[str] = collections.Counter()
        dlq: collections.Counter[tuple[str, str]] = collections.Counter()
        groups = [[r] for r in requests] if self._fsync == "always" else [requests]
        for group in groups:
            try:
                with self._translated("write"):
                    batch = self._write_group(group)
            except StoreUnavailableError as exc:
                for request in group:
                    request.error = exc
                # it may have reached the memtable all the same: forget what may be wrong
                self._states.clear()
            except BaseException:
                self._states.clear()
                raise
            else:
                self._states.written(batch.states)
                backlog.update(batch.backlog)
                dlq.update(batch.dlq)
        return backlog, dlq

    def _write_group(self, group: list[_Request]) -> _Batch:
        batch = _Batch(self._require_db(), group, self._states)
        for request in group:
            request.apply(batch)
        if not batch.wb.is_empty():
            self._write_batches += 1
            rdict = batch.db.rdict
            rdict.write(batch.wb, self._write_options)
            if self._sync_bookkeeping or (
                self._sync_saves and any(request.needs_sync for request in group)
            ):
                rdict.flush_wal(True)
        return batch

    # -- reads -----------------------------------------------------------------------

    async def get(self, message_id: str) -> StoredMessage | None:
        return await self._read("get", reads.get, message_id.encode())

    async def page_due(
        self, now: float, limit: int, after: base.DueCursor | None = None
    ) -> list[StoredMessage]:
        self._state.check_open()
        if limit <= 0:
            return []
        return await self._read("page_due", reads.page_due, now, limit, after)

    async def page_uncommitted(self, limit: int, after: str | None = None) -> list[StoredMessage]:
        self._state.check_open()
        if limit <= 0:
            return []
        return await self._read("page_uncommitted", reads.page_uncommitted, limit, after)

    async def pending_counts(self) -> base.PendingCounts:
        self._state.check_open()
        return await self._read("pending_counts", reads.pending_counts)

    async def take_over(self, owner: str) -> base.TakenOver:
        """Nothing: this store is never shared, so no other broker's rows are in it."""
        self._state.check_open()
        return base.TakenOver()

    async def list_dlq(
        self, where: base.DlqFilter, limit: int, after: base.DlqKey | None = None
    ) -> list[base.DeadLetter]:
        self._state.check_open()
        found: list[base.DeadLetter] = []
        if limit <= 0:
            return found
        cursor = None if after is None else dead_entry_key(*after)
        while True:
            page, cursor = await self._read(
                "list_dlq", reads.list_dlq, where, limit - len(found), cursor
            )
            found += page
            if cursor is None or len(found) >= limit:
                return found
            self._state.check_open()

    async def get_dead_letters(self, message_id: str) -> list[base.DeadLetter]:
        return await self._read("get_dead_letters", reads.get_dead_letters, message_id.encode())

    async def get_history(self, message_id: str) -> list[base.HistoryEvent]:
        return await self._read("get_history", reads.get_history, message_id)

    async def prune_history(self, before: float) -> int:
        return await self._prune("prune_history", reads.prune_history, before)

    async def prune_remembered(self, before: float) -> int:
        return await self._prune("prune_remembered", reads.prune_remembered, before)

    async def _prune(
        self,
        name: str,
        chunk: Callable[[DB, WriteOptions, float, bytes], tuple[int, bytes | None]],
        before: float,
    ) -> int:
        """Delete in chunks on the store thread until *chunk* says it is through."""
        self._state.check_open()
        removed = 0
        cursor: bytes | None = b""
        while cursor is not None:
            count, cursor = await self._read(name, chunk, self._prune_options, before, cursor)
            if count:
                # Bookkeeping: a prune lost in an OS crash is done again by the next one.
                self._write_batches += 1
            removed += count
            if cursor is not None:
                self._state.check_open()
        return removed

    async def remembered_estimate(self) -> int:
        return await self._read("remembered_estimate", reads.remembered_estimate)

    async def get_meta(self, prefix: str) -> Mapping[str, bytes]:
        return await self._read("get_meta", reads.get_meta, prefix.encode())

    async def release_memory(self) -> None:
        """Flush every memtable (up to the 64 MiB write buffer budget) to SST files.

        RocksDB frees a memtable once it is flushed. The flush takes ~0.1-0.2 s for a
        full budget, so it runs beside the store thread rather than on it: writes and
        reads go on meanwhile, and ``close`` waits for it.
        """
        self._state.check_open()
        db = self._require_db()
        job = asyncio.get_running_loop().run_in_executor(None, self._release_sync, db)
        self._releasing = job
        # cleared when the flush itself ends: a caller cancelled meanwhile must not let
        # close() shut the database under a flush that is still running
        job.add_done_callback(self._released)
        await asyncio.shield(job)

    def _released(self, job: asyncio.Future[None]) -> None:
        if self._releasing is job:
            self._releasing = None

    def _release_sync(self, db: DB) -> None:
        with self._translated("release_memory"):
            db.flush_memtables()

    # -- plumbing --------------------------------------------------------------------

    async def _read(self, action: str, read: Callable[[DB, *_Ts], _T], *args: *_Ts) -> _T:
        """*read* of the open database on the store thread, its failures translated."""
        self._state.check_open()
        return await self._run(self._read_sync, action, read, *args)

    def _read_sync(self, action: str, read: Callable[[DB, *_Ts], _T], *args: *_Ts) -> _T:
        db = self._require_db()
        with self._translated(action):
            return read(db, *args)

    async def _run(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _require_db(self) -> DB:
        if self._db is None:
            raise self._state.not_open()
        return self._db

    def _translated(self, action: str) -> contextlib.AbstractContextManager[None]:
        """The one place where rocksdict failures become ``StoreUnavailableError``."""
        return translated(self.description, action, Exception)
