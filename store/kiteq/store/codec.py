"""Binary records for the stores that keep bytes (RocksDB): fast to build and to read back.

A stored message is split in two values because they change at different rates:

* the **message** value is written once at save and never rewritten: the header, the
  properties, the body, ``publish_time`` and ``kite_server``;
* the **state** value is rewritten on every delivery result and on commit: the topic (so
  the backlog can be counted at open from small values only), the committed flag and
  the delivery bookkeeping.

Every value starts with a format version byte so a later format can be read next to an
older one (``MESSAGE_VERSION``, ``STATE_VERSION``, ``DEAD_VERSION``, ``EVENT_VERSION``).
Layout is a little-endian ``struct`` fixed part holding every length, followed by the
UTF-8 strings and the raw body, so encoding is one ``pack`` plus one ``join`` and no
per-field framing. Protobuf is deliberately not used: it would tie the storage format to
the wire schema and costs more per record.

Message value, version 1::

    u8 version | u8 flags (1 fly, 2 snappy, 4 scheduled, 8 keyed) | i64 expired_time
    | i32 deliver_limit | i64 create_time | f64 publish_time | 6 x u32 len (id, topic, type,
    group, kite_server, body) | u32 property count | id | topic | type | group | kite_server
    | 2n x u32 len (key, value per property) | keys and values | body
    | f64 deliver_at (only with flag 4: scheduled delivery, issue #15)
    | u16 len | ordering key (only with flag 8: ordered delivery, issue #16)

A record without flags 4 and 8 is byte for byte what it was before those issues, so old
records read unchanged.

State value, version 2 (issue #10: delivery state per group)::

    u8 version | u8 flags (1 committed) | u32 deliver_count | f64 next_deliver_time
    | u32 len(topic) | u32 group count | u32 len(only_groups) | topic
    | n x (u32 len(name), u8 state, u32 attempts, f64 next_deliver_time) | group names
    | m x u32 len | only_groups names

(The fixed part has the size of version 1's, so a record no group has tried yet costs
what it did.) Version 1, written before issue #10, is still read::

    u8 version | u8 flags (1 committed) | u32 deliver_count | f64 next_deliver_time
    | u32 len(topic) | u32 len(succ_groups) | u32 len(fail_groups) | topic
    | (succ + fail) x u32 len | group names

Its groups map as ``kiteq.store._groups.legacy_groups`` says; it is rewritten as version
2 by the next write of that record's state.

Dead-letter value, version 2 (one group's dead letter: the record's message and state
values, verbatim, behind why, when and for which group)::

    u8 version | f64 dead_time | u32 len(reason) | u32 len(group) | u32 len(state value)
    | reason | group | state value | message value

Version 1 (one value per message, naming every group that had not acked) is read only
to migrate it: ``decode_legacy_dead_letters`` makes one letter per group of it.

History event value, version 1 (the message id is in the key)::

    u8 version | f64 time | i64 attempt | 4 x u32 len (kind, group, connection, detail)
    | kind | group | connection | detail
"""

from __future__ import annotations

import itertools
import struct
import types
from collections.abc import Mapping
from typing import Final, NamedTuple

from kiteq.core.message import GroupDelivery, GroupState, Message, StoredMessage
from kiteq.store._groups import copy_groups, legacy_groups
from kiteq.store.base import DeadLetter, HistoryEvent

__all__ = [
    "DEAD_VERSION",
    "DLQ_KEY_SEPARATOR",
    "EVENT_VERSION",
    "MESSAGE_VERSION",
    "NO_GROUPS",
    "STATE_VERSION",
    "Bookkeeping",
    "DeadEntry",
    "State",
    "bookkeeping_of",
    "dead_entry_key",
    "dead_entry_topic_group",
    "decode_dead_entry",
    "decode_dead_letter",
    "decode_event",
    "decode_legacy_dead_letters",
    "decode_message",
    "decode_state",
    "encode_dead_entry",
    "encode_event",
    "encode_message",
    "encode_state",
    "is_legacy_dead_entry",
    "state_of",
]

MESSAGE_VERSION: Final = 1
STATE_VERSION: Final = 2
DEAD_VERSION: Final = 2
EVENT_VERSION: Final = 1
# what the versions were before issue #10 (read, never written)
_LEGACY_VERSION: Final = 1

