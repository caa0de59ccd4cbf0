"""Record builders shared by the store tests."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Final

import pytest
from rocksdict import Rdict, WriteBatch, WriteOptions

from kiteq.core.message import GroupDelivery, GroupState, Message, StoredMessage
from kiteq.store.base import DeadLetter, MessageStore
from kiteq.store.rocksdb import RocksDBStore
from kiteq.store.url import open_store

NOW: Final = 1_700_000_000.0


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend's name and URL; ``build`` makes a fresh store on the same storage."""

    name: str
    url: str

    def build(self) -> MessageStore:
        return open_store(self.url)


def record(
    *,
    topic: str = "trade",
    ndt: float = NOW,
    commit: bool = True,
    body: bytes | None = None,
    message_id: str | None = None,
    properties: dict[str, str] | None = None,
    message_type: str = "pay-succ",
    expired_time: int = int(NOW) + 3600,
) -> StoredMessage:
    """A committed-by-default record due at *ndt*, with a random id unless given."""
    message = Message(
        topic=topic,
        message_type=message_type,
        body=os.urandom(64) if body is None else body,
        properties=properties or {},
        expired_time=expired_time,
        deliver_limit=100,
        group_id="ps-test",
        commit=commit,
        create_time=int(NOW) - 1,
    )
    if message_id is not None:
        message = dataclasses.replace(message, message_id=message_id)
    return StoredMessage(message=message, publish_time=NOW - 0.5, next_deliver_time=ndt)


def pending(attempts: int = 0, ndt: float = 0.0) -> GroupDelivery:
    return GroupDelivery(GroupState.PENDING, attempts, ndt)


def acked(attempts: int = 1, ndt: float = 0.0) -> GroupDelivery:
    return GroupDelivery(GroupState.ACKED, attempts, ndt)


def dead(attempts: int = 0, ndt: float = 0.0) -> GroupDelivery:
    return GroupDelivery(GroupState.DEAD, attempts, ndt)


def letter(
    r: StoredMessage,
    reason: str = "deliver_limit",
    dead_time: float = NOW,
    group: str = "g1",
    *,
    keep: bool = False,
) -> DeadLetter:
    return DeadLetter(r, reason, dead_time, group, keep)


def ids(records: list[StoredMessage]) -> list[str]:
    return [r.message_id for r in records]


def due_order(records: list[StoredMessage]) -> list[str]:
    """Ids in the order ``page_due`` must return them."""
    return [
        r.message_id for r in sorted(records, key=lambda r: (r.next_deliver_time, r.message_id))
    ]


# backends that promise to keep data across close/reopen (a subset of conftest.BACKENDS)
DURABLE_BACKENDS = ["rocksdb", "mysql"]


class SpyWrites:
    """Stands in for the Rdict and records, per write, whether it was made durable
    (a synced write, or an unsynced one followed by ``flush_wal(sync=True)``)."""

    def __init__(self, real: Rdict) -> None:
        self.real = real
        self.syncs: list[bool] = []

    def write(self, batch: WriteBatch, options: WriteOptions) -> None:
        self.syncs.append(options.sync)
        self.real.write(batch, options)

    def flush_wal(self, sync: bool = True) -> None:
        if sync and self.syncs:
            self.syncs[-1] = True
        self.real.flush_wal(sync)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def spy_writes(store: RocksDBStore, monkeypatch: pytest.MonkeyPatch) -> SpyWrites:
    db = store._db
    assert db is not None
    spy = SpyWrites(db.rdict)
    monkeypatch.setattr(db, "rdict", spy)
    return spy
