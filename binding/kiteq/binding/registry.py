"""Where the broker's bindings come from: the ``BindingRegistry`` seam and its factory.

``[registry.<env>] hosts`` picks the registry:

- ``embedded://`` — consumers declare their bindings when their stream opens; persistent
  ones are kept in the broker's store (``EmbeddedRegistry``).
- ``file://<path>`` — a static TOML file, reloaded periodically (``FileBindingRegistry``);
  the path may be relative to the working directory (``file://conf/registry_demo.toml``).
- ``zk://h1:2181,h2:2181[/chroot][?timeout=10&digest=user:password]`` — ZooKeeper with
  KiteQ's layout (``ZkBindingRegistry``, see ``kiteq.binding.zk``).

In file and ZooKeeper modes the registry is authoritative: bindings declared by
connections are not applied (a ZooKeeper registry writes them to ZooKeeper, whose watch
then applies them).

A broker announces itself through ``broker_registration(registry)``: ZooKeeper publishes
the broker's nodes; with the embedded and file registries clients find brokers by address
or from the registry file, so registration is a no-op.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final, Protocol

from kiteq.binding.embedded import EmbeddedRegistry
from kiteq.binding.file import FileBindingRegistry
from kiteq.binding.zk import ZkBindingRegistry, parse_zk_uri
from kiteq.core.errors import ConfigError

if TYPE_CHECKING:
    from kiteq.binding.match import BindingTable
    from kiteq.binding.model import Binding

__all__ = [
    "BindingRegistry",
    "BrokerInfo",
    "BrokerRegistration",
    "MetaStore",
    "broker_registration",
    "open_registry",
    "redact_registry_uri",
]


class MetaStore(Protocol):
    """Durable small key/values; the broker passes its ``MessageStore``."""

    async def put_meta(self, key: str, value: bytes | None) -> None:
        """Durably set (or with None, delete) *key*."""
        ...

    async def get_meta(self, prefix: str) -> Mapping[str, bytes]:
        """All values whose key starts with *prefix*."""
        ...


class BindingRegistry(Protocol):
    @property
    def kind(self) -> str:
        """``"embedded"``, ``"file"`` or ``"zk"``."""
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


_NO_REGISTRATION: Final = _NoRegistration()


def broker_registration(registry: BindingRegistry) -> BrokerRegistration:
    """How a broker using *registry* announces itself (a no-op unless ZooKeeper)."""
    if isinstance(registry, ZkBindingRegistry):
        return registry
    return _NO_REGISTRATION


def redact_registry_uri(uri: str) -> str:
    """*uri* for logs: a ``zk://`` digest password is replaced by ``***``."""
    if not uri.strip().lower().startswith("zk://"):
        return uri
    try:
        return parse_zk_uri(uri).redacted()
    except ConfigError:
        return uri.partition("?")[0]


def open_registry(
    uri: str,
    meta: MetaStore,
    *,
    reload_seconds: float = 60.0,
    topics: Sequence[str] = ("*",),
) -> BindingRegistry:
    """Create the registry named by *uri* (not started).

    Args:
        uri: ``embedded://``, ``file://<path>`` or ``zk://hosts[/chroot][?params]``.
        meta: Durable metadata for the embedded registry's persistent bindings.
        reload_seconds: Reload period of a file registry.
        topics: The topics the broker serves (``["*"]``: any); a ZooKeeper registry
            watches their bindings and registers the broker under them.

    Raises:
        ConfigError: Unknown or unavailable scheme, or a bad argument.
    """
    scheme, sep, rest = uri.strip().partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ConfigError(f"registry {uri!r}: expected embedded://, file://<path> or zk://<hosts>")
    if scheme == "embedded":
        if rest:
            raise ConfigError(f"registry {uri!r}: embedded:// takes no address")
        return EmbeddedRegistry(meta)
    if scheme == "file":
        if not rest:
            raise ConfigError(f"registry {uri!r}: file:// needs a path")
        if reload_seconds <= 0:
            raise ConfigError(f"registry reload interval must be > 0, got {reload_seconds}")
        return FileBindingRegistry(rest, reload_seconds=reload_seconds)
    if scheme == "zk":
        return ZkBindingRegistry(parse_zk_uri(uri), topics=topics)
    raise ConfigError(
        f"registry {uri!r}: unsupported scheme {scheme!r} (embedded://, file://, zk://)"
    )
