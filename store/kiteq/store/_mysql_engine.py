"""The MySQL store's edge to SQLAlchemy/PyMySQL: the engine, and failures translated.

Every database call of the store runs on its executor through ``Database``, whose
methods turn driver errors into ``StoreUnavailableError`` naming the store and the
action, never the SQL (it would carry message bodies).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Final, TypeVar

import pymysql
from sqlalchemy import URL, Connection, Engine, create_engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from kiteq.core.errors import StoreUnavailableError
from kiteq.store import _state
from kiteq.store.options import MySQLOptions

__all__ = [
    "DEADLOCK",
    "DRIVER_ERRORS",
    "DUPLICATE_KEY",
    "LOCK_WAIT_TIMEOUT",
    "MAX_ATTEMPTS",
    "Database",
    "engine",
    "errno",
    "reason",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# attempts of a transaction that can be retried (nothing of it committed)
MAX_ATTEMPTS: Final = 4
DEADLOCK: Final = 1213
LOCK_WAIT_TIMEOUT: Final = 1205
DUPLICATE_KEY: Final = 1062
# what a database call may raise besides StoreUnavailableError
DRIVER_ERRORS: Final = (SQLAlchemyError, pymysql.Error, OSError)


def engine(options: MySQLOptions, pool_size: int) -> Engine:
    url = URL.create(
        "mysql+pymysql",
        username=options.user,
        password=options.password or None,
        host=options.host,
        port=options.port,
        query={"charset": "utf8mb4"},
    )
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=options.timeout,
        pool_pre_ping=True,
        pool_recycle=3600,
        # Every connection use ends in COMMIT or in the rollback of Connection.close().
        pool_reset_on_return=None,
        connect_args={
            "connect_timeout": options.timeout,
            "read_timeout": options.timeout,
            "write_timeout": options.timeout,
        },
    )


def reason(exc: BaseException) -> str:
    """The driver's words for a failure, without the SQL (it would carry bodies)."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    args: tuple[object, ...] = tuple(getattr(orig, "args", ()))
    if len(args) == 2 and isinstance(args[0], int):
        return f"({args[0]}) {args[1]}"
    return str(orig) or type(orig).__name__


def errno(exc: DBAPIError) -> int | None:
    args = getattr(exc.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def retriable(exc: DBAPIError) -> bool:
    """A deadlock or a lock wait timeout: the transaction was rolled back, try again."""
    return errno(exc) in (DEADLOCK, LOCK_WAIT_TIMEOUT)


class Database:
    """Connections of the store's engine, used from its worker threads."""

    __slots__ = ("description", "engine")

    def __init__(self, engine: Engine, description: str) -> None:
        self.engine = engine
        self.description = description

    def unavailable(self, action: str, exc: BaseException) -> StoreUnavailableError:
        return _state.unavailable(self.description, action, reason(exc))

    def translated(self, action: str) -> contextlib.AbstractContextManager[None]:
        """Database failures outside the write and read paths become one error type."""
        return _state.translated(self.description, action, DRIVER_ERRORS, reason)

    def read(self, action: str, read: Callable[[Connection], _T]) -> _T:
        """Run *read* on a pooled connection; once more on a fresh one if it was dropped."""
        for attempt in range(2):
            try:
                with self.engine.connect() as conn:
                    return read(conn)
            except DBAPIError as exc:
                if attempt == 0 and exc.connection_invalidated:
                    continue
                raise self.unavailable(action, exc) from exc
            except DRIVER_ERRORS as exc:
                raise self.unavailable(action, exc) from exc
        raise AssertionError("unreachable")

    def retried(self, action: str, work: Callable[[Connection], _T]) -> _T:
        """``read``, also retried on a deadlock or a lock wait timeout."""
        for attempt in range(MAX_ATTEMPTS):
            try:
                return self.read(action, work)
            except StoreUnavailableError as exc:
                cause = exc.__cause__
                if (
                    attempt + 1 < MAX_ATTEMPTS
                    and isinstance(cause, DBAPIError)
                    and retriable(cause)
                ):
                    logger.info("store %s retried: %s", action, reason(cause))
                    continue
                raise
        raise AssertionError("unreachable")
