"""Binary records for the stores that keep bytes (RocksDB): fast to build and to read back.

A stored message is split in two values because they change at different rates:

* the **message** value is written once at save and never rewritten: the header, the
  properties, the body, ``publish_time`` and ``kite_server``;
* the **state** value is rewritten on every delivery result and on commit: the topic (so
  the backlog can be counted at open from small values only), the committed flag and
  the delivery bookkeeping.

Both start with a format version byte so a later format can be read next to this one.
Layout is a little-endian ``struct`` fixed part holding every length, followed by the
UTF-8 strings and the raw body, so encoding is one ``pack`` plus one ``join`` and no
per-field framing. Protobuf is deliberately not used: it would tie the storage format to
the wire schema and costs more per record.

Message value, version 1::

    u8 version | u8 flags (1 fly, 2 snappy) | i64 expired_time | i32 deliver_limit
    | i64 create_time | f64 publish_time | 6 x u32 len (id, topic, type, group, kite_server,
    body) | u32 property count | id | topic | type | group | kite_server
    | 2n x u32 len (key, value per property) | keys and values | body

State value, version 1::

    u8 version | u8 flags (1 committed) | u32 deliver_count | f64 next_deliver_time
    | u32 len(topic) | u32 len(succ_groups) | u32 len(fail_groups) | topic
    | (succ + fail) x u32 len | group names

Dead-letter value, version 1 (a whole record out of delivery: its message and state
values, verbatim, behind why and when)::

    u8 version | f64 dead_time | u32 len(reason) | u32 group count | u32 len(state value)
    | reason | n x u32 len | group names | state value | message value

History event value, version 1 (the message id is in the key)::

    u8 version | f64 time | i64 attempt | 4 x u32 len (kind, group, connection, detail)
    | kind | group | connection | detail
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final, NamedTuple

from kiteq.core.message import Message, StoredMessage
from kiteq.store.base import DeadLetter, HistoryEvent

__all__ = [
    "FORMAT_VERSION",
    "DeadEntry",
    "State",
    "dead_entry_topic",
    "decode_dead_entry",
    "decode_dead_letter",
    "decode_event",
    "decode_message",
    "decode_state",
    "encode_dead_entry",
    "encode_event",
    "encode_message",
    "encode_state",
    "state_of",
]

FORMAT_VERSION: Final = 1

_MESSAGE: Final = struct.Struct("<BBqiqdIIIIIII")
_STATE: Final = struct.Struct("<BBIdIII")
_DEAD: Final = struct.Struct("<BdIII")
_EVENT: Final = struct.Struct("<BdqIIII")
_FLY: Final = 1
_SNAPPY: Final = 2
_COMMITTED: Final = 1


class State(NamedTuple):
    """The mutable part of a stored message."""

    topic: str
    committed: bool
    deliver_count: int
    succ_groups: tuple[str, ...]
    fail_groups: tuple[str, ...]
    next_deliver_time: float


def state_of(record: StoredMessage) -> State:
    return State(
        record.message.topic,
        record.message.commit,
        record.deliver_count,
        record.succ_groups,
        record.fail_groups,
        record.next_deliver_time,
    )


def encode_message(record: StoredMessage) -> bytes:
    m = record.message
    mid = m.message_id.encode()
    topic = m.topic.encode()
    mtype = m.message_type.encode()
    group = m.group_id.encode()
    server = record.kite_server.encode()
    flags = (_FLY if m.fly else 0) | (_SNAPPY if m.snappy else 0)
    head = _MESSAGE.pack(
        FORMAT_VERSION,
        flags,
        m.expired_time,
        m.deliver_limit,
        m.create_time,
        record.publish_time,
        len(mid),
        len(topic),
        len(mtype),
        len(group),
        len(server),
        len(m.body),
        len(m.properties),
    )
    if not m.properties:
        return b"".join((head, mid, topic, mtype, group, server, m.body))
    chunks = [s.encode() for kv in m.properties.items() for s in kv]
    lengths = struct.pack(f"<{len(chunks)}I", *map(len, chunks))
    return b"".join((head, mid, topic, mtype, group, server, lengths, *chunks, m.body))


def decode_message(data: bytes, state: State) -> StoredMessage:
    """Rebuild the record from its message value and its (decoded) state value.

    Raises:
        ValueError: *data* is truncated, corrupt or of an unknown format version.
    """
    try:
        return _decode_message(data, state)
    except struct.error as exc:
        raise ValueError(f"truncated message record: {exc}") from exc


def _decode_message(data: bytes, state: State) -> StoredMessage:
    version = data[0] if data else None
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported message record version {version}")
    (
        _,
        flags,
        expired_time,
        deliver_limit,
        create_time,
        publish_time,
        n_id,
        n_topic,
        n_type,
        n_group,
        n_server,
        n_body,
        n_props,
    ) = _MESSAGE.unpack_from(data)
    pos = _MESSAGE.size
    message_id = data[pos : pos + n_id].decode()
    pos += n_id
    topic = data[pos : pos + n_topic].decode()
    pos += n_topic
    message_type = data[pos : pos + n_type].decode()
    pos += n_type
    group_id = data[pos : pos + n_group].decode()
    pos += n_group
    kite_server = data[pos : pos + n_server].decode()
    pos += n_server
    properties: dict[str, str] = {}
    if n_props:
        lengths = struct.unpack_from(f"<{2 * n_props}I", data, pos)
        pos += 8 * n_props
        strings = []
        for n in lengths:
            strings.append(data[pos : pos + n].decode())
            pos += n
        properties = dict(zip(strings[::2], strings[1::2], strict=True))
    if pos + n_body != len(data):
        raise ValueError(f"message record is {len(data)} bytes, its lengths say {pos + n_body}")
    message = Message(
        topic=topic,
        message_type=message_type,
        body=data[pos:],
        message_id=message_id,
        properties=properties,
        expired_time=expired_time,
        deliver_limit=deliver_limit,
        group_id=group_id,
        commit=state.committed,
        fly=bool(flags & _FLY),
        create_time=create_time,
        snappy=bool(flags & _SNAPPY),
    )
    return StoredMessage(
        message=message,
        publish_time=publish_time,
        deliver_count=state.deliver_count,
        succ_groups=state.succ_groups,
        fail_groups=state.fail_groups,
        next_deliver_time=state.next_deliver_time,
        kite_server=kite_server,
    )


def encode_state(state: State) -> bytes:
    topic = state.topic.encode()
    head = _STATE.pack(
        FORMAT_VERSION,
        _COMMITTED if state.committed else 0,
        state.deliver_count,
        state.next_deliver_time,
        len(topic),
        len(state.succ_groups),
        len(state.fail_groups),
    )
    if not state.succ_groups and not state.fail_groups:
        return head + topic
    groups = [g.encode() for g in (*state.succ_groups, *state.fail_groups)]
    lengths = struct.pack(f"<{len(groups)}I", *map(len, groups))
    return b"".join((head, topic, lengths, *groups))


def decode_state(data: bytes) -> State:
    """Raises ``ValueError`` like ``decode_message``."""
    try:
        return _decode_state(data)
    except struct.error as exc:
        raise ValueError(f"truncated state record: {exc}") from exc


def _decode_state(data: bytes) -> State:
    version = data[0] if data else None
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported state record version {version}")
    _, flags, deliver_count, next_deliver_time, n_topic, n_succ, n_fail = _STATE.unpack_from(data)
    pos = _STATE.size
    topic = data[pos : pos + n_topic].decode()
    pos += n_topic
    groups: list[str] = []
    if n_succ or n_fail:
        lengths = struct.unpack_from(f"<{n_succ + n_fail}I", data, pos)
        pos += 4 * (n_succ + n_fail)
        for n in lengths:
            groups.append(data[pos : pos + n].decode())
            pos += n
    if pos != len(data):
        raise ValueError(f"state record is {len(data)} bytes, its lengths say {pos}")
    return State(
        topic,
        bool(flags & _COMMITTED),
        deliver_count,
        tuple(groups[:n_succ]),
        tuple(groups[n_succ:]),
        next_deliver_time,
    )


class DeadEntry(NamedTuple):
    """A dead-letter value taken apart; ``message`` is still an encoded message value."""

    reason: str
    dead_time: float
    groups: tuple[str, ...]
    state: State
    message: bytes


def encode_dead_entry(
    message: bytes, state: State, reason: str, dead_time: float, groups: Sequence[str]
) -> bytes:
    """A dead-letter value around an encoded *message* value and its *state*."""
    encoded_state = encode_state(state)
    why = reason.encode()
    head = _DEAD.pack(FORMAT_VERSION, dead_time, len(why), len(groups), len(encoded_state))
    if not groups:
        return b"".join((head, why, encoded_state, message))
    names = [g.encode() for g in groups]
    lengths = struct.pack(f"<{len(names)}I", *map(len, names))
    return b"".join((head, why, lengths, *names, encoded_state, message))


def decode_dead_entry(data: bytes) -> DeadEntry:
    """Raises ``ValueError`` like ``decode_message`` (the message value is not checked)."""
    try:
        return _decode_dead_entry(data)
    except struct.error as exc:
        raise ValueError(f"truncated dead-letter record: {exc}") from exc


def _dead_head(data: bytes) -> tuple[float, str, tuple[str, ...], int, int]:
    """dead_time, reason, groups, and where the state value starts and ends."""
    version = data[0] if data else None
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported dead-letter record version {version}")
    _, dead_time, n_reason, n_groups, n_state = _DEAD.unpack_from(data)
    pos = _DEAD.size
    reason = data[pos : pos + n_reason].decode()
    pos += n_reason
    groups: list[str] = []
    if n_groups:
        lengths = struct.unpack_from(f"<{n_groups}I", data, pos)
        pos += 4 * n_groups
        for n in lengths:
            groups.append(data[pos : pos + n].decode())
            pos += n
    if pos + n_state > len(data):
        raise ValueError(f"dead-letter record is {len(data)} bytes, its lengths say more")
    return dead_time, reason, tuple(groups), pos, pos + n_state


def _decode_dead_entry(data: bytes) -> DeadEntry:
    dead_time, reason, groups, start, end = _dead_head(data)
    return DeadEntry(reason, dead_time, groups, decode_state(data[start:end]), data[end:])


def dead_entry_topic(data: bytes) -> str:
    """The topic of a dead-letter value, without copying its message."""
    try:
        _, _, _, start, end = _dead_head(data)
        return decode_state(data[start:end]).topic
    except struct.error as exc:
        raise ValueError(f"truncated dead-letter record: {exc}") from exc


def decode_dead_letter(data: bytes) -> DeadLetter:
    """The whole dead letter; raises ``ValueError`` like ``decode_message``."""
    entry = decode_dead_entry(data)
    record = decode_message(entry.message, entry.state)
    return DeadLetter(record, entry.reason, entry.dead_time, entry.groups)


def encode_event(event: HistoryEvent) -> bytes:
    kind = event.kind.encode()
    group = event.group.encode()
    connection = event.connection.encode()
    detail = event.detail.encode()
    head = _EVENT.pack(
        FORMAT_VERSION,
        event.time,
        event.attempt,
        len(kind),
        len(group),
        len(connection),
        len(detail),
    )
    return b"".join((head, kind, group, connection, detail))


def decode_event(message_id: str, data: bytes) -> HistoryEvent:
    """The event of *message_id* in *data*; raises ``ValueError`` like ``decode_message``."""
    try:
        return _decode_event(message_id, data)
    except struct.error as exc:
        raise ValueError(f"truncated history record: {exc}") from exc


def _decode_event(message_id: str, data: bytes) -> HistoryEvent:
    version = data[0] if data else None
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported history record version {version}")
    _, time, attempt, n_kind, n_group, n_connection, n_detail = _EVENT.unpack_from(data)
    pos = _EVENT.size
    if pos + n_kind + n_group + n_connection + n_detail != len(data):
        raise ValueError(f"history record is {len(data)} bytes, its lengths disagree")
    kind = data[pos : pos + n_kind].decode()
    pos += n_kind
    group = data[pos : pos + n_group].decode()
    pos += n_group
    connection = data[pos : pos + n_connection].decode()
    pos += n_connection
    return HistoryEvent(
        message_id,
        time,
        kind,
        group=group,
        connection=connection,
        attempt=attempt,
        detail=data[pos:].decode(),
    )
