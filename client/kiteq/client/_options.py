"""The options of producers and consumers: typed keyword arguments, frozen and validated.

``ProducerArgs``/``ConsumerArgs`` type the keyword arguments that the four client
classes take (``**options: Unpack[...]``); ``ProducerOptions``/``ConsumerOptions`` hold
them with their defaults, checked once when built (``ConfigError`` names the option).
The asyncio class and its blocking facade thus take the same options by construction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Final, Required, TypedDict, cast

from kiteq.binding.model import Binding
from kiteq.client._acks import AckMode
from kiteq.client._channel import check_positive
from kiteq.client._handlers import BatchHandler, Handler
from kiteq.client._tx import TxChecker
from kiteq.core.errors import ConfigError
from kiteq.core.limits import MAX_BATCH_MESSAGES
from kiteq.core.tls import TlsOptions

__all__ = ["ConsumerArgs", "ConsumerOptions", "ProducerArgs", "ProducerOptions"]

_MAX_IN_FLIGHT: Final = 100_000


class _ClientArgs(TypedDict, total=False):
    brokers: Sequence[str] | None
    registry: str | None
    group_id: Required[str]
    secret_key: str
    client_id: str | None
    connect_timeout: float
    reconnect_max_delay: float
    close_timeout: float
    tls: TlsOptions | None


class ProducerArgs(_ClientArgs, total=False):
    """The keyword arguments of ``AsyncProducer`` and ``Producer``."""

    timeout: float
    linger: float
    max_batch: int
    max_batch_bytes: int
    max_pending: int
    retries: int
    tx_checker: TxChecker | None
    tx_check_timeout: float
    tx_check_concurrency: int


class ConsumerArgs(_ClientArgs, total=False):
    """The keyword arguments of ``AsyncConsumer`` and ``Consumer``."""

    bindings: Required[Iterable[Binding]]
    handler: Handler | None
    batch_handler: BatchHandler | None
    ack_mode: AckMode
    max_in_flight: int
    warmup_seconds: float
    max_concurrency: int | None
    concurrency: int | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _ClientOptions:
    group_id: str
    brokers: Sequence[str] | None = None
    registry: str | None = None
    secret_key: str = ""
    client_id: str | None = None
    connect_timeout: float = 5.0
    reconnect_max_delay: float = 30.0
    close_timeout: float = 10.0
    tls: TlsOptions | None = None

    def _check_connection(self) -> None:
        check_positive("connect_timeout", self.connect_timeout)
        check_positive("reconnect_max_delay", self.reconnect_max_delay)
        check_positive("close_timeout", self.close_timeout, allow_zero=True)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ProducerOptions(_ClientOptions):
    """A producer's options (see ``AsyncProducer`` for each).

    Raises:
        ConfigError: An option is invalid.
    """

    timeout: float = 5.0
    linger: float = 0.002
    max_batch: int = 500
    max_batch_bytes: int = 1024 * 1024
    max_pending: int = 10_000
    retries: int = 3
    tx_checker: TxChecker | None = None
    tx_check_timeout: float = 10.0
    tx_check_concurrency: int = 4

    def __post_init__(self) -> None:
        if self.tx_checker is not None and not callable(self.tx_checker):
            raise ConfigError(f"tx_checker must be callable, got {self.tx_checker!r}")
        check_positive("timeout", self.timeout)
        self._check_connection()
        check_positive("tx_check_timeout", self.tx_check_timeout)
        check_positive("linger", self.linger, allow_zero=True)
        for name in ("max_batch", "max_batch_bytes", "max_pending", "tx_check_concurrency"):
            check_positive(name, getattr(self, name), integer=True)
        check_positive("retries", self.retries, allow_zero=True, integer=True)
        if self.max_batch > MAX_BATCH_MESSAGES:
            raise ConfigError(f"max_batch must be <= {MAX_BATCH_MESSAGES}, got {self.max_batch}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConsumerOptions(_ClientOptions):
    """A consumer's options (see ``AsyncConsumer`` for each).

    Raises:
        ConfigError: An option or binding is invalid.
    """

    bindings: Iterable[Binding]
    handler: Handler | None = None
    batch_handler: BatchHandler | None = None
    ack_mode: AckMode = AckMode.AUTO
    max_in_flight: int = 1000
    warmup_seconds: float = 0
    max_concurrency: int | None = None
    concurrency: int | None = None

    def __post_init__(self) -> None:
        self._check_handlers()
        if self.max_concurrency is not None and self.concurrency not in (
            None,
            self.max_concurrency,
        ):
            raise ConfigError("max_concurrency and concurrency (its old name) differ")
        check_positive("max_in_flight", self.max_in_flight, integer=True)
        check_positive("max_concurrency", self.handler_concurrency, integer=True)
        self._check_connection()
        if self.max_in_flight > _MAX_IN_FLIGHT:
            raise ConfigError(
                f"max_in_flight must be <= {_MAX_IN_FLIGHT}, got {self.max_in_flight}"
            )
        # a one-shot iterable is read once, here
        object.__setattr__(self, "bindings", tuple(self.bindings))
        if not self.bindings:
            raise ConfigError("a consumer needs at least one binding")

    def _check_handlers(self) -> None:
        for name, given in (("handler", self.handler), ("batch_handler", self.batch_handler)):
            if given is not None and not callable(given):
                raise ConfigError(f"{name} must be callable, got {given!r}")
        if self.handler is not None and self.batch_handler is not None:
            raise ConfigError("give handler or batch_handler, not both")
        if not isinstance(self.ack_mode, AckMode):
            raise ConfigError(f"ack_mode must be an AckMode, got {self.ack_mode!r}")
        if self.batch_handler is not None and self.ack_mode is AckMode.MANUAL:
            raise ConfigError("a batch_handler answers through its results: use AckMode.AUTO")

    def as_args(self) -> ConsumerArgs:
        """These options as keyword arguments (the bindings as checked: a tuple)."""
        # the same names, by construction (tests/client/test_options.py checks)
        args = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return cast(ConsumerArgs, args)

    @property
    def handler_concurrency(self) -> int:
        """Handler calls in progress at once (``max_concurrency``, or its old name)."""
        if self.max_concurrency is not None:
            return self.max_concurrency
        return 1 if self.concurrency is None else self.concurrency
