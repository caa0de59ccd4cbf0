"""Bindings: a group's subscription to message types of a topic (KiteQ's registry.Binding).

The JSON form is KiteQ's, so a binding node written by a KiteQ client is understood as is::

    {"groupId": "acct-svc", "topic": "trade", "messageType": "pay-succ",
     "bindType": 0, "version": "1.0.0", "watermark": 1000, "persistent": true}

plus one key of ours, present only on the bindings of a webhook group (whose messages the
broker POSTs to a URL, ``kiteq.core.webhook``)::

    "webhook": {"url": "https://hooks.example.com/kiteq", "concurrency": 8,
                "timeoutSeconds": 5}
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, TypeVar

from kiteq.core.limits import MESSAGE_TYPE_RE, is_name
from kiteq.core.webhook import DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT_SECONDS, WebhookEndpoint

__all__ = [
    "BIND_VERSION",
    "MAX_PATTERN_CHARS",
    "BindType",
    "Binding",
    "bind_type_from_name",
    "dumps",
    "loads",
    "read_field",
    "webhook_from_json",
    "webhook_to_json",
]

BIND_VERSION: Final = "1.0.0"
MAX_PATTERN_CHARS: Final = 256


class BindType(enum.IntEnum):
    DIRECT = 0
    REGEX = 1
    FANOUT = 2


_BIND_TYPE_NAMES: Final = {
    "direct": BindType.DIRECT,
    "regx": BindType.REGEX,
    "regex": BindType.REGEX,
    "fanout": BindType.FANOUT,
}


@dataclasses.dataclass(frozen=True, slots=True)
class Binding:
    """One subscription rule.

    Attributes:
        topic: The topic.
        message_type: Direct: the exact type. Regex: an RE2 pattern, searched unanchored
            (Go's ``regexp.MatchString``). Fanout: ``"*"``.
        bind_type: Direct, regex or fanout.
        group_id: The subscribing group; a consumer fills in its own.
        watermark: Delivery rate cap for (topic, group) in messages/s; 0 = no cap.
        persistent: True: messages wait while the group is offline. False: an offline
            group is skipped for the message.
        version: KiteQ's binding version string.
        webhook: The group is a webhook consumer: its messages are POSTed there.
    """

    topic: str
    message_type: str
    bind_type: BindType
    group_id: str = ""
    watermark: int = 0
    persistent: bool = True
    version: str = BIND_VERSION
    webhook: WebhookEndpoint | None = None

    @classmethod
    def direct(
        cls, topic: str, message_type: str, *, watermark: int = 0, persistent: bool = True
    ) -> Binding:
        """Bind exactly *message_type* of *topic*."""
        return cls(topic, message_type, BindType.DIRECT, watermark=watermark, persistent=persistent)

    @classmethod
    def regex(
        cls, topic: str, pattern: str, *, watermark: int = 0, persistent: bool = True
    ) -> Binding:
        """Bind the message types of *topic* in which the RE2 *pattern* finds a match."""
        return cls(topic, pattern, BindType.REGEX, watermark=watermark, persistent=persistent)

    @classmethod
    def fanout(cls, topic: str, *, watermark: int = 0, persistent: bool = True) -> Binding:
        """Bind every message type of *topic*."""
        return cls(topic, "*", BindType.FANOUT, watermark=watermark, persistent=persistent)

    def with_group(self, group_id: str) -> Binding:
        return dataclasses.replace(self, group_id=group_id)

    def check(self) -> None:
        """Raise ``ValueError`` describing the first invalid field.

        Regex syntax is checked where patterns are compiled (``kiteq.binding.match``).
        """
        if not is_name(self.topic):
            raise ValueError(f"invalid binding topic {self.topic!r}")
        if self.group_id and not is_name(self.group_id):
            raise ValueError(f"invalid binding group {self.group_id!r}")
        if (
            self.bind_type is BindType.DIRECT
            and MESSAGE_TYPE_RE.fullmatch(self.message_type) is None
        ):
            raise ValueError(f"invalid message type {self.message_type!r} in a direct binding")
        if self.bind_type is BindType.REGEX and not 0 < len(self.message_type) <= MAX_PATTERN_CHARS:
            raise ValueError(f"regex binding pattern must be 1..{MAX_PATTERN_CHARS} characters")
        if self.watermark < 0:
            raise ValueError(f"watermark must be >= 0, got {self.watermark}")
        if self.webhook is not None:
            self.webhook.check()

    @property
    def effective_watermark(self) -> int:
        """The delivery rate cap in messages/s; 0 = no cap.

        KiteQ turns an unset watermark into 6000/s and caps every binding at 6000/s; a
        broker that delivers far more than that would then throttle every busy group, so
        here an unset watermark means no cap and a set one is honoured as given.
        """
        return max(self.watermark, 0)

    def to_json_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "groupId": self.group_id,
            "topic": self.topic,
            "messageType": self.message_type,
            "bindType": int(self.bind_type),
            "version": self.version,
            "watermark": self.watermark,
            "persistent": self.persistent,
        }
        if self.webhook is not None:
            obj["webhook"] = webhook_to_json(self.webhook)
        return obj

    @classmethod
    def from_json_obj(cls, obj: Mapping[str, Any]) -> Binding:
        """Parse one KiteQ binding object; raise ``ValueError`` when malformed.

        Types are checked strictly (``"persistent": "false"`` is an error, not true).
        ``bindType`` may be KiteQ's number or one of its names (``direct``, ``regx``,
        ``fanout``; ``regex`` too).
        """
        try:
            raw_type = obj.get("bindType", 0)
            if isinstance(raw_type, str):
                bind_type = bind_type_from_name(raw_type)
            else:
                bind_type = BindType(read_field(obj, "bindType", int, 0))
            binding = cls(
                topic=read_field(obj, "topic", str),
                message_type=read_field(obj, "messageType", str, "*"),
                bind_type=bind_type,
                group_id=read_field(obj, "groupId", str, ""),
                watermark=read_field(obj, "watermark", int, 0),
                persistent=read_field(obj, "persistent", bool, True),
                version=read_field(obj, "version", str, BIND_VERSION),
                webhook=webhook_from_json(obj["webhook"]) if "webhook" in obj else None,
            )
            binding.check()
        except ValueError as exc:
            raise ValueError(f"malformed binding {_excerpt(dict(obj))}: {exc}") from exc
        return binding


_T = TypeVar("_T")
MISSING: Final = object()


def read_field(
    obj: Mapping[str, Any],
    key: str,
    kind: type[_T],
    default: object = MISSING,
    *,
    label: Callable[[str], str] = repr,
) -> _T:
    """``obj[key]`` of type *kind* (*default* when absent), for JSON and TOML documents.

    Raises:
        ValueError: Missing without a default, or of another type; names the key as
            ``label(key)``.
    """
    value = obj.get(key, default)
    if value is MISSING:
        raise ValueError(f"{label(key)} is missing")
    # bool is an int subclass: true is not a watermark
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{label(key)} must be {kind.__name__}, got {value!r}")
    return value


def webhook_to_json(endpoint: WebhookEndpoint) -> dict[str, Any]:
    return {
        "url": endpoint.url,
        "concurrency": endpoint.concurrency,
        "timeoutSeconds": endpoint.timeout_seconds,
    }


def webhook_from_json(obj: object, *, label: Callable[[str], str] = repr) -> WebhookEndpoint:
    """A binding's ``webhook`` object (JSON or a TOML table); ``ValueError`` when malformed."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"webhook must be an object with a url, got {_excerpt(obj)}")  # noqa: TRY004
    unknown = sorted(set(obj) - {"url", "concurrency", "timeoutSeconds"})
    if unknown:
        raise ValueError(f"webhook: unknown key {unknown[0]!r} (url, concurrency, timeoutSeconds)")
    timeout = obj.get("timeoutSeconds", DEFAULT_TIMEOUT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ValueError(f"webhook {label('timeoutSeconds')} must be a number, got {timeout!r}")  # noqa: TRY004
    endpoint = WebhookEndpoint(
        url=read_field(obj, "url", str, label=label),
        concurrency=read_field(obj, "concurrency", int, DEFAULT_CONCURRENCY, label=label),
        timeout_seconds=float(timeout),
    )
    endpoint.check()
    return endpoint


def _excerpt(value: object) -> str:
    # binding data comes from clients and ZooKeeper: keep error messages short
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def bind_type_from_name(name: str) -> BindType:
    """Parse KiteQ's bind type names (``direct``, ``regx``, ``fanout``; ``regex`` too)."""
    try:
        return _BIND_TYPE_NAMES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown bind type {name!r} (direct, regx, fanout)") from None


def dumps(bindings: Iterable[Binding]) -> bytes:
    """KiteQ's ``{group}-bind`` node data: a JSON array of bindings."""
    return json.dumps([b.to_json_obj() for b in bindings], separators=(",", ":")).encode()


def loads(data: bytes) -> list[Binding]:
    """Parse a ``{group}-bind`` JSON array; raise ``ValueError`` when malformed."""
    try:
        items = json.loads(data or b"[]")
    except json.JSONDecodeError as exc:
        raise ValueError(f"binding data is not JSON: {exc}") from exc
    # malformed data is a ValueError for callers, whatever its JSON type
    if not isinstance(items, list):
        raise ValueError("binding data must be a JSON array")  # noqa: TRY004
    bindings = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"binding #{index} is not a JSON object: {_excerpt(item)}")  # noqa: TRY004
        bindings.append(Binding.from_json_obj(item))
    return bindings
