from __future__ import annotations

import pytest

from kiteq.core import errors

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
def test_retriable_flag(cls: type[errors.KiteQError]) -> None:
    assert issubclass(cls, errors.KiteQError)
    assert cls.retriable is (cls.__name__ in RETRIABLE)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_documented_in_the_tree(cls: type[errors.KiteQError]) -> None:
    assert errors.__doc__ is not None
    assert f"── {cls.__name__}" in errors.__doc__ or cls is errors.KiteQError


def test_retriable_is_inherited_and_overridable() -> None:
    assert errors.StoreError.retriable is False
    assert errors.StoreUnavailableError.retriable is True
    assert errors.StoreFullError.retriable is True
    assert errors.MessageRejectedError.retriable is False
    assert errors.FlowLimitedError.retriable is True
    assert errors.ClientError.retriable is False


@pytest.mark.parametrize(
    "cls",
    [
        errors.MessageRejectedError,
        errors.InvalidMessageError,
        errors.BodyTooLargeError,
        errors.UnknownTopicError,
        errors.ExpiredMessageError,
        errors.FlowLimitedError,
    ],
)
def test_rejections_carry_message_id_and_reason(cls: type[errors.MessageRejectedError]) -> None:
    error = cls("0123456789abcdef0123456789abcdef", "too big")
    assert error.message_id == "0123456789abcdef0123456789abcdef"
    assert error.reason == "too big"
    assert "0123456789abcdef0123456789abcdef" in str(error)
    assert "too big" in str(error)
    assert isinstance(error, errors.MessageRejectedError)


def test_rejection_without_id_is_readable() -> None:
    assert "message ? rejected: bad" in str(errors.MessageRejectedError("", "bad"))


def test_publish_timeout_is_a_timeout() -> None:
    error = errors.PublishTimeoutError("no ack")
    assert isinstance(error, TimeoutError)
    assert isinstance(error, errors.ClientError)
    with pytest.raises(TimeoutError):
        raise error


def test_unavailable_errors_sit_under_their_family() -> None:
    assert issubclass(errors.RegistryUnavailableError, errors.RegistryError)
    assert issubclass(errors.NotConnectedError, errors.ClientError)
    assert issubclass(errors.BodyTooLargeError, errors.InvalidMessageError)
