"""Where the broker's bindings come from: the factory of ``BindingRegistry`` implementations.

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

A broker announces itself through ``registry.registration``: ZooKeeper publishes the
broker's nodes; with the embedded and file registries clients find brokers by address or
from the registry file, so registration is a no-op. The seams are in ``kiteq.binding.base``.
"""

from __future__ import annotations

from collections.abc import Sequence

from kiteq.binding.base import BindingRegistry, MetaStore
from kiteq.binding.embedded import EmbeddedRegistry
from kiteq.binding.file import FileBindingRegistry
from kiteq.binding.zk import ZkBindingRegistry
from kiteq.binding.zk_uri import parse_zk_uri
from kiteq.core.errors import ConfigError

__all__ = ["open_registry", "redact_registry_uri"]


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
