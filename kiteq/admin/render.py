"""What ``kiteq-admin`` prints: JSON for scripts, aligned tables for people.

JSON (``--json``) keeps every field of the reply, numbers as numbers (protobuf's own
JSON mapping writes 64-bit integers as strings) and times as ISO 8601 UTC strings (null
when unset). Tables show the fields an operator reads first.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from kiteq.proto.v1 import admin_pb2, common_pb2

__all__ = [
    "backlog",
    "bindings",
    "dead_letters",
    "groups",
    "iso_time",
    "message",
    "stats",
    "table",
    "to_json",
    "transactions",
]

# fields holding Unix seconds (double or int64) in the Admin and common messages
TIME_FIELDS = frozenset(
    {
        "time",
        "nextDeliverTime",
        "publishTime",
        "deadTime",
        "nextCheck",
        "expiredTime",
        "createTime",
        "deliverAt",
    }
)
JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]


def iso_time(seconds: float) -> str | None:
    """*seconds* since the epoch as ISO 8601 UTC; None for 0 (unset) and below."""
    if seconds <= 0:
        return None
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_json(message: Message) -> dict[str, JsonValue]:
    """Every field of *message* (defaults included) as JSON-ready values."""
    out: dict[str, JsonValue] = {}
    fields: Any = message.DESCRIPTOR.fields
    for field in fields:
        value = getattr(message, field.name)
        if _is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {
                str(k): _scalar(value_field, v, field.name) for k, v in sorted(value.items())
            }
        elif _is_repeated(field):
            out[field.name] = [_scalar(field, v, field.name) for v in value]
        else:
            out[field.name] = _scalar(field, value, field.name)
    return out


# descriptors typed Any: the stubs describe the pure-Python and the upb classes apart
def _is_repeated(field: Any) -> bool:
    return bool(field.is_repeated)


def _is_map(field: Any) -> bool:
    return bool(
        _is_repeated(field)
        and field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type.GetOptions().map_entry
    )


def _scalar(field: Any, value: object, name: str) -> JsonValue:
    if isinstance(value, Message):
        return to_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        number = int(value)  # type: ignore[call-overload]
        known = field.enum_type.values_by_number.get(number)
        return str(known.name) if known is not None else number
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if name in TIME_FIELDS and isinstance(value, int | float) and not isinstance(value, bool):
        return iso_time(float(value))
    if isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"unexpected protobuf value {value!r} in {name}")


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Columns aligned on the widest cell; ``-`` for an empty cell."""
    cells = [[_cell(v) for v in row] for row in rows]
    if not cells:
        return "(none)"
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [headers, *cells]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _when(seconds: float) -> str:
    return iso_time(seconds) or "-"


