"""This broker's network address: the ``-bind`` flag parsed, the address clients dial."""

from __future__ import annotations

import socket

from kiteq.core.errors import ConfigError

__all__ = ["advertised_address", "is_loopback", "split_bind"]


def split_bind(bind: str) -> tuple[str, int]:
    """Parse ``host:port`` / ``:port`` / ``[::1]:port``; raise ConfigError naming -bind."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"-bind: expected host:port, got {bind!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    return host in {"localhost", "::1"} or host.startswith("127.")


def advertised_address(host: str, port: int) -> str:
    """The address clients should dial.

    ``-bind`` without a host publishes this machine's address, never ``:port`` (KiteQ
    publishes ``:13800``, which no other machine can reach): the host name's address, or
    when that is a loopback one (Debian maps the host name to 127.0.1.1) the address of
    the interface that routes outwards; loopback only when there is nothing else.
    """
    if host in {"", "0.0.0.0", "::"}:  # noqa: S104 - comparing, not binding
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
        if host.startswith("127."):
            host = _outward_address() or host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _outward_address() -> str | None:
    """The local address of the interface that routes outwards, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            # a UDP connect sends nothing: it only picks the route and the source address
            probe.connect(("192.0.2.1", 9))
            address: str = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith(("127.", "0.")) else address
