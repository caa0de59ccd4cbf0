"""The ``zk://`` URI of a ZooKeeper registry, parsed (no kazoo here: the client reads it too).

::

    zk://h1:2181,h2:2181[/chroot][?timeout=10&digest=user:password]

- ``/chroot`` prefixes every path and is created at connect when missing.
- ``timeout``: the ZooKeeper session timeout in seconds (default 10).
- ``digest=user:password`` (percent-encode ``& % +`` and non-ASCII in the password): the
  session authenticates as *user* and its nodes get digest ACLs (``kiteq.binding.zk_session``).
"""

from __future__ import annotations

import dataclasses
from typing import Final

from kiteq.core.errors import ConfigError
from kiteq.core.params import query_params

__all__ = ["DEFAULT_SESSION_TIMEOUT", "ZkSettings", "parse_zk_uri"]

DEFAULT_PORT: Final = 2181
DEFAULT_SESSION_TIMEOUT: Final = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class ZkSettings:
    """A parsed ``zk://`` URI.

    Attributes:
        hosts: ``host:port,...`` without the chroot.
        chroot: ``""`` or ``/a/b``.
        session_timeout: Seconds.
        digest: ``(user, password)`` for digest ACLs, or None.
    """

    hosts: str
    chroot: str = ""
    session_timeout: float = DEFAULT_SESSION_TIMEOUT
    digest: tuple[str, str] | None = dataclasses.field(default=None, repr=False)

    @property
    def connect_string(self) -> str:
        """What kazoo takes: ``h1:2181,h2:2181/chroot``."""
        return self.hosts + self.chroot

    def redacted(self) -> str:
        """The URI for logs and errors: the digest password is never shown."""
        query = [f"timeout={self.session_timeout:g}"]
        if self.digest is not None:
            query.append(f"digest={self.digest[0]}:***")
        return f"zk://{self.connect_string}?{'&'.join(query)}"


def parse_zk_uri(uri: str) -> ZkSettings:
    """Parse ``zk://h1:2181,h2:2181[/chroot][?timeout=S&digest=user:password]``.

    Raises:
        ConfigError: Bad hosts, chroot or parameter; the password is never in the message.
    """
    scheme, sep, rest = uri.strip().partition("://")
    if scheme.lower() != "zk" or not sep:
        raise ConfigError(f"expected zk://host:port[,host:port...][/chroot], got {scheme}://...")
    rest, _, query = rest.partition("?")
    hosts_part, slash, chroot = rest.partition("/")
    hosts = [_check_host(h.strip()) for h in hosts_part.split(",")] if hosts_part else []
    if not hosts:
        raise ConfigError("zk:// registry: no ZooKeeper host given")
    chroot = ("/" + chroot).rstrip("/") if slash else ""
    if chroot and any(part in {"", ".", ".."} for part in chroot[1:].split("/")):
        raise ConfigError(f"zk:// registry: invalid chroot {chroot!r}")
    params = query_params(query, {"timeout", "digest"}, "zk:// registry")
    timeout = params.number("timeout", DEFAULT_SESSION_TIMEOUT)
    digest: tuple[str, str] | None = None
    if params.has("digest"):
        user, colon, password = params.string("digest", "").partition(":")
        if not (user and colon and password):
            raise ConfigError("zk:// registry: digest must be user:password")
        digest = (user, password)
    return ZkSettings(",".join(hosts), chroot, timeout, digest)


def _check_host(host: str) -> str:
    """``host[:port]`` or ``[v6][:port]``, with the port spelt out."""
    if host.startswith("["):
        name, bracket, rest = host.partition("]")
        name += bracket
        colon, port = rest[:1], rest[1:]
        valid = bool(bracket) and (not rest or colon == ":")
    else:
        name, colon, port = host.partition(":")
        valid = ":" not in port
    port = port if colon else str(DEFAULT_PORT)
    if not (valid and name.strip("[]") and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"zk:// registry: expected host:port, got {host!r}")
    return f"{name}:{port}"
