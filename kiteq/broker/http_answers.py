"""The HTTP publish API's answers: statuses and JSON documents from store-acks and errors.

One table maps wire codes (``kiteq.core.codes.AckCode``) to HTTP statuses. A refused
store-ack answers with its code's status, and an error with the status of its code in
``kiteq.core.codes`` (the one error <-> code table), so the gRPC and HTTP answers to the
same refusal always agree; an error with no code there is a broker fault (500). An error document is::

    {"error": {"code": "UNKNOWN_TOPIC", "message": "...", "retriable": false}}

``code`` is the wire code's name (``kiteq.core.codes.AckCode``) for a message refusal, or
one of the HTTP API's own: ``NOT_FOUND``, ``METHOD_NOT_ALLOWED``, ``TIMEOUT``, ``BUSY``,
``ALREADY_DECIDED``, ``INTERNAL``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from kiteq.core.codes import AckCode, Disposition, code_for, code_of
from kiteq.core.errors import KiteQError, MessageRejectedError
from kiteq.handler.connection import StoreAck

__all__ = [
    "STATUS_FOR_CODE",
    "ApiError",
    "error_document",
    "failure",
    "refusal",
    "retry_after",
    "status_for",
    "success",
]

STATUS_FOR_CODE: Final[Mapping[AckCode, int]] = MappingProxyType(
    {
        AckCode.INVALID_ARGUMENT: 400,
        AckCode.EXPIRED: 400,
        AckCode.TOO_LARGE: 413,
        AckCode.UNKNOWN_TOPIC: 404,
        AckCode.PERMISSION_DENIED: 403,
        AckCode.OVERFLOW: 429,
        AckCode.BATCH_TOO_LARGE: 429,
        AckCode.UNAUTHENTICATED: 401,
        AckCode.STORE_FULL: 503,
        AckCode.STORE_UNAVAILABLE: 503,
        AckCode.NOT_SERVING: 503,  # the broker is draining
    }
)
# the status of a KiteQError with no code, or of a code above none (a broker fault)
_FALLBACK_STATUS: Final = 500
_STATUS_NAMES: Final = {
    "stored": Disposition.STORED,
    # "scheduled": stored and waiting for its delivery time (success(scheduled=True))
    "duplicate": Disposition.DUPLICATE,
    "delivered": Disposition.DELIVERED,
}
_NAME_FOR_DISPOSITION: Final = {d: n for n, d in _STATUS_NAMES.items()}


class ApiError(KiteQError):
    """A refusal of the HTTP API that no message-level error describes.

    Args:
        status: The HTTP status.
        code: The document's ``code`` (``NOT_FOUND``, ``ALREADY_DECIDED``, ...).
        message: What went wrong, for a person.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def status_for(error: type[KiteQError]) -> int:
    """The HTTP status of *error*: that of its code (``kiteq.core.codes.code_of``)."""
    code = code_of(error)
    return _FALLBACK_STATUS if code is None else STATUS_FOR_CODE.get(code, _FALLBACK_STATUS)


def error_document(code: str, message: str, *, retriable: bool) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "retriable": retriable}}


def failure(error: KiteQError) -> tuple[int, dict[str, Any]]:
    """The status and document answering *error*."""
    if isinstance(error, ApiError):
        return error.status, error_document(error.code, error.message, retriable=False)
    reason = error.reason if isinstance(error, MessageRejectedError) else str(error)
    return status_for(type(error)), error_document(
        code_for(error).name, reason, retriable=error.retriable
    )


def success(
    message_id: str, ack: StoreAck, *, committed: bool, scheduled: bool = False
) -> dict[str, Any]:
    """The document of a message the store took (``ack.ok``); *scheduled*: it has a delay."""
    status = _NAME_FOR_DISPOSITION.get(ack.disposition, "stored")
    document: dict[str, Any] = {
        "id": message_id,
        "status": "scheduled" if scheduled and status == "stored" else status,
    }
    if not committed:
        document["committed"] = False
    return document


def refusal(ack: StoreAck) -> tuple[int, dict[str, Any]]:
    """The status and document of a refused store-ack (not ``ack.ok``)."""
    code = ack.code
    status = STATUS_FOR_CODE.get(code, _FALLBACK_STATUS)
    return status, error_document(code.name, ack.feedback, retriable=code.retriable)


def retry_after(code: AckCode, messages: int, rate: float) -> str | None:
    """The ``Retry-After`` seconds for a refusal of *code* covering *messages* messages.

    Flow-limited: the time the receive rate (*rate* per second) takes to grant that many
    again, at least 1 s. Draining or a store that cannot write: 1 s (another broker, or
    this one once its store is back). Other refusals are not retriable: None.
    """
    if code is AckCode.OVERFLOW:
        return str(max(1, math.ceil(messages / rate))) if rate > 0 else "1"
    if code.retriable:
        return "1"
    return None
