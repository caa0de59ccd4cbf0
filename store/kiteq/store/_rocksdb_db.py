"""The RocksDB store's database: its column families, key layout and what open does.

The column families and their keys are described in ``kiteq.store.rocksdb``. Opening
also brings a database made by an older version up to date (the ``uncommitted`` index,
dead letters one per group). Everything here runs on the store thread; rocksdict is
used nowhere else but in ``kiteq.store.rocksdb`` and its request and read modules.
"""

from __future__ import annotations

import collections
import logging
import struct
from collections.abc import Iterator
from typing import Final, cast

from rocksdict import (
    BlockBasedOptions,
    Cache,
    ColumnFamily,
    DBRecoveryMode,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
    WriteOptions,
)

from kiteq.store.codec import (
    dead_entry_key,
    dead_entry_topic_group,
    decode_legacy_dead_letters,
    decode_state,
    encode_dead_entry,
    encode_message,
    is_legacy_dead_entry,
    state_of,
)

__all__ = [
    "DB",
    "DEFAULT_BLOCK_CACHE_MB",
    "DUE_TIME",
    "EVENT_SUFFIX",
    "HISTORY_SEQ_KEY",
    "INDEX_COMPLETE_KEY",
    "SCAN_CHUNK",
    "SEQ",
    "Column",
    "Counters",
    "due_time",
    "load",
]

logger = logging.getLogger(__name__)

DUE_TIME: Final = struct.Struct(">d")
SEQ: Final = struct.Struct(">I")
# In ``history`` (never the start of a UTF-8 id, and sorting last): the next sequence.
HISTORY_SEQ_KEY: Final = b"\xff"
# history key suffix: 8-byte time + 4-byte sequence
EVENT_SUFFIX: Final = DUE_TIME.size + SEQ.size
# In ``uncommitted`` (sorting after every UTF-8 id): the index holds every uncommitted record.
INDEX_COMPLETE_KEY: Final = b"\xff"
# Entries one store-thread job looks at in a scan (list_dlq, prune_history, a migration
# at open): writes queued meanwhile run between two jobs instead of waiting for the scan.
SCAN_CHUNK: Final = 4096

# The one block cache every column family reads through. RocksDB's default is a 32 MiB
# cache per table configuration (three here): a broker that drained a backlog held ~96 MB
# of cached blocks for nothing. The hot path reads little: a save's duplicate check
# (bloom filters live with the table readers, outside the cache) and the recover scan.
DEFAULT_BLOCK_CACHE_MB: Final = 16

# (backlog per topic, dead letters per (topic, group), next history sequence)
Counters = tuple[dict[str, int], dict[tuple[str, str], int], int]


def due_time(ndt: float) -> bytes:
    """The ``due`` (and ``history``) key prefix of a time: big-endian IEEE-754."""
    # Negative times, -0.0 and NaN would sort wrongly as IEEE-754 bytes: they sort as 0.0
    # (due at once).
    return DUE_TIME.pack(ndt if ndt > 0.0 else 0.0)


class Column:
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


class DB:
    __slots__ = (
        "block_cache",
        "dedup",
        "dedup_expiry",
        "dlq",
        "due",
        "history",
        "meta",
        "msg",
        "rdict",
        "remembering",
        "state",
        "uncommitted",
    )

    def __init__(self, path: str, block_cache_mb: int = DEFAULT_BLOCK_CACHE_MB) -> None:
        self.block_cache = Cache(block_cache_mb << 20)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.create_missing_column_families(True)
        options.set_wal_recovery_mode(DBRecoveryMode.point_in_time())
        options.set_max_background_jobs(2)
        options.set_keep_log_file_num(10)
        # one budget for the memtables of every column family: without it each of the
        # busy ones (msg, state, due, history) fills its own 2 x 64 MiB, and a broker that
        # took a backlog held ~450 MB instead of ~310 (tests/bench/backlog_bench.py)
        options.set_db_write_buffer_size(64 << 20)
        scans = BlockBasedOptions()
        scans.set_block_cache(self.block_cache)
        options.set_block_based_table_factory(scans)
        lookups = BlockBasedOptions()
        lookups.set_bloom_filter(10, False)
        lookups.set_block_cache(self.block_cache)
        by_id = Options(raw_mode=True)
        by_id.set_block_based_table_factory(lookups)
        small = Options(raw_mode=True)
        small.set_block_based_table_factory(scans)
        due = Options(raw_mode=True)
        due.set_block_based_table_factory(scans)
        # Every delivered message leaves a tombstone at the head of the recover index;
        # compact files full of them so the next scan does not walk over them.
        due.add_compact_on_deletion_collector_factory(1024, 512, 0.5)
        # prune_history deletes old events in bulk
        history = Options(raw_mode=True)
        history.set_block_based_table_factory(scans)
        history.add_compact_on_deletion_collector_factory(1024, 512, 0.5)
        self.rdict = Rdict(
            path,
            options,
            column_families={
                "msg": by_id,
                "state": by_id,
                "due": due,
                "meta": small,
                "dlq": by_id,
                "history": history,
                # every decision leaves a tombstone, as in due
                "uncommitted": due,
                # the idempotency window: looked up by id on every save, pruned by time
                "dedup": by_id,
                "dedup_expiry": history,
            },
        )
        self.msg = Column(self.rdict, "msg")
        self.state = Column(self.rdict, "state")
        self.due = Column(self.rdict, "due")
        self.meta = Column(self.rdict, "meta")
        self.dlq = Column(self.rdict, "dlq")
        self.history = Column(self.rdict, "history")
        self.uncommitted = Column(self.rdict, "uncommitted")
        self.dedup = Column(self.rdict, "dedup")
        self.dedup_expiry = Column(self.rdict, "dedup_expiry")
        # False while no id is remembered: saves then skip the lookup (window off)
        self.remembering = next(self.dedup.keys(b""), None) is not None

    @property
    def columns(self) -> tuple[Column, ...]:
        return (
            self.msg,
            self.state,
            self.due,
            self.meta,
            self.dlq,
            self.history,
            self.uncommitted,
            self.dedup,
            self.dedup_expiry,
        )

    def flush_memtables(self) -> None:
        """Flush every column family's memtable to an SST file, and wait for it.

        rocksdict lets go of the GIL while it waits. Safe beside writes on another thread.
        """
        for column in self.columns:
            column.view.flush(True)

    def close(self) -> None:
        for column in self.columns:
            column.release()
        self.rdict.close()


