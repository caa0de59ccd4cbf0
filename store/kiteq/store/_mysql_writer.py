"""The MySQL store's transactions: what one database's group-commit writer runs.

Each database (shard) has a ``GroupCommitWriter`` (``kiteq.store.group_commit``) whose
queue holds ``Part``s; ``ShardDeferral`` lets bookkeeping wait up to ``flushSeconds``
and ``ShardWriter.write`` turns one batch into one transaction, retried when nothing of
it can have committed (see ``kiteq.store.mysql`` for the rules).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from sqlalchemy.exc import DBAPIError

from kiteq.store._mysql_engine import DRIVER_ERRORS, MAX_ATTEMPTS, Database, reason, retriable
from kiteq.store._mysql_requests import UPDATES, DuplicateKeyError, Kind, Part
from kiteq.store._mysql_tx import ShardTx, Tables

__all__ = ["ShardDeferral", "ShardWriter", "segments"]

logger = logging.getLogger(__name__)


def segments(parts: Sequence[Part]) -> list[list[int]]:
    """Split a transaction's parts (in call order) into runs that may be regrouped.

    Inside a run, writes are applied by kind in ``Kind`` order. A part starts a new run
    when one of its ids was touched earlier in the run by a write of a later kind (a
    delete then a save of the same id), so every id sees its writes in call order.
    """
    runs: list[list[int]] = []
    current: list[int] = []
    touched: dict[str, int] = {}
    for index, part in enumerate(parts):
        kind = part.kind
        ids = list(part.ids())
        if current and any(touched.get(mid, -1) > kind for mid in ids):
            runs.append(current)
            current = []
            touched = {}
        current.append(index)
        for mid in ids:
            if touched.get(mid, -1) < kind:
                touched[mid] = kind
    if current:
        runs.append(current)
    return runs


def _apply(tx: ShardTx, parts: Iterable[Part]) -> None:
    """One run of ``segments``: every kind of write, in ``Kind`` order."""
    by_kind: dict[Kind, list[Part]] = {}
    for part in parts:
        by_kind.setdefault(part.kind, []).append(part)
    for kind in sorted(by_kind):
        same = by_kind[kind]
        type(same[0]).apply(tx, same)


class ShardDeferral:
    """When a database's next transaction is due (a ``group_commit.Deferral``).

    At once when anything but bookkeeping is queued; otherwise when ``batchUpdateSize``
    rows of updates or ``batchDelSize`` rows of deletes are queued, or the oldest
    bookkeeping has waited ``flushSeconds``.
    """

    __slots__ = (
        "batch_del_size",
        "batch_update_size",
        "deletes",
        "flush_seconds",
        "updates",
        "urgent",
    )

    def __init__(self, batch_update_size: int, batch_del_size: int, flush_seconds: float) -> None:
        self.batch_update_size = batch_update_size
        self.batch_del_size = batch_del_size
        self.flush_seconds = flush_seconds
        self.urgent = 0  # queued parts that never wait
        self.updates = 0  # queued rows counted against batchUpdateSize
        self.deletes = 0  # queued rows counted against batchDelSize

    def queued(self, part: Part, sign: int) -> None:
        if not part.deferred:
            self.urgent += sign
        elif part.kind in UPDATES:
            self.updates += sign * part.rows
        else:
            self.deletes += sign * part.rows

    def deadline(self, pending: Iterable[Part], now: float) -> float | None:
        if (
            self.urgent > 0
            or self.updates >= self.batch_update_size
            or self.deletes >= self.batch_del_size
        ):
            return None
        oldest = next((part.queued for part in pending if part.deferred), None)
        if oldest is None or now >= oldest + self.flush_seconds:
            return None
        return oldest + self.flush_seconds


class ShardWriter:
    """Runs a database's batches of parts as transactions (on a worker thread)."""

    __slots__ = ("batch_sizes", "database", "owner", "tables")

    def __init__(
        self, database: Database, tables: Tables, owner: str, batch_sizes: tuple[int, int]
    ) -> None:
        self.database = database
        self.tables = tables
        self.owner = owner
        # (batchUpdateSize, batchDelSize)
        self.batch_sizes = batch_sizes

    def write(self, shard: int, parts: list[Part]) -> ShardTx:
        """One transaction of *parts*; the committed attempt, with its count changes.

        Raises:
            StoreUnavailableError: Nothing was written, or (a connection lost during
                COMMIT) nobody can tell.
        """
        careful = False
        error: BaseException = RuntimeError("no attempt made")
        for _ in range(MAX_ATTEMPTS):
            tx: ShardTx | None = None
            for part in parts:
                part.reset()
            try:
                with self.database.engine.connect() as conn:
                    tx = ShardTx(
                        conn, self.tables, shard, self.owner, self.batch_sizes, careful=careful
                    )
                    for run in segments(parts):
                        _apply(tx, [parts[i] for i in run])
                    tx.committing = True
                    conn.commit()
                    return tx
            except DuplicateKeyError as exc:
                careful = True
                error = exc.__cause__ or exc
                continue
            except DBAPIError as exc:
                error = exc
                if retriable(exc) or (
                    exc.connection_invalidated and not (tx is not None and tx.committing)
                ):
                    logger.info("store write retried shard=%d: %s", shard, reason(exc))
                    continue
                raise self.database.unavailable("write", exc) from exc
            except DRIVER_ERRORS as exc:
                raise self.database.unavailable("write", exc) from exc
        raise self.database.unavailable(
            f"write (gave up after {MAX_ATTEMPTS} attempts)", error
        ) from error
