"""Per-message outcome codes; the numbers equal the wire's ``ErrorCode`` enum."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from kiteq.core.errors import (
    AuthenticationError,
    BodyTooLargeError,
    ExpiredMessageError,
    FlowLimitedError,
    InvalidMessageError,
    KiteQError,
    MessageRejectedError,
    NotConnectedError,
    PermissionDeniedError,
    StoreFullError,
    StoreUnavailableError,
    UnknownTopicError,
)

__all__ = ["ERROR_FOR_CODE", "AckCode", "Disposition", "code_for"]


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


# The error of each refusal code, and (inverted) the code of each error: the one table both
# sides use. The client raises these for refused store-acks; the broker answers with
# ``code_for``. Where two codes share an error, the first one is the error's code
# (BATCH_TOO_LARGE is set by the broker's batch check directly, never through code_for).
ERROR_FOR_CODE: Final[Mapping[int, type[KiteQError]]] = MappingProxyType(
    {
        AckCode.INVALID_ARGUMENT: InvalidMessageError,
        AckCode.TOO_LARGE: BodyTooLargeError,
        AckCode.UNKNOWN_TOPIC: UnknownTopicError,
        AckCode.EXPIRED: ExpiredMessageError,
        AckCode.OVERFLOW: FlowLimitedError,
        # retriable like an overflow: the same message fits in a later batch
        AckCode.BATCH_TOO_LARGE: FlowLimitedError,
        AckCode.PERMISSION_DENIED: PermissionDeniedError,
        AckCode.STORE_FULL: StoreFullError,
        AckCode.STORE_UNAVAILABLE: StoreUnavailableError,
        AckCode.NOT_SERVING: NotConnectedError,
        AckCode.UNAUTHENTICATED: AuthenticationError,
    }
)
_CODE_FOR_ERROR: Final[dict[type[KiteQError], AckCode]] = {
    MessageRejectedError: AckCode.INVALID_ARGUMENT,
    **{error: AckCode(code) for code, error in reversed(list(ERROR_FOR_CODE.items()))},
}


def code_for(error: KiteQError) -> AckCode:
    """The wire code for *error*: that of its most specific class in ``ERROR_FOR_CODE``.

    Anything else (an unexpected failure while storing) is the retriable STORE_UNAVAILABLE.
    """
    for cls in type(error).__mro__:
        code = _CODE_FOR_ERROR.get(cls)
        if code is not None:
            return code
    return AckCode.STORE_UNAVAILABLE
