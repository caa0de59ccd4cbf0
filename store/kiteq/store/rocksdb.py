"""The RocksDB store (rocksdict, raw mode): durable on one node, fast when writes are grouped.

rocksdict holds the GIL through ``write()``, fsync included (PERF-BASELINE.md §3.1), so
neither threads nor RocksDB's own write grouping help: one fsync'ed write per message
caps a broker near 5k msg/s. Throughput comes from **group commit** done here: every
write-type call (``save``, ``reschedule``, ``delete``, ``commit``, ``dead_letter``,
``redrive``, ``append_history``, ``put_meta``) is queued; one writer at a time turns the
whole queue into a single ``WriteBatch`` on the store's own thread, and calls arriving
meanwhile form the next batch. Callers return only when their batch is written. ``fsync``
picks what "written" means:

* ``batch`` (default): each WriteBatch holding a save, commit, dead-letter move, redrive or
  metadata write is written with ``sync=True``; a ``Saved.STORED`` means the WAL is on disk
  and survives an OS crash or power loss. One fsync per batch. A batch of only delivery
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
* ``meta``: UTF-8 key -> value, small broker metadata;
* ``dlq``: message id -> dead-letter value (``codec.encode_dead_entry``: reason, dead time,
  groups, then the record's state and message values verbatim). A dead-letter move
  deletes ``msg``/``state``/``due`` and puts ``dlq`` in one WriteBatch, a redrive the
  reverse, so a record is in exactly one of the two;
* ``history``: message id + big-endian IEEE-754 event time (as in ``due``) + big-endian
  u32 sequence -> event value (``codec.encode_event``), so one message's events are
  adjacent and in time order, events of the same time in the order they were appended.
  The one-byte key ``0xff`` (never the start of a UTF-8 id, and sorting last) holds the
  next sequence number, written in the same batch as the events.

A record's ``due`` key is always derived from its stored state, so a caller holding a
stale ``next_deliver_time`` cannot leave an orphaned index entry behind. A database made
before ``dlq`` and ``history`` existed gets them, empty, at open.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, Final, Literal, TypeVar, TypeVarTuple, cast

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
from kiteq.core.limits import MAX_EXPIRY_SECONDS
from kiteq.core.message import StoredMessage
from kiteq.store.base import (
    DeadLetter,
    DlqFilter,
    DueCursor,
    HistoryEvent,
    Rescheduled,
    Saved,
    SaveOutcome,
)
from kiteq.store.codec import (
    State,
    dead_entry_topic,
    decode_dead_entry,
    decode_dead_letter,
    decode_event,
    decode_message,
    decode_state,
    encode_dead_entry,
    encode_event,
    encode_message,
    encode_state,
    state_of,
)

__all__ = ["FSYNC_MODES", "Fsync", "RocksDBStore"]

logger = logging.getLogger(__name__)

Fsync = Literal["batch", "always", "never"]
FSYNC_MODES: Final[tuple[Fsync, ...]] = ("batch", "always", "never")

# One WriteBatch carries at most this many bytes of values (a single larger call still
# goes alone), so a burst of huge calls cannot build an unbounded batch.
_MAX_BATCH_BYTES: Final = 16 * 1024 * 1024
_KEY_OVERHEAD: Final = 64
_DUE_TIME: Final = struct.Struct(">d")
_SEQ: Final = struct.Struct(">I")
_SEQ_MASK: Final = 0xFFFFFFFF
# history key suffix: 8-byte time + 4-byte sequence
_EVENT_SUFFIX: Final = _DUE_TIME.size + _SEQ.size
_HISTORY_SEQ_KEY: Final = b"\xff"
# Entries one store-thread job looks at in a scan (list_dlq, prune_history): writes
# queued meanwhile run between two jobs instead of waiting for the whole scan.
_SCAN_CHUNK: Final = 4096

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


def _due_time(ndt: float) -> bytes:
    # Negative times, -0.0 and NaN would sort wrongly as IEEE-754 bytes: they sort as 0.0
    # (due at once).
    return _DUE_TIME.pack(ndt if ndt > 0.0 else 0.0)


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
    __slots__ = ("dlq", "due", "history", "meta", "msg", "rdict", "state")

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
            },
        )
        self.msg = _Column(self.rdict, "msg")
        self.state = _Column(self.rdict, "state")
        self.due = _Column(self.rdict, "due")
        self.meta = _Column(self.rdict, "meta")
        self.dlq = _Column(self.rdict, "dlq")
        self.history = _Column(self.rdict, "history")

    def close(self) -> None:
        for column in (self.msg, self.state, self.due, self.meta, self.dlq, self.history):
            column.release()
        self.rdict.close()


class _Batch:
    """A WriteBatch being built on the writer thread.

    It tracks the state its earlier requests left behind, so later requests in the same
    batch see their effects (save then commit, delete then save again).
    """

    def __init__(self, db: _DB, requests: Sequence[_Request]) -> None:
        self.db = db
        self.wb = WriteBatch(raw_mode=True)
        keys = list({key: None for request in requests for key in request.ids_read()})
        found = db.state.get_many(keys) if keys else []
        self.states: dict[bytes, State | None] = {
            key: None if value is None else decode_state(value)
            for key, value in zip(keys, found, strict=True)
        }
        self.messages: dict[bytes, bytes] = {}
        self.backlog: dict[str, int] = {}
        # dead-letter values of the ids DLQ requests touch (None: not in the DLQ)
        dead = list({key: None for request in requests for key in request.dlq_ids_read()})
        self.dead: dict[bytes, bytes | None] = (
            dict(zip(dead, db.dlq.get_many(dead), strict=True)) if dead else {}
        )
        self.dlq: dict[str, int] = {}

    def count(self, topic: str, delta: int) -> None:
        self.backlog[topic] = self.backlog.get(topic, 0) + delta

    def count_dlq(self, topic: str, delta: int) -> None:
        self.dlq[topic] = self.dlq.get(topic, 0) + delta

    def message(self, key: bytes) -> bytes | None:
        """The message value of a live record, as this batch left it."""
        value = self.messages.get(key)
        return self.db.msg.get(key) if value is None else value

    def put_state(self, key: bytes, state: State) -> None:
        self.states[key] = state
        self.wb.put(key, encode_state(state), self.db.state.handle)


class _Request:
    """One caller's writes; applied in call order inside a batch by the writer thread."""

    __slots__ = ("error", "future", "size")
    # False for delivery bookkeeping, which a later synced batch makes durable
    needs_sync: ClassVar[bool] = True

    def __init__(self, size: int) -> None:
        self.size = size
        self.error: StoreUnavailableError | None = None
        self.future: asyncio.Future[None] | None = None

    def ids_read(self) -> Iterable[bytes]:
        """Message ids whose stored state ``apply`` needs."""
        return ()

    def dlq_ids_read(self) -> Iterable[bytes]:
        """Message ids whose dead-letter value ``apply`` needs."""
        return ()

    def apply(self, batch: _Batch) -> None:
        raise NotImplementedError

    def resolve(self) -> None:
        if self.future is None or self.future.done():
            return
        if self.error is None:
            self.future.set_result(None)
        else:
            self.future.set_exception(self.error)


