"""Per-message outcome codes; the numbers equal the wire's ``ErrorCode`` enum."""

from __future__ import annotations

import enum

from kiteq.core.errors import (
    BodyTooLargeError,
    ExpiredMessageError,
    FlowLimitedError,
    KiteQError,
    MessageRejectedError,
    PermissionDeniedError,
    StoreFullError,
    StoreUnavailableError,
    UnknownTopicError,
)

__all__ = ["AckCode", "Disposition", "code_for"]


class AckCode(enum.IntEnum):
    OK = 0
    INVALID_ARGUMENT = 1
    UNKNOWN_TOPIC = 2
    EXPIRED = 3
    TOO_LARGE = 4
    OVERFLOW = 5
    STORE_UNAVAILABLE = 6
    STORE_FULL = 7
    NOT_SERVING = 8
    UNAUTHENTICATED = 9
    PERMISSION_DENIED = 10
    BATCH_TOO_LARGE = 11

    @property
    def retriable(self) -> bool:
        return self in _RETRIABLE

    @property
    def metric_reason(self) -> str:
        return "invalid" if self is AckCode.INVALID_ARGUMENT else self.name.lower()


_RETRIABLE = frozenset(
    {
        AckCode.OVERFLOW,
        AckCode.STORE_UNAVAILABLE,
        AckCode.STORE_FULL,
        AckCode.NOT_SERVING,
        AckCode.BATCH_TOO_LARGE,
    }
)


class Disposition(enum.IntEnum):
    """How an accepted message was taken; the numbers equal the wire's ``StoreDisposition``."""

    UNSPECIFIED = 0  # refused: the code says why
    STORED = 1
    DUPLICATE = 2
    DELIVERED = 3  # deliveryFirst: every group acked before it was stored
    FLY = 4


def code_for(error: KiteQError) -> AckCode:
    """The wire code for an error raised while accepting a message."""
    match error:
        case UnknownTopicError():
            return AckCode.UNKNOWN_TOPIC
        case ExpiredMessageError():
            return AckCode.EXPIRED
        case FlowLimitedError():
            return AckCode.OVERFLOW
        case BodyTooLargeError():
            return AckCode.TOO_LARGE
        case PermissionDeniedError():
            return AckCode.PERMISSION_DENIED
        case MessageRejectedError():
            return AckCode.INVALID_ARGUMENT
        case StoreFullError():
            return AckCode.STORE_FULL
        case StoreUnavailableError():
            return AckCode.STORE_UNAVAILABLE
        case _:
            return AckCode.STORE_UNAVAILABLE
