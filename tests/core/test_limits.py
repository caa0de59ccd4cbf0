from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from kiteq.core.errors import (
    BodyTooLargeError,
    ExpiredMessageError,
    InvalidMessageError,
    MessageRejectedError,
)
from kiteq.core.limits import (
    MAX_BODY_BYTES,
    MAX_DELIVER_LIMIT,
    MAX_EXPIRY_SECONDS,
    MAX_PROPERTIES,
    MAX_PROPERTY_KEY_BYTES,
    MAX_PROPERTY_VALUE_BYTES,
    check_name,
    is_name,
    normalize,
)
from kiteq.core.message import Message

NOW = 1_700_000_000.5
CEILING = int(NOW) + MAX_EXPIRY_SECONDS
MID = "0123456789abcdef0123456789ABCDEF"


def message(**changes: Any) -> Message:
    """A message that ``normalize`` returns unchanged, with *changes* applied."""
    fields: dict[str, Any] = {
        "topic": "trade",
        "message_type": "pay-succeeded",
        "body": b"{}",
        "message_id": MID,
        "expired_time": int(NOW) + 60,
        "deliver_limit": 10,
        "create_time": int(NOW) - 1,
    }
    fields.update(changes)
    return Message(**fields)


@pytest.mark.parametrize(
    "name", ["trade", "a", "A-b_c.d", "x" * 249, "...", "0"], ids=lambda n: n[:12]
)
def test_valid_names(name: str) -> None:
    assert is_name(name)
    check_name("topic", name)


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a/b", "a b", "x" * 250, "tab\t", "ü", "a:b", "new\nline"]
)
def test_invalid_names(name: str) -> None:
    assert not is_name(name)
    with pytest.raises(ValueError, match="invalid group"):
        check_name("group", name)


def test_valid_message_is_returned_as_is() -> None:
    original = message()
    assert normalize(original, NOW) is original


@pytest.mark.parametrize(
    ("changes", "clamped"),
    [
        ({"expired_time": 0}, {"expired_time": CEILING}),
        ({"expired_time": -5}, {"expired_time": CEILING}),
        ({"expired_time": CEILING + 1}, {"expired_time": CEILING}),
        ({"deliver_limit": 0}, {"deliver_limit": MAX_DELIVER_LIMIT}),
        ({"deliver_limit": -1}, {"deliver_limit": MAX_DELIVER_LIMIT}),
        ({"deliver_limit": MAX_DELIVER_LIMIT + 1}, {"deliver_limit": MAX_DELIVER_LIMIT}),
        ({"create_time": 0}, {"create_time": int(NOW)}),
        ({"create_time": -1}, {"create_time": int(NOW)}),
        (
            {"expired_time": 0, "deliver_limit": 0, "create_time": 0},
            {"expired_time": CEILING, "deliver_limit": MAX_DELIVER_LIMIT, "create_time": int(NOW)},
        ),
    ],
)
def test_clamps(changes: dict[str, Any], clamped: dict[str, Any]) -> None:
    original = message(**changes)
    result = normalize(original, NOW)
    assert result == dataclasses.replace(original, **clamped)


@pytest.mark.parametrize(
    "changes",
    [
        {"expired_time": CEILING},
        {"expired_time": int(NOW) + 1},
        {"deliver_limit": 1},
        {"deliver_limit": MAX_DELIVER_LIMIT},
        {"body": b"x" * MAX_BODY_BYTES},
        {"body": b""},
        {"group_id": ""},
        {"group_id": "pay-svc"},
        {"message_type": "a:b.c-d_e"},
        {"message_type": "t" * 255},
        {"fly": True, "commit": True},
        {"commit": False},
        {"properties": {f"k{i}": "v" for i in range(MAX_PROPERTIES)}},
        {"properties": {"k" * MAX_PROPERTY_KEY_BYTES: "v" * MAX_PROPERTY_VALUE_BYTES}},
        {"properties": {"k": ""}},
    ],
    ids=lambda c: ",".join(c),
)
def test_values_at_the_limits_are_kept(changes: dict[str, Any]) -> None:
    original = message(**changes)
    assert normalize(original, NOW) is original


@pytest.mark.parametrize(
    ("changes", "error", "reason"),
    [
        ({"message_id": "abc"}, InvalidMessageError, "32 hex"),
        ({"message_id": "g" * 32}, InvalidMessageError, "32 hex"),
        ({"message_id": MID + "0"}, InvalidMessageError, "32 hex"),
        ({"topic": "a/b"}, InvalidMessageError, "invalid topic"),
        ({"topic": ""}, InvalidMessageError, "invalid topic"),
        ({"topic": ".."}, InvalidMessageError, "invalid topic"),
        ({"message_type": ""}, InvalidMessageError, "invalid message type"),
        ({"message_type": "a b"}, InvalidMessageError, "invalid message type"),
        ({"message_type": "t" * 256}, InvalidMessageError, "invalid message type"),
        ({"group_id": "a/b"}, InvalidMessageError, "invalid group id"),
        ({"body": "text"}, InvalidMessageError, "body must be bytes"),
        ({"body": b"x" * (MAX_BODY_BYTES + 1)}, BodyTooLargeError, "exceeds the limit"),
        ({"fly": True, "commit": False}, InvalidMessageError, "fly message must be committed"),
        (
            {"properties": {f"k{i}": "v" for i in range(MAX_PROPERTIES + 1)}},
            InvalidMessageError,
            f"more than {MAX_PROPERTIES} properties",
        ),
        ({"properties": {"": "v"}}, InvalidMessageError, "empty or too long"),
        (
            {"properties": {"k" * (MAX_PROPERTY_KEY_BYTES + 1): "v"}},
            InvalidMessageError,
            "empty or too long",
        ),
        (
            {"properties": {"é" * (MAX_PROPERTY_KEY_BYTES // 2 + 1): "v"}},
            InvalidMessageError,
            "empty or too long",
        ),
        (
            {"properties": {"k": "v" * (MAX_PROPERTY_VALUE_BYTES + 1)}},
            InvalidMessageError,
            f"exceeds {MAX_PROPERTY_VALUE_BYTES} bytes",
        ),
        ({"expired_time": int(NOW)}, ExpiredMessageError, "before it arrived"),
        ({"expired_time": 1}, ExpiredMessageError, "before it arrived"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_rejections(
    changes: dict[str, Any], error: type[MessageRejectedError], reason: str
) -> None:
    original = message(**changes)
    with pytest.raises(error, match=reason) as info:
        normalize(original, NOW)
    assert info.value.message_id == original.message_id
    assert reason in info.value.reason
