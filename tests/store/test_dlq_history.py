"""The dead-letter queue and message history of the ``MessageStore`` contract.

The tests on the ``store`` fixture run against every backend; those at the end pin what
only one backend promises (RocksDB's batching and on-disk layout, the memory store's
bounds) and the codec of the new RocksDB values.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, strategies as st
from rocksdict import Options, Rdict

from kiteq.core.errors import StoreFullError, StoreUnavailableError
from kiteq.core.limits import MAX_EXPIRY_SECONDS
from kiteq.core.message import StoredMessage
from kiteq.store import _rocksdb_db, _rocksdb_reads, _rocksdb_requests, codec
from kiteq.store.base import DeadLetter, DlqFilter, DlqKey, HistoryEvent, MessageStore, Saved
from kiteq.store.memory import MemoryStore
from kiteq.store.rocksdb import RocksDBStore
from tests.store.helpers import (
    DURABLE_BACKENDS,
    NOW,
    Backend,
    ThreadSpy,
    acked,
    dead,
    fail_writes,
    ids,
    letter,
    mangled,
    only_store_threads,
    opened,
    pending,
    record,
    reopened,
    spy_writes,
)

EVERYTHING = DlqFilter()


def event(message_id: str, time: float, kind: str, **fields: Any) -> HistoryEvent:
    return HistoryEvent(message_id, time, kind, **fields)


async def dead_ids(store: MessageStore, where: DlqFilter = EVERYTHING) -> list[str]:
    return ids([d.record for d in await store.list_dlq(where, 1000)])


async def dead_keys(
    store: MessageStore, where: DlqFilter = EVERYTHING, after: DlqKey | None = None
) -> list[DlqKey]:
    return [d.key for d in await store.list_dlq(where, 1000, after)]


def g1(r: StoredMessage) -> DlqKey:
    return (r.message_id, "g1")


async def all_due(store: MessageStore, now: float = NOW) -> list[str]:
    return ids(await store.page_due(now, 1000))


# -- dead_letter -----------------------------------------------------------------------


async def test_dead_letter_moves_a_record_out_of_delivery(store: MessageStore) -> None:
    doomed, live = record(ndt=NOW - 2), record(ndt=NOW - 1)
    await store.save([doomed, live])
    doomed.groups = {"g1": dead(3), "g2": dead(1)}
    await store.dead_letter(
        [letter(doomed, "expired", NOW + 1, "g2"), letter(doomed, "expired", NOW + 1, "g1")]
    )

    assert await store.get(doomed.message_id) is None
    assert await all_due(store) == [live.message_id]
    assert await store.backlog() == {"trade": 1}
    assert await store.dlq_size() == {("trade", "g1"): 1, ("trade", "g2"): 1}
    expected = [
        DeadLetter(doomed, "expired", NOW + 1, "g1"),
        DeadLetter(doomed, "expired", NOW + 1, "g2"),
    ]
    assert await store.list_dlq(EVERYTHING, 10) == expected
    assert await store.get_dead_letters(doomed.message_id) == expected
    assert await store.get_dead_letters(live.message_id) == []
    # a dead letter is not live: nothing that works on live records reaches it
    assert await store.commit(doomed.message_id) is None
    await store.delete([doomed])
    assert await store.dlq_size() == {("trade", "g1"): 1, ("trade", "g2"): 1}


async def test_dead_letter_keeps_the_callers_bookkeeping_and_the_stored_message(
    store: MessageStore,
) -> None:
    r = record(properties={"k": "v"}, body=b"stored body")
    await store.save([r])
    latest = dataclasses.replace(
        r,
        message=dataclasses.replace(r.message, body=b"not what was stored"),
        deliver_count=7,
        groups={"g1": acked(), "g2": dead(7, NOW + 80), "g3": dead(2, NOW + 5)},
        next_deliver_time=NOW + 80,
    )
    await store.dead_letter([letter(latest, group="g2"), letter(latest, group="g3")])
    got = await store.list_dlq(EVERYTHING, 10)
    assert [d.record for d in got] == [dataclasses.replace(latest, message=r.message)] * 2


async def test_dead_letter_of_missing_or_already_dead_ids_is_ignored(
    store: MessageStore,
) -> None:
    r = record()
    await store.dead_letter([letter(record())])
    assert await store.list_dlq(EVERYTHING, 10) == []
    assert await store.dlq_size() == {}
    await store.save([r])
    # the same key twice in one call: the later letter replaces the earlier one
    await store.dead_letter([letter(r, "expired", NOW), letter(r, "deliver_limit", NOW + 5)])
    await store.dead_letter([letter(r, "no_binding", NOW + 9, "")])
    assert await store.list_dlq(EVERYTHING, 10) == [letter(r, "deliver_limit", NOW + 5)]
    assert await store.dlq_size() == {("trade", "g1"): 1}
    assert await store.backlog() == {}
    await store.dead_letter([])


async def test_dead_letter_of_an_uncommitted_record_never_makes_it_deliverable(
    store: MessageStore,
) -> None:
    tx = record(commit=False, ndt=NOW - 5)
    await store.save([tx])
    await store.dead_letter([letter(tx, "expired")])
    assert await store.get(tx.message_id) is None
    assert await store.backlog() == {}
    assert await store.dlq_size() == {("trade", "g1"): 1}
    [letter_] = await store.get_dead_letters(tx.message_id)
    assert letter_.record.message.commit is False
    assert await store.commit(tx.message_id) is None

    # Back in delivery it is still uncommitted: stored, counted, not due, not returned.
    assert await store.redrive([g1(tx)], NOW) == []
    got = await store.get(tx.message_id)
    assert got is not None
    assert got.message.commit is False
    assert await all_due(store) == []
    assert await store.backlog() == {"trade": 1}
    assert await store.dlq_size() == {}
    assert await store.commit(tx.message_id) is not None
    assert await all_due(store) == [tx.message_id]


# -- list_dlq ------------------------------------------------------------------------


async def test_list_dlq_filters_by_topic_type_group_and_reason(store: MessageStore) -> None:
    a = record(topic="trade", message_type="pay-succ")
    b = record(topic="trade", message_type="pay-fail")
    c = record(topic="user", message_type="pay-succ")
    d = record(topic="user", message_type="signup")
    await store.save([a, b, c, d])
    await store.dead_letter(
        [
            letter(a, "expired", group="g1"),
            letter(b, "deliver_limit", group="g1"),
            letter(b, "deliver_limit", group="g2"),
            letter(c, "deliver_limit", group="g2"),
            letter(d, "no_binding", group=""),
        ]
    )

    def keys(*pairs: tuple[StoredMessage, str]) -> list[DlqKey]:
        return sorted((r.message_id, group) for r, group in pairs)

    everything = keys((a, "g1"), (b, "g1"), (b, "g2"), (c, "g2"), (d, ""))
    assert await dead_keys(store) == everything
    assert await dead_keys(store, DlqFilter(topic="trade")) == keys((a, "g1"), (b, "g1"), (b, "g2"))
    assert await dead_keys(store, DlqFilter(message_type="pay-succ")) == keys((a, "g1"), (c, "g2"))
    assert await dead_keys(store, DlqFilter(group="g2")) == keys((b, "g2"), (c, "g2"))
    assert await dead_keys(store, DlqFilter(reason="deliver_limit")) == keys(
        (b, "g1"), (b, "g2"), (c, "g2")
    )
    assert await dead_keys(store, DlqFilter(topic="user", reason="deliver_limit")) == keys(
        (c, "g2")
    )
    assert await dead_keys(store, DlqFilter(topic="user", group="g1")) == []
    assert await dead_keys(store, DlqFilter(topic="nothing")) == []
    assert await store.dlq_size() == {
        ("trade", "g1"): 2,
        ("trade", "g2"): 1,
        ("user", "g2"): 1,
        ("user", ""): 1,
    }


async def test_list_dlq_pages_by_message_and_group_with_after(store: MessageStore) -> None:
    records = [record(topic="even" if i % 2 else "odd") for i in range(25)]
    await store.save(records)
    # every third message is dead for two groups (and "" sorts first)
    groups = {r.message_id: ("g1", "") if i % 3 == 0 else ("g1",) for i, r in enumerate(records)}
    await store.dead_letter([letter(r, group=g) for r in records for g in groups[r.message_id]])
    everything = sorted((mid, g) for mid, gs in groups.items() for g in gs)
    assert len(everything) == 34

    seen: list[DlqKey] = []
    after = None
    while page := await store.list_dlq(EVERYTHING, 4, after):
        assert len(page) <= 4
        seen += [d.key for d in page]
        after = page[-1].key
    assert seen == everything

    evens = sorted(k for k in everything if k[0] in {r.message_id for r in records[1::2]})
    page = await store.list_dlq(DlqFilter(topic="even"), 3, evens[4])
    assert [d.key for d in page] == evens[5:8]
    # after needs not be a stored key: a group after every group of its message...
    assert await dead_keys(store, after=(everything[10][0], "~")) == [
        k for k in everything if k[0] > everything[10][0]
    ]
    # ...or before them all, which is the message's first key when it has group ""
    first = next(k for k in everything if k[1] == "")
    assert await dead_keys(store, after=(first[0], "")) == everything[everything.index(first) + 1 :]
    assert await store.list_dlq(EVERYTHING, 0) == []
    assert await store.list_dlq(EVERYTHING, 10, everything[-1]) == []


# -- redrive -------------------------------------------------------------------------


async def test_redrive_restarts_delivery_by_the_contracts_rules(store: MessageStore) -> None:
    later = NOW + 50
    fresh = record(ndt=NOW - 100)
    expired = record(ndt=NOW - 90, expired_time=int(NOW) - 10, topic="user")
    endless = record(ndt=NOW - 80, expired_time=0)
    await store.save([fresh, expired, endless])
    worn = [
        dataclasses.replace(r, deliver_count=5, groups={"g1": acked(), "g2": dead(5, NOW - 1)})
        for r in (fresh, expired, endless)
    ]
    await store.dead_letter([letter(r, "deliver_limit", group="g2") for r in worn])

    redriven = await store.redrive(
        [
            (fresh.message_id, "g2"),
            ("f" * 32, "g2"),
            (fresh.message_id, "g1"),  # g1 acked it: not a dead letter
            (expired.message_id, "g2"),
            (endless.message_id, "g2"),
            (fresh.message_id, "g2"),
        ],
        later,
    )
    # No longer stored: stored again for g2 alone, so g1 does not get it twice.
    expected = {
        r.message_id: dataclasses.replace(
            r,
            deliver_count=0,
            groups={"g1": acked(), "g2": pending(0, later)},
            only_groups=("g2",),
            next_deliver_time=later,
        )
        for r in (fresh, expired, endless)
    }
    expected[expired.message_id].message = dataclasses.replace(
        expired.message, expired_time=int(later) + MAX_EXPIRY_SECONDS
    )
    assert sorted(redriven, key=lambda r: r.message_id) == [
        expected[mid] for mid in sorted(expected)
    ]
    for mid, want in expected.items():
        assert await store.get(mid) == want
    assert await all_due(store, later) == sorted(expected)
    assert await all_due(store) == []
    assert await store.list_dlq(EVERYTHING, 10) == []
    assert await store.dlq_size() == {}
    assert await store.backlog() == {"trade": 2, "user": 1}
    assert await store.redrive([(mid, "g2") for mid in expected], later) == []
    assert await store.redrive([], later) == []


async def test_a_redriven_record_can_die_again(store: MessageStore) -> None:
    r = record()
    await store.save([r])
    await store.dead_letter([letter(r, "expired")])
    [back] = await store.redrive([g1(r)], NOW)
    await store.dead_letter([letter(back, "deliver_limit", NOW + 1)])
    assert await store.list_dlq(EVERYTHING, 10) == [letter(back, "deliver_limit", NOW + 1)]
    assert await store.dlq_size() == {("trade", "g1"): 1}
    assert await store.backlog() == {}
    assert await all_due(store) == []


# -- history ---------------------------------------------------------------------------


async def test_history_is_returned_oldest_first_in_append_order_for_ties(
    store: MessageStore,
) -> None:
    mid, other = record().message_id, record().message_id
    published = event(mid, NOW, "published", detail="from p-1")
    pushed = event(mid, NOW + 1, "delivered", group="g1", connection="c-7", attempt=1)
    acked = event(mid, NOW + 1, "acked", group="g1", connection="c-7", attempt=1)
    nacked = event(mid, NOW + 1, "nacked", group="g2", connection="c-8", attempt=1)
    moved = event(mid, NOW + 2, "dead_lettered", detail="deliver_limit")
    await store.append_history([moved, pushed, event(other, NOW, "published")])
    await store.append_history([acked, published])
    await store.append_history([nacked])
    assert await store.get_history(mid) == [published, pushed, acked, nacked, moved]
    assert await store.get_history(other) == [event(other, NOW, "published")]
    assert await store.get_history("0" * 32) == []
    await store.append_history([])


async def test_history_of_an_id_is_not_mixed_with_ids_it_prefixes(store: MessageStore) -> None:
    short, long = "ab" * 8, "ab" * 8 + "01" * 8
    # RocksDB keys: the longer id's sort between the shorter one's for 0.0 and for 2.5
    # (b"0" falls between the first bytes of those times in big-endian IEEE-754)
    events = [event(short, t, "published") for t in (NOW, 0.0, 2.5)]
    await store.append_history([event(long, NOW - 1, "published"), *events])
    assert await store.get_history(short) == sorted(events, key=lambda e: e.time)
    assert await store.get_history(long) == [event(long, NOW - 1, "published")]


async def test_prune_history_forgets_events_before_a_time(store: MessageStore) -> None:
    a, b = record().message_id, record().message_id
    await store.append_history(
        [
            event(a, NOW - 100, "published"),
            event(a, NOW - 10, "delivered", attempt=1),
            event(a, NOW, "acked", attempt=1),
            event(b, NOW - 50, "published"),
        ]
    )
    assert await store.prune_history(NOW - 10) == 2
    assert await store.get_history(a) == [
        event(a, NOW - 10, "delivered", attempt=1),
        event(a, NOW, "acked", attempt=1),
    ]
    assert await store.get_history(b) == []
    assert await store.prune_history(NOW - 10) == 0
    assert await store.prune_history(NOW + 1) == 2
    assert await store.get_history(a) == []
    await store.append_history([event(a, NOW + 5, "redriven")])
    assert await store.get_history(a) == [event(a, NOW + 5, "redriven")]


async def test_many_events_of_one_message(store: MessageStore) -> None:
    mid = record().message_id
    events = [event(mid, NOW + i // 10, "delivered", attempt=i) for i in range(300)]
    for i in range(0, 300, 7):
        await store.append_history(events[i : i + 7])
    assert await store.get_history(mid) == events
    assert await store.prune_history(NOW + 15) == 150
    assert await store.get_history(mid) == events[150:]


# -- all of it at once ----------------------------------------------------------------


async def test_dead_letter_moves_among_concurrent_writes_stay_consistent(
    store: MessageStore,
) -> None:
    doomed = [record(ndt=NOW - 1) for _ in range(20)]
    deleted = [record(ndt=NOW - 1) for _ in range(20)]
    kept = [record(ndt=NOW - 1, topic="user") for _ in range(20)]
    await store.save([*doomed, *deleted, *kept])
    new = [record(ndt=NOW - 1) for _ in range(20)]
    history = [event(r.message_id, NOW, "dead_lettered") for r in doomed]
    calls = []
    for i in range(20):
        calls += [
            store.dead_letter([letter(doomed[i])]),
            store.save([new[i]]),
            store.delete([deleted[i]]),
            store.append_history(history[i : i + 1]),
        ]
    await asyncio.gather(*calls)

    assert await dead_ids(store) == sorted(ids(doomed))
    assert await store.dlq_size() == {("trade", "g1"): 20}
    assert await store.backlog() == {"trade": 20, "user": 20}
    assert sorted(await all_due(store)) == sorted(ids(new + kept))
    for r in doomed:
        assert await store.get(r.message_id) is None
        assert await store.get_history(r.message_id) == [event(r.message_id, NOW, "dead_lettered")]

    # and back, while the same ids are also dead-lettered again and deleted
    back = doomed[:10]
    redriven, *_ = await asyncio.gather(
        store.redrive([g1(r) for r in back], NOW),
        store.dead_letter([letter(r, "expired") for r in new[:5]]),
        store.delete(kept[:5]),
    )
    assert sorted(ids(redriven)) == sorted(ids(back))
    assert await dead_ids(store) == sorted(ids(doomed[10:] + new[:5]))
    assert await store.dlq_size() == {("trade", "g1"): 15}
    assert await store.backlog() == {"trade": 25, "user": 15}
    assert sorted(await all_due(store)) == sorted(ids(back + new[5:] + kept[5:]))


async def test_save_then_dead_letter_then_redrive_in_one_burst(store: MessageStore) -> None:
    r = record(ndt=NOW - 3)
    saved, _, redriven = await asyncio.gather(
        store.save([r]), store.dead_letter([letter(r)]), store.redrive([g1(r)], NOW)
    )
    assert saved == [Saved.STORED]
    assert ids(redriven) == [r.message_id]
    assert await all_due(store) == [r.message_id]
    assert await store.list_dlq(EVERYTHING, 10) == []
    assert await store.backlog() == {"trade": 1}


# -- lifecycle -------------------------------------------------------------------------


async def test_dlq_and_history_calls_fail_once_closed(store: MessageStore) -> None:
    r = record()
    await store.save([r])
    await store.close()
    calls: list[Callable[[], Any]] = [
        lambda: store.dead_letter([letter(r)]),
        lambda: store.list_dlq(EVERYTHING, 10),
        lambda: store.get_dead_letters(r.message_id),
        lambda: store.redrive([g1(r)], NOW),
        lambda: store.dlq_size(),
        lambda: store.append_history([event(r.message_id, NOW, "published")]),
        lambda: store.get_history(r.message_id),
        lambda: store.prune_history(NOW),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailableError):
            await call()


@pytest.mark.parametrize("backend", DURABLE_BACKENDS, indirect=True)
async def test_dlq_and_history_persist_across_close_and_reopen(
    store: MessageStore, backend: Backend
) -> None:
    gone, back, live = record(), record(topic="user"), record(ndt=NOW - 1)
    await store.save([gone, back, live])
    gone.groups = {"g1": dead(2, NOW - 3), "g2": dead(1, NOW - 4)}
    await store.dead_letter(
        [letter(gone, "expired", NOW, "g1"), letter(gone, "expired", NOW, "g2"), letter(back)]
    )
    await store.redrive([g1(back)], NOW - 2)
    first = [event(gone.message_id, NOW, "published"), event(gone.message_id, NOW, "delivered")]
    await store.append_history(first)
    expected_dead = await store.list_dlq(EVERYTHING, 10)
    assert len(expected_dead) == 2
    async with reopened(store, backend) as fresh:
        assert await fresh.list_dlq(EVERYTHING, 10) == expected_dead
        assert await fresh.dlq_size() == {("trade", "g1"): 1, ("trade", "g2"): 1}
        assert await fresh.backlog() == {"trade": 1, "user": 1}
        assert await fresh.get(gone.message_id) is None
        assert await all_due(fresh) == [back.message_id, live.message_id]
        # an event of the same time appended after the restart still sorts after them
        later = event(gone.message_id, NOW, "dead_lettered")
        await fresh.append_history([later])
        assert await fresh.get_history(gone.message_id) == [*first, later]
        [redriven] = await fresh.redrive([(gone.message_id, "g2")], NOW)
        assert redriven.message == gone.message
        assert (redriven.groups, redriven.only_groups) == (
            {"g1": dead(2, NOW - 3), "g2": pending(0, NOW)},
            ("g2",),
        )
        assert await fresh.dlq_size() == {("trade", "g1"): 1}


# -- an id saved again after it died (save does not look into the DLQ) -------------------


async def test_redrive_of_an_id_saved_again_applies_to_the_stored_copy(
    store: MessageStore,
) -> None:
    r = record(body=b"first")
    await store.save([r])
    await store.dead_letter([letter(r)])
    again = record(message_id=r.message_id, body=b"again", ndt=NOW - 1)
    # save does not look into the DLQ (it would cost a read per saved message)
    assert await store.save([again]) == [Saved.STORED]
    # a message still stored: only the group's state changes, on the stored copy
    expected = dataclasses.replace(again, groups={"g1": pending(0, NOW)})
    assert await store.redrive([g1(r)], NOW) == [expected]
    assert await store.get(r.message_id) == expected
    assert await store.list_dlq(EVERYTHING, 10) == []
    assert await store.dlq_size() == {}
    assert await store.backlog() == {"trade": 1}


async def test_dead_letter_of_an_id_saved_again_replaces_the_dead_letter(
    store: MessageStore,
) -> None:
    r = record(body=b"first")
    await store.save([r])
    await store.dead_letter([letter(r, "expired")])
    again = record(message_id=r.message_id, body=b"again", topic="user")
    await store.save([again])
    await store.dead_letter([letter(again, "deliver_limit", NOW + 1)])
    assert await store.list_dlq(EVERYTHING, 10) == [letter(again, "deliver_limit", NOW + 1)]
    assert await store.dlq_size() == {("user", "g1"): 1}
    assert await store.backlog() == {}


# -- RocksDB ---------------------------------------------------------------------------


async def test_moves_are_synced_and_history_is_bookkeeping(
    rocks: RocksDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = record()
    await rocks.save([r])
    spy = spy_writes(rocks, monkeypatch)
    await rocks.append_history([event(r.message_id, NOW, "delivered")])
    await rocks.delete([record()])  # nothing to write
    await rocks.dead_letter([letter(r)])
    await rocks.append_history([event(r.message_id, NOW, "dead_lettered")])
    await rocks.redrive([g1(r)], NOW)
    assert spy.syncs == [False, True, False, True]


async def test_history_and_dead_letters_ride_in_the_batch_of_other_writes(
    rocks: RocksDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    doomed, gone = record(), record()
    await rocks.save([doomed, gone])
    spy = spy_writes(rocks, monkeypatch)
    before = rocks.write_batches
    fresh = record(commit=False)
    await asyncio.gather(
        rocks.append_history([event(doomed.message_id, NOW, "delivered")]),
        rocks.save([fresh]),
        rocks.dead_letter([letter(doomed)]),
        rocks.delete([gone]),
        rocks.commit(fresh.message_id),
        rocks.dead_letter([letter(fresh)]),
        rocks.redrive([g1(fresh)], NOW - 1),
        rocks.append_history([event(fresh.message_id, NOW, "redriven")]),
    )
    assert rocks.write_batches - before == 1
    assert spy.syncs == [True]
    assert await all_due(rocks) == [fresh.message_id]
    assert await dead_ids(rocks) == [doomed.message_id]
    assert await rocks.backlog() == {"trade": 1}
    assert await rocks.dlq_size() == {("trade", "g1"): 1}
    assert len(await rocks.get_history(doomed.message_id)) == 1


async def test_a_failed_move_leaves_the_record_where_it_was(
    rocks: RocksDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    live, gone = record(), record()
    await rocks.save([live, gone])
    await rocks.dead_letter([letter(gone)])
    fail_writes(rocks, monkeypatch)
    results = await asyncio.gather(
        rocks.dead_letter([letter(live)]),
        rocks.redrive([g1(gone)], NOW),
        rocks.append_history([event(live.message_id, NOW, "dead_lettered")]),
        return_exceptions=True,
    )
    assert all(isinstance(r, StoreUnavailableError) for r in results)
    monkeypatch.undo()
    assert await all_due(rocks) == [live.message_id]
    assert await dead_ids(rocks) == [gone.message_id]
    assert await rocks.backlog() == {"trade": 1}
    assert await rocks.dlq_size() == {("trade", "g1"): 1}
    assert await rocks.get_history(live.message_id) == []
    # and the next attempt works
    await rocks.dead_letter([letter(live)])
    assert await rocks.dlq_size() == {("trade", "g1"): 2}


async def test_scans_go_in_chunks_and_let_writes_through(
    rocks: RocksDBStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_rocksdb_reads, "SCAN_CHUNK", 3)
    records = [record(topic="a" if i % 4 else "b") for i in range(20)]
    await rocks.save(records)
    await rocks.dead_letter([letter(r) for r in records])
    b_ids = sorted(r.message_id for r in records if r.topic == "b")
    assert await dead_ids(rocks, DlqFilter(topic="b")) == b_ids
    page = await rocks.list_dlq(DlqFilter(topic="b"), 2, (b_ids[0], "g1"))
    assert ids([d.record for d in page]) == b_ids[1:3]

    events = [event(r.message_id, NOW - i % 2, "published") for i, r in enumerate(records)]
    await rocks.append_history(events)
    extra = record()
    pruned, saved = await asyncio.gather(rocks.prune_history(NOW), rocks.save([extra]))
    assert (pruned, saved) == (10, [Saved.STORED])
    for e in events:
        assert await rocks.get_history(e.message_id) == ([] if e.time < NOW else [e])


async def test_new_column_families_are_added_to_an_older_database(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    old = record(ndt=NOW - 1)
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.create_missing_column_families(True)
    families = {name: Options(raw_mode=True) for name in ("msg", "state", "due", "meta")}
    db = Rdict(path, options, column_families=families)
    key = old.message_id.encode()
    db.get_column_family("msg")[key] = codec.encode_message(old)
    db.get_column_family("state")[key] = codec.encode_state(codec.state_of(old))
    db.get_column_family("due")[_rocksdb_db.due_time(old.next_deliver_time) + key] = b""
    db.close()
    del db
    assert set(Rdict.list_cf(path)) == {"default", "msg", "state", "due", "meta"}

    async with opened(RocksDBStore(path)) as store:
        assert await store.get(old.message_id) == old
        assert await store.dlq_size() == {}
        assert await store.get_history(old.message_id) == []
        await store.dead_letter([letter(old)])
        await store.append_history([event(old.message_id, NOW, "dead_lettered")])
        assert await dead_ids(store) == [old.message_id]
    assert {"dlq", "history"} <= set(Rdict.list_cf(path))


async def test_dlq_and_history_use_only_the_store_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = ThreadSpy(monkeypatch)
    spy.on(_rocksdb_db.Column, "get", "get_many", "keys", "items", "values", "release")
    spy.on(_rocksdb_requests._Batch, "__init__")

    store = RocksDBStore(str(tmp_path / "db"))
    await store.open()
    r = record()
    await store.save([r])
    await store.append_history([event(r.message_id, NOW - 5, "published")])
    await store.dead_letter([letter(r)])
    await store.list_dlq(EVERYTHING, 10)
    await store.get_dead_letters(r.message_id)
    await store.dlq_size()
    await store.redrive([g1(r)], NOW)
    await store.get_history(r.message_id)
    await store.prune_history(NOW)
    await store.close()
    only_store_threads(spy.threads)


# -- memory ----------------------------------------------------------------------------


async def test_memory_history_forgets_the_oldest_messages_first() -> None:
    store = MemoryStore(maxcap=10, history_messages=3)
    await store.open()
    mids = [record().message_id for _ in range(5)]
    for mid in mids[:3]:
        await store.append_history([event(mid, NOW, "published")])
    await store.append_history([event(mids[0], NOW + 1, "delivered")])  # not a new message
    await store.append_history([event(mids[3], NOW, "published")])
    assert await store.get_history(mids[0]) == []
    assert len(await store.get_history(mids[1])) == 1
    await store.append_history([event(mids[4], NOW, "published")])
    assert await store.get_history(mids[1]) == []
    assert [len(await store.get_history(m)) for m in mids[2:]] == [1, 1, 1]
    await store.close()


async def test_memory_dead_letters_count_towards_maxcap() -> None:
    store = MemoryStore(maxcap=2)
    await store.open()
    a, b = record(), record()
    await store.save([a, b])
    await store.dead_letter([letter(a)])
    [outcome] = await store.save([record()])
    assert isinstance(outcome, StoreFullError)
    await store.redrive([g1(a)], NOW)  # moving back needs no room
    assert await store.backlog() == {"trade": 2}
    await store.close()


def test_memory_history_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="history_messages"):
        MemoryStore(maxcap=1, history_messages=0)


# -- codec -----------------------------------------------------------------------------

_text = st.text(max_size=30)
_events = st.builds(
    HistoryEvent,
    message_id=_text,
    time=st.floats(allow_nan=False),
    kind=_text,
    group=_text,
    connection=_text,
    attempt=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    detail=st.text(max_size=200),
)


@given(_events)
def test_event_round_trip(e: HistoryEvent) -> None:
    assert codec.decode_event(e.message_id, codec.encode_event(e)) == e


@given(
    reason=_text,
    dead_time=st.floats(allow_nan=False),
    group=_text,
    others=st.lists(_text, max_size=5),
    topic=_text,
)
def test_dead_entry_round_trip(
    reason: str, dead_time: float, group: str, others: list[str], topic: str
) -> None:
    r = record(topic=topic, properties={"k": "v"})
    r.groups = {g: pending(1, NOW) for g in others}
    r.groups[group] = dead(3, NOW + 1)
    value = codec.encode_dead_entry(
        codec.encode_message(r), codec.state_of(r), reason, dead_time, group
    )
    assert codec.decode_dead_letter(value) == DeadLetter(r, reason, dead_time, group)
    assert codec.dead_entry_topic_group(value) == (topic, group)


@pytest.mark.parametrize("mangle", ["version", "truncate", "extend", "empty"])
def test_corrupt_dead_entries_and_events_raise_value_error(mangle: str) -> None:
    r = record()
    entry = codec.encode_dead_entry(
        codec.encode_message(r), codec.state_of(r), "expired", NOW, "g1"
    )
    e = codec.encode_event(event(r.message_id, NOW, "published", detail="x"))
    entry, e = mangled(entry, e, mangle)
    with pytest.raises(ValueError, match="record"):
        codec.decode_dead_letter(entry)
    with pytest.raises(ValueError, match="record"):
        codec.decode_event(r.message_id, e)
