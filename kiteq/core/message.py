"""The message model shared by broker, stores and client (KiteQ's MessageEntity)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from kiteq.core.ids import new_message_id

__all__ = ["Message", "ReceivedMessage", "StoredMessage"]


# Not frozen on purpose: a frozen dataclass sets each field through object.__setattr__,
# which made constructing a Message cost 3.7 us instead of 0.7 us, on the hot path of
# both client and broker. Treat instances as immutable; kiteq code never changes one it
# did not just create.
@dataclasses.dataclass(slots=True, kw_only=True)
class Message:
    """One message as published: KiteQ's Header plus the body.

    Attributes:
        topic: First-level category, ``[A-Za-z0-9._-]{1,249}``.
        message_type: Second-level type that bindings match on.
        body: Opaque bytes (at most 4 MiB).
        message_id: 32 hex characters; generated when not given. Sending the same id again
            is safe: a broker stores an id once.
        properties: Small string map carried with the message.
        expired_time: Unix seconds after which the message is not delivered; 0 = the
            broker's maximum (7 days).
        deliver_limit: Maximum delivery attempts; 0 = the broker's default (100).
        group_id: The publishing group (set by the producer).
        commit: False for a transactional message not yet committed.
        fly: True for a best-effort message that is never stored.
        create_time: Unix seconds; 0 = set by the broker on arrival.
        snappy: The body is snappy-compressed (informational; the broker never decodes it).
    """

    topic: str
    message_type: str
    body: bytes
    message_id: str = dataclasses.field(default_factory=new_message_id)
    properties: Mapping[str, str] = dataclasses.field(default_factory=dict)
    expired_time: int = 0
    deliver_limit: int = 0
    group_id: str = ""
    commit: bool = True
    fly: bool = False
    create_time: int = 0
    snappy: bool = False


@dataclasses.dataclass(slots=True, kw_only=True)
class ReceivedMessage(Message):
    """A message as a consumer receives it; ``attempt`` is 1 on the first delivery."""

    attempt: int = 1


@dataclasses.dataclass(slots=True)
class StoredMessage:
    """A message as the broker keeps it, with its delivery bookkeeping.

    ``deliver_count`` counts delivery rounds; ``succ_groups`` are the groups that acked and
    are never delivered to again; ``next_deliver_time`` (Unix seconds) is when the recover
    scan may deliver it next.
    """

    message: Message
    publish_time: float
    deliver_count: int = 0
    succ_groups: tuple[str, ...] = ()
    fail_groups: tuple[str, ...] = ()
    next_deliver_time: float = 0.0
    kite_server: str = ""
    # The transport's encoding of ``message``, cached by the edge that received it so a
    # push does not rebuild it; never stored. Opaque to everything but that edge.
    wire: object = dataclasses.field(default=None, compare=False, repr=False)

    # a copy of message.message_id: the hot paths read it many times per message
    message_id: str = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.message_id = self.message.message_id

    @property
    def topic(self) -> str:
        return self.message.topic