class _Save(_Request):
    __slots__ = ("items", "outcomes")

    def __init__(self, records: Sequence[StoredMessage]) -> None:
        self.items = [(r.message_id.encode(), encode_message(r), state_of(r)) for r in records]
        super().__init__(
            sum(len(value) for _, value, _ in self.items) + _KEY_OVERHEAD * len(records)
        )
        self.outcomes: list[SaveOutcome] = []

    def ids_read(self) -> Iterable[bytes]:
        return (key for key, _, _ in self.items)

    def apply(self, batch: _Batch) -> None:
        # The hot loop of the store: names are bound locally on purpose.
        put = batch.wb.put
        states = batch.states
        messages = batch.messages
        msg_cf, state_cf, due_cf = batch.db.msg.handle, batch.db.state.handle, batch.db.due.handle
        outcomes: list[SaveOutcome] = []
        for key, value, state in self.items:
            if states[key] is not None:
                outcomes.append(Saved.DUPLICATE)
                continue
            put(key, value, msg_cf)
            put(key, encode_state(state), state_cf)
            if state.committed:
                put(_due_time(state.next_deliver_time) + key, b"", due_cf)
            states[key] = state
            messages[key] = value
            batch.count(state.topic, 1)
            outcomes.append(Saved.STORED)
        self.outcomes = outcomes


