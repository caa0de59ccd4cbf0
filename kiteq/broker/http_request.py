"""What an HTTP publish request says: credentials, headers and JSON, as messages to publish.

Pure functions over header pairs and body bytes (no HTTP library), so every rule is unit
tested without a server; ``kiteq.broker.http_publish`` serves them.

A message is described either by a **raw body** (any ``Content-Type`` but JSON: the
request body is the message body, byte for byte), with its fields in headers::

    X-KiteQ-Message-Type: pay-succ           required
    X-KiteQ-Property-<name>: <value>         one per property; <name> as sent
    X-KiteQ-Transactional: true              publish uncommitted (two-phase commit)
    Idempotency-Key: <key>                   the message id is derived from it

or by a **JSON object** (``Content-Type: application/json``)::

    {"messageType": "pay-succ", "body": "text" | "bodyBase64": "AAEC",
     "properties": {"k": "v"}, "transactional": false, "idempotencyKey": "order-42"}

``body`` is a string sent as its UTF-8 bytes; a binary body goes as ``bodyBase64``
(standard base64 with padding): exactly one of the two. A batch is a JSON array of such
objects. Unknown fields and unknown ``X-KiteQ-`` headers are refused, so a misspelt
option never passes silently.

Every refusal is a ``KiteQError`` the server maps to a status: ``InvalidMessageError``
(400), ``BodyTooLargeError`` (413), ``AuthenticationError`` (401).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from kiteq.core.errors import AuthenticationError, BodyTooLargeError, InvalidMessageError
from kiteq.core.ids import new_message_id
from kiteq.core.limits import MAX_BATCH_BYTES, MAX_BATCH_MESSAGES, MAX_PROPERTIES
from kiteq.core.message import Message

__all__ = [
    "GROUP_HEADER",
    "IDEMPOTENCY_HEADER",
    "MESSAGE_TYPE_HEADER",
    "PROPERTY_PREFIX",
    "SECRET_HEADER",
    "TRANSACTIONAL_HEADER",
    "Draft",
    "credentials",
    "idempotent_id",
    "is_json",
    "parse_batch",
    "parse_json_message",
    "parse_raw_message",
]

PREFIX: Final = "x-kiteq-"
GROUP_HEADER: Final = "X-KiteQ-Group"
SECRET_HEADER: Final = "X-KiteQ-Secret"  # noqa: S105 - a header name, not a secret
MESSAGE_TYPE_HEADER: Final = "X-KiteQ-Message-Type"
TRANSACTIONAL_HEADER: Final = "X-KiteQ-Transactional"
PROPERTY_PREFIX: Final = "X-KiteQ-Property-"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
DELAY_HEADER: Final = "X-KiteQ-Delay-Seconds"
ORDERING_KEY_HEADER: Final = "X-KiteQ-Ordering-Key"
_AUTHORIZATION: Final = "authorization"
# headers that describe the message: only for a raw body (a JSON body has fields instead)
_MESSAGE_HEADERS: Final = frozenset(
    {
        MESSAGE_TYPE_HEADER.lower(),
        TRANSACTIONAL_HEADER.lower(),
        IDEMPOTENCY_HEADER.lower(),
        DELAY_HEADER.lower(),
        ORDERING_KEY_HEADER.lower(),
    }
)
_CREDENTIAL_HEADERS: Final = frozenset({GROUP_HEADER.lower(), SECRET_HEADER.lower()})
IDEMPOTENCY_KEY_RE: Final = re.compile(r"[\x21-\x7e]{1,255}")
_FIELDS: Final = frozenset(
    {
        "messageType",
        "body",
        "bodyBase64",
        "properties",
        "transactional",
        "idempotencyKey",
        "delaySeconds",
        "orderingKey",
    }
)
_TRUE: Final = frozenset({"true", "1"})
_FALSE: Final = frozenset({"false", "0"})


@dataclasses.dataclass(frozen=True, slots=True)
class Draft:
    """One message as a request describes it, before it has a topic, group and id."""

    message_type: str
    body: bytes
    properties: Mapping[str, str] = dataclasses.field(default_factory=dict)
    transactional: bool = False
    idempotency_key: str = ""
    # scheduled delivery: seconds from the request's arrival (0: at once)
    delay_seconds: float = 0.0
    # ordered delivery (the broker checks it as a gRPC publish's)
    ordering_key: str = ""

    def message(self, topic: str, group: str) -> Message:
        """The message *group* publishes to *topic* (the broker validates the rest)."""
        key = self.idempotency_key
        return Message(
            topic=topic,
            message_type=self.message_type,
            body=self.body,
            message_id=idempotent_id(group, key) if key else new_message_id(),
            properties=self.properties,
            group_id=group,
            commit=not self.transactional,
            delay=self.delay_seconds,
            ordering_key=self.ordering_key,
        )


def idempotent_id(group: str, key: str) -> str:
    """The message id of *group*'s ``Idempotency-Key`` *key*.

    It is the first 32 hex digits of ``sha256(group + LF + key)`` (UTF-8). Group names
    hold no newline, so two (group, key) pairs never share an input; a key reused by
    another group is another message. The hex digits are uniform, so MySQL's shards (by
    the last digit) fill evenly.
    """
    return hashlib.sha256(f"{group}\n{key}".encode()).hexdigest()[:32]


def is_json(content_type: str) -> bool:
    """True for ``application/json`` (any parameters, e.g. ``; charset=utf-8``)."""
    return content_type.partition(";")[0].strip().lower() == "application/json"


def _invalid(reason: str) -> InvalidMessageError:
    return InvalidMessageError("", reason)


def _text(name: str, value: str) -> str:
    """*value* of a header as text; refused when it is not UTF-8.

    (The server decodes header bytes as UTF-8 with surrogate escapes.)
    """
    try:
        value.encode()
    except UnicodeEncodeError:
        raise _invalid(f"header {name} is not UTF-8") from None
    return value


def credentials(headers: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """``(group, secret)`` from ``X-KiteQ-Group``/``X-KiteQ-Secret`` or HTTP Basic.

    Basic credentials are ``group:secret`` (the group name holds no colon). Both forms at
    once must agree.

    Raises:
        AuthenticationError: No credentials, or Basic credentials that do not decode.
        InvalidMessageError: A header given twice, or the two forms disagree.
    """
    found: dict[str, str] = {}
    for name, value in headers:
        lower = name.lower()
        if lower in _CREDENTIAL_HEADERS or lower == _AUTHORIZATION:
            if lower in found:
                raise _invalid(f"header {name} given more than once")
            found[lower] = _text(name, value)
    group = found.get(GROUP_HEADER.lower())
    secret = found.get(SECRET_HEADER.lower())
    authorization = found.get(_AUTHORIZATION)
    if authorization is not None:
        basic = _basic(authorization)
        if (group is not None and group != basic[0]) or (secret is not None and secret != basic[1]):
            raise _invalid(f"{GROUP_HEADER}/{SECRET_HEADER} and Basic credentials disagree")
        return basic
    if group is None:
        raise AuthenticationError(
            f"no credentials: send {GROUP_HEADER} and {SECRET_HEADER}, or Basic group:secret"
        )
    return group, secret or ""


def _basic(authorization: str) -> tuple[str, str]:
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        raise AuthenticationError("Authorization: only Basic group:secret is accepted")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise AuthenticationError("Authorization: Basic credentials do not decode") from None
    group, colon, secret = decoded.partition(":")
    if not colon:
        raise AuthenticationError("Authorization: Basic credentials must be group:secret")
    return group, secret


def _idempotency_key(value: str) -> str:
    if IDEMPOTENCY_KEY_RE.fullmatch(value) is None:
        raise _invalid("Idempotency-Key must be 1 to 255 visible ASCII characters")
    return value


def _ordering_key(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _invalid(f"{where}: orderingKey must be a string")
    return value


def _delay_header(value: str) -> float:
    try:
        seconds = float(value.strip())
    except ValueError:
        raise _invalid(f"{DELAY_HEADER} must be a number of seconds, not {value[:20]!r}") from None
    return _delay(DELAY_HEADER, seconds)


def _delay(name: str, value: object) -> float:
    """A delay in seconds: a finite number >= 0 (the broker refuses one past 7 days)."""
    if isinstance(value, str):
        raise _invalid(f"{name} must be finite seconds >= 0 as a number, not a string")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(f"{name} must be a number of seconds")
    if not math.isfinite(value) or value < 0:
        raise _invalid(f"{name} must be finite seconds >= 0, not {value!r}")
    return float(value)


def _flag(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _invalid(f"{name} must be true or false, not {value[:20]!r}")


def parse_raw_message(body: bytes, headers: Iterable[tuple[str, str]]) -> Draft:
    """The message of a raw-body request: *body* as is, its fields from *headers*.

    Raises:
        InvalidMessageError: No message type; a header given twice; an unknown
            ``X-KiteQ-`` header; a bad flag or idempotency key.
    """
    fields: dict[str, str] = {}
    properties: dict[str, str] = {}
    for name, value in headers:
        lower = name.lower()
        if lower.startswith(PROPERTY_PREFIX.lower()):
            key = name[len(PROPERTY_PREFIX) :]
            if not key:
                raise _invalid(f"{PROPERTY_PREFIX}<name>: the property name is empty")
            if key in properties:
                raise _invalid(f"property {key!r} given more than once")
            if len(properties) >= MAX_PROPERTIES:
                raise _invalid(f"more than {MAX_PROPERTIES} properties")
            properties[key] = _text(name, value)
        elif lower in _MESSAGE_HEADERS:
            if lower in fields:
                raise _invalid(f"header {name} given more than once")
            fields[lower] = _text(name, value)
        elif lower.startswith(PREFIX) and lower not in _CREDENTIAL_HEADERS:
            raise _invalid(f"unknown header {name[:64]}")
    message_type = fields.get(MESSAGE_TYPE_HEADER.lower(), "")
    if not message_type:
        raise _invalid(f"{MESSAGE_TYPE_HEADER} is required with a raw body")
    idempotency = fields.get(IDEMPOTENCY_HEADER.lower())
    transactional = fields.get(TRANSACTIONAL_HEADER.lower())
    delay = fields.get(DELAY_HEADER.lower())
    return Draft(
        message_type=message_type,
        body=body,
        properties=properties,
        transactional=_flag(TRANSACTIONAL_HEADER, transactional) if transactional else False,
        idempotency_key="" if idempotency is None else _idempotency_key(idempotency),
        delay_seconds=0.0 if delay is None else _delay_header(delay),
        ordering_key=fields.get(ORDERING_KEY_HEADER.lower(), ""),
    )


def _json_headers(headers: Iterable[tuple[str, str]], *, batch: bool) -> str | None:
    """The Idempotency-Key of a JSON request; refuses the raw-body headers."""
    key: str | None = None
    for name, value in headers:
        lower = name.lower()
        if lower == IDEMPOTENCY_HEADER.lower() and not batch:
            if key is not None:
                raise _invalid(f"header {name} given more than once")
            key = _idempotency_key(_text(name, value))
        elif lower == IDEMPOTENCY_HEADER.lower():
            raise _invalid("a batch takes no Idempotency-Key: give each message idempotencyKey")
        elif lower.startswith(PREFIX) and lower not in _CREDENTIAL_HEADERS:
            raise _invalid(f"{name[:64]}: with a JSON body, message fields go in the JSON")
    return key


def _load(body: bytes) -> Any:
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise _invalid("the JSON body is not UTF-8") from None
    except ValueError as exc:
        raise _invalid(f"the body is not JSON: {exc}") from None


def parse_json_message(body: bytes, headers: Iterable[tuple[str, str]]) -> Draft:
    """The message of a ``Content-Type: application/json`` request.

    An ``Idempotency-Key`` header and an ``idempotencyKey`` field must agree.

    Raises:
        InvalidMessageError: Not a JSON object of the fields above; a raw-body header.
    """
    key = _json_headers(headers, batch=False)
    draft = _draft(_load(body), "the body")
    if key is not None:
        if draft.idempotency_key and draft.idempotency_key != key:
            raise _invalid("the Idempotency-Key header and idempotencyKey disagree")
        draft = dataclasses.replace(draft, idempotency_key=key)
    return draft


def parse_batch(body: bytes, headers: Iterable[tuple[str, str]]) -> list[Draft]:
    """The messages of a batch: a JSON array of 1 to ``MAX_BATCH_MESSAGES`` objects.

    Raises:
        InvalidMessageError: Not such an array, or an item is not a message object (the
            reason names its index); a raw-body header.
        BodyTooLargeError: The bodies add up to more than ``MAX_BATCH_BYTES``.
    """
    _json_headers(headers, batch=True)
    items = _load(body)
    if not isinstance(items, list) or not items:
        raise _invalid("a batch is a non-empty JSON array of messages")
    if len(items) > MAX_BATCH_MESSAGES:
        raise _invalid(f"a batch holds at most {MAX_BATCH_MESSAGES} messages, not {len(items)}")
    drafts = [_draft(item, f"message [{i}]") for i, item in enumerate(items)]
    total = sum(len(d.body) for d in drafts)
    if total > MAX_BATCH_BYTES:
        raise BodyTooLargeError(
            "", f"the batch's bodies ({total} bytes) exceed maxBatchBytes ({MAX_BATCH_BYTES})"
        )
    return drafts


def _draft(item: Any, where: str) -> Draft:
    if not isinstance(item, dict):
        raise _invalid(f"{where}: expected a JSON object")
    unknown = sorted(set(item) - _FIELDS)
    if unknown:
        raise _invalid(
            f"{where}: unknown field {unknown[0][:64]!r}; known: {', '.join(sorted(_FIELDS))}"
        )
    message_type = item.get("messageType")
    if not isinstance(message_type, str) or not message_type:
        raise _invalid(f"{where}: messageType (a string) is required")
    transactional = item.get("transactional", False)
    if not isinstance(transactional, bool):
        raise _invalid(f"{where}: transactional must be true or false")
    key = item.get("idempotencyKey", "")
    if not isinstance(key, str) or (
        "idempotencyKey" in item and IDEMPOTENCY_KEY_RE.fullmatch(key) is None
    ):
        raise _invalid(f"{where}: idempotencyKey must be 1 to 255 visible ASCII characters")
    return Draft(
        message_type=message_type,
        body=_body(item, where),
        properties=_properties(item.get("properties", {}), where),
        transactional=transactional,
        idempotency_key=key,
        delay_seconds=_delay("delaySeconds", item.get("delaySeconds", 0)),
        ordering_key=_ordering_key(item.get("orderingKey", ""), where),
    )


def _body(item: dict[str, Any], where: str) -> bytes:
    if ("body" in item) == ("bodyBase64" in item):
        raise _invalid(f"{where}: give exactly one of body (a string) and bodyBase64")
    if "body" in item:
        text = item["body"]
        if not isinstance(text, str):
            raise _invalid(f"{where}: body must be a string (binary bodies: bodyBase64)")
        try:
            return text.encode()
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            raise _invalid(f"{where}: body is not valid Unicode") from None
    encoded = item["bodyBase64"]
    if not isinstance(encoded, str):
        raise _invalid(f"{where}: bodyBase64 must be a base64 string")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"{where}: bodyBase64 is not standard base64") from None


def _properties(raw: Any, where: str) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise _invalid(f"{where}: properties must be an object of strings")
    for key, value in raw.items():
        try:
            key.encode()
            value.encode()
        except UnicodeEncodeError:
            raise _invalid(f"{where}: property {key[:40]!r} is not valid Unicode") from None
    return dict(raw)
