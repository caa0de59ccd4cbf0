"""MySQL store internals: rows <-> records, and the SQL statements the store runs."""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Final, TypeVar, TypeVarTuple

from kiteq.core.message import GroupDelivery, GroupState, Message, StoredMessage, pending_groups
from kiteq.store._groups import failed_groups, legacy_groups
from kiteq.store._mysql_schema import (
    DLQ_COLUMNS,
    HISTORY_COLUMNS,
    MESSAGE_COLUMNS,
)
from kiteq.store.base import (
    DeadLetter,
)

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")
_Row = tuple[Any, ...]

# KiteQ's msg_type for a bytes body (0x12 was a string body; all bodies are bytes here).
_BYTES_MESSAGE: Final = 0x11
# One transaction carries at most this many bytes of rows (a single larger call goes
# alone), so a burst cannot build an unbounded transaction.
_MAX_FLUSH_BYTES: Final = 8 * 1024 * 1024
_ROW_OVERHEAD: Final = 256
# ids per IN (…) list for reads (SELECT … IN, SELECT … FOR UPDATE)
_READ_CHUNK: Final = 1000
# history rows removed per statement by prune_history
_PRUNE_CHUNK: Final = 10_000
_MAX_ATTEMPTS: Final = 4
_DEADLOCK: Final = 1213
_LOCK_WAIT_TIMEOUT: Final = 1205
_DUPLICATE_KEY: Final = 1062
_MAX_TIME: Final = sys.float_info.max
# Column limits checked before a write joins a transaction, so one bad record fails alone
# instead of failing everything written with it. A body is sent escaped (at worst twice
# its size) in one statement: the server's max_allowed_packet (16 MiB by default) must
# hold it.
MAX_BODY_BYTES: Final = 8 * 1024 * 1024
_MAX_NAME: Final = 255
_INT: Final = range(-(2**31), 2**31)
_BIGINT: Final = range(-(2**63), 2**63)
_KIND_CHARS: Final = 32
_REASON_CHARS: Final = 64
_DETAIL_CHARS: Final = 16_000
_COLUMNS: Final = ", ".join(f"`{c}`" for c in MESSAGE_COLUMNS)
# what ``_pending_groups`` reads: the columns of the delivery state, with the message id
# first (the paging key) and the topic and publish time it is counted by
PENDING_COLUMNS: Final = (
    "message_id, topic, publish_time, group_state, only_groups, succ_groups, fail_groups, "
    "deliver_count, next_deliver_time"
)
_DLQ_COLUMNS: Final = ", ".join(f"`{c}`" for c in DLQ_COLUMNS)
_HISTORY_COLUMNS: Final = ", ".join(f"`{c}`" for c in HISTORY_COLUMNS)
# positions in a MESSAGE_COLUMNS row
_KITE_SERVER: Final = MESSAGE_COLUMNS.index("kite_server")
_TOPIC: Final = MESSAGE_COLUMNS.index("topic")
_COMMIT: Final = MESSAGE_COLUMNS.index("commit")
# group_state of a record no group has tried yet (NULL is a row from before issue #10)
_NO_GROUPS: Final = "{}"
_STATES: Final = {state.value: state for state in GroupState}
# (deliver_count, succ_groups, fail_groups, group_state, only_groups, next_deliver_time)
_Bookkeeping = tuple[int, str, str, str, str | None, float]


# -- rows ------------------------------------------------------------------------------


def _time(value: float) -> float:
    """A stored time: negative, -0.0 and NaN become 0.0 (due at once), +inf the largest."""
    if value > 0.0:
        return value if value < _MAX_TIME else _MAX_TIME
    return 0.0


def _problem(record: StoredMessage) -> str | None:
    """Why *record* cannot be stored, or None."""
    m = record.message
    if not _storable_id(m.message_id):
        return "its id is not 1 to 32 ASCII characters"
    for name, value in (
        ("topic", m.topic),
        ("message_type", m.message_type),
        ("group_id", m.group_id),
        ("kite_server", record.kite_server),
    ):
        if len(value) > _MAX_NAME:
            return f"its {name} is longer than {_MAX_NAME} characters"
    if len(m.body) > MAX_BODY_BYTES:
        return f"its body is larger than {MAX_BODY_BYTES} bytes"
    if not math.isfinite(record.publish_time):
        return "its publish_time is not a finite number"
    if m.deliver_limit not in _INT or record.deliver_count not in _INT:
        return "its deliver_limit or deliver_count is out of range"
    if m.expired_time not in _BIGINT:
        return "its expired_time is out of range"
    return None


def _storable_id(message_id: str) -> bool:
    return 0 < len(message_id) <= 32 and message_id.isascii()