class _Reschedule(_Request):
    __slots__ = ("changes",)
    needs_sync = False

    def __init__(self, changes: Sequence[Rescheduled]) -> None:
        super().__init__(len(changes) * _KEY_OVERHEAD)
        self.changes = [(c.record.message_id.encode(), c.record) for c in changes]

    def ids_read(self) -> Iterable[bytes]:
        return (key for key, _ in self.changes)

    def apply(self, batch: _Batch) -> None:
        due = batch.db.due.handle
        for key, record in self.changes:
            old = batch.states[key]
            if old is None:
                continue
            new = old._replace(
                deliver_count=record.deliver_count,
                succ_groups=record.succ_groups,
                fail_groups=record.fail_groups,
                next_deliver_time=record.next_deliver_time,
            )
            batch.put_state(key, new)
            if old.committed:
                batch.wb.delete(_due_time(old.next_deliver_time) + key, due)
                batch.wb.put(_due_time(new.next_deliver_time) + key, b"", due)


class _Delete(_Request):
    __slots__ = ("ids",)
    needs_sync = False

    def __init__(self, records: Sequence[StoredMessage]) -> None:
        super().__init__(len(records) * _KEY_OVERHEAD)
        self.ids = [r.message_id.encode() for r in records]

    def ids_read(self) -> Iterable[bytes]:
        return self.ids

    def apply(self, batch: _Batch) -> None:
        db = batch.db
        wb = batch.wb
        for key in self.ids:
            old = batch.states[key]
            if old is None:
                continue
            wb.delete(key, db.msg.handle)
            wb.delete(key, db.state.handle)
            wb.delete(_due_time(old.next_deliver_time) + key, db.due.handle)
            batch.states[key] = None
            batch.messages.pop(key, None)
            batch.count(old.topic, -1)


class _Commit(_Request):
    __slots__ = ("key", "record")

    def __init__(self, message_id: str) -> None:
        super().__init__(_KEY_OVERHEAD)
        self.key = message_id.encode()
        self.record: StoredMessage | None = None

    def ids_read(self) -> Iterable[bytes]:
        return (self.key,)

    def apply(self, batch: _Batch) -> None:
        old = batch.states[self.key]
        if old is None:
            return
        value = batch.message(self.key)
        if value is None:
            logger.warning("state without message id=%s: not committed", self.key.decode())
            return
        state = old
        if not old.committed:
            state = old._replace(committed=True)
            batch.put_state(self.key, state)
            batch.wb.put(_due_time(state.next_deliver_time) + self.key, b"", batch.db.due.handle)
        self.record = decode_message(value, state)


class _PutMeta(_Request):
    __slots__ = ("key", "value")

    def __init__(self, key: str, value: bytes | None) -> None:
        super().__init__(_KEY_OVERHEAD + (0 if value is None else len(value)))
        self.key = key.encode()
        self.value = value

    def apply(self, batch: _Batch) -> None:
        if self.value is None:
            batch.wb.delete(self.key, batch.db.meta.handle)
        else:
            batch.wb.put(self.key, bytes(self.value), batch.db.meta.handle)


