"""Store URLs: the cluster's ``db`` key names the backend and its settings in one string.

The syntax is KiteQ's, so existing configs keep working:

* ``memory://?maxcap=500000`` (KiteQ's ``initcap`` is accepted and has no effect);
* ``rocksdb://./db/x?fsync=batch`` (relative path ``./db/x``) or ``rocksdb:///var/lib/kiteq``
  (absolute); ``fsync`` is ``batch`` (default), ``always`` or ``never``;
* ``mysql://user:pw@host:3306?db=kite&shardnum=4&…`` (see ``MySQLOptions`` for every
  parameter; KiteQ's ``username=``/``password=`` query form works too).

Unknown parameters are errors rather than ignored: a misspelt ``fsync`` must not silently
leave a broker running with a durability it was not configured for.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Final
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit

from kiteq.core.errors import ConfigError
from kiteq.store.base import MessageStore
from kiteq.store.memory import MemoryStore

__all__ = ["MySQLOptions", "describe", "mysql_options", "open_store"]

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
            return _mysql(url)
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


@dataclasses.dataclass(frozen=True, slots=True)
class MySQLOptions:
    """A parsed ``mysql://`` store URL.

    ``mysql://user:password@host:3306/?db=kite&shardnum=4&batchUpdateSize=1000&…``; the
    user and password may also be given KiteQ's way, as ``username=`` and ``password=``
    query parameters, and the database prefix as the path (``mysql://host/kite``).

    Attributes:
        host: Server host name or address (KiteQ's ``,slave:port`` is refused: reads from
            a replica can miss acknowledged writes).
        port: Server port (``3306``).
        user: Login (``root``).
        password: Password (empty). Never shown: ``description`` and errors hide it.
        db: Database name prefix (``kite``): the store uses databases ``{db}_0`` to
            ``{db}_{shardnum-1}``. Letters, digits and ``_``, at most 48 characters.
        shardnum: Databases (``4``): 1, 2, 4, 8 or 16; each holds ``16/shardnum``
            message tables (KiteQ's sharding by the id's last hex digit).
        batch_update_size: ``batchUpdateSize`` (``1000``): most rows one ``UPDATE``
            statement changes, and the number of queued reschedules and history events
            that are written at once instead of waiting for ``flushSeconds``.
        batch_del_size: ``batchDelSize`` (``1000``): most ids one ``DELETE`` statement
            removes, and the number of queued deletes and dead letters written at once.
        flush_seconds: ``flushSeconds`` (``1``): longest time bookkeeping (reschedules,
            deletes, dead letters, history) waits to be written with other writes. It
            also goes with any save, commit, redrive or metadata write of its database,
            which never waits: a store-ack is sent as soon as its transaction is
            committed. ``0`` writes bookkeeping at once too.
        max_conn: ``maxConn`` (``20``): connections in the pool, which is also the number
            of the store's worker threads (every PyMySQL call runs on one of them).
        timeout: ``timeout`` (``30``): connect, read and write timeout in seconds.
        auto_create: ``autoCreate`` (``false``): create missing databases, tables and
            indexes when the store opens. When false, a store whose schema is incomplete
            refuses to open and names the command that creates it (``kiteq-schema``).
        kite_server: ``kiteServer`` (None: this host's name; the broker passes its
            advertised ``host:port``, the name it stamps on the records it accepts): the owner whose rows this store pages for
            redelivery and counts in ``backlog``, ``dlq_size`` and ``list_dlq`` (KiteQ's
            ``kite_server`` filter). Records are stored with the ``kite_server`` they
            carry; an empty ``kiteServer=`` owns records saved without one (tools, tests).
    """

    host: str
    port: int = 3306
    user: str = "root"
    password: str = ""
    db: str = "kite"
    shardnum: int = 4
    batch_update_size: int = 1000
    batch_del_size: int = 1000
    flush_seconds: float = 1.0
    max_conn: int = 20
    timeout: float = 30.0
    auto_create: bool = False
    kite_server: str | None = None

    @property
    def description(self) -> str:
        """The URL without user or password, every setting spelt out."""
        query = urlencode(
            {
                "db": self.db,
                "shardnum": self.shardnum,
                "batchUpdateSize": self.batch_update_size,
                "batchDelSize": self.batch_del_size,
                "flushSeconds": f"{self.flush_seconds:g}",
                "maxConn": self.max_conn,
                "timeout": f"{self.timeout:g}",
                "autoCreate": "true" if self.auto_create else "false",
                **({} if self.kite_server is None else {"kiteServer": self.kite_server}),
            }
        )
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mysql://{host}:{self.port}?{query}"


_MYSQL_PARAMS: Final = frozenset(
    {
        "db",
        "username",
        "user",
        "password",
        "shardnum",
        "batchUpdateSize",
        "batchDelSize",
        "flushSeconds",
        "maxConn",
        "timeout",
        "autoCreate",
        "kiteServer",
    }
)
_DB_PREFIX: Final = re.compile(r"[A-Za-z0-9_]{1,48}")


def mysql_options(url: str) -> MySQLOptions:
    """Parse and validate a ``mysql://`` store URL.

    Raises:
        ConfigError: A bad parameter; the message names it.
    """
    parts = urlsplit(url)
    shown = describe(url)
    if parts.scheme != "mysql":
        raise ConfigError(f"store URL {shown}: expected mysql://")
    query = _query(url, parts, set(_MYSQL_PARAMS))
    if "," in parts.netloc:
        raise ConfigError(
            f"store URL {shown}: a second (slave) host is not supported: every read goes to "
            "the one server, so it sees every acknowledged write"
        )
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"store URL {shown}: bad port: {exc}") from exc
    if not host:
        raise ConfigError(f"store URL {shown}: mysql:// needs a host, e.g. mysql://127.0.0.1:3306")
    if "username" in query and "user" in query:
        raise ConfigError(f"store URL {shown}: parameter user given twice (user and username)")
    user = query.get("username", query.get("user"))
    if parts.username is not None:
        if user is not None:
            raise ConfigError(f"store URL {shown}: parameter username given twice")
        user = unquote(parts.username)
    password = query.get("password")
    if parts.password is not None:
        if password is not None:
            raise ConfigError(f"store URL {shown}: parameter password given twice")
        password = unquote(parts.password)
    path = unquote(parts.path).strip("/")
    db = query.get("db")
    if path and db is not None and path != db:
        raise ConfigError(f"store URL {shown}: parameter db given twice (path /{path} and db={db})")
    db = db if db is not None else (path or "kite")
    if not _DB_PREFIX.fullmatch(db):
        raise ConfigError(
            f"store URL {shown}: parameter db must be 1-48 letters, digits or _, got {db!r}"
        )
    shardnum = _positive_int(url, query, "shardnum", 4)
    if 16 % shardnum:
        raise ConfigError(
            f"store URL {shown}: parameter shardnum must divide 16 (1, 2, 4, 8 or 16), "
            f"got {shardnum}"
        )
    kite_server = query.get("kiteServer")
    if kite_server is not None and len(kite_server) > 255:
        raise ConfigError(f"store URL {shown}: parameter kiteServer is longer than 255 characters")
    return MySQLOptions(
        host=host,
        port=3306 if port is None else port,
        user="root" if user is None else user,
        password=password or "",
        db=db,
        shardnum=shardnum,
        batch_update_size=_positive_int(url, query, "batchUpdateSize", 1000),
        batch_del_size=_positive_int(url, query, "batchDelSize", 1000),
        flush_seconds=_seconds(url, query, "flushSeconds", 1.0, allow_zero=True),
        max_conn=_positive_int(url, query, "maxConn", 20),
        timeout=_seconds(url, query, "timeout", 30.0, allow_zero=False),
        auto_create=_bool(url, query, "autoCreate", default=False),
        kite_server=kite_server,
    )


def _seconds(
    url: str, query: dict[str, str], name: str, default: float, *, allow_zero: bool
) -> float:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        kind = "a number >= 0" if allow_zero else "a number > 0"
        raise ConfigError(
            f"store URL {describe(url)}: parameter {name} must be {kind}, got {raw!r}"
        )
    return value


def _bool(url: str, query: dict[str, str], name: str, *, default: bool) -> bool:
    raw = query.get(name)
    if raw is None:
        return default
    value = {"true": True, "1": True, "false": False, "0": False}.get(raw.lower())
    if value is None:
        raise ConfigError(
            f"store URL {describe(url)}: parameter {name} must be true or false, got {raw!r}"
        )
    return value


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
