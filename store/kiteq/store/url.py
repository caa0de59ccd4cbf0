"""Store URLs: the cluster's ``db`` key names the backend and its settings in one string.

The syntax is KiteQ's, so existing configs keep working:

* ``memory://?maxcap=500000`` (KiteQ's ``initcap`` is accepted and has no effect);
* ``rocksdb://./db/x?fsync=batch`` (relative path ``./db/x``) or ``rocksdb:///var/lib/kiteq``
  (absolute); ``fsync`` is ``batch`` (default), ``always`` or ``never``; ``cacheMB`` is
  the block cache every column family shares (default 16);
* ``mysql://user:pw@host:3306?db=kite&shardnum=4&…`` (see ``MySQLOptions`` for every
  parameter; KiteQ's ``username=``/``password=`` query form works too).

Unknown parameters are errors rather than ignored: a misspelt ``fsync`` must not silently
leave a broker running with a durability it was not configured for.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import SplitResult, unquote, urlsplit

from kiteq.core.errors import ConfigError
from kiteq.core.params import query_params
from kiteq.store.base import MessageStore
from kiteq.store.memory import MemoryStore
from kiteq.store.options import (
    MySQLOptions,
    StoreOwnership,
    describe,
    mysql_options,
    store_ownership,
    where,
)

# MySQLOptions, describe, mysql_options and store_ownership are at home in
# kiteq.store.options (the backends import them from there); named here too, beside
# open_store, as the one module a broker needs for its db URL.
__all__ = [
    "MySQLOptions",
    "StoreOwnership",
    "describe",
    "mysql_options",
    "open_store",
    "store_ownership",
]

DEFAULT_MAXCAP: Final = 500_000


def open_store(url: str) -> MessageStore:
    """Build (not open) the backend *url* names.

    Raises:
        ConfigError: Unknown scheme, unknown parameter or bad value; the message names
            the parameter and shows the URL without credentials.
    """
    parts = urlsplit(url)
    match parts.scheme:
        case "memory":
            params = query_params(parts.query, {"maxcap", "initcap"}, where(url))
            if parts.netloc or parts.path:
                raise ConfigError(f"{where(url)}: memory:// takes no path")
            params.integer("initcap", 1)
            return MemoryStore(params.integer("maxcap", DEFAULT_MAXCAP))
        case "rocksdb":
            return _rocksdb(url, parts)
        case "mysql":
            return _mysql(url)
        case _:
            raise ConfigError(
                f"store URL {describe(url)}: unknown scheme {parts.scheme!r}; "
                "expected memory://, rocksdb:// or mysql://"
            )


def _rocksdb(url: str, parts: SplitResult) -> MessageStore:
    try:
        # imported here: needs rocksdict
        from kiteq.store.rocksdb import DEFAULT_BLOCK_CACHE_MB, FSYNC_MODES, RocksDBStore
    except ImportError as exc:
        raise ConfigError(
            f"store URL {describe(url)}: rocksdb:// needs rocksdict (pip install 'kiteq[server]')"
        ) from exc
    params = query_params(parts.query, {"fsync", "cacheMB"}, where(url))
    path = unquote(parts.netloc + parts.path)
    if not path:
        raise ConfigError(
            f"store URL {describe(url)}: rocksdb:// needs a path, "
            "e.g. rocksdb://./db/kiteq or rocksdb:///var/lib/kiteq"
        )
    fsync = params.string("fsync", "batch")
    cache_mb = params.integer("cacheMB", DEFAULT_BLOCK_CACHE_MB)
    for mode in FSYNC_MODES:
        if fsync == mode:
            return RocksDBStore(path, fsync=mode, cache_mb=cache_mb)
    raise ConfigError(
        f"store URL {describe(url)}: parameter fsync must be one of "
        f"{', '.join(FSYNC_MODES)}, got {fsync!r}"
    )


def _mysql(url: str) -> MessageStore:
    options = mysql_options(url)
    try:
        from kiteq.store.mysql import MySQLStore  # imported here: needs SQLAlchemy and PyMySQL
    except ImportError as exc:
        raise ConfigError(
            f"store URL {describe(url)}: mysql:// needs SQLAlchemy and PyMySQL "
            "(pip install 'kiteq[server]')"
        ) from exc
    return MySQLStore(options)
