"""The ``MessageStore`` contract (store/kiteq/store/base.py), run against every backend."""

from __future__ import annotations

import asyncio
import random

import pytest

from kiteq.core.errors import StoreUnavailableError
from kiteq.store.base import MessageStore, Saved
from tests.store.helpers import (
    DURABLE_BACKENDS,
    NOW,
    Backend,
    acked,
    dead,
    due_order,
    ids,
    moved,
    pending,
    record,
    reopened,
)


async def all_due(store: MessageStore, now: float = NOW, limit: int = 1000) -> list[str]:
    return ids(await store.page_due(now, limit))


# -- save / get ---------------------------------------------------------------------


async def test_save_then_get_returns_the_same_record(store: MessageStore) -> None:
    r = record(properties={"trace": "abc", "ключ": "значение ✓"}, body=b"\x00\xff" * 500)
    r.deliver_count = 2
    r.groups = {"g1": acked(), "g2": pending(2, NOW + 5.25), "g3": dead(2, NOW - 1)}
    r.only_groups = ("g2", "g3")
    r.kite_server = "host-1"
    assert await store.save([r]) == [Saved.STORED]
    assert await store.get(r.message_id) == r


async def test_empty_body_and_empty_save(store: MessageStore) -> None:
    r = record(body=b"")
    assert await store.save([]) == []
    assert await store.save([r]) == [Saved.STORED]
    got = await store.get(r.message_id)
    assert got is not None
    assert got.message.body == b""


async def test_get_missing_is_none(store: MessageStore) -> None:
    assert await store.get("0" * 32) is None


async def test_stored_record_is_not_shared_with_the_caller(store: MessageStore) -> None:
    r = record()
    r.groups = {"g": pending()}
    await store.save([r])
    r.deliver_count = 99
    r.groups["g"].attempts = 5
    r.groups["h"] = acked()
    got = await store.get(r.message_id)
    assert got is not None
    assert (got.deliver_count, got.groups) == (0, {"g": pending()})
    got.deliver_count = 42
    got.groups["g"].attempts = 7
    again = await store.get(r.message_id)
    assert again is not None
    assert (again.deliver_count, again.groups) == (0, {"g": pending()})

    # a reschedule keeps what the record said when it was called
    change = moved(again, NOW + 1, groups={"g": pending(1, NOW + 1)})
    done = asyncio.ensure_future(store.reschedule([change]))
    await asyncio.sleep(0)  # the call has started; its record changes while it is written
    change.record.groups["g"].attempts = 9
    await done
    after = await store.get(r.message_id)
    assert after is not None
    assert after.groups == {"g": pending(1, NOW + 1)}


async def test_duplicate_of_a_stored_id_is_not_overwritten(store: MessageStore) -> None:
    first = record(body=b"first")
    await store.save([first])
    second = record(message_id=first.message_id, body=b"second")
    assert await store.save([second, record()]) == [Saved.DUPLICATE, Saved.STORED]
    got = await store.get(first.message_id)
    assert got is not None
    assert got.message.body == b"first"


async def test_duplicate_within_one_call(store: MessageStore) -> None:
    r = record(body=b"first")
    again = record(message_id=r.message_id, body=b"second")
    assert await store.save([r, again]) == [Saved.STORED, Saved.DUPLICATE]
    got = await store.get(r.message_id)
    assert got is not None
    assert got.message.body == b"first"
    assert await store.backlog() == {"trade": 1}


async def test_duplicate_across_concurrent_calls(store: MessageStore) -> None:
    r = record()
    outcomes = await asyncio.gather(*(store.save([r]) for _ in range(10)))
    assert sorted(o[0] == Saved.STORED for o in outcomes) == [False] * 9 + [True]
    assert await store.backlog() == {"trade": 1}


async def test_an_id_can_be_saved_again_after_delete(store: MessageStore) -> None:
    r = record()
    await store.save([r])
    await store.delete([r])
    assert await store.save([r]) == [Saved.STORED]


# -- page_due / reschedule -------------------------------------------------------------


async def test_page_due_orders_by_time_then_id(store: MessageStore) -> None:
    records = [record(ndt=NOW - t) for t in (5, 5, 5, 1, 1, 3, 0.25, 0.001, 0)]
    shuffled = random.sample(records, len(records))
    await asyncio.gather(*(store.save([r]) for r in shuffled))
    assert await all_due(store) == due_order(records)


async def test_page_due_only_returns_times_up_to_now(store: MessageStore) -> None:
    now_due = record(ndt=NOW)
    past = record(ndt=NOW - 60)
    future = record(ndt=NOW + 0.001)
    await store.save([future, now_due, past])
    assert await all_due(store) == [past.message_id, now_due.message_id]
    assert await all_due(store, now=NOW + 1) == due_order([now_due, past, future])


