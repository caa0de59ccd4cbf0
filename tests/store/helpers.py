"""Record builders, stand-ins and spies shared by the store tests."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, TypeVar

import pytest
from rocksdict import Rdict, WriteBatch, WriteOptions

from kiteq.core.message import GroupDelivery, GroupState, Message, StoredMessage
from kiteq.store.base import DeadLetter, MessageStore, Rescheduled
from kiteq.store.rocksdb import RocksDBStore
from kiteq.store.url import open_store

NOW: Final = 1_700_000_000.0

_Store = TypeVar("_Store", bound=MessageStore)


@dataclasses.dataclass(frozen=True)
class Backend:
    """A backend's name and URL; ``build`` makes a fresh store on the same storage."""

    name: str
    url: str

    def build(self) -> MessageStore:
        return open_store(self.url)


@contextlib.asynccontextmanager
async def opened(store: _Store) -> AsyncIterator[_Store]:
    """*store* opened for the block, closed after."""
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def reopened(store: MessageStore, backend: Backend) -> AsyncIterator[MessageStore]:
    """*store* closed, and a new store opened on its storage for the block (closed after)."""
    await store.close()
    async with opened(backend.build()) as again:
        yield again


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


def moved(r: StoredMessage, ndt: float, **changes: object) -> Rescheduled:
    """A reschedule of *r* to *ndt*, given what the caller believes is stored."""
    new = dataclasses.replace(r, next_deliver_time=ndt)
    for name, value in changes.items():
        setattr(new, name, value)
    return Rescheduled(record=new, previous_due=r.next_deliver_time)


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


class FailingWrites:
    """Stands in for the Rdict: every write fails like a full or broken disk would."""

    def __init__(self, real: Rdict) -> None:
        self.real = real

    def write(self, *args: object) -> None:
        raise RuntimeError("injected: IO error: No space left on device")


def fail_writes(store: RocksDBStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write of *store* fails from now on (``monkeypatch.undo()`` heals it)."""
    db = store._db
    assert db is not None
    monkeypatch.setattr(db, "rdict", FailingWrites(db.rdict))


class ThreadSpy:
    """Records the name of every thread that calls one of the spied methods."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.threads: set[str] = set()
        self._monkeypatch = monkeypatch

    def on(self, owner: type, *names: str) -> None:
        for name in names:
            self._monkeypatch.setattr(owner, name, self._recording(getattr(owner, name)))

    def _recording(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.threads.add(threading.current_thread().name)
            return original(*args, **kwargs)

        return recorded


def only_store_threads(threads: set[str]) -> None:
    """Something was called, and only on the store's own threads."""
    assert threads
    assert all(name.startswith("kiteq-store") for name in threads), threads


async def acked_before_sigkill(script: str, *args: str, lines: int) -> list[str]:
    """Run *script* (it prints the ids of each save once it has returned STORED) in a child,
    SIGKILL it after *lines* lines, and return the ids it reported."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    acked: list[str] = []
    try:
        for _ in range(lines):
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
            assert line, "the child exited early"
            acked += line.decode().split()
    finally:
        proc.kill()
        await proc.stdout.read()
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return acked


def mangled(first: bytes, second: bytes, how: str) -> tuple[bytes, bytes]:
    """Both encodings broken the same way: a wrong version byte, truncated, extended, empty."""
    match how:
        case "version":
            return b"\x09" + first[1:], b"\x09" + second[1:]
        case "truncate":
            return first[:-1], second[:-1]
        case "extend":
            return first + b"x", second + b"x"
        case _:
            return b"", b""
