"""Delivery state per (message, group) in every backend (issue #10).

The stored ``groups`` map, dead letters per (message_id, group) with ``keep``, per-group
redrive (``only_groups``) and ``dlq_size`` per (topic, group). Run against every backend
through the ``store`` fixture; a few checks at the end pin how one backend keeps a move
atomic.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from kiteq.core.limits import MAX_EXPIRY_SECONDS
from kiteq.core.message import StoredMessage
from kiteq.store.base import DlqFilter, MessageStore, Rescheduled
from kiteq.store.rocksdb import RocksDBStore
from tests.store.helpers import (
    DURABLE_BACKENDS,
    NOW,
    Backend,
    acked,
    dead,
    ids,
    letter,
    pending,
    record,
    reopened,
    spy_writes,
)

EVERYTHING = DlqFilter()


def bookkept(r: StoredMessage, ndt: float, **changes: object) -> StoredMessage:
    """*r* with new delivery bookkeeping (as the broker hands it to the store)."""
    return dataclasses.replace(r, next_deliver_time=ndt, **changes)  # type: ignore[arg-type]


async def due(store: MessageStore, now: float) -> list[str]:
    return ids(await store.page_due(now, 1000))


# -- the groups map ---------------------------------------------------------------------


async def test_per_group_state_round_trips_through_save_reschedule_and_page_due(
    store: MessageStore,
) -> None:
    r = record(ndt=NOW - 1)
    r.groups = {"healthy": acked(1, NOW - 2), "poison": pending(2, NOW + 40.5)}
    await store.save([r])
    assert await store.get(r.message_id) == r

    # the offline group comes back: one more group, the message due when it is
    new = bookkept(
        r,
        NOW - 0.25,
        deliver_count=2,
        groups={**r.groups, "offline": pending(0, NOW - 0.25)},
    )
    await store.reschedule([Rescheduled(new, r.next_deliver_time)])
    assert await store.get(r.message_id) == new
    [page] = await store.page_due(NOW, 10)
    assert page == new
    assert page.settled("healthy")
    assert not page.settled("offline")

    # and the poison group dead: its state is kept, the message still due for "offline"
    last = bookkept(new, NOW + 5, groups={**new.groups, "poison": dead(3, NOW + 40.5)})
    await store.reschedule([Rescheduled(last, new.next_deliver_time)])
    assert await store.get(r.message_id) == last
    assert await due(store, NOW) == []
    assert await due(store, NOW + 5) == [r.message_id]


async def test_a_record_with_many_groups_and_only_groups(store: MessageStore) -> None:
    r = record()
    r.groups = {f"group-{i:03}": pending(i, NOW + i) for i in range(200)}
    r.groups["ключ ✓"] = acked()
    r.only_groups = ("group-007", "ключ ✓")
    await store.save([r])
    assert await store.get(r.message_id) == r


@pytest.mark.parametrize("backend", DURABLE_BACKENDS, indirect=True)
async def test_per_group_state_survives_close_and_reopen(
    store: MessageStore, backend: Backend
) -> None:
    r, kept = record(ndt=NOW - 1), record(ndt=NOW + 10)
    await store.save([r, kept])
    new = bookkept(r, NOW + 80, deliver_count=4, groups={"a": acked(), "b": pending(4, NOW + 80)})
    kept_new = bookkept(
        kept, NOW + 20, groups={"a": dead(100, NOW), "b": pending(1, NOW + 20)}, only_groups=("b",)
    )
    await store.reschedule([Rescheduled(new, r.next_deliver_time)])
    await store.dead_letter([letter(kept_new, group="a", keep=True)])
    async with reopened(store, backend) as fresh:
        assert await fresh.get(r.message_id) == new
        assert await fresh.get(kept.message_id) == kept_new
        assert await due(fresh, NOW + 80) == [kept.message_id, r.message_id]
        assert [d.key for d in await fresh.list_dlq(EVERYTHING, 10)] == [(kept.message_id, "a")]


async def test_pending_counts_name_each_stored_pending_group_by_publish_second(
    store: MessageStore,
) -> None:
    fresh, parked, retried, left_out = (record() for _ in range(4))
    await store.save([fresh, parked, retried, left_out])
    await store.reschedule(
        [
            Rescheduled(bookkept(parked, NOW + 9, groups={"a": pending(0, NOW + 9)}), NOW),
            Rescheduled(
                bookkept(retried, NOW + 5, groups={"a": acked(), "b": pending(3, NOW + 5)}), NOW
            ),
            # a redrive's only_groups leaves "a" out: not pending for it
            Rescheduled(
                bookkept(
                    left_out, NOW, groups={"a": pending(), "c": pending()}, only_groups=("c",)
                ),
                NOW,
            ),
        ]
    )
    second = int(fresh.publish_time)
    assert await store.pending_counts() == {
        ("trade", "a", second): 1,
        ("trade", "b", second): 1,
        ("trade", "c", second): 1,
    }


@pytest.mark.parametrize("backend", DURABLE_BACKENDS, indirect=True)
async def test_pending_counts_are_read_from_the_stored_records_after_a_reopen(
    store: MessageStore, backend: Backend
) -> None:
    parked = [record() for _ in range(3)]
    await store.save(parked)
    await store.reschedule(
        [Rescheduled(bookkept(r, NOW + 9, groups={"a": pending(0, NOW + 9)}), NOW) for r in parked]
    )
    async with reopened(store, backend) as fresh:
        assert await fresh.pending_counts() == {("trade", "a", int(parked[0].publish_time)): 3}


# -- dead_letter: keep or remove, in one write -------------------------------------------


async def test_dead_letter_for_one_group_keeps_the_message_for_the_others(
    store: MessageStore,
) -> None:
    r = record(ndt=NOW - 1)
    await store.save([r])
    one_dead = bookkept(r, NOW + 40, groups={"poison": dead(2, NOW), "slow": pending(1, NOW + 40)})
    await store.dead_letter([letter(one_dead, "deliver_limit", NOW, "poison", keep=True)])

    # the stored message has the letter's bookkeeping, in the due index at its new time
    assert await store.get(r.message_id) == one_dead
    assert await due(store, NOW) == []
    assert await due(store, NOW + 40) == [r.message_id]
    assert await store.backlog() == {"trade": 1}
    assert await store.list_dlq(EVERYTHING, 10) == [
        letter(one_dead, "deliver_limit", NOW, "poison")
    ]
    assert await store.dlq_size() == {("trade", "poison"): 1}

    # the last group dead: the message leaves delivery, both letters stay
    all_dead = bookkept(one_dead, NOW + 40, groups={**one_dead.groups, "slow": dead(5, NOW + 90)})
    await store.dead_letter([letter(all_dead, "expired", NOW + 90, "slow")])
    assert await store.get(r.message_id) is None
    assert await due(store, NOW + 1000) == []
    assert await store.backlog() == {}
    assert await store.get_dead_letters(r.message_id) == [
        letter(one_dead, "deliver_limit", NOW, "poison"),
        letter(all_dead, "expired", NOW + 90, "slow"),
    ]
    assert await store.dlq_size() == {("trade", "poison"): 1, ("trade", "slow"): 1}


async def test_one_dead_letter_call_keeps_some_messages_and_removes_others(
    store: MessageStore,
) -> None:
    kept, gone, other = record(ndt=NOW - 3), record(ndt=NOW - 2), record(ndt=NOW - 1)
    await store.save([kept, gone, other])
    kept_new = bookkept(kept, NOW - 3, groups={"a": dead(3), "b": pending()})
    gone_new = bookkept(gone, NOW - 2, groups={"a": dead(3), "b": dead(3)})
    await store.dead_letter(
        [
            letter(kept_new, group="a", keep=True),
            letter(gone_new, group="a"),
            letter(gone_new, group="b"),
        ]
    )
    assert await due(store, NOW) == [kept.message_id, other.message_id]
    assert await store.get(kept.message_id) == kept_new
    assert await store.get(gone.message_id) is None
    assert [d.key for d in await store.list_dlq(EVERYTHING, 10)] == sorted(
        [(kept.message_id, "a"), (gone.message_id, "a"), (gone.message_id, "b")]
    )
    assert await store.dlq_size() == {("trade", "a"): 2, ("trade", "b"): 1}
    assert await store.backlog() == {"trade": 2}


async def test_dead_letters_filter_by_group(store: MessageStore) -> None:
    a, b = record(topic="trade"), record(topic="user")
    await store.save([a, b])
    await store.dead_letter(
        [
            letter(a, group="acct", keep=True),
            letter(b, group="acct"),
            letter(b, group="audit"),
        ]
    )
    acct = await store.list_dlq(DlqFilter(group="acct"), 10)
    assert sorted(d.key for d in acct) == sorted([(a.message_id, "acct"), (b.message_id, "acct")])
    assert [d.key for d in await store.list_dlq(DlqFilter(group="audit"), 10)] == [
        (b.message_id, "audit")
    ]
    # the cursor is a (message_id, group) key: b's second letter comes after its first
    assert [d.key for d in await store.list_dlq(EVERYTHING, 10, (b.message_id, "acct"))] == [
        *([(a.message_id, "acct")] if a.message_id > b.message_id else []),
        (b.message_id, "audit"),
    ]
    assert await store.dlq_size() == {
        ("trade", "acct"): 1,
        ("user", "acct"): 1,
        ("user", "audit"): 1,
    }


# -- redrive per group ------------------------------------------------------------------


async def test_redrive_of_one_group_while_the_message_is_still_stored(
    store: MessageStore,
) -> None:
    r = record(ndt=NOW - 10)
    await store.save([r])
    # "poison" dead; "slow" in its 160 s backoff window
    state = bookkept(r, NOW + 160, groups={"poison": dead(3, NOW), "slow": pending(7, NOW + 160)})
    await store.dead_letter([letter(state, group="poison", keep=True)])
    assert await due(store, NOW) == []

    [back] = await store.redrive([(r.message_id, "poison")], NOW)
    expected = bookkept(
        state, NOW, groups={"poison": pending(0, NOW), "slow": pending(7, NOW + 160)}
    )
    assert back == expected
    assert await store.get(r.message_id) == expected
    # due now for "poison"; "slow" keeps its own window
    assert await due(store, NOW) == [r.message_id]
    assert await store.list_dlq(EVERYTHING, 10) == []
    assert await store.dlq_size() == {}
    assert await store.backlog() == {"trade": 1}


async def test_redrive_does_not_delay_a_message_due_earlier(store: MessageStore) -> None:
    r = record(ndt=NOW - 10)
    await store.save([r])
    state = bookkept(r, NOW - 10, groups={"a": dead(3), "b": pending(1, NOW - 10)})
    await store.dead_letter([letter(state, group="a", keep=True)])
    [back] = await store.redrive([(r.message_id, "a")], NOW)
    assert back.next_deliver_time == NOW - 10
    assert await due(store, NOW - 10) == [r.message_id]


async def test_redrive_after_removal_delivers_to_the_redriven_groups_only(
    store: MessageStore,
) -> None:
    r = record(ndt=NOW - 1)
    await store.save([r])
    state = bookkept(
        r, NOW - 1, deliver_count=4, groups={"ok": acked(), "x": dead(4), "y": dead(2)}
    )
    await store.dead_letter([letter(state, group="x"), letter(state, group="y")])

    [back] = await store.redrive([(r.message_id, "x")], NOW)
    assert back.only_groups == ("x",)
    assert back.groups == {"ok": acked(), "x": pending(0, NOW), "y": dead(2)}
    assert back.deliver_count == 0
    assert (back.settled("ok"), back.settled("x"), back.settled("y")) == (True, False, True)
    assert await store.get(r.message_id) == back
    assert [d.key for d in await store.list_dlq(EVERYTHING, 10)] == [(r.message_id, "y")]

    # y redriven while x still has it: the same stored message, now for both
    [both] = await store.redrive([(r.message_id, "y")], NOW + 1)
    assert both.only_groups == ("x", "y")
    assert both.groups == {"ok": acked(), "x": pending(0, NOW), "y": pending(0, NOW + 1)}
    assert both.next_deliver_time == NOW
    assert await store.dlq_size() == {}
    assert await store.backlog() == {"trade": 1}


async def _dead_in_x_and_y(store: MessageStore) -> StoredMessage:
    """A stored message dead-lettered by two groups, x and y."""
    r = record()
    await store.save([r])
    state = bookkept(r, NOW, groups={"x": dead(4), "y": dead(2)})
    await store.dead_letter([letter(state, group="x"), letter(state, group="y")])
    return r


async def test_redrive_of_two_groups_in_one_call_stores_the_message_once(
    store: MessageStore,
) -> None:
    r = await _dead_in_x_and_y(store)
    [back] = await store.redrive([(r.message_id, "y"), (r.message_id, "x")], NOW)
    assert back.only_groups == ("x", "y")
    assert back.groups == {"x": pending(0, NOW), "y": pending(0, NOW)}
    assert await store.backlog() == {"trade": 1}
    assert await store.dlq_size() == {}


async def test_concurrent_redrives_of_two_groups_each_get_the_message(
    store: MessageStore,
) -> None:
    r = await _dead_in_x_and_y(store)
    # issued together, so the batching backends apply them in one write
    x, y = await asyncio.gather(
        store.redrive([(r.message_id, "x")], NOW), store.redrive([(r.message_id, "y")], NOW)
    )
    assert (ids(x), ids(y)) == ([r.message_id], [r.message_id])
    got = await store.get(r.message_id)
    assert got is not None
    assert (got.only_groups, got.groups) == (
        ("x", "y"),
        {"x": pending(0, NOW), "y": pending(0, NOW)},
    )
    assert await store.backlog() == {"trade": 1}


async def test_redrive_of_a_no_binding_letter_is_for_every_group(store: MessageStore) -> None:
    r = record()
    await store.save([r])
    await store.dead_letter([letter(r, "no_binding", NOW, "")])
    assert await store.dlq_size() == {("trade", ""): 1}
    [back] = await store.redrive([(r.message_id, "")], NOW + 5)
    assert (back.only_groups, back.groups, back.next_deliver_time) == ((), {}, NOW + 5)
    assert not back.settled("any-group")


async def test_redrive_of_a_stored_expired_message_extends_its_expiry(
    store: MessageStore,
) -> None:
    r = record(ndt=NOW - 1, expired_time=int(NOW) - 5)
    await store.save([r])
    state = bookkept(r, NOW + 20, groups={"a": dead(1), "b": pending(1, NOW + 20)})
    await store.dead_letter([letter(state, "expired", NOW, "a", keep=True)])
    [back] = await store.redrive([(r.message_id, "a")], NOW)
    assert back.message.expired_time == int(NOW) + MAX_EXPIRY_SECONDS
    got = await store.get(r.message_id)
    assert got is not None
    assert got.message.expired_time == int(NOW) + MAX_EXPIRY_SECONDS
    assert got.message.body == r.message.body


async def test_dlq_size_counts_each_topic_and_group(store: MessageStore) -> None:
    r0, r1, r2 = record(topic="trade"), record(topic="trade"), record(topic="user")
    await store.save([r0, r1, r2])
    await store.dead_letter(
        [letter(r0, group="a", keep=True), letter(r1, group="b"), letter(r2, group="b")]
    )
    counts = {("trade", "a"): 1, ("trade", "b"): 1, ("user", "b"): 1}
    assert await store.dlq_size() == counts
    # replacing a letter does not count it twice
    await store.dead_letter([letter(r0, "expired", NOW + 1, "a")])
    assert await store.dlq_size() == counts
    assert await store.backlog() == {}
    # a redrive uncounts it
    await store.redrive([(r2.message_id, "b"), (r0.message_id, "a")], NOW)
    assert await store.dlq_size() == {("trade", "b"): 1}


# -- what one backend promises about the write ---------------------------------------------


@pytest.mark.parametrize("backend", ["rocksdb"], indirect=True)
async def test_rocksdb_dead_letter_and_redrive_are_one_write_each(
    store: MessageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(store, RocksDBStore)
    kept, gone = record(), record()
    await store.save([kept, gone])
    spy = spy_writes(store, monkeypatch)
    before = store.write_batches
    await store.dead_letter(
        [
            letter(bookkept(kept, NOW, groups={"a": dead(1)}), group="a", keep=True),
            letter(gone, group="a"),
            letter(gone, group="b"),
        ]
    )
    await store.redrive([(kept.message_id, "a"), (gone.message_id, "b")], NOW)
    assert store.write_batches - before == 2
    assert spy.syncs == [True, True]
