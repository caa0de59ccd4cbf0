"""The public API is exactly ``__all__``: sorted, complete, and nothing private leaks."""

from __future__ import annotations
import __future__

import inspect

import kiteq.client as client


def test_all_is_sorted() -> None:
    assert client.__all__ == sorted(client.__all__)


def test_all_names_exist() -> None:
    for name in client.__all__:
        assert hasattr(client, name), name


def test_all_public_members_are_exported() -> None:
    public = {
        name
        for name, value in vars(client).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and not isinstance(value, __future__._Feature)  # "annotations"
    }
    assert public == set(client.__all__)


def test_required_surface() -> None:
    required = {
        "AsyncConsumer",
        "AsyncProducer",
        "AuthenticationError",
        "Binding",
        "ClientClosedError",
        "ConfigError",
        "Consumer",
        "ExpiredMessageError",
        "FlowLimitedError",
        "InvalidMessageError",
        "KiteQError",
        "Message",
        "MessageRejectedError",
        "NotConnectedError",
        "Producer",
        "PublishTimeoutError",
        "ReceivedMessage",
        "SendResult",
        "StoreFullError",
        "StoreUnavailableError",
        "TxChecker",
        "TxResult",
        "TxStatus",
        "UnknownTopicError",
    }
    assert required <= set(client.__all__)