def _count(value: int) -> int:
    """An INT column value (deliver_count, attempt), clamped."""
    return value if value in _INT else (_INT.stop - 1 if value > 0 else _INT.start)


def _groups(groups: Sequence[str]) -> str:
    return json.dumps(list(groups), ensure_ascii=False, separators=(",", ":")) if groups else "[]"


def _group_state(groups: dict[str, GroupDelivery]) -> str:
    """The ``group_state`` column: ``{"group": ["pending", attempts, next_deliver_time]}``."""
    if not groups:
        return _NO_GROUPS
    return json.dumps(
        {g: [d.state.value, d.attempts, d.next_deliver_time] for g, d in groups.items()},
        ensure_ascii=False,
        separators=(",", ":"),
    )


def _bookkeeping(record: StoredMessage) -> _Bookkeeping:
    """The delivery-state columns of *record*, KiteQ's succ/fail groups derived."""
    groups = record.groups
    if not groups:
        succ = fail = "[]"
    else:
        succ, fail = _groups(record.succ_groups), _groups(failed_groups(groups))
    return (
        _count(record.deliver_count),
        succ,
        fail,
        _group_state(groups),
        _groups(record.only_groups) if record.only_groups else None,
        _time(record.next_deliver_time),
    )


def _read_groups(
    group_state: str | None,
    succ_groups: str,
    fail_groups: str,
    deliver_count: int,
    next_deliver_time: float,
    dead_groups: str = "[]",
) -> dict[str, GroupDelivery]:
    if group_state is None:
        # written before issue #10: KiteQ's columns and one count for every group
        return legacy_groups(
            json.loads(succ_groups),
            json.loads(fail_groups),
            deliver_count,
            next_deliver_time,
            json.loads(dead_groups),
        )
    if group_state == _NO_GROUPS:
        return {}
    return {
        g: GroupDelivery(_STATES[state], attempts, ndt)
        for g, (state, attempts, ndt) in json.loads(group_state).items()
    }


def _header(message: Message) -> bytes:
    """The header fields without a column of their own, as JSON (module doc of the schema)."""
    if not (
        message.fly
        or message.snappy
        or message.properties
        or message.deliver_at
        or message.ordering_key
    ):
        return b'{"createTime":%d}' % message.create_time
    header: dict[str, object] = {"createTime": message.create_time}
    if message.deliver_at:
        header["deliverAt"] = message.deliver_at
    if message.ordering_key:
        header["orderingKey"] = message.ordering_key
    if message.fly:
        header["fly"] = True
    if message.snappy:
        header["snappy"] = True
    if message.properties:
        header["properties"] = dict(message.properties)
    return json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()


def _row(record: StoredMessage) -> _Row:
    """INSERT values, in ``MESSAGE_COLUMNS`` order."""
    m = record.message
    deliver_count, succ, fail, group_state, only_groups, next_deliver_time = _bookkeeping(record)
    return (
        m.message_id,
        _header(m),
        m.body,
        _BYTES_MESSAGE,
        m.topic,
        m.message_type,
        m.group_id,
        1 if m.commit else 0,
        record.publish_time,
        m.expired_time,
        deliver_count,
        m.deliver_limit,
        record.kite_server,
        fail,
        succ,
        next_deliver_time,
        group_state,
        only_groups,
    )


def _record(row: _Row, dead_groups: str = "[]") -> StoredMessage:
    """The record of a message row (or of a dead-letter row, naming its *dead_groups*)."""
    (
        message_id,
        header_json,
        body,
        _msg_type,
        topic,
        message_type,
        group,
        commit,
        publish_time,
        expired_time,
        deliver_count,
        deliver_limit,
        kite_server,
        fail_groups,
        succ_groups,
        next_deliver_time,
        group_state,
        only_groups,
    ) = row[: len(MESSAGE_COLUMNS)]
    header: dict[str, Any] = json.loads(header_json) if header_json else {}
    message = Message(
        topic=topic,
        message_type=message_type,
        body=bytes(body),
        message_id=message_id,
        properties=header.get("properties", {}),
        expired_time=expired_time,
        deliver_limit=deliver_limit,
        group_id=group,
        commit=bool(commit),
        fly=bool(header.get("fly", False)),
        create_time=int(header.get("createTime", 0)),
        snappy=bool(header.get("snappy", False)),
        deliver_at=float(header.get("deliverAt", 0.0)),
        ordering_key=str(header.get("orderingKey", "")),
    )
    return StoredMessage(
        message=message,
        publish_time=publish_time,
        deliver_count=deliver_count,
        groups=_read_groups(
            group_state, succ_groups, fail_groups, deliver_count, next_deliver_time, dead_groups
        ),
        next_deliver_time=next_deliver_time,
        only_groups=tuple(json.loads(only_groups)) if only_groups else (),
        kite_server=kite_server,
    )


