"""The broker's error codes and the typed error each becomes in the client, written once.

Both the wire decoding (``test_wire``) and a producer's send refused by a fake broker
(``test_producer``) check this table; each adds its own case for a code without a type.
"""

from __future__ import annotations

from typing import Final

from kiteq.core.errors import (
    AuthenticationError,
    BodyTooLargeError,
    ExpiredMessageError,
    FlowLimitedError,
    InvalidMessageError,
    KiteQError,
    NotConnectedError,
    StoreFullError,
    StoreUnavailableError,
    UnknownTopicError,
)
from kiteq.proto.v1 import common_pb2

__all__ = ["TYPED_REFUSALS"]

TYPED_REFUSALS: Final[list[tuple[int, type[KiteQError]]]] = [
    (common_pb2.ERROR_CODE_INVALID_ARGUMENT, InvalidMessageError),
    (common_pb2.ERROR_CODE_TOO_LARGE, BodyTooLargeError),
    (common_pb2.ERROR_CODE_UNKNOWN_TOPIC, UnknownTopicError),
    (common_pb2.ERROR_CODE_EXPIRED, ExpiredMessageError),
    (common_pb2.ERROR_CODE_OVERFLOW, FlowLimitedError),
    (common_pb2.ERROR_CODE_STORE_FULL, StoreFullError),
    (common_pb2.ERROR_CODE_STORE_UNAVAILABLE, StoreUnavailableError),
    (common_pb2.ERROR_CODE_NOT_SERVING, NotConnectedError),
    (common_pb2.ERROR_CODE_UNAUTHENTICATED, AuthenticationError),
]
