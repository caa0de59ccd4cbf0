"""Two-phase commit in the ``MessageStore`` contract: commit, rollback, page_uncommitted.

COMMIT and ROLLBACK are final (DESIGN.md §6): only the call that decides a message gets
the record back, and no later decision changes it. Uncommitted records are never due;
their ``deliver_count`` counts transaction checks and ``next_deliver_time`` is the next
check. The tests on the ``store`` fixture run against every backend; those at the end pin
what only one backend promises.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from rocksdict import Options, Rdict

from kiteq.core.errors import StoreFullError, StoreUnavailableError
from kiteq.core.message import StoredMessage
from kiteq.store import _rocksdb_db, codec
from kiteq.store.base import DeadLetter, HistoryEvent, MessageStore, Saved
from kiteq.store.memory import MemoryStore
from kiteq.store.rocksdb import RocksDBStore
from tests.store.helpers import (
    DURABLE_BACKENDS,
    NOW,
    Backend,
    fail_writes,
    ids,
    moved,
    opened,
    record,
    reopened,
    spy_writes,
)


async def all_due(store: MessageStore, now: float = NOW) -> list[str]:
    return ids(await store.page_due(now, 1000))


async def all_uncommitted(store: MessageStore) -> list[str]:
    return ids(await store.page_uncommitted(1000))


def committed(r: StoredMessage) -> StoredMessage:
    return dataclasses.replace(r, message=dataclasses.replace(r.message, commit=True))


# -- commit ----------------------------------------------------------------------------


async def test_commit_twice_returns_the_record_once(store: MessageStore) -> None:
    tx = record(commit=False, ndt=NOW - 1)
    await store.save([tx])
    first = await store.commit(tx.message_id)
    assert first == committed(tx)
    assert await store.commit(tx.message_id) is None
    assert await store.get(tx.message_id) == committed(tx)
    assert await all_due(store) == [tx.message_id]
    assert await all_uncommitted(store) == []
    assert await store.backlog() == {"trade": 1}


# -- rollback --------------------------------------------------------------------------


async def test_rollback_removes_an_uncommitted_record_and_returns_it(
    store: MessageStore,
) -> None:
    tx = record(commit=False, ndt=NOW - 2, topic="user", body=b"tx body")
    plain = record(ndt=NOW - 1)
    await store.save([tx, plain])
    assert await store.backlog() == {"trade": 1, "user": 1}

    assert await store.rollback(tx.message_id) == tx
    assert await store.get(tx.message_id) is None
    assert await store.backlog() == {"trade": 1}
    assert await all_uncommitted(store) == []
    assert await all_due(store) == [plain.message_id]


async def test_rollback_then_commit_is_none_and_nothing_is_due(store: MessageStore) -> None:
    tx = record(commit=False, ndt=NOW - 1)
    await store.save([tx])
    assert await store.rollback(tx.message_id) is not None
    assert await store.commit(tx.message_id) is None
    assert await store.rollback(tx.message_id) is None
    assert await store.get(tx.message_id) is None
    assert await all_due(store, NOW + 3600) == []
    assert await all_uncommitted(store) == []
    assert await store.backlog() == {}


async def test_commit_then_rollback_is_none_and_the_record_stays(store: MessageStore) -> None:
    tx = record(commit=False, ndt=NOW - 1)
    await store.save([tx])
    assert await store.commit(tx.message_id) is not None
    assert await store.rollback(tx.message_id) is None
    assert await store.get(tx.message_id) == committed(tx)
    assert await all_due(store) == [tx.message_id]
    assert await all_uncommitted(store) == []
    assert await store.backlog() == {"trade": 1}


@pytest.mark.parametrize("decision", ["commit", "rollback"])
async def test_a_decision_on_a_record_saved_committed_is_none(
    store: MessageStore, decision: str
) -> None:
    plain = record(ndt=NOW - 1)
    await store.save([plain])
    assert await getattr(store, decision)(plain.message_id) is None
    assert await store.get(plain.message_id) == plain
    assert await all_due(store) == [plain.message_id]
    assert await store.backlog() == {"trade": 1}


async def test_decisions_on_unknown_or_deleted_ids_are_none(store: MessageStore) -> None:
    assert await store.commit("f" * 32) is None
    assert await store.rollback("f" * 32) is None
    tx = record(commit=False)
    await store.save([tx])
    await store.delete([tx])
    assert await store.rollback(tx.message_id) is None
    assert await store.commit(tx.message_id) is None
    assert await store.backlog() == {}
    assert await all_uncommitted(store) == []


async def test_rollback_keeps_the_history(store: MessageStore) -> None:
    tx = record(commit=False)
    await store.save([tx])
    events = [
        HistoryEvent(tx.message_id, NOW, "published"),
        HistoryEvent(tx.message_id, NOW + 1, "rolled_back"),
    ]
    await store.append_history(events)
    assert await store.rollback(tx.message_id) is not None
    assert await store.get_history(tx.message_id) == events


async def test_concurrent_decisions_have_exactly_one_winner(store: MessageStore) -> None:
    txs = [record(commit=False, ndt=NOW - 1) for _ in range(6)]
    await store.save(txs)
    calls = []
    for i, tx in enumerate(txs):
        decisions = [store.commit(tx.message_id), store.rollback(tx.message_id)]
        calls += decisions if i % 2 else decisions[::-1]
    results = await asyncio.gather(*calls)
    kept: list[str] = []
    for i, tx in enumerate(txs):
        first, second = results[2 * i : 2 * i + 2]
        commit_result, rollback_result = (first, second) if i % 2 else (second, first)
        assert (commit_result is None) != (rollback_result is None), tx.message_id
        if commit_result is not None:
            kept.append(tx.message_id)
            assert await store.get(tx.message_id) == committed(tx)
        else:
            assert await store.get(tx.message_id) is None
    assert await all_due(store) == sorted(kept)
    assert await all_uncommitted(store) == []
    assert await store.backlog() == ({"trade": len(kept)} if kept else {})


async def test_save_and_rollback_in_one_burst(store: MessageStore) -> None:
    tx = record(commit=False)
    saved, rolled_back = await asyncio.gather(store.save([tx]), store.rollback(tx.message_id))
    assert saved == [Saved.STORED]
    assert rolled_back == tx
    assert await store.get(tx.message_id) is None
    assert await store.backlog() == {}


# -- page_uncommitted --------------------------------------------------------------------


async def test_page_uncommitted_pages_by_id_and_skips_committed(store: MessageStore) -> None:
    # due times in reverse id order: the page order must not come from them
    txs = [record(commit=False, ndt=NOW - i) for i in range(25)]
    plain = [record(ndt=NOW - 1) for _ in range(5)]
    await store.save([*plain, *txs])
    everything = sorted(ids(txs))

    seen: list[str] = []
    after = None
    while page := await store.page_uncommitted(4, after):
        assert len(page) <= 4
        assert all(r.message.commit is False for r in page)
        seen += ids(page)
        after = page[-1].message_id
    assert seen == everything

    assert ids(await store.page_uncommitted(3, everything[4])) == everything[5:8]
    # after needs not be a stored id
    between = everything[10] + "0"
    assert ids(await store.page_uncommitted(100, between)) == everything[11:]
    assert await store.page_uncommitted(0) == []
    assert await store.page_uncommitted(10, everything[-1]) == []


async def test_page_uncommitted_returns_whole_records(store: MessageStore) -> None:
    tx = record(commit=False, properties={"k": "v"}, body=b"\x00\xff" * 100, topic="user")
    await store.save([tx, record()])
    assert await store.page_uncommitted(10) == [tx]


async def test_decided_records_leave_page_uncommitted(store: MessageStore) -> None:
    a, b, c = (record(commit=False) for _ in range(3))
    await store.save([a, b, c])
    await store.commit(a.message_id)
    await store.rollback(b.message_id)
    assert await all_uncommitted(store) == [c.message_id]
    await store.delete([c])
    assert await all_uncommitted(store) == []


async def test_reschedule_of_an_uncommitted_record_moves_its_next_check(
    store: MessageStore,
) -> None:
    tx = record(commit=False, ndt=NOW + 6)
    await store.save([tx])
    first = moved(tx, NOW - 100, deliver_count=1)
    await store.reschedule([first])
    await store.reschedule([moved(first.record, NOW + 30, deliver_count=2)])
    [checked] = await store.page_uncommitted(10)
    assert (checked.deliver_count, checked.next_deliver_time) == (2, NOW + 30)
    assert checked.message.commit is False
    assert await store.get(tx.message_id) == checked
    assert await all_due(store, NOW + 3600) == []

    await store.reschedule([moved(checked, NOW - 50, deliver_count=3)])
    assert await all_due(store, NOW + 3600) == []
    decided = await store.commit(tx.message_id)
    assert decided is not None
    assert (decided.deliver_count, decided.next_deliver_time) == (3, NOW - 50)
    assert await all_due(store) == [tx.message_id]


# -- dead letters ------------------------------------------------------------------------


async def test_dead_letter_and_redrive_of_an_uncommitted_record(store: MessageStore) -> None:
    tx = record(commit=False, ndt=NOW - 5)
    await store.save([tx])
    checked = moved(tx, NOW + 30, deliver_count=15)
    await store.reschedule([checked])
    await store.dead_letter([DeadLetter(checked.record, "unresolved", NOW)])
    assert await all_uncommitted(store) == []
    assert await store.backlog() == {}
    # a dead letter is not live: no decision reaches it
    assert await store.commit(tx.message_id) is None
    assert await store.rollback(tx.message_id) is None
    # no group is in it: an uncommitted message has not been delivered to any
    assert await store.dlq_size() == {("trade", ""): 1}

    assert await store.redrive([(tx.message_id, "")], NOW) == []
    [back] = await store.page_uncommitted(10)
    assert back.message_id == tx.message_id
    assert (back.deliver_count, back.next_deliver_time) == (0, NOW)
    assert await all_due(store, NOW + 3600) == []
    assert await store.backlog() == {"trade": 1}
    assert await store.rollback(tx.message_id) is not None
    assert await store.backlog() == {}
    assert await all_uncommitted(store) == []
    assert await store.dlq_size() == {}


# -- durability --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", DURABLE_BACKENDS, indirect=True)
async def test_decisions_and_checks_survive_close_and_reopen(
    store: MessageStore, backend: Backend
) -> None:
    waiting, rolled_back, decided = (record(commit=False, ndt=NOW - 3) for _ in range(3))
    plain = record(ndt=NOW - 1)
    await store.save([waiting, rolled_back, decided, plain])
    await store.rollback(rolled_back.message_id)
    await store.commit(decided.message_id)
    await store.reschedule([moved(waiting, NOW + 30, deliver_count=2)])
    expected = await store.get(waiting.message_id)
    assert expected is not None
    async with reopened(store, backend) as fresh:
        assert await fresh.page_uncommitted(10) == [expected]
        assert await fresh.get(rolled_back.message_id) is None
        assert await all_due(fresh) == sorted([decided.message_id, plain.message_id])
        assert await fresh.backlog() == {"trade": 3}
        assert await fresh.commit(decided.message_id) is None
        assert await fresh.rollback(waiting.message_id) == expected

    async with opened(backend.build()) as again:
        assert await all_uncommitted(again) == []
        assert await again.get(waiting.message_id) is None
        assert await again.backlog() == {"trade": 2}


# -- memory ------------------------------------------------------------------------------


async def test_memory_rollback_frees_capacity() -> None:
    async with opened(MemoryStore(maxcap=1)) as store:
        tx = record(commit=False)
        await store.save([tx])
        [full] = await store.save([record()])
        assert isinstance(full, StoreFullError)
        await store.rollback(tx.message_id)
        assert await store.save([record()]) == [Saved.STORED]


# -- RocksDB -----------------------------------------------------------------------------


async def test_decisions_are_synced_and_checks_are_bookkeeping(
    rocks: RocksDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = record(commit=False), record(commit=False)
    await rocks.save([a, b])
    spy = spy_writes(rocks, monkeypatch)
    await rocks.reschedule([moved(a, NOW + 30, deliver_count=1)])
    await rocks.commit(a.message_id)
    await rocks.rollback(b.message_id)
    await rocks.commit(a.message_id)  # nothing to write
    assert spy.syncs == [False, True, True]


async def test_decisions_ride_in_one_batch_in_call_order(rocks: RocksDBStore) -> None:
    one, two = record(commit=False), record(commit=False)
    before = rocks.write_batches
    results = await asyncio.gather(
        rocks.save([one, two]),
        rocks.commit(one.message_id),
        rocks.rollback(two.message_id),
        rocks.rollback(one.message_id),
        rocks.commit(two.message_id),
    )
    assert rocks.write_batches - before == 1
    saved, commit_one, rollback_two, rollback_one, commit_two = results
    assert saved == [Saved.STORED] * 2
    assert (commit_one, rollback_two) == (committed(one), two)
    assert (rollback_one, commit_two) == (None, None)
    assert await all_due(rocks) == [one.message_id]
    assert await all_uncommitted(rocks) == []
    assert await rocks.backlog() == {"trade": 1}


async def test_a_failed_decision_leaves_the_record_undecided(
    rocks: RocksDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = record(commit=False), record(commit=False)
    await rocks.save([a, b])
    fail_writes(rocks, monkeypatch)
    results = await asyncio.gather(
        rocks.commit(a.message_id), rocks.rollback(b.message_id), return_exceptions=True
    )
    assert all(isinstance(r, StoreUnavailableError) for r in results)
    monkeypatch.undo()
    assert await all_uncommitted(rocks) == sorted([a.message_id, b.message_id])
    assert await all_due(rocks) == []
    assert await rocks.backlog() == {"trade": 2}
    assert await rocks.commit(a.message_id) == committed(a)
    assert await rocks.rollback(b.message_id) == b


async def test_an_older_database_gets_its_uncommitted_records_indexed(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    tx, plain = record(commit=False), record(ndt=NOW - 1)
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.create_missing_column_families(True)
    names = ("msg", "state", "due", "meta", "dlq", "history")
    db = Rdict(path, options, column_families={name: Options(raw_mode=True) for name in names})
    for r in (tx, plain):
        key = r.message_id.encode()
        db.get_column_family("msg")[key] = codec.encode_message(r)
        db.get_column_family("state")[key] = codec.encode_state(codec.state_of(r))
    key = plain.message_id.encode()
    db.get_column_family("due")[_rocksdb_db.due_time(plain.next_deliver_time) + key] = b""
    db.close()
    del db
    assert "uncommitted" not in Rdict.list_cf(path)

    async with opened(RocksDBStore(path)) as store:
        assert await store.page_uncommitted(10) == [tx]
        assert await store.backlog() == {"trade": 2}
        assert await all_due(store) == [plain.message_id]
    assert "uncommitted" in Rdict.list_cf(path)

    # from then on the index is kept by every write
    async with opened(RocksDBStore(path)) as store:
        assert await store.rollback(tx.message_id) == tx
    async with opened(RocksDBStore(path)) as store:
        assert await all_uncommitted(store) == []
        assert await store.backlog() == {"trade": 1}


async def test_the_uncommitted_index_holds_exactly_the_undecided_records(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "db")
    waiting, deleted, dead, decided, rolled_back = (record(commit=False) for _ in range(5))
    redriven = record(commit=False)
    async with opened(RocksDBStore(path)) as store:
        await store.save([waiting, deleted, dead, decided, rolled_back, redriven, record()])
        await store.delete([deleted])
        await store.dead_letter([DeadLetter(dead, "unresolved", NOW)])
        await store.commit(decided.message_id)
        await store.rollback(rolled_back.message_id)
        await store.dead_letter([DeadLetter(redriven, "unresolved", NOW)])
        await store.redrive([(redriven.message_id, "")], NOW)

    families = {name: Options(raw_mode=True) for name in Rdict.list_cf(path) if name != "default"}
    db = Rdict(path, Options(raw_mode=True), column_families=families)
    try:
        keys = list(db.get_column_family("uncommitted").keys())
    finally:
        db.close()
    assert keys == [*sorted(r.message_id.encode() for r in (waiting, redriven)), b"\xff"]
