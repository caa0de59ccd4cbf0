from __future__ import annotations

import pytest

from kiteq.core.errors import StoreFullError, StoreUnavailableError
from kiteq.store.base import Saved
from kiteq.store.memory import MemoryStore
from tests.store.helpers import NOW, record


async def test_full_store_rejects_what_does_not_fit_and_evicts_nothing() -> None:
    store = MemoryStore(maxcap=3)
    await store.open()
    kept = [record() for _ in range(2)]
    assert await store.save(kept) == [Saved.STORED, Saved.STORED]
    late = [record(), record(), record()]
    outcomes = await store.save([*late, kept[0]])
    assert outcomes[0] == Saved.STORED
    assert all(isinstance(o, StoreFullError) for o in outcomes[1:3])
    assert outcomes[3] == Saved.DUPLICATE  # a duplicate is not "full"
    for r in [*kept, late[0]]:
        assert await store.get(r.message_id) is not None
    assert await store.get(late[1].message_id) is None
    assert await store.backlog() == {"trade": 3}

    await store.delete([kept[0]])
    assert await store.save([late[1]]) == [Saved.STORED]


async def test_is_not_durable_and_not_reopenable() -> None:
    store = MemoryStore(maxcap=10)
    assert store.durable is False
    assert store.description == "memory://?maxcap=10"
    [outcome] = await store.save([record()])
    assert isinstance(outcome, StoreUnavailableError)  # not open yet
    await store.open()
    await store.close()
    with pytest.raises(StoreUnavailableError):
        await store.open()


def test_maxcap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="maxcap"):
        MemoryStore(maxcap=0)


async def test_due_index_stays_ordered_across_many_chunks() -> None:
    store = MemoryStore(maxcap=10_000)
    await store.open()
    records = [record(ndt=NOW - (i * 7919 % 3001)) for i in range(3000)]
    await store.save(records)
    await store.delete(records[::3])
    left = [r for i, r in enumerate(records) if i % 3]
    expected = [
        r.message_id for r in sorted(left, key=lambda r: (r.next_deliver_time, r.message_id))
    ]
    page = await store.page_due(NOW, 10_000)
    assert [r.message_id for r in page] == expected
    cursor = (page[999].next_deliver_time, page[999].message_id)
    assert [r.message_id for r in await store.page_due(NOW, 5, cursor)] == expected[1000:1005]
