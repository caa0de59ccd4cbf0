from __future__ import annotations

import pytest

from kiteq.core import errors
from kiteq.core.errors import (
    BodyTooLargeError,
    ClientError,
    ExpiredMessageError,
    FlowLimitedError,
    InvalidMessageError,
    KiteQError,
    MessageRejectedError,
    NotConnectedError,
    PublishTimeoutError,
    RegistryUnavailableError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
    UnknownTopicError,
)

RETRIABLE = {
    "FlowLimitedError",
    "NotConnectedError",
    "PublishTimeoutError",
    "RegistryUnavailableError",
    "StoreFullError",
    "StoreUnavailableError",
}
ERROR_CLASSES = [getattr(errors, name) for name in errors.__all__]


def test_all_is_sorted_and_complete() -> None:
    assert errors.__all__ == sorted(errors.__all__)
    defined = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, BaseException)
    }
    assert defined == set(errors.__all__)
    assert defined >= RETRIABLE


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_retriable_flag(cls: type[KiteQError]) -> None:
    assert issubclass(cls, KiteQError)
    assert cls.retriable is (cls.__name__ in RETRIABLE)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_documented_in_the_tree(cls: type[KiteQError]) -> None:
    assert errors.__doc__ is not None
    assert f"── {cls.__name__}" in errors.__doc__ or cls is KiteQError


def test_retriable_is_inherited_and_overridable() -> None:
    assert StoreError.retriable is False
    assert StoreUnavailableError.retriable is True
    assert StoreFullError.retriable is True
    assert MessageRejectedError.retriable is False
    assert FlowLimitedError.retriable is True
    assert ClientError.retriable is False


@pytest.mark.parametrize(
    "cls",
    [
        MessageRejectedError,
        InvalidMessageError,
        BodyTooLargeError,
        UnknownTopicError,
        ExpiredMessageError,
        FlowLimitedError,
    ],
)
def test_rejections_carry_message_id_and_reason(cls: type[MessageRejectedError]) -> None:
    error = cls("0123456789abcdef0123456789abcdef", "too big")
    assert error.message_id == "0123456789abcdef0123456789abcdef"
    assert error.reason == "too big"
    assert "0123456789abcdef0123456789abcdef" in str(error)
    assert "too big" in str(error)
    assert isinstance(error, MessageRejectedError)


def test_rejection_without_id_is_readable() -> None:
    assert "message ? rejected: bad" in str(MessageRejectedError("", "bad"))


def test_publish_timeout_is_a_timeout() -> None:
    error = PublishTimeoutError("no ack")
    assert isinstance(error, TimeoutError)
    assert isinstance(error, ClientError)
    with pytest.raises(TimeoutError):
        raise error


def test_unavailable_errors_sit_under_their_family() -> None:
    assert issubclass(RegistryUnavailableError, errors.RegistryError)
    assert issubclass(NotConnectedError, ClientError)
    assert issubclass(BodyTooLargeError, InvalidMessageError)
