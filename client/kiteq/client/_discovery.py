"""Where the brokers are: a static ``brokers=[...]`` list or a ``registry=`` URL."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

from kiteq.core.errors import ConfigError, KiteQError

__all__ = ["BrokerDirectory", "resolve"]

_FILE_SCHEME = "file://"
_ZK_SCHEME = "zk://"


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerDirectory:
    """Broker addresses for a topic.

    Attributes:
        lookup: The addresses serving a topic.
        every: Every known broker, whatever it serves (where a ``tx_checker`` listens).
        static: True when every broker serves every topic (a plain ``brokers=`` list).
    """

    lookup: Callable[[str], Sequence[str]]
    every: Callable[[], Sequence[str]]
    static: bool

    def brokers_for(self, topic: str) -> list[str]:
        """The addresses serving *topic*."""
        return list(self.lookup(topic))

    def brokers_for_any(self, topics: Iterable[str]) -> list[str]:
        """Every address serving at least one of *topics*, without repeats, in order."""
        seen: dict[str, None] = {}
        for topic in topics:
            seen.update(dict.fromkeys(self.lookup(topic)))
        return list(seen)


def resolve(brokers: Sequence[str] | None, registry: str | None) -> BrokerDirectory:
    """Build the directory from exactly one of *brokers* and *registry*.

    Raises:
        ConfigError: Neither or both are given, an address is not ``host:port``, the
            registry URL has an unsupported scheme or the registry file is invalid.
    """
    if brokers is not None:
        if registry is not None:
            raise ConfigError("give brokers=[...] or registry='file://...', not both")
        return _static(brokers)
    if registry is None:
        raise ConfigError("give brokers=[...] or registry='file://...'")
    if registry.startswith(_ZK_SCHEME):
        raise ConfigError("zk:// discovery is not available yet (issue #3)")
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
    return BrokerDirectory(registry_file.brokers_for, lambda: addresses, static=False)


def _static(brokers: Sequence[str]) -> BrokerDirectory:
    if isinstance(brokers, str):
        raise ConfigError("brokers must be a list of 'host:port' strings, not a string")
    addresses = tuple(dict.fromkeys(_check_address(address) for address in brokers))
    if not addresses:
        raise ConfigError("brokers must name at least one 'host:port'")
    return BrokerDirectory(lambda _topic: addresses, lambda: addresses, static=True)


def _check_address(address: object) -> str:
    if not isinstance(address, str):
        raise ConfigError(f"broker address {address!r} must be a 'host:port' string")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"broker address {address!r} must be 'host:port'")
    return address
