"""What ``kiteq`` checks and settles before it builds a broker.

Every problem found here is one ``ConfigError`` naming the flag or key, raised before
anything starts, so the command prints one line and exits 1 (no traceback, no shutdown
lines of a broker that never ran).

The config file is, first found: ``-configPath``, ``$KITEQ_CONFIG``, ``conf/cluster.toml``
in the current directory, else the one shipped in the package (``shipped_config``).
Relative ``rocksdb://`` paths are resolved against the current directory and shown
absolute from then on.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.metadata
import math
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from kiteq.core.config import ClusterConfig
from kiteq.core.errors import ConfigError, KiteQError, RegistryError, StoreError

__all__ = [
    "CONFIG_ENV",
    "LOCAL_CONFIG",
    "check_flags",
    "check_http_port",
    "check_port_free",
    "explain",
    "find_config",
    "resolve_store_path",
    "shipped_config",
    "version",
]

CONFIG_ENV: Final = "KITEQ_CONFIG"
LOCAL_CONFIG: Final = Path("conf") / "cluster.toml"
MAX_PORT: Final = 65535
_ROCKSDB: Final = "rocksdb://"


def version() -> str:
    """The installed distribution's version (``kiteq --version``)."""
    try:
        return importlib.metadata.version("kiteq")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def shipped_config() -> Path:
    """The config shipped with the package.

    In a wheel it is ``kiteq/broker/conf/cluster.toml`` (pyproject's force-include of
    ``conf/``); in a source checkout (editable install), ``conf/cluster.toml`` at its root.
    """
    packaged = Path(__file__).with_name("conf") / "cluster.toml"
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / LOCAL_CONFIG


def find_config(flag: str | None, environ: Mapping[str, str], cwd: Path) -> Path:
    """The config file to read, by the order in the module docstring.

    Raises:
        ConfigError: ``$KITEQ_CONFIG`` names no file (``-configPath``'s is reported by
            the reader).
    """
    if flag:
        return Path(flag)
    if environ.get(CONFIG_ENV):
        path = Path(environ[CONFIG_ENV])
        if not path.is_file():
            raise ConfigError(f"${CONFIG_ENV}: no config file at {str(path)!r}")
        return path
    local = cwd / LOCAL_CONFIG
    return local if local.is_file() else shipped_config()


def check_flags(*, pport: int, grace: float, hport: int | None = None) -> None:
    """Refuse flag values the broker would misread (argparse checks only their type).

    Raises:
        ConfigError: ``-pport`` or ``-hport`` above 65535 (it would wrap to another port)
            or ``-grace`` negative or not finite.
    """
    for flag, port in (("-pport", pport), ("-hport", hport or 0)):
        if port > MAX_PORT:
            raise ConfigError(f"{flag}: must be 0..{MAX_PORT} (or < 0: off), got {port}")
    if not math.isfinite(grace) or grace < 0:
        raise ConfigError(f"-grace: must be >= 0 seconds, got {grace!r}")


def check_port_free(flag: str, host: str, port: int) -> None:
    """Fail now, with the cause, if *host*:*port* cannot be listened on.

    gRPC's own error says only "Failed to bind" and the HTTP server's is a traceback;
    this bind (same SO_REUSEADDR as the servers, so a port in TIME_WAIT passes) names the
    cause. Port 0 (any free port) is not checked.

    Raises:
        ConfigError: The address is in use, not local, or not permitted.
    """
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"{flag}: cannot resolve {host!r}: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            cause = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ConfigError(f"{flag}: cannot listen on {host or '*'}:{port}: {cause}") from exc


def check_http_port(
    config: ClusterConfig, flag: int | None, host: str, others: tuple[int, ...]
) -> None:
    """Fail now if the HTTP publish port cannot be listened on.

    The port is the ``-hport`` *flag*'s, else (None) ``config.hport``; nothing is checked
    when it is off or 0 (a port the OS picks). *others* are the ports the broker listens
    on besides it (gRPC, ops): the same port twice would fail only once the broker has
    started.

    Raises:
        ConfigError: Naming ``-hport``, or the key when the port comes from the config.
    """
    port = config.hport if flag is None else flag
    if port <= 0:
        return
    name = "-hport" if flag is not None else f"clusters.{config.name}.hport"
    if port in others:
        raise ConfigError(f"{name}: port {port} is already the gRPC or ops port")
    check_port_free(name, host, port)


def resolve_store_path(config: ClusterConfig, cwd: Path) -> ClusterConfig:
    """*config* with a relative ``rocksdb://`` path made absolute against *cwd*."""
    if not config.db.startswith(_ROCKSDB):
        return config
    path, sep, query = config.db[len(_ROCKSDB) :].partition("?")
    if not path or Path(path).is_absolute():
        return config
    absolute = os.path.normpath(cwd / path)
    return dataclasses.replace(config, db=f"{_ROCKSDB}{absolute}{sep}{query}")


def explain(exc: KiteQError, config: ClusterConfig) -> str:
    """The one line for a start-up failure: the key it concerns first, then the cause."""
    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, StoreError):
        return f"clusters.{config.name}.db: store unavailable: {exc}"
    if isinstance(exc, RegistryError):
        key = f"registry.{config.env}.hosts" if config.env else f"clusters.{config.name}.env"
        return f"{key}: registry unavailable: {exc}"
    return str(exc)
