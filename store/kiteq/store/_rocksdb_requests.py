"""The write requests of the RocksDB store, and the WriteBatch they are applied to.

Each write-type call of ``RocksDBStore`` becomes one request object, queued on the event
loop. The store thread applies a group of them, in call order, to one ``_Batch`` and
writes it as a single WriteBatch (group commit; see ``kiteq.store.rocksdb`` for the
column families and the fsync modes). Everything here but the constructors runs on the
store thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import ClassVar, Final

from rocksdict import WriteBatch

from kiteq.core.errors import StoreUnavailableError
from kiteq.core.message import StoredMessage
from kiteq.store._groups import redrive_groups
from kiteq.store._rocksdb_db import DB, DUE_TIME, HISTORY_SEQ_KEY, SEQ, due_time
from kiteq.store._rocksdb_states import StateCache
from kiteq.store._state import settle
from kiteq.store.base import DeadLetter, DlqKey, HistoryEvent, Rescheduled, Saved, SaveOutcome
from kiteq.store.codec import (
    Bookkeeping,
    DeadEntry,
    State,
    bookkeeping_of,
    dead_entry_key,
    dead_entry_topic_group,
    decode_dead_entry,
    decode_message,
    decode_state,
    encode_dead_entry,
    encode_event,
    encode_message,
    encode_state,
    state_of,
)

logger = logging.getLogger(__name__)

_KEY_OVERHEAD: Final = 64
_SEQ_MASK: Final = 0xFFFFFFFF


class _Batch:
    """A WriteBatch being built on the writer thread.

    It tracks the state its earlier requests left behind, so later requests in the same
    batch see their effects (save then commit, delete then save again).
    """

    def __init__(self, db: DB, requests: Sequence[_Request], cache: StateCache) -> None:
        self.db = db
        self.wb = WriteBatch(raw_mode=True)
        # the states this thread wrote last need no read (a delete just after the save)
        self.states, keys = cache.split(
            {key: None for request in requests for key in request.ids_read()}
        )
        if keys:
            found = db.state.get_many(keys)
            for key, value in zip(keys, found, strict=True):
                self.states[key] = None if value is None else decode_state(value)
        self.messages: dict[bytes, bytes] = {}
        self.backlog: dict[str, int] = {}
        # dead-letter values of the dlq keys DLQ requests touch (None: not in the DLQ)
        dead = list({key: None for request in requests for key in request.dlq_keys_read()})
        self.dead: dict[bytes, bytes | None] = (
            dict(zip(dead, db.dlq.get_many(dead), strict=True)) if dead else {}
        )
        # dead-letter count changes per (topic, group)
        self.dlq: dict[tuple[str, str], int] = {}
        # remembered ids (the idempotency window) -> until, of the ids saves bring: one
        # multi-get per batch, none while nothing is remembered
        self.remembered: dict[bytes, float] = {}
        if db.remembering:
            saved = list({key: None for request in requests for key in request.saved_ids()})
            if saved:
                unpack = DUE_TIME.unpack
                self.remembered = {
                    key: unpack(value)[0]
                    for key, value in zip(saved, db.dedup.get_many(saved), strict=True)
                    if value is not None
                }

    def count(self, topic: str, delta: int) -> None:
        self.backlog[topic] = self.backlog.get(topic, 0) + delta

    def count_dlq(self, topic_group: tuple[str, str], delta: int) -> None:
        self.dlq[topic_group] = self.dlq.get(topic_group, 0) + delta

    def message(self, key: bytes) -> bytes | None:
        """The message value of a live record, as this batch left it."""
        value = self.messages.get(key)
        return self.db.msg.get(key) if value is None else value

    def put_state(self, key: bytes, state: State) -> None:
        self.states[key] = state
        self.wb.put(key, encode_state(state), self.db.state.handle)

    def move_due(self, key: bytes, old: State, new: State) -> None:
        """Write *new* over the stored *old* state, moving its due key with it."""
        self.put_state(key, new)
        if old.committed:
            due = self.db.due.handle
            self.wb.delete(due_time(old.next_deliver_time) + key, due)
            self.wb.put(due_time(new.next_deliver_time) + key, b"", due)

    def remove(self, key: bytes, old: State) -> None:
        """Delete the stored record whose state is *old* (and its index entry)."""
        db, wb = self.db, self.wb
        wb.delete(key, db.msg.handle)
        wb.delete(key, db.state.handle)
        if old.committed:
            wb.delete(due_time(old.next_deliver_time) + key, db.due.handle)
        else:
            wb.delete(key, db.uncommitted.handle)
        self.states[key] = None
        self.messages.pop(key, None)
        self.count(old.topic, -1)

    def add(self, key: bytes, value: bytes, state: State) -> None:
        """Store a record that is not stored (a redrive), indexed by its state."""
        db = self.db
        self.wb.put(key, value, db.msg.handle)
        self.put_state(key, state)
        self.messages[key] = value
        self.count(state.topic, 1)
        if state.committed:
            self.wb.put(due_time(state.next_deliver_time) + key, b"", db.due.handle)
        else:
            # still waiting for its decision: checked again, never delivered
            self.wb.put(key, b"", db.uncommitted.handle)


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

    def dlq_keys_read(self) -> Iterable[bytes]:
        """The dlq keys whose dead-letter value ``apply`` needs."""
        return ()

    def saved_ids(self) -> Iterable[bytes]:
        """Ids ``apply`` may store anew: their remembered time is needed."""
        return ()

    def apply(self, batch: _Batch) -> None:
        raise NotImplementedError

    def resolve(self) -> None:
        settle(self.future, self.error)


class _Save(_Request):
    __slots__ = ("items", "outcomes", "times")

    def __init__(self, records: Sequence[StoredMessage]) -> None:
        self.items = [(r.message_id.encode(), encode_message(r), state_of(r)) for r in records]
        self.times = [r.publish_time for r in records]
        super().__init__(
            sum(len(value) for _, value, _ in self.items) + _KEY_OVERHEAD * len(records)
        )
        self.outcomes: list[SaveOutcome] = []

    def ids_read(self) -> Iterable[bytes]:
        return (key for key, _, _ in self.items)

    saved_ids = ids_read

    def apply(self, batch: _Batch) -> None:
        # The hot loop of the store: names are bound locally on purpose.
        put = batch.wb.put
        states = batch.states
        messages = batch.messages
        remembered = batch.remembered
        msg_cf, state_cf, due_cf = batch.db.msg.handle, batch.db.state.handle, batch.db.due.handle
        outcomes: list[SaveOutcome] = []
        for (key, value, state), published in zip(self.items, self.times, strict=True):
            if states[key] is not None or (remembered and remembered.get(key, 0.0) > published):
                outcomes.append(Saved.DUPLICATE)
                continue
            put(key, value, msg_cf)
            put(key, encode_state(state), state_cf)
            if state.committed:
                put(due_time(state.next_deliver_time) + key, b"", due_cf)
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
        # copied on the loop: the caller may change its records while the store thread
        # encodes them
        self.changes = [(c.record.message_id.encode(), bookkeeping_of(c.record)) for c in changes]

    def ids_read(self) -> Iterable[bytes]:
        return (key for key, _ in self.changes)

    def apply(self, batch: _Batch) -> None:
        # Bound locally and inlined (move_due): reschedules come in large batches.
        states = batch.states
        put, delete = batch.wb.put, batch.wb.delete
        state_cf, due = batch.db.state.handle, batch.db.due.handle
        for key, bookkeeping in self.changes:
            old = states[key]
            if old is None:
                continue
            new = State(old.topic, old.committed, *bookkeeping)
            states[key] = new
            put(key, encode_state(new), state_cf)
            if old.committed:
                delete(due_time(old.next_deliver_time) + key, due)
                put(due_time(new.next_deliver_time) + key, b"", due)


class _Delete(_Request):
    __slots__ = ("ids", "remember_until")
    needs_sync = False

    def __init__(self, records: Sequence[StoredMessage], remember_until: float) -> None:
        super().__init__(len(records) * _KEY_OVERHEAD)
        self.ids = [r.message_id.encode() for r in records]
        self.remember_until = remember_until

    def ids_read(self) -> Iterable[bytes]:
        return self.ids

    def apply(self, batch: _Batch) -> None:
        for key in self.ids:
            old = batch.states[key]
            if old is not None:
                batch.remove(key, old)
        until = self.remember_until
        if until > 0.0:
            # in the delete's WriteBatch: the id is never gone and forgotten
            db, put = batch.db, batch.wb.put
            value, expiry = DUE_TIME.pack(until), due_time(until)
            dedup, dedup_expiry = db.dedup.handle, db.dedup_expiry.handle
            for key in self.ids:
                put(key, value, dedup)
                put(expiry + key, b"", dedup_expiry)
                batch.remembered[key] = until
            db.remembering = True


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

    def apply(self, batch: _Batch) -> None:
        old = batch.states[self.key]
        if old is None or old.committed:
            return
        value = batch.message(self.key)
        if value is None:
            logger.warning("state without message id=%s: not decided", self.key.decode())
            return
        self.record = decode_message(value, self.decide(batch, old))

    def decide(self, batch: _Batch, old: State) -> State:
        """Write the decision on the stored, uncommitted *old*; the record's state after it."""
        raise NotImplementedError