def load(db: DB, write_options: WriteOptions, sync: bool, description: str) -> Counters:
    """The counters of an opened database, after bringing an older one up to date.

    *write_options* and *sync* (fsync the WAL after writing) are the store's, for the
    rewrites; they are not counted in ``write_batches``, which counts the batches of calls.
    """
    upgrade = _Upgrade(db, write_options, sync, description)
    if db.uncommitted.get(INDEX_COMPLETE_KEY) is None:
        topics = upgrade.build_uncommitted_index()
    else:
        topics = collections.Counter(decode_state(value).topic for value in db.state.values())
    dead = upgrade.count_dead_letters()
    seq = db.history.get(HISTORY_SEQ_KEY)
    return dict(topics), dead, 0 if seq is None else SEQ.unpack(seq)[0]


class _Upgrade:
    """What open rewrites in a database made by an older version."""

    def __init__(self, db: DB, write_options: WriteOptions, sync: bool, description: str) -> None:
        self.db = db
        self.write_options = write_options
        self.sync = sync
        self.description = description

    def write(self, wb: WriteBatch) -> None:
        self.db.rdict.write(wb, self.write_options)
        if self.sync:
            self.db.rdict.flush_wal(True)

    def count_dead_letters(self) -> dict[tuple[str, str], int]:
        """Dead letters per (topic, group); entries from before issue #10 are migrated."""
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        legacy: list[tuple[bytes, bytes]] = []
        migrated = 0
        for key, value in self.db.dlq.items(b""):
            if is_legacy_dead_entry(value):
                legacy.append((key, value))
                if len(legacy) == SCAN_CHUNK:
                    migrated += self.migrate_dead_letters(legacy, counts)
                    legacy = []
            else:
                counts[dead_entry_topic_group(value)] += 1
        if legacy:
            migrated += self.migrate_dead_letters(legacy, counts)
        if migrated:
            logger.info("dead letters migrated to one per group %s: %d", self.description, migrated)
        return dict(counts)

    def migrate_dead_letters(
        self, entries: list[tuple[bytes, bytes]], counts: collections.Counter[tuple[str, str]]
    ) -> int:
        """Rewrite version-1 dead letters (one per message) as one entry per group.

        One WriteBatch: each message's old entry and its new ones go together. Returns
        how many messages' entries were rewritten.
        """
        dlq = self.db.dlq.handle
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
                wb.put(dead_entry_key(record.message_id, letter.group), entry, dlq)
                counts[(record.topic, letter.group)] += 1
            wb.delete(key, dlq)
        self.write(wb)
        return len(entries)

    def build_uncommitted_index(self) -> collections.Counter[str]:
        """Index the uncommitted records of a new database or one older than the index.

        Written in one batch with the marker that says the index is complete, so a crash
        halfway leaves no marker and the next open builds it again. Returns the backlog.
        """
        topics: collections.Counter[str] = collections.Counter()
        uncommitted = self.db.uncommitted.handle
        wb = WriteBatch(raw_mode=True)
        indexed = 0
        for key, value in self.db.state.items(b""):
            state = decode_state(value)
            topics[state.topic] += 1
            if not state.committed:
                wb.put(key, b"", uncommitted)
                indexed += 1
        wb.put(INDEX_COMPLETE_KEY, b"", uncommitted)
        self.write(wb)
        if indexed:
            logger.info("uncommitted index built %s entries=%d", self.description, indexed)
        return topics
