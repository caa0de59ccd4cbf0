"""The write requests of the RocksDB store, and the WriteBatch they are applied to.

Each write-type call of ``RocksDBStore`` becomes one request object, queued on the event
loop. The store thread applies a group of them, in call order, to one ``_Batch`` and
writes it as a single WriteBatch (group commit; see ``kiteq.store.rocksdb`` for the
column families and the fsync modes). Everything here but the constructors runs on the
store thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import struct
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, ClassVar, Final

from rocksdict import WriteBatch

from kiteq.core.errors import StoreUnavailableError
from kiteq.core.limits import MAX_EXPIRY_SECONDS
from kiteq.core.message import StoredMessage
from kiteq.store.base import DeadLetter, HistoryEvent, Rescheduled, Saved, SaveOutcome
from kiteq.store.codec import (
    State,
    dead_entry_topic,
    decode_dead_entry,
    decode_message,
    decode_state,
    encode_dead_entry,
    encode_event,
    encode_message,
    encode_state,
    state_of,
)

if TYPE_CHECKING:
    # only for annotations: rocksdb.py imports this module
    from kiteq.store.rocksdb import _DB

logger = logging.getLogger(__name__)

_KEY_OVERHEAD: Final = 64
_DUE_TIME: Final = struct.Struct(">d")
_SEQ: Final = struct.Struct(">I")
_SEQ_MASK: Final = 0xFFFFFFFF
_HISTORY_SEQ_KEY: Final = b"\xff"


def _due_time(ndt: float) -> bytes:
    # Negative times, -0.0 and NaN would sort wrongly as IEEE-754 bytes: they sort as 0.0
    # (due at once).
    return _DUE_TIME.pack(ndt if ndt > 0.0 else 0.0)


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
            else:
                put(key, b"", batch.db.uncommitted.handle)
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
            if old.committed:
                wb.delete(_due_time(old.next_deliver_time) + key, db.due.handle)
            else:
                wb.delete(key, db.uncommitted.handle)
            batch.states[key] = None
            batch.messages.pop(key, None)
            batch.count(old.topic, -1)


class _Decision(_Request):
    """COMMIT or ROLLBACK of one uncommitted message; ``record`` is set when it decided it.

    A decision is final: a record already committed, or absent (rolled back, deleted,
    dead-lettered, never stored), is left alone and ``record`` stays None.
    """

    __slots__ = ("key", "record")

    def __init__(self, message_id: str) -> None:
        super().__init__(_KEY_OVERHEAD)
        self.key = message_id.encode()
        self.record: StoredMessage | None = None

    def ids_read(self) -> Iterable[bytes]:
        return (self.key,)

    def undecided(self, batch: _Batch) -> tuple[State, bytes] | None:
        """The state and message value of the record if it is stored and uncommitted."""
        old = batch.states[self.key]
        if old is None or old.committed:
            return None
        value = batch.message(self.key)
        if value is None:
            logger.warning("state without message id=%s: not decided", self.key.decode())
            return None
        return old, value


class _Commit(_Decision):
    __slots__ = ()

    def apply(self, batch: _Batch) -> None:
        found = self.undecided(batch)
        if found is None:
            return
        old, value = found
        state = old._replace(committed=True)
        batch.put_state(self.key, state)
        batch.wb.delete(self.key, batch.db.uncommitted.handle)
        batch.wb.put(_due_time(state.next_deliver_time) + self.key, b"", batch.db.due.handle)
        self.record = decode_message(value, state)


class _Rollback(_Decision):
    __slots__ = ()

    def apply(self, batch: _Batch) -> None:
        found = self.undecided(batch)
        if found is None:
            return
        old, value = found
        db = batch.db
        # msg, state and the uncommitted index go; the history stays, to show what happened
        batch.wb.delete(self.key, db.msg.handle)
        batch.wb.delete(self.key, db.state.handle)
        batch.wb.delete(self.key, db.uncommitted.handle)
        batch.states[self.key] = None
        batch.messages.pop(self.key, None)
        batch.count(old.topic, -1)
        self.record = decode_message(value, old)


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
            else:
                wb.delete(key, db.uncommitted.handle)
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
            else:
                # still waiting for its decision: checked again, never delivered
                wb.put(key, b"", db.uncommitted.handle)


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
