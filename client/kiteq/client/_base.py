"""The client's seams: where the brokers are, what a pool reports, ``async with``.

A ``BrokerDirectory`` is one of three implementations: ``StaticDirectory`` (a
``brokers=[...]`` list), ``FileDirectory`` (``registry="file://..."``, read once) and
``ZkDirectory`` (``registry="zk://..."``, followed live). The pool, the producer and the
consumer ask it through this Protocol only; what differs between them is said by its two
properties, ``static`` and ``live``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, Self

from kiteq.binding.model import Binding
from kiteq.client import _wire
from kiteq.client._channel import Session
from kiteq.core.errors import KiteQError
from kiteq.core.message import ReceivedMessage

__all__ = ["AsyncClient", "BrokerDirectory", "PoolListener", "brokers_for_any"]


class BrokerDirectory(Protocol):
    """Broker addresses per topic; every method runs on the client's event loop."""

    @property
    def static(self) -> bool:
        """True when every broker serves every topic (a plain ``brokers=`` list)."""

    @property
    def live(self) -> bool:
        """True when brokers come and go: topics are watched from their first use."""

    def watching(self, topic: str) -> bool:
        """True once the brokers of *topic* are known."""

    def brokers_for(self, topic: str) -> list[str]:
        """The addresses serving *topic* right now."""

    def brokers_for_any(self, topics: Iterable[str]) -> list[str]:
        """Every address serving at least one of *topics*, without repeats, in order."""

    def every(self) -> list[str]:
        """Every broker known, whatever it serves (where a ``tx_checker`` listens)."""

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call *listener* (loop thread) whenever a list of brokers changes."""

    async def watch(self, topics: Iterable[str], timeout: float) -> None:
        """Make the brokers of *topics* known (and followed, when live).

        Raises:
            RegistryUnavailableError: The registry did not answer in time (retriable).
            ClientClosedError: The directory is closed.
        """

    async def watch_alive(self, timeout: float) -> None:
        """Make every live broker known to ``every``."""

    def publish_producer(self, topic: str, group: str) -> None:
        """Record that *group* publishes to *topic*, where the registry keeps such records."""

    async def write_bindings(self, group: str, bindings: Sequence[Binding], timeout: float) -> None:
        """Record *group*'s bindings, where the registry keeps them (failures are logged)."""

    async def close(self) -> None:
        """Stop following the registry; idempotent."""


def brokers_for_any(directory: BrokerDirectory, topics: Iterable[str]) -> list[str]:
    """Every address serving at least one of *topics*, without repeats, in order."""
    seen: dict[str, None] = {}
    for topic in topics:
        seen.update(dict.fromkeys(directory.brokers_for(topic)))
    return list(seen)


class PoolListener(Protocol):
    """What a ``BrokerPool`` tells the producer or consumer above it (loop thread)."""

    def on_opened(self, session: Session) -> None:
        """*session* is open and may carry frames."""

    def on_lost(self, session: Session, reason: KiteQError) -> None:
        """*session* has ended (its link reconnects unless the pool has failed)."""

    def on_fatal(self, error: KiteQError) -> None:
        """The pool failed with a non-retriable *error* (auth, config, a crashed task)."""

    def on_brokers_changed(self) -> None:
        """The pool dialled or retired brokers after the directory changed."""

    def on_store_acks(self, session: Session, results: list[_wire.StoreResult]) -> None:
        """Store-acks arrived for messages published on *session*."""

    def on_deliveries(self, session: Session, messages: list[ReceivedMessage]) -> None:
        """The broker pushed a batch of messages; answer on the same *session*."""

    def on_tx_checks(self, session: Session, checks: list[_wire.TxCheckRequest]) -> None:
        """The broker asks about uncommitted messages."""


class AsyncClient(abc.ABC):
    """``async with`` for the asyncio producer and consumer: ``start``, then ``close``."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect (idempotent)."""

    @abc.abstractmethod
    async def close(self, timeout: float | None = None) -> None:
        """Close (idempotent)."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
