"""Input limits and header normalisation, enforced by the broker and checked early by clients.

Names become ZooKeeper path components (``/kiteq/server/{topic}``), so ``/``, control
characters and ``.``/``..`` must be impossible: the character sets below guarantee it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Final

from kiteq.core.errors import BodyTooLargeError, ExpiredMessageError, InvalidMessageError
from kiteq.core.ids import is_message_id
from kiteq.core.message import Message

NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,249}")
MESSAGE_TYPE_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,255}")
MAX_BODY_BYTES: Final = 4 * 1024 * 1024
MAX_PROPERTIES: Final = 64
MAX_PROPERTY_KEY_BYTES: Final = 256
MAX_PROPERTY_VALUE_BYTES: Final = 4096
MAX_EXPIRY_SECONDS: Final = 7 * 24 * 3600
MAX_DELIVER_LIMIT: Final = 100
MAX_BATCH_MESSAGES: Final = 1000
MAX_BATCH_BYTES: Final = 8 * 1024 * 1024
# gRPC frame ceiling: one full batch plus headers.
MAX_FRAME_BYTES: Final = MAX_BATCH_BYTES + MAX_BODY_BYTES + 1024 * 1024
MAX_SECRET_BYTES: Final = 1024


def is_name(value: str) -> bool:
    """True for a valid topic or group name."""
    return NAME_RE.fullmatch(value) is not None and value not in {".", ".."}


def check_name(kind: str, value: str) -> None:
    """Raise ``ValueError`` naming *kind* unless *value* is a valid topic/group name."""
    if not is_name(value):
        raise ValueError(f"invalid {kind} {value!r}: must match [A-Za-z0-9._-]{{1,249}}")


def normalize(message: Message, now: float) -> Message:
    """Validate *message* and return it with KiteQ's clamps applied.

    Expiry ``<= 0`` or beyond 7 days becomes now + 7 days; ``deliver_limit`` outside
    1..100 becomes 100; ``create_time <= 0`` becomes now.

    Raises:
        InvalidMessageError: A field is outside the limits.
        ExpiredMessageError: The expiry time has passed.
    """
    mid = message.message_id
    if not is_message_id(mid):
        raise InvalidMessageError(mid, "message id must be 32 hex characters")
    if not is_name(message.topic):
        raise InvalidMessageError(mid, f"invalid topic {message.topic!r}")
    if MESSAGE_TYPE_RE.fullmatch(message.message_type) is None:
        raise InvalidMessageError(mid, f"invalid message type {message.message_type!r}")
    if message.group_id and not is_name(message.group_id):
        raise InvalidMessageError(mid, f"invalid group id {message.group_id!r}")
    if not isinstance(message.body, bytes):
        raise InvalidMessageError(mid, "body must be bytes")
    if len(message.body) > MAX_BODY_BYTES:
        raise BodyTooLargeError(
            mid, f"body of {len(message.body)} bytes exceeds the limit of {MAX_BODY_BYTES}"
        )
    if message.fly and not message.commit:
        raise InvalidMessageError(mid, "a fly message must be committed")
    _check_properties(mid, message)
    ceiling = int(now) + MAX_EXPIRY_SECONDS
    expired = message.expired_time
    if 0 < expired <= now:
        raise ExpiredMessageError(mid, f"expired at {expired}, before it arrived")
    if expired <= 0 or expired > ceiling:
        expired = ceiling
    limit = message.deliver_limit
    if not 0 < limit <= MAX_DELIVER_LIMIT:
        limit = MAX_DELIVER_LIMIT
    created = message.create_time if message.create_time > 0 else int(now)
    if (expired, limit, created) == (
        message.expired_time,
        message.deliver_limit,
        message.create_time,
    ):
        return message
    return dataclasses.replace(
        message, expired_time=expired, deliver_limit=limit, create_time=created
    )


def _check_properties(mid: str, message: Message) -> None:
    props = message.properties
    if len(props) > MAX_PROPERTIES:
        raise InvalidMessageError(mid, f"more than {MAX_PROPERTIES} properties")
    for key, value in props.items():
        if not key or len(key.encode()) > MAX_PROPERTY_KEY_BYTES:
            raise InvalidMessageError(mid, f"property key {key[:40]!r} is empty or too long")
        if len(value.encode()) > MAX_PROPERTY_VALUE_BYTES:
            raise InvalidMessageError(
                mid, f"property {key!r} exceeds {MAX_PROPERTY_VALUE_BYTES} bytes"
            )
