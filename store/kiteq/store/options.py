"""Parsed store URLs: what a ``db`` URL says, read without building a store.

``mysql_options`` reads a ``mysql://`` URL (``MySQLOptions``); ``store_ownership`` says
who owns a broker's stored rows and which brokers share them, so nobody outside the
store package parses store URLs; ``describe`` shows any URL without its secrets.
``kiteq.store.url`` builds the stores.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from typing import Final
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit

from kiteq.core.errors import ConfigError
from kiteq.core.params import Params, query_params

__all__ = [
    "MySQLOptions",
    "StoreOwnership",
    "describe",
    "mysql_options",
    "store_ownership",
    "where",
]

_SECRET_PARAMS: Final = frozenset({"password", "passwd", "pwd", "secret"})


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

    @property
    def sharing_identity(self) -> str:
        """Which database set the store uses: stores with equal identities share rows.

        The server as written in the URL (write it the same way on every broker), the
        database prefix and the shard count; never the owner or the credentials.
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mysql://{host.lower()}:{self.port}/{self.db}?shardnum={self.shardnum}"


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
    shown = where(url)
    if parts.scheme != "mysql":
        raise ConfigError(f"{shown}: expected mysql://")
    params = query_params(parts.query, _MYSQL_PARAMS, shown)
    if "," in parts.netloc:
        raise ConfigError(
            f"{shown}: a second (slave) host is not supported: every read goes to "
            "the one server, so it sees every acknowledged write"
        )
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"{shown}: bad port: {exc}") from exc
    if not host:
        raise ConfigError(f"{shown}: mysql:// needs a host, e.g. mysql://127.0.0.1:3306")
    user, password = _credentials(parts, params, shown)
    shardnum = params.integer("shardnum", 4)
    if 16 % shardnum:
        raise ConfigError(
            f"{shown}: parameter shardnum must divide 16 (1, 2, 4, 8 or 16), got {shardnum}"
        )
    kite_server = params.string("kiteServer", "") if params.has("kiteServer") else None
    if kite_server is not None and len(kite_server) > 255:
        raise ConfigError(f"{shown}: parameter kiteServer is longer than 255 characters")
    return MySQLOptions(
        host=host,
        port=3306 if port is None else port,
        user=user,
        password=password,
        db=_database(parts, params, shown),
        shardnum=shardnum,
        batch_update_size=params.integer("batchUpdateSize", 1000),
        batch_del_size=params.integer("batchDelSize", 1000),
        flush_seconds=params.number("flushSeconds", 1.0, allow_zero=True),
        max_conn=params.integer("maxConn", 20),
        timeout=params.number("timeout", 30.0),
        auto_create=params.flag("autoCreate", False),
        kite_server=kite_server,
    )


def _credentials(parts: SplitResult, params: Params, shown: str) -> tuple[str, str]:
    """(user, password) from the URL's authority or KiteQ's query form, never both."""
    if params.has("username") and params.has("user"):
        raise ConfigError(f"{shown}: parameter user given twice (user and username)")
    user = params.string("username", params.string("user", "")) or None
    if parts.username is not None:
        if user is not None:
            raise ConfigError(f"{shown}: parameter username given twice")
        user = unquote(parts.username)
    password = params.string("password", "") if params.has("password") else None
    if parts.password is not None:
        if password is not None:
            raise ConfigError(f"{shown}: parameter password given twice")
        password = unquote(parts.password)
    return ("root" if user is None else user), (password or "")


def _database(parts: SplitResult, params: Params, shown: str) -> str:
    """The database prefix, from the path or ``db=`` (KiteQ's form), ``kite`` by default."""
    path = unquote(parts.path).strip("/")
    db = params.string("db", "") if params.has("db") else None
    if path and db is not None and path != db:
        raise ConfigError(f"{shown}: parameter db given twice (path /{path} and db={db})")
    db = db if db is not None else (path or "kite")
    if not _DB_PREFIX.fullmatch(db):
        raise ConfigError(f"{shown}: parameter db must be 1-48 letters, digits or _, got {db!r}")
    return db


def where(url: str) -> str:
    """*url* as error messages name it."""
    return f"store URL {describe(url)}"


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


@dataclasses.dataclass(frozen=True, slots=True)
class StoreOwnership:
    """Who owns a broker's stored rows (``kite_server``), and who shares them.

    Attributes:
        url: The store URL to open: a ``mysql://`` URL without ``kiteServer`` gains
            ``kiteServer=<owner>``; any other URL is unchanged.
        owner: The ``kite_server`` of the rows the broker stores and redelivers.
        derived: The owner is the broker's address (not configured by ``kiteServer``).
        sharing: ``MySQLOptions.sharing_identity`` of a store several brokers can share
            (brokers with equal values take over each other's rows); None for stores
            only one broker ever uses (memory, RocksDB).
    """

    url: str
    owner: str
    derived: bool
    sharing: str | None

    @property
    def adopts_host_rows(self) -> bool:
        """Whether rows stamped with the host's name belong to this broker.

        True for a shared store whose owner was derived: the host's name was KiteQ's
        owner, and ours before owners were addresses.
        """
        return self.derived and self.sharing is not None


def store_ownership(db: str, advertised: str) -> StoreOwnership:
    """The ownership of the store *db* for a broker advertised as *advertised*.

    The owner is ``kiteServer=`` of a ``mysql://`` URL when given, otherwise the
    broker's advertised address, unique per broker (KiteQ's host name is shared by
    brokers on one host).

    Raises:
        ConfigError: A bad ``mysql://`` URL; the message names the parameter.
    """
    if not db.strip().lower().startswith("mysql://"):
        return StoreOwnership(db, advertised, derived=True, sharing=None)
    options = mysql_options(db)
    if options.kite_server is not None:
        return StoreOwnership(db, options.kite_server, False, options.sharing_identity)
    joiner = "&" if "?" in db else "?"
    url = f"{db}{joiner}kiteServer={urllib.parse.quote(advertised, safe='')}"
    return StoreOwnership(url, advertised, True, options.sharing_identity)