class _DeadLetter(_Request):
    __slots__ = ("letters",)

    def __init__(self, letters: Sequence[DeadLetter]) -> None:
        super().__init__(sum(len(letter.record.message.body) + _KEY_OVERHEAD for letter in letters))
        self.letters = [(letter.record.message_id.encode(), letter) for letter in letters]

    def ids_read(self) -> Iterable[bytes]:
        return (key for key, _ in self.letters)

    def dlq_ids_read(self) -> Iterable[bytes]:
        return self.ids_read()

    def apply(self, batch: _Batch) -> None:
        db = batch.db
        wb = batch.wb
        for key, letter in self.letters:
            old = batch.states[key]
            if old is None:
                continue
            value = batch.message(key)
            if value is None:
                logger.warning("state without message id=%s: not dead-lettered", key.decode())
                continue
            # The caller's bookkeeping is the latest (as in reschedule); the message and
            # its committed flag are the stored ones.
            r = letter.record
            state = old._replace(
                deliver_count=r.deliver_count,
                succ_groups=r.succ_groups,
                fail_groups=r.fail_groups,
                next_deliver_time=r.next_deliver_time,
            )
            wb.delete(key, db.msg.handle)
            wb.delete(key, db.state.handle)
            if old.committed:
                wb.delete(_due_time(old.next_deliver_time) + key, db.due.handle)
            entry = encode_dead_entry(value, state, letter.reason, letter.dead_time, letter.groups)
            wb.put(key, entry, db.dlq.handle)
            batch.states[key] = None
            batch.messages.pop(key, None)
            batch.count(old.topic, -1)
            replaced = batch.dead[key]
            if replaced is not None:
                batch.count_dlq(dead_entry_topic(replaced), -1)
            batch.dead[key] = entry
            batch.count_dlq(old.topic, 1)


class _Redrive(_Request):
    __slots__ = ("keys", "now", "records")

    def __init__(self, message_ids: Sequence[str], now: float) -> None:
        super().__init__(len(message_ids) * _KEY_OVERHEAD)
        self.keys = list({mid.encode(): None for mid in message_ids})
        self.now = now
        self.records: list[StoredMessage] = []

    def ids_read(self) -> Iterable[bytes]:
        return self.keys

    def dlq_ids_read(self) -> Iterable[bytes]:
        return self.keys

    def apply(self, batch: _Batch) -> None:
        db = batch.db
        wb = batch.wb
        now = self.now
        for key in self.keys:
            dead = batch.dead[key]
            if dead is None:
                continue
            entry = decode_dead_entry(dead)
            wb.delete(key, db.dlq.handle)
            batch.dead[key] = None
            batch.count_dlq(entry.state.topic, -1)
            if batch.states[key] is not None:
                # Saved again since it died: the live copy is delivered anyway.
                logger.info("redrive of a live message id=%s: dead letter dropped", key.decode())
                continue
            state = entry.state._replace(deliver_count=0, fail_groups=(), next_deliver_time=now)
            value = entry.message
            record = decode_message(value, state)
            if 0 < record.message.expired_time <= now:
                record.message = dataclasses.replace(
                    record.message, expired_time=int(now) + MAX_EXPIRY_SECONDS
                )
                value = encode_message(record)
            wb.put(key, value, db.msg.handle)
            batch.put_state(key, state)
            batch.messages[key] = value
            batch.count(state.topic, 1)
            if state.committed:
                wb.put(_due_time(now) + key, b"", db.due.handle)
                self.records.append(record)


class _AppendHistory(_Request):
    __slots__ = ("items", "next_seq")
    needs_sync = False

    def __init__(self, events: Sequence[HistoryEvent], seq: int) -> None:
        items: list[tuple[bytes, bytes]] = []
        for event in events:
            key = event.message_id.encode() + _due_time(event.time) + _SEQ.pack(seq)
            items.append((key, encode_event(event)))
            seq = (seq + 1) & _SEQ_MASK
        super().__init__(sum(len(value) + _KEY_OVERHEAD for _, value in items))
        self.items = items
        self.next_seq = seq

    def apply(self, batch: _Batch) -> None:
        put = batch.wb.put
        history = batch.db.history.handle
        for key, value in self.items:
            put(key, value, history)
        put(_HISTORY_SEQ_KEY, _SEQ.pack(self.next_seq), history)


