"""The RocksDB store's reads and scans, each one job on the store thread.

Each function takes the open database and raises rocksdict's own errors: the store runs
it on its thread and translates those (``RocksDBStore._read``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from rocksdict import ReadOptions, WriteBatch, WriteOptions

from kiteq.core.message import StoredMessage, pending_groups
from kiteq.store._rocksdb_db import (
    DB,
    DUE_TIME,
    EVENT_SUFFIX,
    HISTORY_SEQ_KEY,
    INDEX_COMPLETE_KEY,
    SCAN_CHUNK,
    due_time,
)
from kiteq.store.base import (
    DeadLetter,
    DlqFilter,
    DueCursor,
    HistoryEvent,
    PendingCounts,
    count_pending,
)
from kiteq.store.codec import (
    DLQ_KEY_SEPARATOR,
    decode_dead_letter,
    decode_event,
    decode_message,
    decode_state,
    publish_time_of,
)

__all__ = [
    "get",
    "get_dead_letters",
    "get_history",
    "get_meta",
    "list_dlq",
    "page_due",
    "page_uncommitted",
    "pending_counts",
    "prune_history",
]

logger = logging.getLogger(__name__)


def get(db: DB, key: bytes) -> StoredMessage | None:
    state = db.state.get(key)
    if state is None:
        return None
    value = db.msg.get(key)
    return None if value is None else decode_message(value, decode_state(state))


def page_due(db: DB, now: float, limit: int, after: DueCursor | None) -> list[StoredMessage]:
    start = b"" if after is None else due_time(after[0]) + after[1].encode()
    # Exclusive upper bound: the next representable time after *now*.
    bound = (int.from_bytes(due_time(now), "big") + 1).to_bytes(8, "big")
    read = ReadOptions()
    read.set_iterate_upper_bound(bound)
    keys = (due_key[8:] for due_key in db.due.keys(start, read) if due_key != start)
    return _page(db, keys, limit, "due")


def page_uncommitted(db: DB, limit: int, after: str | None) -> list[StoredMessage]:
    start = b"" if after is None else after.encode()
    read = ReadOptions()
    read.set_iterate_upper_bound(INDEX_COMPLETE_KEY)
    keys = (key for key in db.uncommitted.keys(start, read) if key != start)
    return _page(db, keys, limit, "uncommitted")


def pending_counts(db: DB) -> PendingCounts:
    """``MessageStore.pending_counts``: every state value; a message value only when needed."""
    counts: PendingCounts = {}
    for key, value in db.state.items(b""):
        state = decode_state(value)
        if not state.groups:
            continue  # the common case: no group has tried it yet
        groups = pending_groups(state.groups, state.only_groups)
        if not groups:
            continue
        message = db.msg.get(key)
        if message is None:
            continue  # a state without its message: get() and the scans skip it too
        count_pending(counts, state.topic, publish_time_of(message), groups)
    return counts


def _page(db: DB, index: Iterable[bytes], limit: int, name: str) -> list[StoredMessage]:
    """The records of the first *limit* ids of *index* (entries of the index *name*)."""
    keys: list[bytes] = []
    for key in index:
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
            logger.warning("%s entry without message id=%s: skipped", name, key.decode())
            continue
        page.append(decode_message(value, decode_state(state)))
    return page


def list_dlq(
    db: DB, where: DlqFilter, want: int, after: bytes | None
) -> tuple[list[DeadLetter], bytes | None]:
    """Up to *want* matches among the next ``SCAN_CHUNK`` entries after *after*.

    Returns them and the last key looked at (None when the end was reached).
    """
    page: list[DeadLetter] = []
    scanned = 0
    for key, value in db.dlq.items(b"" if after is None else after):
        if key == after:
            continue
        letter = decode_dead_letter(value)
        if where.matches(letter):
            page.append(letter)
            if len(page) == want:
                return page, key
        scanned += 1
        if scanned == SCAN_CHUNK:
            return page, key
    return page, None


def get_dead_letters(db: DB, message_id: bytes) -> list[DeadLetter]:
    prefix = message_id + DLQ_KEY_SEPARATOR
    found: list[DeadLetter] = []
    for key, value in db.dlq.items(prefix):
        if not key.startswith(prefix):
            break
        found.append(decode_dead_letter(value))
    return found


def get_history(db: DB, message_id: str) -> list[HistoryEvent]:
    prefix = message_id.encode()
    size = len(prefix) + EVENT_SUFFIX
    events: list[HistoryEvent] = []
    for key, value in db.history.items(prefix):
        if not key.startswith(prefix):
            break
        # another id that starts with this one
        if len(key) == size:
            events.append(decode_event(message_id, value))
    return events


def prune_history(
    db: DB, write_options: WriteOptions, before: float, start: bytes
) -> tuple[int, bytes | None]:
    """Delete the events older than *before* among ``SCAN_CHUNK`` keys from *start*.

    Returns how many, and the key to go on from (None when the end was reached).
    """
    read = ReadOptions()
    read.set_iterate_upper_bound(HISTORY_SEQ_KEY)
    wb = WriteBatch(raw_mode=True)
    removed = 0
    last: bytes | None = None
    unpack_time = DUE_TIME.unpack_from
    for scanned, key in enumerate(db.history.keys(start, read)):
        if scanned == SCAN_CHUNK:
            last = key
            break
        if len(key) >= EVENT_SUFFIX and unpack_time(key, len(key) - EVENT_SUFFIX)[0] < before:
            wb.delete(key, db.history.handle)
            removed += 1
    if removed:
        db.rdict.write(wb, write_options)
    return removed, last


def prune_remembered(
    db: DB, write_options: WriteOptions, before: float, start: bytes
) -> tuple[int, bytes | None]:
    """Forget the ids remembered until before *before*, ``SCAN_CHUNK`` expiry keys from *start*.

    Reads only expiry keys that are due (the time order), never the rest of the window.
    An id remembered again later keeps its ``dedup`` entry; its old expiry key goes.
    Returns how many ids were forgotten, and the key to go on from (None: done).
    """
    read = ReadOptions()
    read.set_iterate_upper_bound(due_time(before))
    keys: list[bytes] = []
    last: bytes | None = None
    for key in db.dedup_expiry.keys(start, read):
        if len(keys) == SCAN_CHUNK:
            last = key
            break
        keys.append(key)
    if not keys:
        return 0, None
    ids = [key[DUE_TIME.size :] for key in keys]
    wb = WriteBatch(raw_mode=True)
    removed = 0
    for key, message_id, value in zip(keys, ids, db.dedup.get_many(ids), strict=True):
        wb.delete(key, db.dedup_expiry.handle)
        if value is not None and DUE_TIME.unpack(value)[0] < before:
            wb.delete(message_id, db.dedup.handle)
            removed += 1
    db.rdict.write(wb, write_options)
    return removed, last


def remembered_estimate(db: DB) -> int:
    """RocksDB's estimate of the keys in ``dedup`` (memtables and file metadata, no scan)."""
    return db.dedup.view.property_int_value("rocksdb.estimate-num-keys") or 0


def get_meta(db: DB, prefix: bytes) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for key, value in db.meta.items(prefix):
        if not key.startswith(prefix):
            break
        found[key.decode()] = value
    return found
