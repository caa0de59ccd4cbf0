"""Per-message outcome codes; the numbers equal the wire's ``ErrorCode`` enum."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from kiteq.core import errors
from kiteq.core.errors import KiteQError

__all__ = ["ERROR_FOR_CODE", "AckCode", "Disposition", "code_for", "code_of"]


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
        AckCode.INVALID_ARGUMENT: errors.InvalidMessageError,
        AckCode.TOO_LARGE: errors.BodyTooLargeError,
        AckCode.UNKNOWN_TOPIC: errors.UnknownTopicError,
        AckCode.EXPIRED: errors.ExpiredMessageError,
        AckCode.OVERFLOW: errors.FlowLimitedError,
        # retriable like an overflow: the same message fits in a later batch
        AckCode.BATCH_TOO_LARGE: errors.FlowLimitedError,
        AckCode.PERMISSION_DENIED: errors.PermissionDeniedError,
        AckCode.STORE_FULL: errors.StoreFullError,
        AckCode.STORE_UNAVAILABLE: errors.StoreUnavailableError,
        AckCode.NOT_SERVING: errors.NotConnectedError,
        AckCode.UNAUTHENTICATED: errors.AuthenticationError,
    }
)
_CODE_FOR_ERROR: Final[dict[type[KiteQError], AckCode]] = {
    errors.MessageRejectedError: AckCode.INVALID_ARGUMENT,
    # a store failure of no more specific class: the store cannot take the message now
    errors.StoreError: AckCode.STORE_UNAVAILABLE,
    **{error: AckCode(code) for code, error in reversed(list(ERROR_FOR_CODE.items()))},
}


def code_of(error: type[KiteQError]) -> AckCode | None:
    """The code of *error*'s most specific class in ``ERROR_FOR_CODE``; None if it has none."""
    for cls in error.__mro__:
        code = _CODE_FOR_ERROR.get(cls)
        if code is not None:
            return code
    return None


def code_for(error: KiteQError) -> AckCode:
    """The wire code for *error*: that of its most specific class in ``ERROR_FOR_CODE``.

    Anything else (an unexpected failure while storing) is the retriable STORE_UNAVAILABLE.
    """
    code = code_of(type(error))
    return AckCode.STORE_UNAVAILABLE if code is None else code
