"""What only the RocksDB backend promises: group commit, fsync modes, failure handling,
work kept off the event loop, and durability across a SIGKILL."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from rocksdict import Rdict

from kiteq.core.errors import StoreUnavailableError
from kiteq.store import _rocksdb_db, _rocksdb_requests
from kiteq.store.base import Rescheduled, Saved
from kiteq.store.rocksdb import Fsync, RocksDBStore
from tests.store.helpers import (
    NOW,
    ThreadSpy,
    acked_before_sigkill,
    fail_writes,
    only_store_threads,
    opened,
    record,
)


@pytest.fixture
def store(rocks: RocksDBStore) -> RocksDBStore:
    return rocks


async def test_concurrent_saves_share_one_write_batch(store: RocksDBStore) -> None:
    before = store.write_batches
    records = [record() for _ in range(200)]
    outcomes = await asyncio.gather(*(store.save([r]) for r in records))
    assert outcomes == [[Saved.STORED]] * 200
    assert store.write_batches - before <= 2
    assert await store.backlog() == {"trade": 200}


async def test_calls_arriving_during_a_write_form_the_next_batch(store: RocksDBStore) -> None:
    before = store.write_batches
    first = asyncio.ensure_future(store.save([record()]))
    await asyncio.sleep(0)  # the writer takes the first call alone
    rest = [asyncio.ensure_future(store.save([record()])) for _ in range(100)]
    await asyncio.gather(first, *rest)
    assert store.write_batches - before == 2


async def test_mixed_calls_are_grouped_in_call_order(store: RocksDBStore) -> None:
    before = store.write_batches
    tx, gone, moved = record(commit=False), record(), record(ndt=NOW - 5)
    again = record(message_id=gone.message_id, body=b"again")
    results = await asyncio.gather(
        store.save([tx, gone, moved]),
        store.commit(tx.message_id),
        store.reschedule([Rescheduled(record=record(ndt=NOW - 9), previous_due=NOW)]),
        store.delete([gone]),
        store.save([again]),
        store.put_meta("m", b"1"),
    )
    assert store.write_batches - before == 1
    assert results[0] == [Saved.STORED] * 3
    committed = results[1]
    assert committed is not None
    assert committed.message.commit is True
    assert results[4] == [Saved.STORED]
    got = await store.get(gone.message_id)
    assert got is not None
    assert got.message.body == b"again"
    assert await store.backlog() == {"trade": 3}


async def test_fsync_always_writes_each_call_alone(tmp_path: Path) -> None:
    async with opened(RocksDBStore(str(tmp_path / "db"), fsync="always")) as store:
        outcomes = await asyncio.gather(*(store.save([record(), record()]) for _ in range(20)))
        assert outcomes == [[Saved.STORED, Saved.STORED]] * 20
        assert store.write_batches == 20


async def test_a_burst_larger_than_the_batch_limit_is_split(store: RocksDBStore) -> None:
    body = bytes(1024)
    calls = [[record(body=body) for _ in range(1000)] for _ in range(24)]  # ~27 MB
    before = store.write_batches
    outcomes = await asyncio.gather(*(store.save(c) for c in calls))
    assert all(o == [Saved.STORED] * 1000 for o in outcomes)
    assert 2 <= store.write_batches - before <= 4


async def test_a_failed_write_fails_every_caller_of_its_batch(
    store: RocksDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = record()
    await store.save([kept])
    fail_writes(store, monkeypatch)

    saves = [store.save([record(), record()]) for _ in range(50)]
    others = [store.delete([kept]), store.put_meta("k", b"v"), store.commit(kept.message_id)]
    results = await asyncio.wait_for(
        asyncio.gather(*saves, *others, return_exceptions=True), timeout=10
    )
    for outcomes in results[:50]:
        assert isinstance(outcomes, list)
        assert len(outcomes) == 2
        for outcome in outcomes:
            assert isinstance(outcome, StoreUnavailableError)
            assert isinstance(outcome.__cause__, RuntimeError)
    assert all(isinstance(r, StoreUnavailableError) for r in results[50:])
    assert await store.backlog() == {"trade": 1}

    monkeypatch.undo()
    assert await store.save([record()]) == [Saved.STORED]
    assert await store.get(kept.message_id) is not None
    assert await store.backlog() == {"trade": 2}


async def test_an_unexpected_writer_error_still_answers_every_caller(
    store: RocksDBStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(requests: object) -> dict[str, int]:
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(store, "_write_sync", broken)
    results = await asyncio.wait_for(
        asyncio.gather(
            *(store.save([record()]) for _ in range(5)),
            store.delete([record()]),
            return_exceptions=True,
        ),
        timeout=10,
    )
    for outcomes in results[:5]:
        assert isinstance(outcomes, list)
        assert isinstance(outcomes[0], StoreUnavailableError)
    assert isinstance(results[5], StoreUnavailableError)
    assert "store writer failed" in caplog.text

    monkeypatch.undo()
    assert await store.save([record()]) == [Saved.STORED]


async def test_a_cancelled_caller_does_not_stall_the_others(store: RocksDBStore) -> None:
    cancelled = asyncio.ensure_future(store.save([record()]))
    others = [asyncio.ensure_future(store.save([record()])) for _ in range(10)]
    await asyncio.sleep(0)
    cancelled.cancel()
    assert await asyncio.wait_for(asyncio.gather(*others), timeout=10) == [[Saved.STORED]] * 10
    assert await store.save([record()]) == [Saved.STORED]


async def test_rocksdb_runs_only_on_the_store_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ThreadSpy(monkeypatch)
    spy.on(_rocksdb_db.Column, "get", "get_many", "keys", "items", "values", "release")
    spy.on(_rocksdb_db.DB, "__init__", "close")
    spy.on(_rocksdb_requests._Batch, "__init__")

    store = RocksDBStore(str(tmp_path / "db"))
    await store.open()
    r, tx = record(), record(commit=False)
    await store.save([r, tx])
    await store.commit(tx.message_id)
    await store.reschedule([Rescheduled(record=r, previous_due=r.next_deliver_time)])
    await store.get(r.message_id)
    await store.page_due(NOW, 10)
    await store.put_meta("k", b"v")
    await store.get_meta("k")
    await store.delete([r])
    await store.close()
    only_store_threads(spy.threads)


class _StateReads:
    """Counts the ids *store* reads from its state column family."""

    def __init__(self, store: RocksDBStore, monkeypatch: pytest.MonkeyPatch) -> None:
        db = store._db
        assert db is not None
        self.ids: list[bytes] = []
        original = _rocksdb_db.Column.get_many

        def counted(column: _rocksdb_db.Column, keys: list[bytes]) -> list[bytes | None]:
            if column is db.state:
                self.ids.extend(keys)
            return original(column, keys)

        monkeypatch.setattr(_rocksdb_db.Column, "get_many", counted)


async def _due_keys(store: RocksDBStore) -> list[bytes]:
    db = store._db
    assert db is not None
    return list(db.due.keys(b""))


async def test_a_delete_just_after_the_save_reads_no_state(
    store: RocksDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = _StateReads(store, monkeypatch)
    records = [record() for _ in range(50)]
    assert await store.save(records) == [Saved.STORED] * 50
    saved_reads = len(reads.ids)
    assert saved_reads == 50  # a save still asks RocksDB whether the id is stored
    moved = records[0]
    moved.next_deliver_time = NOW + 60
    await store.reschedule([Rescheduled(record=moved, previous_due=NOW)])
    await store.delete(records)
    assert len(reads.ids) == saved_reads  # the store thread knew every state it wrote
    assert await _due_keys(store) == []
    assert await store.get(moved.message_id) is None
    assert await store.backlog() == {}


async def test_a_write_that_failed_its_sync_is_read_back_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with opened(RocksDBStore(str(tmp_path / "db"), fsync="always")) as store:
        reads = _StateReads(store, monkeypatch)
        kept = record()
        await store.save([kept])
        db = store._db
        assert db is not None
        real = db.rdict

        class FailingSync:
            """The write reaches the memtable; the WAL sync after it fails."""

            def write(self, *args: Any) -> None:
                real.write(*args)

            def flush_wal(self, sync: bool) -> None:
                raise RuntimeError("injected: IO error: sync failed")

        monkeypatch.setattr(db, "rdict", FailingSync())
        kept.next_deliver_time = NOW + 60
        with pytest.raises(StoreUnavailableError):
            await store.reschedule([Rescheduled(record=kept, previous_due=NOW)])
        monkeypatch.setattr(db, "rdict", real)
        before = len(reads.ids)
        # the reschedule is in RocksDB after all: the delete must find its due key there
        await store.delete([kept])
        assert reads.ids[before:] == [kept.message_id.encode()]
        assert await _due_keys(store) == []
        assert await store.get(kept.message_id) is None


async def test_release_memory_flushes_the_memtables_and_close_waits_for_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db"
    store = RocksDBStore(str(path))
    await store.open()
    records = [record() for _ in range(200)]
    await store.save(records)
    assert not list(path.glob("*.sst"))  # what was written is in the memtables
    await store.release_memory()
    assert list(path.glob("*.sst"))
    more = [record() for _ in range(200)]
    await store.save(more)
    releasing = asyncio.ensure_future(store.release_memory())
    await asyncio.sleep(0)  # one step of the loop: the flush has been handed to its thread
    await store.close()
    await releasing
    # a caller that gives up waiting does not let close() run under the flush
    third = RocksDBStore(str(path))
    await third.open()
    await third.save([record() for _ in range(200)])
    cancelled = asyncio.ensure_future(third.release_memory())
    await asyncio.sleep(0)  # one step of the loop: the flush has been handed to its thread
    cancelled.cancel()
    await third.close()
    assert cancelled.cancelled()
    again = RocksDBStore(str(path))
    await again.open()
    for r in records + more:
        assert await again.get(r.message_id) == r
    await again.close()


async def test_open_failure_is_a_store_unavailable_error_and_can_be_retried(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "db")
    first = RocksDBStore(path)
    await first.open()
    second = RocksDBStore(path)
    with pytest.raises(StoreUnavailableError, match="open failed") as info:
        await second.open()  # RocksDB's lock is held by the first
    assert info.value.__cause__ is not None
    await first.close()
    await second.open()
    await second.close()


async def test_close_while_opening_leaves_the_database_closed(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    store = RocksDBStore(path)
    opening = asyncio.ensure_future(store.open())
    await asyncio.sleep(0)
    with pytest.raises(StoreUnavailableError, match="still opening"):
        await store.open()
    await store.close()
    with pytest.raises(StoreUnavailableError, match="closed"):
        await opening
    again = RocksDBStore(path)  # the lock was released
    await again.open()
    await again.close()


async def test_column_families_are_plain_raw_rocksdb(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    store = RocksDBStore(path)
    await store.open()
    await store.save([record()])
    await store.close()
    assert {"msg", "state", "due", "meta"} <= set(Rdict.list_cf(path))


def test_bad_constructor_arguments() -> None:
    bad: Any = "sometimes"
    with pytest.raises(ValueError, match="fsync"):
        RocksDBStore("./db", fsync=bad)
    with pytest.raises(ValueError, match="path"):
        RocksDBStore("")


# The child saves from 4 concurrent tasks and prints the ids of each batch once ``save``
# has returned STORED for it; it is SIGKILLed mid-stream.
_CHILD = """
import asyncio, sys, time
from kiteq.core.message import Message, StoredMessage
from kiteq.store.base import Saved
from kiteq.store.rocksdb import RocksDBStore

