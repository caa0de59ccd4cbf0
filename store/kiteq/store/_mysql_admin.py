"""The MySQL schema from outside the store: the ``kiteq-schema`` command, the check at open.

``kiteq-schema [--check] URL`` (also ``python -m kiteq.store.mysql``) creates or checks
the databases, tables and indexes of ``_mysql_schema``; a store refuses to open on an
incomplete schema and names that command (``ensure_schema``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from sqlalchemy import Connection

from kiteq.core.errors import ConfigError, StoreUnavailableError
from kiteq.store._mysql_engine import DRIVER_ERRORS, engine, reason
from kiteq.store._mysql_schema import Layout, check_schema, create_schema
from kiteq.store.options import MySQLOptions, mysql_options

__all__ = ["ensure_schema", "schema_command", "schema_main"]

logger = logging.getLogger(__name__)

# problems named in the error of a store that will not open
_SHOWN: int = 6


def schema_command(options: MySQLOptions) -> str:
    """The command that creates the schema for *options* (a password shows as ***)."""
    auth = f"{options.user}:***@" if options.password else f"{options.user}@"
    host = f"[{options.host}]" if ":" in options.host else options.host
    url = f"mysql://{auth}{host}:{options.port}?db={options.db}&shardnum={options.shardnum}"
    return f"kiteq-schema '{url}' (or: python -m kiteq.store.mysql '{url}')"


def ensure_schema(conn: Connection, layout: Layout, options: MySQLOptions) -> None:
    """At open: create or upgrade the schema (``autoCreate``), then refuse an incomplete one.

    Raises:
        StoreUnavailableError: Something is missing or from an older version.
    """
    if options.auto_create:
        created = create_schema(conn, layout)
        conn.commit()
        if created:
            logger.info("store schema created: %s", "; ".join(created))
    problems = check_schema(conn, layout)
    if problems:
        shown = "; ".join(problems[:_SHOWN]) + (
            f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        )
        raise StoreUnavailableError(
            f"{options.description}: the schema is incomplete or from an older "
            f"version (needs: {shown}); create or upgrade it with "
            f"{schema_command(options)}, or add autoCreate=true to the store URL"
        )


def schema_main(argv: Sequence[str] | None = None) -> int:
    """``kiteq-schema [--check] URL``: create (idempotent) or check the MySQL schema.

    Exit status: 0 complete, 1 something is missing (named) or the server failed,
    2 bad arguments or URL.
    """
    parser = argparse.ArgumentParser(
        prog="kiteq-schema",
        description="Create the MySQL store's databases, tables and indexes (idempotent), "
        "or with --check only verify them.",
    )
    parser.add_argument("url", help="the store URL, as in the cluster's db setting")
    parser.add_argument(
        "--check", action="store_true", help="only check; exit 1 naming what is missing"
    )
    args = parser.parse_args(argv)
    out, err = sys.stdout, sys.stderr
    try:
        options = mysql_options(args.url)
    except ConfigError as exc:
        err.write(f"kiteq-schema: {exc}\n")
        return 2
    layout = Layout(options.db, options.shardnum)
    connections = engine(options, 1)
    try:
        with connections.connect() as conn:
            created: list[str] = []
            if not args.check:
                created = create_schema(conn, layout)
                conn.commit()
            problems = check_schema(conn, layout)
    except DRIVER_ERRORS as exc:
        err.write(f"kiteq-schema: {options.description}: {reason(exc)}\n")
        return 1
    finally:
        connections.dispose()
    for line in created:
        out.write(f"{line}\n" if line.startswith("upgrade") else f"created {line}\n")
    if problems:
        for line in problems:
            err.write(f"{line}\n" if line.startswith("upgrade") else f"missing {line}\n")
        hint = (
            ""
            if args.check
            else " (existing tables are altered only to upgrade a schema from before issue #10)"
        )
        err.write(f"kiteq-schema: schema incomplete: {len(problems)} problem(s){hint}\n")
        return 1
    out.write(
        f"schema complete: {options.shardnum} database(s) {', '.join(layout.databases())}, "
        f"{len(layout.expected_tables())} tables\n"
    )
    return 0