_MESSAGE: Final = struct.Struct("<BBqiqdIIIIIII")
_STATE: Final = struct.Struct("<BBIdIII")
_GROUP: Final = "IBId"
_GROUP_SIZE: Final = struct.calcsize("<" + _GROUP)
_DEAD: Final = struct.Struct("<BdIII")
_LEGACY_DEAD: Final = struct.Struct("<BdIII")
_EVENT: Final = struct.Struct("<BdqIIII")
_FLY: Final = 1
_SNAPPY: Final = 2
_SCHEDULED: Final = 4
_DELIVER_AT: Final = struct.Struct("<d")
_KEYED: Final = 8
_KEY_LEN: Final = struct.Struct("<H")
_COMMITTED: Final = 1
_STATE_CODES: Final = {GroupState.PENDING: 0, GroupState.ACKED: 1, GroupState.DEAD: 2}
_CODE_STATES: Final = {code: state for state, code in _STATE_CODES.items()}
# between the message id and the group in a dlq key: sorts before every other character,
# so keys sort as (message_id, group) tuples do
DLQ_KEY_SEPARATOR: Final = b"\x00"


# the groups of a record no group has tried yet, shared: a State never changes its groups
NO_GROUPS: Final[Mapping[str, GroupDelivery]] = types.MappingProxyType({})


class State(NamedTuple):
    """The mutable part of a stored message.

    ``groups`` is owned by the State (``state_of`` copies it) and never changed: it is
    encoded on the store thread while the caller's record may change.
    """

    topic: str
    committed: bool
    deliver_count: int
    groups: Mapping[str, GroupDelivery]
    only_groups: tuple[str, ...]
    next_deliver_time: float


# A record's delivery bookkeeping: State's fields after topic and committed, in its order
# (``State(topic, committed, *bookkeeping)``), copied as ``state_of`` copies.
Bookkeeping = tuple[int, Mapping[str, GroupDelivery], tuple[str, ...], float]


def bookkeeping_of(record: StoredMessage) -> Bookkeeping:
    groups = record.groups
    return (
        record.deliver_count,
        copy_groups(groups) if groups else NO_GROUPS,
        tuple(record.only_groups),
        record.next_deliver_time,
    )


def state_of(record: StoredMessage) -> State:
    return State(record.message.topic, record.message.commit, *bookkeeping_of(record))