async def producer(store, deadline):
    while time.monotonic() < deadline:
        batch = [
            StoredMessage(message=Message(topic="t", message_type="m", body=b"x" * 1024), publish_time=1.0)
            for _ in range(10)
        ]
        outcomes = await store.save(batch)
        assert outcomes == [Saved.STORED] * 10, outcomes
        print(" ".join(r.message_id for r in batch), flush=True)

async def main():
    store = RocksDBStore(sys.argv[1], fsync=sys.argv[2])
    await store.open()
    deadline = time.monotonic() + 60
    await asyncio.gather(*(producer(store, deadline) for _ in range(4)))

asyncio.run(main())
"""


@pytest.mark.parametrize("fsync", ["batch", "always", "never"])
async def test_acked_saves_survive_sigkill(tmp_path: Path, fsync: Fsync) -> None:
    path = str(tmp_path / "db")
    acked = await acked_before_sigkill(_CHILD, path, fsync, lines=40)

    async with opened(RocksDBStore(path)) as store:
        missing = [mid for mid in acked if await store.get(mid) is None]
        assert missing == []
        backlog = await store.backlog()
        assert backlog["t"] >= len(acked)


def _logged_block_caches(path: Path) -> tuple[set[str], set[str]]:
    """The block cache addresses and capacities RocksDB's LOG gives its column families."""
    addresses, capacities = set(), set()
    for line in (path / "LOG").read_text().splitlines():
        key, _, value = line.strip().partition(":")
        if key == "block_cache":
            addresses.add(value.strip())
        elif key.strip() == "capacity":
            capacities.add(value.strip())
    return addresses, capacities


@pytest.mark.parametrize(("cache_mb", "expected"), [(None, 16 << 20), (3, 3 << 20)])
async def test_every_column_family_reads_through_one_bounded_block_cache(
    tmp_path: Path, cache_mb: int | None, expected: int
) -> None:
    path = tmp_path / "db"
    store = (
        RocksDBStore(str(path)) if cache_mb is None else RocksDBStore(str(path), cache_mb=cache_mb)
    )
    await store.open()
    await store.close()
    addresses, capacities = _logged_block_caches(path)
    # RocksDB logs the table options of the default and each of the nine families
    assert len(addresses) == 1
    assert capacities == {str(expected)}


def test_a_block_cache_under_one_mib_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cache_mb"):
        RocksDBStore(str(tmp_path / "db"), cache_mb=0)