class _Commit(_Decision):
    __slots__ = ()

    def decide(self, batch: _Batch, old: State) -> State:
        state = old._replace(committed=True)
        batch.put_state(self.key, state)
        batch.wb.delete(self.key, batch.db.uncommitted.handle)
        batch.wb.put(due_time(state.next_deliver_time) + self.key, b"", batch.db.due.handle)
        return state


class _Rollback(_Decision):
    __slots__ = ()

    def decide(self, batch: _Batch, old: State) -> State:
        db = batch.db
        # msg, state and the uncommitted index go; the history stays, to show what happened
        batch.wb.delete(self.key, db.msg.handle)
        batch.wb.delete(self.key, db.state.handle)
        batch.wb.delete(self.key, db.uncommitted.handle)
        batch.states[self.key] = None
        batch.messages.pop(self.key, None)
        batch.count(old.topic, -1)
        return old


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
    """Dead letters, applied per message.

    A message's entries and the update or removal of its stored record go into the same
    WriteBatch, so a crash keeps both or neither.
    """

    __slots__ = ("messages",)

    def __init__(self, letters: Sequence[DeadLetter]) -> None:
        super().__init__(sum(len(letter.record.message.body) + _KEY_OVERHEAD for letter in letters))
        # message id -> [(dlq key, letter, its bookkeeping)], in call order
        self.messages: dict[bytes, list[tuple[bytes, DeadLetter, Bookkeeping]]] = {}
        for letter in letters:
            mid = letter.record.message_id
            self.messages.setdefault(mid.encode(), []).append(
                (dead_entry_key(mid, letter.group), letter, bookkeeping_of(letter.record))
            )

    def ids_read(self) -> Iterable[bytes]:
        return self.messages

    def dlq_keys_read(self) -> Iterable[bytes]:
        return (dlq_key for mine in self.messages.values() for dlq_key, _, _ in mine)

    def apply(self, batch: _Batch) -> None:
        for key, mine in self.messages.items():
            old = batch.states[key]
            if old is None:
                continue
            value = batch.message(key)
            if value is None:
                logger.warning("state without message id=%s: not dead-lettered", key.decode())
                continue
            for dlq_key, letter, bookkeeping in mine:
                # The caller's bookkeeping is the latest (as in reschedule); the message and
                # its committed flag are the stored ones.
                entry = encode_dead_entry(
                    value,
                    State(old.topic, old.committed, *bookkeeping),
                    letter.reason,
                    letter.dead_time,
                    letter.group,
                )
                batch.wb.put(dlq_key, entry, batch.db.dlq.handle)
                replaced = batch.dead[dlq_key]
                if replaced is not None:
                    batch.count_dlq(dead_entry_topic_group(replaced), -1)
                batch.dead[dlq_key] = entry
                batch.count_dlq((old.topic, letter.group), 1)
            _, last, bookkeeping = mine[-1]
            if last.keep:
                batch.move_due(key, old, State(old.topic, old.committed, *bookkeeping))
            else:
                batch.remove(key, old)