class RocksDBStore:
    def __init__(self, path: str, fsync: Fsync = "batch") -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, got {fsync!r}")
        if not path:
            raise ValueError("path must not be empty")
        self._path = path
        self._fsync: Fsync = fsync
        self._write_options = WriteOptions()
        self._write_options.sync = fsync != "never"
        self._bookkeeping_options = WriteOptions()
        self._bookkeeping_options.sync = fsync == "always"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiteq-store")
        self._db: _DB | None = None
        self._status: Literal["new", "opening", "open", "closed"] = "new"
        self._closing: asyncio.Future[None] | None = None
        self._pending: collections.deque[_Request] = collections.deque()
        # True from the first queued write until the queue is empty and written.
        self._writing = False
        self._drained: asyncio.Future[None] | None = None
        self._backlog: dict[str, int] = {}
        self._dlq: dict[str, int] = {}
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

    def _open_sync(self) -> tuple[dict[str, int], dict[str, int], int]:
        """Open (unless an earlier, cancelled or failed, open did) and load the counters.

        Returns the backlog and the dead letters per topic, and the next history sequence.
        """
        with self._translated("open"):
            if self._db is None:
                os.makedirs(self._path, exist_ok=True)
                self._db = _DB(self._path)
            db = self._db
            topics = (decode_state(value).topic for value in db.state.values())
            dead = (dead_entry_topic(value) for value in db.dlq.values())
            seq = db.history.get(_HISTORY_SEQ_KEY)
            return (
                dict(collections.Counter(topics)),
                dict(collections.Counter(dead)),
                0 if seq is None else _SEQ.unpack(seq)[0],
            )

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

    async def put_meta(self, key: str, value: bytes | None) -> None:
        await self._submit(_PutMeta(key, value))

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        if letters:
            await self._submit(_DeadLetter(letters))

    async def redrive(self, message_ids: Sequence[str], now: float) -> list[StoredMessage]:
        if not message_ids:
            self._check_open()
            return []
        request = _Redrive(message_ids, now)
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
        job: asyncio.Future[tuple[dict[str, int], dict[str, int]]],
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

    def _write_sync(self, requests: list[_Request]) -> tuple[dict[str, int], dict[str, int]]:
        """Runs on the store thread: build and write one WriteBatch per group.

        Returns the backlog and dead-letter count changes per topic of what was written.
        """
        backlog: dict[str, int] = {}
        dlq: dict[str, int] = {}
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
                    durable = any(request.needs_sync for request in group)
                    options = self._write_options if durable else self._bookkeeping_options
                    batch.db.rdict.write(batch.wb, options)
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

    async def backlog(self) -> dict[str, int]:
        self._check_open()
        return dict(self._backlog)

    async def dlq_size(self) -> dict[str, int]:
        self._check_open()
        return dict(self._dlq)

    async def list_dlq(
        self, where: DlqFilter, limit: int, after: str | None = None
    ) -> list[DeadLetter]:
        self._check_open()
        found: list[DeadLetter] = []
        if limit <= 0:
            return found
        cursor = None if after is None else after.encode()
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

    async def get_dead_letter(self, message_id: str) -> DeadLetter | None:
        self._check_open()
        return await self._run(self._get_dead_letter_sync, message_id.encode())

    def _get_dead_letter_sync(self, key: bytes) -> DeadLetter | None:
        db = self._require_db()
        with self._translated("get_dead_letter"):
            value = db.dlq.get(key)
            return None if value is None else decode_dead_letter(value)

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


def _add_counts(counts: dict[str, int], deltas: Mapping[str, int]) -> None:
    for topic, delta in deltas.items():
        count = counts.get(topic, 0) + delta
        if count:
            counts[topic] = count
        else:
            counts.pop(topic, None)
