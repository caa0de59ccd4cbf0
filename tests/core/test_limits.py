from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from kiteq.core import limits
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
    clamp,
    is_message_type,
    is_name,
    normalize,
    validate,
)
from kiteq.core.message import Message

NOW = 1_700_000_000.5
CEILING = int(NOW) + MAX_EXPIRY_SECONDS
MID = "0123456789abcdef0123456789abcdef"


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


def test_normalize_gives_an_id_its_one_spelling() -> None:
    mixed = message(message_id=MID.upper()[:16] + MID[16:])
    validate(mixed, NOW)  # either case is a valid id
    result = normalize(mixed, NOW)
    assert result.message_id == MID
    assert dataclasses.replace(result, message_id=mixed.message_id) == mixed


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
    # validate checks the same message and leaves the clamps to the broker
    validate(original, NOW)
    fields = (original.expired_time, original.deliver_limit, original.create_time)
    assert clamp(*fields, NOW) == (result.expired_time, result.deliver_limit, result.create_time)


def test_clamp_keeps_values_within_the_limits() -> None:
    assert clamp(CEILING, MAX_DELIVER_LIMIT, 1, NOW) == (CEILING, MAX_DELIVER_LIMIT, 1)
    assert clamp(int(NOW) + 1, 1, int(NOW) + 10, NOW) == (int(NOW) + 1, 1, int(NOW) + 10)
    assert clamp(0, 0, 0, NOW) == (CEILING, MAX_DELIVER_LIMIT, int(NOW))


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
    validate(original, NOW)


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
@pytest.mark.parametrize("check", [normalize, validate], ids=["normalize", "validate"])
def test_rejections(
    changes: dict[str, Any],
    error: type[MessageRejectedError],
    reason: str,
    check: Callable[[Message, float], object],
) -> None:
    original = message(**changes)
    with pytest.raises(error, match=reason) as info:
        check(original, NOW)
    assert info.value.message_id == original.message_id
    assert reason in info.value.reason


def test_validate_does_not_change_the_message() -> None:
    original = message(expired_time=0, deliver_limit=0, create_time=0)
    validate(original, NOW)
    assert (original.expired_time, original.deliver_limit, original.create_time) == (0, 0, 0)


def test_checked_names_are_remembered_and_invalid_ones_never(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(limits, "_checked_names", set())
    monkeypatch.setattr(limits, "_checked_types", set())
    for _ in range(2):
        assert is_name("trade")
        assert not is_name("a/b")
        assert not is_name("..")
        assert is_message_type("pay:succ")
        assert not is_message_type("a b")
    assert limits._checked_names == {"trade"}
    assert limits._checked_types == {"pay:succ"}


def test_the_name_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "_checked_names", set())
    monkeypatch.setattr(limits, "_CHECKED_NAMES_MAX", 3)
    names = [f"topic-{i}" for i in range(10)]
    assert all(is_name(name) for name in names)
    assert all(is_name(name) for name in names)  # still valid when not remembered
    assert len(limits._checked_names) == 3


def test_an_ordering_key_of_at_most_255_bytes_passes() -> None:
    validate(message(ordering_key="k" * 255), NOW)
    validate(message(ordering_key="ü" * 127), NOW)  # 254 bytes
    assert normalize(message(ordering_key="order-1"), NOW).ordering_key == "order-1"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"ordering_key": "k" * 256}, "at most 255 bytes"),
        ({"ordering_key": "ü" * 128}, "at most 255 bytes"),
        ({"ordering_key": "k", "fly": True}, "cannot be ordered"),
        ({"ordering_key": "k", "deliver_at": NOW + 30}, "cannot be scheduled"),
    ],
)
def test_an_ordering_key_outside_the_limits_is_refused(
    changes: dict[str, Any], reason: str
) -> None:
    with pytest.raises(InvalidMessageError, match=reason):
        validate(message(**changes), NOW)
