"""Where the brokers are: a static ``brokers=[...]`` list or a ``registry=`` URL.

``file://path`` reads a registry file once; ``zk://h1:2181,h2:2181[/chroot][?timeout=S&
digest=user:password]`` finds the brokers of each topic in ZooKeeper (KiteQ's layout) and
follows them live (``kiteq.client._zk_directory``, imported only then: kazoo loads only
for zk:// clients).

With ``digest=user:password`` the client authenticates as *user* and every node it
creates (producer nodes, ``-bind`` nodes, the parents of both, a topic's
``/kiteq/server/{topic}`` when it is missing, the chroot) gets the broker's ACL: world READ,
ALL for *user* (``kiteq.binding.zk_session``). A node that already exists keeps its ACL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from kiteq.binding.model import Binding
from kiteq.client._base import BrokerDirectory, brokers_for_any
from kiteq.core.errors import ConfigError, KiteQError

__all__ = ["FileDirectory", "StaticDirectory", "resolve"]

_FILE_SCHEME = "file://"
_ZK_SCHEME = "zk://"


class _FixedDirectory:
    """Brokers known from the start and never changing: nothing to watch or write."""

    live = False
    static = False

    def __init__(self, lookup: Callable[[str], Sequence[str]], every: tuple[str, ...]) -> None:
        self._lookup = lookup
        self._every = every

    def watching(self, topic: str) -> bool:
        """Always True: the addresses are known from the start."""
        return True

    def brokers_for(self, topic: str) -> list[str]:
        """The addresses serving *topic*."""
        return list(self._lookup(topic))

    def brokers_for_any(self, topics: Iterable[str]) -> list[str]:
        """Every address serving at least one of *topics*, without repeats, in order."""
        return brokers_for_any(self, topics)

    def every(self) -> list[str]:
        """Every broker listed."""
        return list(self._every)

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Nothing changes: *listener* is never called."""

    async def watch(self, topics: Iterable[str], timeout: float) -> None:
        """Nothing to watch."""

    async def watch_alive(self, timeout: float) -> None:
        """Nothing to watch."""

    def publish_producer(self, topic: str, group: str) -> None:
        """Nowhere to publish."""

    async def write_bindings(self, group: str, bindings: Sequence[Binding], timeout: float) -> None:
        """Nowhere to write: the broker takes the bindings a stream declares."""

    async def close(self) -> None:
        """Nothing to close."""


class StaticDirectory(_FixedDirectory):
    """A ``brokers=[...]`` list: every broker serves every topic."""

    static = True

    def __init__(self, addresses: tuple[str, ...]) -> None:
        super().__init__(lambda _topic: addresses, addresses)


class FileDirectory(_FixedDirectory):
    """A ``registry="file://..."`` registry file, read once: brokers per topic."""


def resolve(brokers: Sequence[str] | None, registry: str | None) -> BrokerDirectory:
    """Build the directory from exactly one of *brokers* and *registry*.

    Raises:
        ConfigError: Neither or both are given, an address is not ``host:port``, the
            registry URL has an unsupported scheme or the registry file is invalid.
    """
    if brokers is not None:
        if registry is not None:
            raise ConfigError("give brokers=[...] or registry='file://...|zk://...', not both")
        return _static(brokers)
    if registry is None:
        raise ConfigError("give brokers=[...] or registry='file://...|zk://...'")
    if registry[: len(_ZK_SCHEME)].lower() == _ZK_SCHEME:
        # imported here: kazoo loads only for zk:// users (import kiteq.client stays light)
        from kiteq.client._zk_directory import ZkDirectory

        return ZkDirectory(registry)
    if not registry.startswith(_FILE_SCHEME):
        raise ConfigError(f"registry {registry!r}: expected file://<path> or zk://<hosts>")
    path = registry[len(_FILE_SCHEME) :]
    if not path:
        raise ConfigError(f"registry {registry!r}: the file path is missing")
    # imported here: the registry reader is needed only by file:// users
    from kiteq.binding.file import read_registry_file

    try:
        registry_file = read_registry_file(path)
    except KiteQError as exc:
        raise ConfigError(f"registry {registry!r}: {exc}") from exc
    addresses = tuple(dict.fromkeys(broker.address for broker in registry_file.brokers))
    return FileDirectory(registry_file.brokers_for, addresses)


def _static(brokers: Sequence[str]) -> StaticDirectory:
    if isinstance(brokers, str):
        raise ConfigError("brokers must be a list of 'host:port' strings, not a string")
    addresses = tuple(dict.fromkeys(_check_address(address) for address in brokers))
    if not addresses:
        raise ConfigError("brokers must name at least one 'host:port'")
    return StaticDirectory(addresses)


def _check_address(address: object) -> str:
    if not isinstance(address, str):
        raise ConfigError(f"broker address {address!r} must be a 'host:port' string")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"broker address {address!r} must be 'host:port'")
    return address