async def test_page_due_pages_with_cursor_and_limit(store: MessageStore) -> None:
    records = [record(ndt=NOW - (i % 7)) for i in range(25)]
    await store.save(records)
    seen: list[str] = []
    after = None
    while True:
        page = await store.page_due(NOW, 4, after)
        assert len(page) <= 4
        if not page:
            break
        seen += ids(page)
        after = (page[-1].next_deliver_time, page[-1].message_id)
    assert seen == due_order(records)


async def test_page_due_cursor_survives_deletion_of_its_record(store: MessageStore) -> None:
    records = [record(ndt=NOW - i) for i in range(6)]
    await store.save(records)
    order = due_order(records)
    first = await store.page_due(NOW, 3)
    await store.delete([first[-1]])
    rest = await store.page_due(NOW, 10, (first[-1].next_deliver_time, first[-1].message_id))
    assert ids(rest) == order[3:]


async def test_negative_and_nan_times_are_due_at_once_as_zero(store: MessageStore) -> None:
    odd = [record(ndt=-5.0), record(ndt=float("nan")), record(ndt=-0.0), record(ndt=0.0)]
    later = record(ndt=1.0)
    await store.save([later, *odd])
    expected = [*sorted(ids(odd)), later.message_id]
    assert await all_due(store) == expected
    paged: list[str] = []
    after = None
    while page := await store.page_due(NOW, 1, after):
        paged += ids(page)
        after = (page[0].next_deliver_time, page[0].message_id)
    assert paged == expected


async def test_page_due_with_non_positive_limit_is_empty(store: MessageStore) -> None:
    await store.save([record()])
    assert await store.page_due(NOW, 0) == []


async def test_reschedule_moves_the_record_and_updates_bookkeeping(
    store: MessageStore,
) -> None:
    a, b, c = record(ndt=NOW - 3), record(ndt=NOW - 2), record(ndt=NOW - 1)
    await store.save([a, b, c])
    groups = {"g1": acked(), "g2": pending(1, NOW - 1.5)}
    await store.reschedule([moved(a, NOW - 1.5, deliver_count=1, groups=groups)])
    assert await all_due(store) == [b.message_id, a.message_id, c.message_id]
    got = await store.get(a.message_id)
    assert got is not None
    assert (got.deliver_count, got.groups, got.only_groups, got.next_deliver_time) == (
        1,
        groups,
        (),
        NOW - 1.5,
    )
    assert got.succ_groups == ("g1",)
    await store.reschedule([moved(got, NOW + 60, deliver_count=2)])
    assert await all_due(store) == [b.message_id, c.message_id]
    assert await all_due(store, now=NOW + 60) == [b.message_id, c.message_id, a.message_id]


async def test_reschedule_with_a_stale_previous_due_leaves_no_ghost(store: MessageStore) -> None:
    r = record(ndt=NOW - 10)
    await store.save([r])
    await store.reschedule([moved(r, NOW - 5)])
    # The caller still holds the original record (previous_due NOW - 10).
    await store.reschedule([moved(r, NOW - 1)])
    assert await all_due(store) == [r.message_id]
    await store.delete([r])
    assert await all_due(store) == []


async def test_reschedule_of_a_missing_record_is_ignored(store: MessageStore) -> None:
    r = record()
    await store.reschedule([moved(r, NOW - 1)])
    assert await store.get(r.message_id) is None
    assert await all_due(store) == []
    assert await store.backlog() == {}


async def test_reschedule_keeps_an_uncommitted_record_out_of_due(store: MessageStore) -> None:
    r = record(commit=False, ndt=NOW - 10)
    await store.save([r])
    await store.reschedule([moved(r, NOW - 5, deliver_count=1)])
    assert await all_due(store) == []
    committed = await store.commit(r.message_id)
    assert committed is not None
    assert committed.next_deliver_time == NOW - 5
    assert await all_due(store) == [r.message_id]


# -- delete ------------------------------------------------------------------------


async def test_delete_removes_record_index_and_backlog(store: MessageStore) -> None:
    keep, gone = record(), record()
    await store.save([keep, gone])
    await store.delete([gone, record()])  # an unknown id is ignored
    assert await store.get(gone.message_id) is None
    assert await all_due(store) == [keep.message_id]
    assert await store.backlog() == {"trade": 1}
    await store.delete([gone])
    assert await store.backlog() == {"trade": 1}


async def test_delete_with_a_stale_record_still_clears_the_index(store: MessageStore) -> None:
    r = record(ndt=NOW - 10)
    await store.save([r])
    await store.reschedule([moved(r, NOW - 3)])
    await store.delete([r])  # r still says NOW - 10
    assert await all_due(store) == []


# -- commit ------------------------------------------------------------------------


async def test_uncommitted_is_stored_but_not_due_until_commit(store: MessageStore) -> None:
    tx = record(commit=False, ndt=NOW - 1)
    plain = record(ndt=NOW - 2)
    assert await store.save([tx, plain]) == [Saved.STORED, Saved.STORED]
    stored = await store.get(tx.message_id)
    assert stored is not None
    assert stored.message.commit is False
    assert await all_due(store) == [plain.message_id]
    assert await store.backlog() == {"trade": 2}

    committed = await store.commit(tx.message_id)
    assert committed is not None
    assert committed.message.commit is True
    assert committed.message.body == tx.message.body
    assert await all_due(store) == [plain.message_id, tx.message_id]
    got = await store.get(tx.message_id)
    assert got == committed


