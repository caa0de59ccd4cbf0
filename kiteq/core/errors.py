"""The one exception tree of KiteQ for Python.

Every error raised by kiteq code derives from ``KiteQError``. ``retriable`` says whether
doing the same thing again (for a publish: the same message, same id) may succeed.

::

    KiteQError                         (retriable = False)
    ├── ConfigError                    bad configuration; names the key
    ├── ProtocolError                  wire/protobuf problems
    ├── MessageRejectedError           the broker refused a message; carries message_id, code
    │   ├── InvalidMessageError        bad name, id, properties
    │   │   └── BodyTooLargeError      body above the size limit
    │   ├── UnknownTopicError          the broker does not serve the topic
    │   ├── ExpiredMessageError        expired before it arrived
    │   ├── FlowLimitedError           retriable; the broker's receive rate is exhausted
    │   └── PermissionDeniedError      the session's group may not do this (acl, another group)
    ├── AuthenticationError            wrong or missing group secret
    ├── StoreError
    │   ├── StoreFullError             retriable; memory store at capacity
    │   └── StoreUnavailableError      retriable; the backend failed or is closed
    ├── RegistryError
    │   └── RegistryUnavailableError   retriable (ZooKeeper SUSPENDED/LOST)
    └── ClientError
        ├── ClientClosedError          the producer/consumer was closed
        ├── DeliveryExpiredError       an ack/nack/in_progress too late: the broker redelivers
        ├── NotConnectedError          retriable; no broker reachable for the topic
        ├── TlsError                   TLS refused: plaintext vs TLS, untrusted or missing certificate
        └── PublishTimeoutError        retriable; no store-ack in time (also a TimeoutError)
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AuthenticationError",
    "BodyTooLargeError",
    "ClientClosedError",
    "ClientError",
    "ConfigError",
    "DeliveryExpiredError",
    "ExpiredMessageError",
    "FlowLimitedError",
    "InvalidMessageError",
    "KiteQError",
    "MessageRejectedError",
    "NotConnectedError",
    "PermissionDeniedError",
    "ProtocolError",
    "PublishTimeoutError",
    "RegistryError",
    "RegistryUnavailableError",
    "StoreError",
    "StoreFullError",
    "StoreUnavailableError",
    "TlsError",
    "UnknownTopicError",
]


class KiteQError(Exception):
    """Root of every kiteq error."""

    retriable: ClassVar[bool] = False


class ConfigError(KiteQError):
    """The configuration is invalid; the message names the key."""


class ProtocolError(KiteQError):
    """A peer sent something the protocol does not allow."""


class MessageRejectedError(KiteQError):
    """A message was refused. ``message_id`` and ``reason`` say which and why."""

    def __init__(self, message_id: str, reason: str) -> None:
        super().__init__(f"message {message_id or '?'} rejected: {reason}")
        self.message_id = message_id
        self.reason = reason


class InvalidMessageError(MessageRejectedError):
    """A name, id, size or property is outside the limits."""


class BodyTooLargeError(InvalidMessageError):
    """The body is larger than the broker accepts."""


class UnknownTopicError(MessageRejectedError):
    """The broker does not serve the message's topic."""


class ExpiredMessageError(MessageRejectedError):
    """The message's expiry time had passed when it arrived."""


class FlowLimitedError(MessageRejectedError):
    """The broker-wide receive rate is exhausted; send the same message again later."""

    retriable = True


class PermissionDeniedError(MessageRejectedError):
    """The session's group may not do this.

    Publish to the topic, act for another group, decide another group's transaction, or
    bind the topic.
    """


class AuthenticationError(KiteQError):
    """The group's secret was wrong or missing."""


class StoreError(KiteQError):
    """The message store failed."""


class StoreFullError(StoreError):
    """The store is at capacity (memory store); nothing was evicted to make room."""

    retriable = True


class StoreUnavailableError(StoreError):
    """The store cannot make messages durable right now (I/O error, closed)."""

    retriable = True


class RegistryError(KiteQError):
    """The binding/broker registry failed."""


class RegistryUnavailableError(RegistryError):
    """The registry is unreachable (ZooKeeper suspended or lost)."""

    retriable = True


class ClientError(KiteQError):
    """A client-side failure."""


class ClientClosedError(ClientError):
    """The producer or consumer is closed."""


class DeliveryExpiredError(ClientError):
    """The delivery can no longer be answered; the broker redelivers (or has) the message.

    Its session ended, or ``deliverySeconds`` passed without an ack or ``in_progress``.
    Acking again cannot help: the next delivery of the message is answered instead.
    """


class NotConnectedError(ClientError):
    """No broker is reachable for the message's topic."""

    retriable = True


class TlsError(ClientError):
    """The connection to a broker failed at the TLS layer; retrying the same way cannot help.

    The client speaks plaintext to a TLS port (or TLS to a plaintext one), the broker's
    certificate is not trusted, or the broker requires a client certificate (mTLS) that
    was not given or not accepted. The message says which.
    """


class PublishTimeoutError(ClientError, TimeoutError):
    """No store-ack arrived in time; sending the same message again is safe."""

    retriable = True
