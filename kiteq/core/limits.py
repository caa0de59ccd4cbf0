"""Input limits and header normalisation, enforced by the broker and checked early by clients.

Names become ZooKeeper path components (``/kiteq/server/{topic}``), so ``/``, control
characters and ``.``/``..`` must be impossible: the character sets below guarantee it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Final

from kiteq.core.errors import BodyTooLargeError, ExpiredMessageError, InvalidMessageError
from kiteq.core.ids import canonical_message_id, is_message_id
from kiteq.core.message import Message

NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,249}")
MESSAGE_TYPE_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,255}")
MAX_BODY_BYTES: Final = 4 * 1024 * 1024
MAX_PROPERTIES: Final = 64
MAX_PROPERTY_KEY_BYTES: Final = 256
MAX_PROPERTY_VALUE_BYTES: Final = 4096
MAX_EXPIRY_SECONDS: Final = 7 * 24 * 3600
# how far ahead a delivery time may be (scheduled delivery): the expiry's maximum, since
# the expiry counts from the delivery time
MAX_DELAY_SECONDS: Final = MAX_EXPIRY_SECONDS
MAX_DELIVER_LIMIT: Final = 100
# an ordering key (issue #16) is an index key in memory and a JSON field in MySQL's header
MAX_ORDERING_KEY_BYTES: Final = 255
MAX_BATCH_MESSAGES: Final = 1000
MAX_BATCH_BYTES: Final = 8 * 1024 * 1024
# gRPC frame ceiling: one full batch plus headers.
MAX_FRAME_BYTES: Final = MAX_BATCH_BYTES + MAX_BODY_BYTES + 1024 * 1024
MAX_SECRET_BYTES: Final = 1024


# Names already checked (topics, message types, groups): a message's names repeat, so the
# hot path looks them up instead of running the regexes. Bounded; a set is thread-safe.
_CHECKED_NAMES_MAX: Final = 4096
_checked_names: set[str] = set()
_checked_types: set[str] = set()


def is_name(value: str) -> bool:
    """True for a valid topic or group name."""
    if value in _checked_names:
        return True
    if NAME_RE.fullmatch(value) is None or value in {".", ".."}:
        return False
    if len(_checked_names) < _CHECKED_NAMES_MAX:
        _checked_names.add(value)
    return True


def is_message_type(value: str) -> bool:
    """True for a valid message type."""
    if value in _checked_types:
        return True
    if MESSAGE_TYPE_RE.fullmatch(value) is None:
        return False
    if len(_checked_types) < _CHECKED_NAMES_MAX:
        _checked_types.add(value)
    return True


def check_name(kind: str, value: str) -> None:
    """Raise ``ValueError`` naming *kind* unless *value* is a valid topic/group name."""
    if not is_name(value):
        raise ValueError(f"invalid {kind} {value!r}: must match [A-Za-z0-9._-]{{1,249}}")


def validate(message: Message, now: float) -> None:
    """Check *message* against the limits without changing it (what clients do).

    Values that ``normalize`` would clamp (expiry, deliver limit, create time) pass.

    Raises:
        InvalidMessageError: A field is outside the limits.
        ExpiredMessageError: The expiry time has passed.
    """
    mid = message.message_id
    if not is_message_id(mid):
        raise InvalidMessageError(mid, "message id must be 32 hex characters")
    topic = message.topic
    if not is_name(topic):
        raise InvalidMessageError(mid, f"invalid topic {topic!r}")
    message_type = message.message_type
    if not is_message_type(message_type):
        raise InvalidMessageError(mid, f"invalid message type {message_type!r}")
    group_id = message.group_id
    if group_id and not is_name(group_id):
        raise InvalidMessageError(mid, f"invalid group id {group_id!r}")
    body = message.body
    if not isinstance(body, bytes):
        raise InvalidMessageError(mid, "body must be bytes")
    if len(body) > MAX_BODY_BYTES:
        raise BodyTooLargeError(
            mid, f"body of {len(body)} bytes exceeds the limit of {MAX_BODY_BYTES}"
        )
    if message.fly and not message.commit:
        raise InvalidMessageError(mid, "a fly message must be committed")
    if message.properties:
        _check_properties(mid, message)
    expired = message.expired_time
    if 0 < expired <= now:
        raise ExpiredMessageError(mid, f"expired at {expired}, before it arrived")
    if message.deliver_at:
        _check_schedule(mid, message, now)
    if message.ordering_key:
        _check_ordering_key(mid, message)


def _check_ordering_key(mid: str, message: Message) -> None:
    key = message.ordering_key
    if len(key.encode()) > MAX_ORDERING_KEY_BYTES:
        raise InvalidMessageError(
            mid, f"ordering_key must be a string of at most {MAX_ORDERING_KEY_BYTES} bytes"
        )
    if message.fly:
        raise InvalidMessageError(mid, "a fly message is not stored, so it cannot be ordered")
    if message.deliver_at:
        # a scheduled message would hold its key back until its delivery time
        raise InvalidMessageError(mid, "a message with an ordering_key cannot be scheduled")


def _check_schedule(mid: str, message: Message, now: float) -> None:
    deliver_at = message.deliver_at
    if not math.isfinite(deliver_at) or deliver_at < 0:
        raise InvalidMessageError(mid, f"deliver_at must be Unix seconds, got {deliver_at!r}")
    if deliver_at <= now:
        return  # due already: delivered at once
    if deliver_at > now + MAX_DELAY_SECONDS:
        raise InvalidMessageError(
            mid,
            f"deliver_at {deliver_at:.3f} is more than {MAX_DELAY_SECONDS} s "
            f"(7 days) ahead of {now:.3f}",
        )
    if message.fly:
        raise InvalidMessageError(mid, "a fly message is not stored, so it cannot be scheduled")
    if message.expired_time > 0 and message.expired_time <= deliver_at:
        raise InvalidMessageError(
            mid,
            f"deliver_at {deliver_at:.3f} is not before the message's expiry "
            f"{message.expired_time}: it would expire before its delivery",
        )


def clamp(
    expired_time: int, deliver_limit: int, create_time: int, now: float, deliver_at: float = 0.0
) -> tuple[int, int, int]:
    """KiteQ's clamps of a valid message's ``(expired_time, deliver_limit, create_time)``.

    Expiry ``<= 0`` or beyond 7 days becomes now + 7 days; ``deliver_limit`` outside
    1..100 becomes 100; ``create_time <= 0`` becomes now.

    A scheduled message (*deliver_at* after *now*) counts its expiry from its delivery
    time: the default and the 7-day maximum are deliver_at + 7 days (an explicit expiry
    is an absolute time and stays as given up to that maximum).
    """
    ceiling = int(max(now, deliver_at)) + MAX_EXPIRY_SECONDS
    if expired_time <= 0 or expired_time > ceiling:
        expired_time = ceiling
    if not 0 < deliver_limit <= MAX_DELIVER_LIMIT:
        deliver_limit = MAX_DELIVER_LIMIT
    if create_time <= 0:
        create_time = int(now)
    return expired_time, deliver_limit, create_time


def normalize(message: Message, now: float) -> Message:
    """Validate *message* and return it as a broker stores it (what brokers do).

    KiteQ's clamps are applied (see ``validate`` and ``clamp``) and the id is made
    canonical (``canonical_message_id``: it is the dedupe key, one spelling per message);
    the message itself is returned when nothing changes.

    Raises:
        InvalidMessageError: A field is outside the limits.
        ExpiredMessageError: The expiry time has passed.
    """
    validate(message, now)
    expired, limit, created = clamp(
        message.expired_time, message.deliver_limit, message.create_time, now, message.deliver_at
    )
    message_id = canonical_message_id(message.message_id)
    if (
        expired == message.expired_time
        and limit == message.deliver_limit
        and created == message.create_time
        and message_id == message.message_id
    ):
        return message
    return dataclasses.replace(
        message,
        message_id=message_id,
        expired_time=expired,
        deliver_limit=limit,
        create_time=created,
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