async def test_commit_is_idempotent_and_none_when_absent(store: MessageStore) -> None:
    tx = record(commit=False)
    await store.save([tx])
    first = await store.commit(tx.message_id)
    second = await store.commit(tx.message_id)
    assert first is not None
    # only the call that committed returns the record: a repeated COMMIT never delivers twice
    assert second is None
    assert await store.get(tx.message_id) == first
    assert await all_due(store) == [tx.message_id]
    assert await store.commit("f" * 32) is None


async def test_save_and_commit_in_one_burst(store: MessageStore) -> None:
    tx = record(commit=False)
    saved, committed = await asyncio.gather(store.save([tx]), store.commit(tx.message_id))
    assert saved == [Saved.STORED]
    assert committed is not None
    assert committed.message.commit is True
    assert await all_due(store) == [tx.message_id]


async def test_commit_after_delete_is_none(store: MessageStore) -> None:
    tx = record(commit=False)
    await store.save([tx])
    await store.delete([tx])
    assert await store.commit(tx.message_id) is None
    assert await all_due(store) == []


# -- backlog and meta ------------------------------------------------------------------


async def test_backlog_counts_stored_messages_per_topic(store: MessageStore) -> None:
    assert await store.backlog() == {}
    trade = [record(topic="trade") for _ in range(3)]
    user = [record(topic="user", commit=False) for _ in range(2)]
    await store.save([*trade, *user, trade[0]])
    assert await store.backlog() == {"trade": 3, "user": 2}
    await store.delete(user)
    assert await store.backlog() == {"trade": 3}


async def test_meta_put_get_by_prefix_and_delete(store: MessageStore) -> None:
    await store.put_meta("bind/trade/g1", b"one")
    await store.put_meta("bind/trade/g2", b"two")
    await store.put_meta("bind/user/g1", b"three")
    await store.put_meta("binder", b"other")
    assert await store.get_meta("bind/trade/") == {
        "bind/trade/g1": b"one",
        "bind/trade/g2": b"two",
    }
    await store.put_meta("bind/trade/g1", b"uno")
    await store.put_meta("bind/trade/g2", None)
    await store.put_meta("never/set", None)
    assert await store.get_meta("bind/") == {"bind/trade/g1": b"uno", "bind/user/g1": b"three"}
    assert len(await store.get_meta("")) == 3
    assert await store.get_meta("nothing") == {}


# -- lifecycle -------------------------------------------------------------------------


async def test_close_is_idempotent_and_later_calls_fail(store: MessageStore) -> None:
    r = record()
    await store.save([r])
    await asyncio.gather(store.close(), store.close())
    await store.close()
    [outcome] = await store.save([record()])
    assert isinstance(outcome, StoreUnavailableError)
    with pytest.raises(StoreUnavailableError):
        await store.get(r.message_id)
    with pytest.raises(StoreUnavailableError):
        await store.delete([r])
    with pytest.raises(StoreUnavailableError):
        await store.page_due(NOW, 10)


async def test_writes_in_flight_at_close_complete(backend: Backend) -> None:
    store = backend.build()
    await store.open()
    records = [record() for _ in range(50)]
    saves = [asyncio.ensure_future(store.save([r])) for r in records]
    await asyncio.sleep(0)
    await store.close()
    outcomes = await asyncio.gather(*saves)
    assert outcomes == [[Saved.STORED]] * 50


async def test_description_has_no_credentials(store: MessageStore, backend: Backend) -> None:
    assert store.description.split("://")[0] == backend.name
    assert "@" not in store.description


@pytest.mark.parametrize("backend", DURABLE_BACKENDS, indirect=True)
async def test_persistence_across_close_and_reopen(store: MessageStore, backend: Backend) -> None:
    assert store.durable
    plain = record(ndt=NOW - 3, properties={"k": "v"})
    tx = record(ndt=NOW - 2, commit=False, topic="user")
    later = record(ndt=NOW - 1)
    gone = record(ndt=NOW - 4)
    await store.save([plain, tx, later, gone])
    await store.commit(tx.message_id)
    await store.reschedule(
        [moved(later, NOW + 10, deliver_count=3, groups={"g": acked(), "h": pending(3, NOW + 10)})]
    )
    await store.delete([gone])
    await store.put_meta("k", b"v")
    expected = {r.message_id: await store.get(r.message_id) for r in (plain, tx, later)}
    async with reopened(store, backend) as fresh:
        for message_id, before in expected.items():
            assert await fresh.get(message_id) == before
        assert await fresh.get(gone.message_id) is None
        assert await all_due(fresh) == [plain.message_id, tx.message_id]
        assert await fresh.backlog() == {"trade": 2, "user": 1}
        assert await fresh.get_meta("k") == {"k": b"v"}
