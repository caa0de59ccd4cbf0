"""Drop the MySQL databases of a bench broker's store (PyMySQL, the server extra)."""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

import pymysql

from kiteq.core.errors import KiteQError

__all__ = ["drop_databases"]


def drop_databases(url: str) -> None:
    """Drop every database ``{db}_<n>`` of the ``mysql://`` store *url*.

    Raises:
        KiteQError: The server refused or could not be reached.
    """
    parts = urlsplit(url)
    prefix = parse_qs(parts.query)["db"][-1]
    try:
        with (
            pymysql.connect(
                host=parts.hostname or "127.0.0.1",
                port=parts.port or 3306,
                user=unquote(parts.username or "root"),
                password=unquote(parts.password or ""),
                connect_timeout=5,
                autocommit=True,
            ) as conn,
            conn.cursor() as cur,
        ):
            cur.execute(
                "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE %s",
                (prefix.replace("_", "\\_") + "\\_%",),
            )
            for (name,) in cur.fetchall():
                cur.execute(f"DROP DATABASE `{name}`")
    except pymysql.Error as exc:
        raise KiteQError(f"could not drop the bench databases {prefix}_*: {exc}") from exc
