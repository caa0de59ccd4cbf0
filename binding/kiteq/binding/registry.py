"""Where the broker's bindings come from: the ``BindingRegistry`` seam and its factory.

``[registry.<env>] hosts`` picks the registry:

- ``embedded://`` — consumers declare their bindings when their stream opens; persistent
  ones are kept in the broker's store (``EmbeddedRegistry``).
- ``file://<path>`` — a static TOML file, reloaded periodically (``FileBindingRegistry``);
  the path may be relative to the working directory (``file://conf/registry_demo.toml``).
- ``zk://...`` — ZooKeeper, KiteQ's layout (not available yet).

In file and ZooKeeper modes the registry is authoritative: bindings declared by
connections are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from kiteq.binding.embedded import EmbeddedRegistry
from kiteq.binding.file import FileBindingRegistry
from kiteq.core.errors import ConfigError

if TYPE_CHECKING:
    from kiteq.binding.match import BindingTable
    from kiteq.binding.model import Binding

__all__ = ["BindingRegistry", "MetaStore", "open_registry"]


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


def open_registry(uri: str, meta: MetaStore, *, reload_seconds: float = 60.0) -> BindingRegistry:
    """Create the registry named by *uri* (not started).

    Args:
        uri: ``embedded://``, ``file://<path>`` or ``zk://hosts``.
        meta: Durable metadata for the embedded registry's persistent bindings.
        reload_seconds: Reload period of a file registry.

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
        raise ConfigError("zk:// registries are not available yet (issue #3)")
    raise ConfigError(
        f"registry {uri!r}: unsupported scheme {scheme!r} (embedded://, file://, zk://)"
    )