def _pending_key(row: _Row) -> tuple[str, float, frozenset[str]]:
    """(topic, publish_time, pending groups) of a ``PENDING_COLUMNS`` row."""
    _, topic, publish_time, group_state, only, succ, fail, deliver_count, ndt = row
    groups = _read_groups(group_state, succ, fail, deliver_count, ndt)
    return topic, publish_time, pending_groups(groups, tuple(json.loads(only)) if only else ())


def _dead_letter(row: _Row) -> DeadLetter:
    reason, dead_time, dead_groups, group = row[len(MESSAGE_COLUMNS) :]
    return DeadLetter(_record(row, dead_groups), reason, dead_time, group)


# -- SQL -------------------------------------------------------------------------------
# Table names come from the validated layout (``db`` is [A-Za-z0-9_]); every value is a
# driver parameter. Statements are plain driver SQL rather than compiled Core constructs:
# their shape changes with every batch size, and compiling them would cost more than the
# statement itself.


def _marks(n: int) -> str:
    return ", ".join(["%s"] * n)


@functools.lru_cache(maxsize=1024)
def _insert_sql(table: str, columns: str, n: int) -> str:
    return f"INSERT INTO {table} ({columns}) VALUES ({_marks(n)})"  # noqa: S608


@functools.lru_cache(maxsize=1024)
def _select_sql(table: str, columns: str, n: int, lock: bool = False) -> str:
    suffix = " FOR UPDATE" if lock else ""
    return f"SELECT {columns} FROM {table} WHERE message_id IN ({_marks(n)}){suffix}"  # noqa: S608


@functools.lru_cache(maxsize=1024)
def _commit_sql(table: str, n: int) -> str:
    return f"UPDATE {table} SET `commit` = 1 WHERE message_id IN ({_marks(n)}) AND `commit` = 0"  # noqa: S608


@functools.lru_cache(maxsize=1024)
def _delete_sql(table: str, n: int) -> str:
    return f"DELETE FROM {table} WHERE message_id IN ({_marks(n)})"  # noqa: S608


def _delete_meta_sql(table: str, n: int) -> str:
    return f"DELETE FROM {table} WHERE meta_key IN ({_marks(n)})"  # noqa: S608


# the columns of _Bookkeeping, in its order
_RESCHEDULED: Final = (
    "deliver_count",
    "succ_groups",
    "fail_groups",
    "group_state",
    "only_groups",
    "next_deliver_time",
)


@functools.lru_cache(maxsize=1024)
def _reschedule_sql(table: str, n: int) -> str:
    whens = " ".join(["WHEN %s THEN %s"] * n)
    sets = ", ".join(f"`{c}` = CASE message_id {whens} END" for c in _RESCHEDULED)
    return f"UPDATE {table} SET {sets} WHERE message_id IN ({_marks(n)})"  # noqa: S608


def page_keys_sql(tables: Sequence[tuple[int, str]]) -> str:
    """The recover query: due keys of every (slot, table), in due order.

    Parameters per table: owner, now, cursor time, cursor time, cursor id, limit; then
    the overall limit. Each branch is a range scan of ``idx_recover`` that stops after
    *limit* keys (no filesort).
    """
    branch = (
        "(SELECT next_deliver_time, message_id, {slot} AS slot FROM {table}"
        " WHERE kite_server = %s AND `commit` = 1 AND next_deliver_time <= %s"
        " AND (next_deliver_time > %s OR (next_deliver_time = %s AND message_id > %s))"
        " ORDER BY next_deliver_time, message_id LIMIT %s)"
    )
    union = " UNION ALL ".join(branch.format(slot=slot, table=table) for slot, table in tables)
    return f"{union} ORDER BY next_deliver_time, message_id LIMIT %s"


def uncommitted_keys_sql(tables: Sequence[tuple[int, str]]) -> str:
    """Uncommitted ids of every (slot, table), in id order (``idx_recover`` prefix).

    Parameters per table: owner, cursor id, limit; then the overall limit.
    """
    branch = (
        "(SELECT message_id, {slot} AS slot FROM {table}"
        " WHERE kite_server = %s AND `commit` = 0 AND message_id > %s"
        " ORDER BY message_id LIMIT %s)"
    )
    union = " UNION ALL ".join(branch.format(slot=slot, table=table) for slot, table in tables)
    return f"{union} ORDER BY message_id LIMIT %s"


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