def _pairs(pairs: Sequence[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in pairs)


def stats(reply: admin_pb2.StatsResponse) -> str:
    summary = _pairs(
        [
            ("broker", reply.broker),
            ("cluster", reply.cluster),
            ("store", f"{reply.store} ({'durable' if reply.storeDurable else 'not durable'})"),
            ("uptime", f"{reply.uptimeSeconds:.0f}s"),
            ("received", reply.received),
            ("rejected", reply.rejected),
            ("delivered", reply.delivered),
            ("redelivered", reply.redelivered),
            ("dead-lettered", reply.deadLettered),
            ("flow-limited", reply.flowLimited),
            ("tx pending", reply.pendingTransactions),
            ("tx unresolved", reply.unresolvedTransactions),
            ("tx checks", reply.txChecksSent),
            ("recover scans", reply.recoverScans),
        ]
    )
    return "\n\n".join([summary, backlog(reply), groups(reply)])


def backlog(reply: admin_pb2.StatsResponse) -> str:
    """Per topic (stored messages), per (topic, group): backlog, oldest age, dead letters."""
    topics = sorted(set(reply.backlog) | set(reply.deadLetters))
    per_topic = table(
        ["TOPIC", "BACKLOG", "DEAD-LETTERS"],
        [(t, reply.backlog.get(t, 0), reply.deadLetters.get(t, 0)) for t in topics],
    )
    pairs: dict[tuple[str, str], list[object]] = {
        (g.topic, g.groupId): [g.backlog, g.unacked, _age(g.oldestAgeSeconds), 0]
        for g in reply.groupBacklogs
    }
    for d in reply.deadLetterGroups:
        pairs.setdefault((d.topic, d.groupId), [0, 0, "-", 0])[3] = d.count
    per_group = table(
        ["TOPIC", "GROUP", "BACKLOG", "UNACKED", "OLDEST", "DEAD-LETTERS"],
        [(t, g or "(no binding)", *row) for (t, g), row in sorted(pairs.items())],
    )
    return f"{per_topic}\n\n{per_group}"


def _age(seconds: float) -> str:
    return "-" if seconds <= 0 else f"{seconds:.0f}s"


def groups(reply: admin_pb2.StatsResponse) -> str:
    """Bound, connected and dead-letter-holding groups, one row each (topics together)."""
    dead: dict[str, int] = {}
    for d in reply.deadLetterGroups:
        if d.groupId:
            dead[d.groupId] = dead.get(d.groupId, 0) + d.count
    backlog: dict[str, int] = {}
    for b in reply.groupBacklogs:
        backlog[b.groupId] = backlog.get(b.groupId, 0) + b.backlog
    connected = {g.groupId: g for g in reply.groups}
    rows = []
    for name in sorted(set(connected) | set(dead) | set(backlog)):
        g = connected.get(name)
        rows.append(
            (
                name,
                g.connections if g else 0,
                g.inFlight if g else 0,
                backlog.get(name, 0),
                dead.get(name, 0),
            )
        )
    return table(["GROUP", "CONNECTIONS", "IN-FLIGHT", "BACKLOG", "DEAD-LETTERS"], rows)


def bindings(reply: admin_pb2.ListBindingsResponse) -> str:
    rows = table(
        ["GROUP", "TOPIC", "TYPE", "BIND", "PERSISTENT", "WATERMARK"],
        [
            (
                b.groupId,
                b.topic,
                b.messageType,
                common_pb2.BindType.Name(b.bindType).removeprefix("BIND_TYPE_").lower(),
                b.persistent,
                b.watermark,
            )
            for b in reply.bindings
        ],
    )
    if not reply.webhooks:
        return rows
    hooks = table(
        ["WEBHOOK GROUP", "URL", "CONCURRENCY", "TIMEOUT"],
        [
            (group, w.url, w.concurrency, f"{w.timeoutSeconds:g}s")
            for group, w in sorted(reply.webhooks.items())
        ],
    )
    return f"{rows}\n\n{hooks}"


def message(reply: admin_pb2.GetMessageResponse) -> str:
    state = admin_pb2.MessageState.Name(reply.state).removeprefix("MESSAGE_STATE_").lower()
    h = reply.header
    fields: list[tuple[str, object]] = [
        ("id", h.messageId),
        ("state", state),
        ("topic", h.topic),
        ("type", h.messageType),
        ("group", h.groupId),
        ("committed", h.commit),
        ("published", _when(reply.publishTime)),
        ("deliver at", _when(h.deliverAt)),
        ("expires", _when(h.expiredTime)),
        ("body bytes", reply.bodyBytes),
    ]
    if h.orderingKey:
        fields.insert(8, ("key", h.orderingKey))  # ordered delivery (issue #16)
    parts = [_pairs(fields)]
    if reply.groups:
        parts.append(
            table(
                ["GROUP", "STATE", "ATTEMPTS", "NEXT-DELIVERY"],
                [(g.groupId, g.state, g.attempts, _when(g.nextDeliverTime)) for g in reply.groups],
            )
        )
    if reply.deadLetters:
        parts.append(
            table(
                ["DEAD-FOR", "REASON", "DEAD-TIME"],
                [
                    (d.groupId or "(no binding)", d.reason, _when(d.deadTime))
                    for d in reply.deadLetters
                ],
            )
        )
    parts.append(
        table(
            ["TIME", "EVENT", "GROUP", "ATTEMPT", "DETAIL"],
            [(_when(e.time), e.kind, e.groupId, e.attempt, e.detail) for e in reply.history],
        )
    )
    if reply.body:
        parts.append(f"body: {reply.body.decode('utf-8', 'backslashreplace')}")
    return "\n\n".join(parts)


def dead_letters(reply: admin_pb2.ListDeadLettersResponse) -> str:
    rows = table(
        ["MESSAGE-ID", "GROUP", "TOPIC", "TYPE", "REASON", "DEAD-TIME", "ATTEMPTS", "BYTES"],
        [
            (
                d.header.messageId,
                d.groupId or "(no binding)",
                d.header.topic,
                d.header.messageType,
                d.reason,
                _when(d.deadTime),
                d.deliverCount,
                d.bodyBytes,
            )
            for d in reply.deadLetters
        ],
    )
    if reply.next:
        after_group = reply.nextGroup or '""'
        rows += f"\nmore: -after {reply.next} -after-group {after_group}"
    return rows


def transactions(reply: admin_pb2.ListTransactionsResponse) -> str:
    rows = table(
        ["MESSAGE-ID", "TOPIC", "TYPE", "GROUP", "CHECKS", "NEXT-CHECK", "UNRESOLVED", "PUBLISHED"],
        [
            (
                t.header.messageId,
                t.header.topic,
                t.header.messageType,
                t.header.groupId,
                t.checks,
                _when(t.nextCheck),
                t.unresolved,
                _when(t.publishTime),
            )
            for t in reply.transactions
        ],
    )
    if reply.next:
        rows += f"\nmore: -after {reply.next}"
    return rows


def scheduled(reply: admin_pb2.ListScheduledResponse) -> str:
    rows = table(
        ["MESSAGE-ID", "TOPIC", "TYPE", "GROUP", "DELIVER-AT", "EXPIRES", "PUBLISHED"],
        [
            (
                s.header.messageId,
                s.header.topic,
                s.header.messageType,
                s.header.groupId,
                _when(s.header.deliverAt),
                _when(s.header.expiredTime),
                _when(s.publishTime),
            )
            for s in reply.messages
        ],
    )
    if reply.next:
        rows += f"\nmore: -afterTime {reply.nextTime!r} -after {reply.next}"
    return rows
