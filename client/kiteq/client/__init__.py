"""The KiteQ client library: producers and consumers, blocking and asyncio.

Sends are batched transparently (a frame per batch, not per message), so a plain
``send()`` loop and a burst of ``send_async()`` calls are both fast. Transactional
messages (``send_transactional``, ``tx_checker=``) are delivered only once the local
transaction commits them. Every error derives
from ``KiteQError``; ``error.retriable`` says whether the same send (same message id) may
succeed later.

Brokers with TLS: give any of the four classes ``tls=TlsOptions(ca=..., cert=..., key=...)``
(cert and key only for brokers that verify clients); a client whose transport does not
match the broker's fails at once with ``TlsError``, saying what to change.

Examples:
    >>> from kiteq.client import Binding, Consumer, Message, Producer
    >>> with Producer(brokers=["127.0.0.1:13800"], group_id="pay-svc",
    ...               secret_key="s3cret") as producer:
    ...     result = producer.send(Message(topic="trade", message_type="pay-succ", body=b"1"))
    >>> def handle(message) -> bool:
    ...     return True
    >>> with Consumer(brokers=["127.0.0.1:13800"], group_id="acct-svc", secret_key="s3cret",
    ...               bindings=[Binding.direct("trade", "pay-succ")], handler=handle) as c:
    ...     c.wait(timeout=10.0)
"""

from __future__ import annotations

from kiteq.binding.model import Binding
from kiteq.client._accumulator import SendResult
from kiteq.client._acks import AckMode, AsyncDelivery, Delivery
from kiteq.client._consumer import AsyncConsumer
from kiteq.client._handlers import BatchHandler, Handler
from kiteq.client._producer import AsyncProducer
from kiteq.client._sync import Consumer, Producer
from kiteq.client._tx import LocalTransaction, TxChecker, TxResult
from kiteq.core.errors import (
    AuthenticationError,
    BodyTooLargeError,
    ClientClosedError,
    ClientError,
    ConfigError,
    DeliveryExpiredError,
    ExpiredMessageError,
    FlowLimitedError,
    InvalidMessageError,
    KiteQError,
    MessageRejectedError,
    NotConnectedError,
    PermissionDeniedError,
    PublishTimeoutError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
    TlsError,
    UnknownTopicError,
)
from kiteq.core.message import Message, ReceivedMessage, TxStatus
from kiteq.core.tls import TlsOptions

__all__ = [
    "AckMode",
    "AsyncConsumer",
    "AsyncDelivery",
    "AsyncProducer",
    "AuthenticationError",
    "BatchHandler",
    "Binding",
    "BodyTooLargeError",
    "ClientClosedError",
    "ClientError",
    "ConfigError",
    "Consumer",
    "Delivery",
    "DeliveryExpiredError",
    "ExpiredMessageError",
    "FlowLimitedError",
    "Handler",
    "InvalidMessageError",
    "KiteQError",
    "LocalTransaction",
    "Message",
    "MessageRejectedError",
    "NotConnectedError",
    "PermissionDeniedError",
    "Producer",
    "PublishTimeoutError",
    "ReceivedMessage",
    "SendResult",
    "StoreError",
    "StoreFullError",
    "StoreUnavailableError",
    "TlsError",
    "TlsOptions",
    "TxChecker",
    "TxResult",
    "TxStatus",
    "UnknownTopicError",
]
