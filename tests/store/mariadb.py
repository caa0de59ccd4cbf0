"""The MariaDB server the MySQL store tests use.

The local server (``KITEQ_TEST_MYSQL``, default ``mysql://root@127.0.0.1:3306``) when it
answers; otherwise tests call ``unavailable("MariaDB")``: a skip locally, a failure under
``CI=true`` (``scripts/test.sh`` installs and starts the server first). Every user of it
works in its own databases ``kqt_<random>_<shard>``, dropped at the end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final
from urllib.parse import urlsplit

import pymysql

from kiteq.store._mysql_engine import engine as _engine
from kiteq.store._mysql_schema import Layout, create_schema
from kiteq.store.url import mysql_options

BASE_URL: Final = os.environ.get("KITEQ_TEST_MYSQL", "mysql://root@127.0.0.1:3306").rstrip("/")
# databases of the session's conformance schema (conftest.mysql_prefix)
SHARDNUM: Final = 4


def connect() -> pymysql.Connection[pymysql.cursors.Cursor]:
    """A plain admin connection (autocommit) to the test server."""
    parts = urlsplit(BASE_URL)
    return pymysql.connect(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=parts.username or "root",
        password=parts.password or "",
        connect_timeout=3,
        autocommit=True,
    )


def available() -> bool:
    try:
        connect().close()
    except pymysql.Error:
        return False
    return True


def new_prefix() -> str:
    return f"kqt_{uuid.uuid4().hex[:12]}"


def url(prefix: str, **params: object) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"db": prefix, **params}.items())
    return f"{BASE_URL}?{query}"


def create(prefix: str, shardnum: int) -> None:
    options = mysql_options(url(prefix, shardnum=shardnum))
    engine = _engine(options, 1)
    try:
        with engine.connect() as conn:
            create_schema(conn, Layout(prefix, shardnum))
            conn.commit()
    finally:
        engine.dispose()


def drop(prefix: str) -> None:
    with connect() as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE %s",
            (prefix.replace("_", "\\_") + "\\_%",),
        )
        for (name,) in cur.fetchall():
            cur.execute(f"DROP DATABASE `{name}`")


def drop_store(store_url: str) -> None:
    """Drop the databases a ``mysql://`` store URL names (benchmarks)."""
    options = mysql_options(store_url)
    with (
        pymysql.connect(
            host=options.host,
            port=options.port,
            user=options.user,
            password=options.password,
            connect_timeout=5,
            autocommit=True,
        ) as conn,
        conn.cursor() as cur,
    ):
        for database in Layout(options.db, options.shardnum).databases():
            cur.execute(f"DROP DATABASE IF EXISTS `{database}`")


def clear(prefix: str, shardnum: int) -> None:
    """Empty every table of the layout (faster than TRUNCATE on small tables)."""
    layout = Layout(prefix, shardnum)
    with connect() as conn, conn.cursor() as cur:
        for database, table in layout.expected_tables():
            cur.execute(f"DELETE FROM `{database}`.`{table}`")


@contextmanager
def databases(shardnum: int = 4, *, schema: bool = True) -> Iterator[str]:
    """A fresh prefix (with its schema unless told not to), dropped afterwards."""
    prefix = new_prefix()
    try:
        if schema:
            create(prefix, shardnum)
        yield prefix
    finally:
        drop(prefix)
