"""The seams of ``kiteq.binding``: what the broker asks of a registry, and the shared types.

- ``BindingRegistry``: where the broker's bindings come from (embedded, file, zk); made by
  ``kiteq.binding.registry.open_registry``.
- ``BrokerRegistration`` with ``BrokerInfo``: how a broker announces itself to clients.
- ``TakeoverNodes`` with ``BrokerStore``: the shared records of backlog takeover
  (``kiteq.handler.takeover``); only a ZooKeeper registry has them.
- ``MetaStore``: the durable key/values the embedded registry keeps its bindings in.
- ``StandaloneRegistry``: what the registries without a server (embedded, file) share.

Implementations raise only ``KiteQError``s: ``RegistryUnavailableError`` (retriable) when
the registry's server does not answer, ``RegistryError`` when it refuses.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from kiteq.binding.match import BindingTable
    from kiteq.binding.model import Binding

__all__ = [
    "NO_REGISTRATION",
    "BindingRegistry",
    "BrokerInfo",
    "BrokerRegistration",
    "BrokerStore",
    "MetaStore",
    "StandaloneRegistry",
    "TakeoverNodes",
]


class MetaStore(Protocol):
    """Durable small key/values; the broker passes its ``MessageStore``."""

    async def put_meta(self, key: str, value: bytes | None) -> None:
        """Durably set (or with None, delete) *key*."""
        ...

    async def get_meta(self, prefix: str) -> Mapping[str, bytes]:
        """All values whose key starts with *prefix*."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerInfo:
    """What a broker announces about itself.

    Attributes:
        address: ``host:port`` other machines dial (never ``:port``).
        protocol_version: The broker's wire protocol version.
        proto: The protobuf package it speaks, e.g. ``kiteq.proto.v1``.
    """

    address: str
    protocol_version: int
    proto: str


class BrokerRegistration(Protocol):
    """Publishing the broker where clients look for it."""

    async def register(self, broker: BrokerInfo) -> None:
        """Announce *broker* for the served topics, and keep announcing it.

        Called once, after the broker accepts connections.
        """
        ...

    async def unregister(self) -> None:
        """Stop announcing the broker (first step of a graceful stop); idempotent."""
        ...


class _NoRegistration:
    """Embedded and file registries: clients know the brokers' addresses already."""

    async def register(self, broker: BrokerInfo) -> None:
        pass

    async def unregister(self) -> None:
        pass


NO_REGISTRATION: Final = _NoRegistration()


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerStore:
    """What a broker announces for takeover: its store, its owner name, this run."""

    store: str
    owner: str
    incarnation: str

    def dumps(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def loads(cls, data: bytes) -> BrokerStore | None:
        """None when *data* is not a takeover node's JSON."""
        try:
            doc = json.loads(data)
            return cls(str(doc["store"]), str(doc["owner"]), str(doc["incarnation"]))
        except (ValueError, TypeError, KeyError):
            return None


class TakeoverNodes(Protocol):
    """The records brokers sharing a store keep about each other (``kiteq.handler.takeover``).

    Every method raises ``RegistryUnavailableError`` (retriable) when the registry does not
    answer and ``RegistryError`` when it refuses (e.g. an ACL).
    """

    async def start(self) -> None:
        """Get ready (the registry is started already)."""
        ...

    async def stop(self) -> None:
        """Release what this broker holds; idempotent."""
        ...

    async def announce(self, address: str, info: BrokerStore) -> None:
        """Write this broker's record (a new incarnation)."""
        ...

    async def brokers(self) -> tuple[set[str], set[str]]:
        """(every broker ever registered, those alive)."""
        ...

    async def is_alive(self, address: str) -> bool: ...

    async def store_of(self, address: str) -> BrokerStore | None:
        """What *address* announced, or None (nothing, or not ours)."""
        ...

    async def done(self, address: str) -> dict[str, Any] | None:
        """The completion record of the last takeover of *address*, or None."""
        ...

    async def try_lock(self, address: str, taker: str) -> bool:
        """Take the lock of *address*; False when another taker holds it.

        The lock dies with this broker's session, so a taker that dies releases it.
        """
        ...

    async def unlock(self, address: str) -> None: ...

    async def mark_done(self, address: str, record: dict[str, Any]) -> None: ...


class StandaloneRegistry:
    """Base of the registries without a server of their own (embedded, file).

    Clients dial the broker's address or read the registry file, so there is nothing to
    announce, and without ZooKeeper there are no takeover records.
    """

    @property
    def registration(self) -> BrokerRegistration:
        return NO_REGISTRATION

    def takeover_nodes(self) -> TakeoverNodes | None:
        return None

    @property
    def connection_state(self) -> str | None:
        return None

    @property
    def session_losses(self) -> int:
        return 0

    async def brokers(self) -> list[str]:
        return []


class BindingRegistry(Protocol):
    @property
    def kind(self) -> str:
        """``"embedded"``, ``"file"`` or ``"zk"``."""
        ...

    @property
    def registration(self) -> BrokerRegistration:
        """How a broker using this registry announces itself (``NO_REGISTRATION``: no-op)."""
        ...

    def takeover_nodes(self) -> TakeoverNodes | None:
        """The takeover records on this registry's session, or None (not ZooKeeper)."""
        ...

    @property
    def connection_state(self) -> str | None:
        """``connected``, ``suspended`` or ``lost``; None without a registry server."""
        ...

    @property
    def session_losses(self) -> int:
        """Registry sessions lost (expired) since start."""
        ...

    async def brokers(self) -> list[str]:
        """The addresses of the cluster's live brokers the registry knows, sorted.

        Empty when the registry knows none (embedded). Raises ``RegistryError`` when the
        registry server cannot be asked.
        """
        ...

    async def start(self, table: BindingTable) -> None:
        """Load the initial bindings into *table* and start watching for changes.

        Raises:
            RegistryError: The initial bindings cannot be loaded.
        """
        ...

    async def declare(self, group: str, bindings: Sequence[Binding]) -> bool:
        """Bindings a connection of *group* declared when it opened.

        Returns:
            True if they were applied (embedded); False if this registry is authoritative
            and ignores declarations (file, zk).

        Raises:
            ValueError: A declared binding is invalid; nothing was applied.
        """
        ...

    async def stop(self) -> None:
        """Stop watching; idempotent. Raises ``RegistryError`` if the watch had crashed."""
        ...
