"""Scheduled messages (issue #15) in every store: the delivery time is kept, and the due
index keeps them away from ``page_due`` until then."""

from __future__ import annotations

import dataclasses

import pytest

from kiteq.core.message import StoredMessage
from kiteq.store.base import MessageStore, Saved
from tests.store.helpers import DURABLE_BACKENDS, NOW, Backend, ids, record, reopened


def scheduled(deliver_at: float, **kwargs: object) -> StoredMessage:
    r = record(ndt=deliver_at, expired_time=int(deliver_at) + 3600, **kwargs)  # type: ignore[arg-type]
    r.message = dataclasses.replace(r.message, deliver_at=deliver_at)
    return r


async def test_delivery_time_round_trips_and_due_index_holds_it_back(store: MessageStore) -> None:
    now_msg = record(ndt=NOW - 1)
    soon = scheduled(NOW + 2.5, properties={"k": "v"})
    later = scheduled(NOW + 3600.25)
    assert await store.save([now_msg, soon, later]) == [Saved.STORED] * 3
    got = await store.get(soon.message_id)
    assert got == soon
    assert got is not None
    assert got.message.deliver_at == NOW + 2.5
    assert ids(await store.page_due(NOW, 100)) == [now_msg.message_id]
    assert ids(await store.page_due(NOW + 2.5, 100)) == [now_msg.message_id, soon.message_id]
    # what the admin listing reads: the index from now on, in delivery-time order
    ahead = await store.page_due(1e300, 100, (NOW, ""))
    assert ids(ahead) == [soon.message_id, later.message_id]


@pytest.mark.parametrize("backend", DURABLE_BACKENDS, indirect=True)
async def test_delivery_time_survives_a_reopen(store: MessageStore, backend: Backend) -> None:
    r = scheduled(NOW + 60.125)
    await store.save([r])
    async with reopened(store, backend) as fresh:
        got = await fresh.get(r.message_id)
        assert got is not None
        assert got.message.deliver_at == NOW + 60.125
        assert await fresh.page_due(NOW + 60, 10) == []
        assert ids(await fresh.page_due(NOW + 61, 10)) == [r.message_id]
