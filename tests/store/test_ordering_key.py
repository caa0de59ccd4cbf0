"""The ordering key (issue #16) is kept by every store, across a reopen of the durable ones."""

from __future__ import annotations

import dataclasses

import pytest

from kiteq.core.message import StoredMessage
from kiteq.store.base import MessageStore, Saved
from tests.store.helpers import DURABLE_BACKENDS, NOW, Backend, ids, record, reopened


def keyed(key: str, **kwargs: object) -> StoredMessage:
    r = record(**kwargs)  # type: ignore[arg-type]
    r.message = dataclasses.replace(r.message, ordering_key=key)
    return r


async def test_ordering_key_round_trips(store: MessageStore) -> None:
    plain = record(ndt=NOW - 2)
    a = keyed("order-17", ndt=NOW - 1)
    b = keyed("k" * 255, ndt=NOW - 1, properties={"p": "v"})
    assert await store.save([plain, a, b]) == [Saved.STORED] * 3
    for r in (plain, a, b):
        got = await store.get(r.message_id)
        assert got == r
    due = await store.page_due(NOW, 100)
    assert ids(due) == ids([plain, *sorted((a, b), key=lambda r: r.message_id)])
    assert {r.message_id: r.message.ordering_key for r in due}[b.message_id] == "k" * 255


@pytest.mark.parametrize("backend", DURABLE_BACKENDS, indirect=True)
async def test_ordering_key_survives_a_reopen(store: MessageStore, backend: Backend) -> None:
    r = keyed("ключ-1")
    await store.save([r])
    async with reopened(store, backend) as fresh:
        got = await fresh.get(r.message_id)
        assert got is not None
        assert got.message.ordering_key == "ключ-1"