def encode_message(record: StoredMessage) -> bytes:
    m = record.message
    mid = m.message_id.encode()
    topic = m.topic.encode()
    mtype = m.message_type.encode()
    group = m.group_id.encode()
    server = record.kite_server.encode()
    flags = (_FLY if m.fly else 0) | (_SNAPPY if m.snappy else 0)
    # a message with no delivery time has none: its value is what it was before issue #15
    tail = _DELIVER_AT.pack(m.deliver_at) if m.deliver_at else b""
    if tail:
        flags |= _SCHEDULED
    if m.ordering_key:
        key = m.ordering_key.encode()
        tail += _KEY_LEN.pack(len(key)) + key
        flags |= _KEYED
    head = _MESSAGE.pack(
        MESSAGE_VERSION,
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
        return b"".join((head, mid, topic, mtype, group, server, m.body, tail))
    chunks = [s.encode() for kv in m.properties.items() for s in kv]
    lengths = struct.pack(f"<{len(chunks)}I", *map(len, chunks))
    return b"".join((head, mid, topic, mtype, group, server, lengths, *chunks, m.body, tail))


def decode_message(data: bytes, state: State) -> StoredMessage:
    """Rebuild the record from its message value and its (decoded) state value.

    Raises:
        ValueError: *data* is truncated, corrupt or of an unknown format version.
    """
    try:
        return _decode_message(data, state)
    except struct.error as exc:
        raise ValueError(f"truncated message record: {exc}") from exc


def publish_time_of(data: bytes) -> float:
    """The ``publish_time`` of a message value, without decoding the rest."""
    if not data or data[0] != MESSAGE_VERSION:
        raise ValueError(f"unsupported message record version {data[0] if data else None}")
    return float(_MESSAGE.unpack_from(data)[5])


def _decode_message(data: bytes, state: State) -> StoredMessage:
    version = data[0] if data else None
    if version != MESSAGE_VERSION:
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
    end = pos + n_body
    deliver_at = 0.0
    size = end
    if flags & _SCHEDULED:
        (deliver_at,) = _DELIVER_AT.unpack_from(data, size)
        size += _DELIVER_AT.size
    ordering_key = ""
    if flags & _KEYED:
        (n_key,) = _KEY_LEN.unpack_from(data, size)
        size += _KEY_LEN.size
        ordering_key = data[size : size + n_key].decode()
        size += n_key
    if size != len(data):
        raise ValueError(f"message record is {len(data)} bytes, its lengths say {size}")
    message = Message(
        topic=topic,
        message_type=message_type,
        body=data[pos:end],
        message_id=message_id,
        properties=properties,
        expired_time=expired_time,
        deliver_limit=deliver_limit,
        group_id=group_id,
        commit=state.committed,
        fly=bool(flags & _FLY),
        create_time=create_time,
        snappy=bool(flags & _SNAPPY),
        deliver_at=deliver_at,
        ordering_key=ordering_key,
    )
    return StoredMessage(
        message=message,
        publish_time=publish_time,
        deliver_count=state.deliver_count,
        # the record's own copy: a State may be read again (the RocksDB batch keeps it)
        groups=copy_groups(state.groups),
        next_deliver_time=state.next_deliver_time,
        only_groups=state.only_groups,
        kite_server=kite_server,
    )


def encode_state(state: State) -> bytes:
    topic = state.topic.encode()
    groups, only = state.groups, state.only_groups
    head = _STATE.pack(
        STATE_VERSION,
        _COMMITTED if state.committed else 0,
        state.deliver_count,
        state.next_deliver_time,
        len(topic),
        len(groups),
        len(only),
    )
    if not groups and not only:
        return head + topic
    names = [g.encode() for g in groups]
    fields: list[int | float] = []
    for name, d in zip(names, groups.values(), strict=True):
        fields += (len(name), _STATE_CODES[d.state], d.attempts, d.next_deliver_time)
    only_names = [g.encode() for g in only]
    return b"".join(
        (
            head,
            topic,
            struct.pack("<" + _GROUP * len(names), *fields),
            *names,
            struct.pack(f"<{len(only_names)}I", *map(len, only_names)),
            *only_names,
        )
    )


def decode_state(data: bytes) -> State:
    """Raises ``ValueError`` like ``decode_message``."""
    try:
        return _decode_state(data)
    except struct.error as exc:
        raise ValueError(f"truncated state record: {exc}") from exc
    except KeyError as exc:
        raise ValueError(f"state record with an unknown group state {exc}") from exc


def _decode_state(data: bytes) -> State:
    version = data[0] if data else None
    if version == _LEGACY_VERSION:
        return _decode_legacy_state(data)
    if version != STATE_VERSION:
        raise ValueError(f"unsupported state record version {version}")
    _, flags, deliver_count, next_deliver_time, n_topic, n_groups, n_only = _STATE.unpack_from(data)
    pos = _STATE.size
    topic = data[pos : pos + n_topic].decode()
    pos += n_topic
    # shared when empty: a batch decodes a State per id it touches, and a dict each
    # would cost the cyclic GC more than the decoding
    groups: Mapping[str, GroupDelivery] = NO_GROUPS
    only: tuple[str, ...] = ()
    if n_groups or n_only:
        fields = struct.unpack_from("<" + _GROUP * n_groups, data, pos)
        pos += _GROUP_SIZE * n_groups
        found: dict[str, GroupDelivery] = {}
        for i in range(0, 4 * n_groups, 4):
            n = fields[i]
            name = data[pos : pos + n].decode()
            pos += n
            found[name] = GroupDelivery(_CODE_STATES[fields[i + 1]], fields[i + 2], fields[i + 3])
        names, pos = _strings(data, pos, n_only)
        groups, only = found or NO_GROUPS, tuple(names)
    if pos != len(data):
        raise ValueError(f"state record is {len(data)} bytes, its lengths say {pos}")
    return State(topic, bool(flags & _COMMITTED), deliver_count, groups, only, next_deliver_time)


def _decode_legacy_state(data: bytes) -> State:
    _, flags, deliver_count, next_deliver_time, n_topic, n_succ, n_fail = _STATE.unpack_from(data)
    pos = _STATE.size
    topic = data[pos : pos + n_topic].decode()
    pos += n_topic
    names, pos = _strings(data, pos, n_succ + n_fail)
    if pos != len(data):
        raise ValueError(f"state record is {len(data)} bytes, its lengths say {pos}")
    groups = legacy_groups(names[:n_succ], names[n_succ:], deliver_count, next_deliver_time)
    return State(topic, bool(flags & _COMMITTED), deliver_count, groups, (), next_deliver_time)


def _strings(data: bytes, pos: int, count: int) -> tuple[list[str], int]:
    """*count* strings stored as count x u32 len then the UTF-8 bytes, from *pos*."""
    if not count:
        return [], pos
    lengths = struct.unpack_from(f"<{count}I", data, pos)
    pos += 4 * count
    strings: list[str] = []
    for n in lengths:
        strings.append(data[pos : pos + n].decode())
        pos += n
    return strings, pos


def dead_entry_key(message_id: str, group: str) -> bytes:
    """The dlq key of one (message_id, group): ordered as the tuples are."""
    return message_id.encode() + DLQ_KEY_SEPARATOR + group.encode()


class DeadEntry(NamedTuple):
    """A dead-letter value taken apart; ``message`` is still an encoded message value."""

    reason: str
    dead_time: float
    group: str
    state: State
    message: bytes


def encode_dead_entry(
    message: bytes, state: State, reason: str, dead_time: float, group: str
) -> bytes:
    """A dead-letter value around an encoded *message* value and its *state*."""
    encoded_state = encode_state(state)
    why = reason.encode()
    name = group.encode()
    head = _DEAD.pack(DEAD_VERSION, dead_time, len(why), len(name), len(encoded_state))
    return b"".join((head, why, name, encoded_state, message))


def decode_dead_entry(data: bytes) -> DeadEntry:
    """Raises ``ValueError`` like ``decode_message`` (the message value is not checked)."""
    try:
        dead_time, reason, group, start, end = _dead_head(data)
        return DeadEntry(reason, dead_time, group, decode_state(data[start:end]), data[end:])
    except struct.error as exc:
        raise ValueError(f"truncated dead-letter record: {exc}") from exc


def _dead_head(data: bytes) -> tuple[float, str, str, int, int]:
    """dead_time, reason, group, and where the state value starts and ends."""
    version = data[0] if data else None
    if version != DEAD_VERSION:
        raise ValueError(f"unsupported dead-letter record version {version}")
    _, dead_time, n_reason, n_group, n_state = _DEAD.unpack_from(data)
    pos = _DEAD.size
    reason = data[pos : pos + n_reason].decode()
    pos += n_reason
    group = data[pos : pos + n_group].decode()
    pos += n_group
    if pos + n_state > len(data):
        raise ValueError(f"dead-letter record is {len(data)} bytes, its lengths say more")
    return dead_time, reason, group, pos, pos + n_state


def dead_entry_topic_group(data: bytes) -> tuple[str, str]:
    """The (topic, group) of a dead-letter value, without copying its message."""
    try:
        _, _, group, start, end = _dead_head(data)
        return decode_state(data[start:end]).topic, group
    except struct.error as exc:
        raise ValueError(f"truncated dead-letter record: {exc}") from exc


def decode_dead_letter(data: bytes) -> DeadLetter:
    """The whole dead letter; raises ``ValueError`` like ``decode_message``."""
    entry = decode_dead_entry(data)
    record = decode_message(entry.message, entry.state)
    return DeadLetter(record, entry.reason, entry.dead_time, entry.group)


def is_legacy_dead_entry(data: bytes) -> bool:
    return bool(data) and data[0] == _LEGACY_VERSION


def decode_legacy_dead_letters(data: bytes) -> list[DeadLetter]:
    """The letters of a dead-letter value written before issue #10, one per group.

    That value named every group that had not acked; each becomes ``DEAD`` in the
    record, with the message's attempt count. A value naming no group (``no_binding``)
    becomes the letter of group ``""``. Raises ``ValueError`` like ``decode_message``.
    """
    try:
        return _decode_legacy_dead_letters(data)
    except struct.error as exc:
        raise ValueError(f"truncated dead-letter record: {exc}") from exc


def _decode_legacy_dead_letters(data: bytes) -> list[DeadLetter]:
    if not is_legacy_dead_entry(data):
        raise ValueError(f"not a version {_LEGACY_VERSION} dead-letter record")
    _, dead_time, n_reason, n_groups, n_state = _LEGACY_DEAD.unpack_from(data)
    pos = _LEGACY_DEAD.size
    reason = data[pos : pos + n_reason].decode()
    pos += n_reason
    groups, pos = _strings(data, pos, n_groups)
    if pos + n_state > len(data):
        raise ValueError(f"dead-letter record is {len(data)} bytes, its lengths say more")
    state = decode_state(data[pos : pos + n_state])
    if groups:
        dead = copy_groups(state.groups)
        for g in groups:
            dead[g] = GroupDelivery(GroupState.DEAD, state.deliver_count, state.next_deliver_time)
        state = state._replace(groups=dead)
    message = data[pos + n_state :]
    return [
        DeadLetter(decode_message(message, state), reason, dead_time, group)
        for group in groups or ("",)
    ]


def encode_event(event: HistoryEvent) -> bytes:
    kind = event.kind.encode()
    group = event.group.encode()
    connection = event.connection.encode()
    detail = event.detail.encode()
    head = _EVENT.pack(
        EVENT_VERSION,
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
    if version != EVENT_VERSION:
        raise ValueError(f"unsupported history record version {version}")
    _, time, attempt, *lengths = _EVENT.unpack_from(data)
    # where each string starts, and where the record must end
    ends = list(itertools.accumulate(lengths, initial=_EVENT.size))
    if ends[-1] != len(data):
        raise ValueError(f"history record is {len(data)} bytes, its lengths disagree")
    kind, group, connection, detail = (
        data[start:end].decode() for start, end in itertools.pairwise(ends)
    )
    return HistoryEvent(
        message_id,
        time,
        kind,
        group=group,
        connection=connection,
        attempt=attempt,
        detail=detail,
    )