class _Redrive(_Request):
    __slots__ = ("keys", "now", "records")

    def __init__(self, keys: Sequence[DlqKey], now: float) -> None:
        super().__init__(len(keys) * _KEY_OVERHEAD)
        # (message id, dlq key, group), each dlq key once
        unique = {dead_entry_key(mid, group): (mid.encode(), group) for mid, group in keys}
        self.keys = [(mid, dlq_key, group) for dlq_key, (mid, group) in unique.items()]
        self.now = now
        self.records: list[StoredMessage] = []

    def ids_read(self) -> Iterable[bytes]:
        return (mid for mid, _, _ in self.keys)

    def dlq_keys_read(self) -> Iterable[bytes]:
        return (dlq_key for _, dlq_key, _ in self.keys)

    def apply(self, batch: _Batch) -> None:
        # message id -> (its latest dead letter taken, the groups redriven)
        revived: dict[bytes, tuple[DeadEntry, list[str]]] = {}
        for key, dlq_key, group in self.keys:
            dead = batch.dead[dlq_key]
            if dead is None:
                continue
            entry = decode_dead_entry(dead)
            batch.wb.delete(dlq_key, batch.db.dlq.handle)
            batch.dead[dlq_key] = None
            batch.count_dlq((entry.state.topic, group), -1)
            latest, groups = revived.get(key, (entry, []))
            groups.append(group)
            # the latest letter has the latest state of the message's other groups
            revived[key] = (entry if entry.dead_time >= latest.dead_time else latest, groups)
        for key, (entry, groups) in revived.items():
            self._revive(batch, key, entry, groups)

    def _revive(self, batch: _Batch, key: bytes, entry: DeadEntry, groups: list[str]) -> None:
        old = batch.states[key]
        stored = None if old is None else batch.message(key)
        if old is not None and stored is not None:
            value, record = stored, decode_message(stored, old)
        else:
            value, record = entry.message, decode_message(entry.message, entry.state)
        expired_time = record.message.expired_time
        redrive_groups(record, groups, self.now, still_stored=old is not None)
        if record.message.expired_time != expired_time:
            value = encode_message(record)
            batch.wb.put(key, value, batch.db.msg.handle)
            batch.messages[key] = value
        state = state_of(record)
        if old is None:
            batch.add(key, value, state)
        else:
            batch.move_due(key, old, state)
        if state.committed:
            self.records.append(record)


class _AppendHistory(_Request):
    __slots__ = ("items", "next_seq")
    needs_sync = False

    def __init__(self, events: Sequence[HistoryEvent], seq: int) -> None:
        items: list[tuple[bytes, bytes]] = []
        for event in events:
            key = event.message_id.encode() + due_time(event.time) + SEQ.pack(seq)
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
        put(HISTORY_SEQ_KEY, SEQ.pack(self.next_seq), history)
