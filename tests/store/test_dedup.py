"""The idempotency window of the ``MessageStore`` contract, run against every backend.

``delete(records, remember_until)`` remembers the deleted ids in the same write; a save of
one of them published before that time answers ``Saved.DUPLICATE``; ``prune_remembered``
forgets them by time.
"""

from __future__ import annotations

import asyncio

import pytest

from kiteq.store.base import MessageStore, Saved
from tests.store.helpers import DURABLE_BACKENDS, NOW, Backend, record, reopened

# records are published at NOW - 0.5 (tests.store.helpers.record)
UNTIL = NOW + 120


async def test_a_remembered_id_is_a_duplicate_and_not_stored(store: MessageStore) -> None:
    first, other = record(), record()
    assert await store.save([first, other]) == [Saved.STORED, Saved.STORED]
    await store.delete([first, other], UNTIL)
    retry, new = record(message_id=first.message_id), record()
    assert await store.save([retry, new]) == [Saved.DUPLICATE, Saved.STORED]
    assert await store.get(first.message_id) is None
    assert await store.backlog() == {"trade": 1}


async def test_a_delete_without_a_window_forgets_the_id(store: MessageStore) -> None:
    first = record()
    await store.save([first])
    await store.delete([first])
    assert await store.save([record(message_id=first.message_id)]) == [Saved.STORED]


async def test_a_publish_after_the_window_is_a_new_message(store: MessageStore) -> None:
    first = record()
    await store.save([first])
    await store.delete([first], UNTIL)
    later = record(message_id=first.message_id)
    later.publish_time = UNTIL + 1
    # not pruned yet: the publish time decides
    assert await store.save([later]) == [Saved.STORED]
    assert await store.get(first.message_id) is not None


async def test_prune_forgets_what_expired_and_keeps_the_rest(store: MessageStore) -> None:
    early, late, moved = record(), record(), record()
    await store.save([early, late, moved])
    await store.delete([early, moved], NOW + 10)
    await store.delete([late], NOW + 100)
    # remembered again (a redriven message deleted a second time): its time moves
    await store.save([record(message_id=moved.message_id)])
    await store.delete([moved], NOW + 200)
    assert await store.prune_remembered(NOW + 50) == 1
    assert await store.prune_remembered(NOW + 50) == 0
    retries = [record(message_id=r.message_id) for r in (early, late, moved)]
    assert await store.save(retries) == [Saved.STORED, Saved.DUPLICATE, Saved.DUPLICATE]
    assert await store.prune_remembered(NOW + 300) == 2


async def test_many_ids_across_shards(store: MessageStore, backend: Backend) -> None:
    assert await store.remembered_estimate() == 0
    records = [record() for _ in range(300)]
    await store.save(records)
    await store.delete(records, UNTIL)
    estimate = await store.remembered_estimate()
    match backend.name:
        case "memory":
            assert estimate == 300
        case "rocksdb":
            assert 200 <= estimate <= 300  # from the memtable's counts
        case _:
            assert estimate >= 0  # InnoDB refreshes its row estimate in the background
    assert await store.save([record(message_id=r.message_id) for r in records]) == (
        [Saved.DUPLICATE] * 300
    )
    assert await store.backlog() == {}
    assert await store.prune_remembered(UNTIL + 1) == 300
    assert await store.save([record(message_id=r.message_id) for r in records[:5]]) == (
        [Saved.STORED] * 5
    )


async def test_a_save_racing_the_delete_is_a_duplicate(store: MessageStore) -> None:
    first = record()
    await store.save([first])
    retry = record(message_id=first.message_id)
    _, outcome = await asyncio.gather(store.delete([first], UNTIL), store.save([retry]))
    # before the delete: the id is stored; after it: remembered
    assert outcome == [Saved.DUPLICATE]
    assert await store.get(first.message_id) is None


@pytest.mark.parametrize("backend", DURABLE_BACKENDS, indirect=True)
async def test_the_window_survives_close_and_reopen(store: MessageStore, backend: Backend) -> None:
    kept, expiring = record(), record()
    await store.save([kept, expiring])
    await store.delete([kept], UNTIL)
    await store.delete([expiring], NOW + 5)
    async with reopened(store, backend) as fresh:
        assert await fresh.prune_remembered(NOW + 10) == 1
        retries = [record(message_id=kept.message_id), record(message_id=expiring.message_id)]
        assert await fresh.save(retries) == [Saved.DUPLICATE, Saved.STORED]
