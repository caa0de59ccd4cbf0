"""Store URLs: the cluster's ``db`` key names the backend and its settings in one string.

The syntax is KiteQ's, so existing configs keep working:

* ``memory://?maxcap=500000`` (KiteQ's ``initcap`` is accepted and has no effect);
* ``rocksdb://./db/x?fsync=batch`` (relative path ``./db/x``) or ``rocksdb:///var/lib/kiteq``
  (absolute); ``fsync`` is ``batch`` (default), ``always`` or ``never``;
* ``mysql://…`` is reserved for the MySQL backend (issue #6).

Unknown parameters are errors rather than ignored: a misspelt ``fsync`` must not silently
leave a broker running with a durability it was not configured for.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit

from kiteq.core.errors import ConfigError
from kiteq.store.base import MessageStore
from kiteq.store.memory import MemoryStore

__all__ = ["describe", "open_store"]

DEFAULT_MAXCAP: Final = 500_000
_SECRET_PARAMS: Final = frozenset({"password", "passwd", "pwd", "secret"})


def open_store(url: str) -> MessageStore:
    """Build (not open) the backend *url* names.

    Raises:
        ConfigError: Unknown scheme, unknown parameter or bad value; the message names
            the parameter and shows the URL without credentials.
    """
    parts = urlsplit(url)
    match parts.scheme:
        case "memory":
            query = _query(url, parts, {"maxcap", "initcap"})
            if parts.netloc or parts.path:
                raise ConfigError(f"store URL {describe(url)}: memory:// takes no path")
            _positive_int(url, query, "initcap", 1)
            return MemoryStore(_positive_int(url, query, "maxcap", DEFAULT_MAXCAP))
        case "rocksdb":
            return _rocksdb(url, parts)
        case "mysql":
            raise ConfigError("mysql:// store is not available yet (issue #6)")
        case _:
            raise ConfigError(
                f"store URL {describe(url)}: unknown scheme {parts.scheme!r}; "
                "expected memory://, rocksdb:// or mysql://"
            )


def _rocksdb(url: str, parts: SplitResult) -> MessageStore:
    try:
        from kiteq.store.rocksdb import FSYNC_MODES, RocksDBStore  # imported here: needs rocksdict
    except ImportError as exc:
        raise ConfigError(
            f"store URL {describe(url)}: rocksdb:// needs rocksdict (pip install 'kiteq[server]')"
        ) from exc
    query = _query(url, parts, {"fsync"})
    path = unquote(parts.netloc + parts.path)
    if not path:
        raise ConfigError(
            f"store URL {describe(url)}: rocksdb:// needs a path, "
            "e.g. rocksdb://./db/kiteq or rocksdb:///var/lib/kiteq"
        )
    fsync = query.get("fsync", "batch")
    for mode in FSYNC_MODES:
        if fsync == mode:
            return RocksDBStore(path, fsync=mode)
    raise ConfigError(
        f"store URL {describe(url)}: parameter fsync must be one of "
        f"{', '.join(FSYNC_MODES)}, got {fsync!r}"
    )


def _query(url: str, parts: SplitResult, allowed: set[str]) -> dict[str, str]:
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise ConfigError(f"store URL {describe(url)}: malformed query: {exc}") from exc
    query: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise ConfigError(
                f"store URL {describe(url)}: unknown parameter {name!r} for "
                f"{parts.scheme}://; known: {', '.join(sorted(allowed))}"
            )
        if name in query:
            raise ConfigError(f"store URL {describe(url)}: parameter {name} given twice")
        query[name] = value
    return query


def _positive_int(url: str, query: dict[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(
            f"store URL {describe(url)}: parameter {name} must be a positive integer, got {raw!r}"
        )
    return value


def describe(url: str) -> str:
    """*url* for logs and stats: any password (authority or query) becomes ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(name.lower() in _SECRET_PARAMS for name, _ in pairs):
        query = urlencode(
            [(n, "***" if n.lower() in _SECRET_PARAMS else v) for n, v in pairs], safe="*"
        )
    if netloc == parts.netloc and query == parts.query:
        return url
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
