"""The hand-off from the intake to the dispatcher, and what the recover scan does meanwhile.

A message the recover scan reads while its save is still under way is the intake's: a
sharded MySQL store commits one save's parts one after another, so a scan can read a
message before the save returns. If the scan delivered it, the intake would hand the same
message to the dispatcher again once the save returned: every group would get it twice,
and a group that used up deliverLimit would get another full round.

A message the dispatcher has no room for stays stored and due: the recover scan brings it,
and the intake counts it for the broker's periodic summary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from kiteq.binding.model import Binding
from kiteq.core.errors import StoreError
from kiteq.core.message import Message, StoredMessage
from kiteq.store.base import Saved
from kiteq.store.memory import MemoryStore
from tests.handler.harness import NOW, Broker


class HeldSave(MemoryStore):
    """Stores at once (readable by scans), then holds the save's answer until released."""

    def __init__(self) -> None:
        super().__init__(maxcap=1000)
        self.visible = asyncio.Event()
        self.release = asyncio.Event()

    async def save(self, records: Sequence[StoredMessage]) -> list[Saved | StoreError]:
        results = await super().save(records)
        self.visible.set()
        await self.release.wait()
        return results


async def test_a_scan_during_the_save_leaves_the_message_to_the_intake() -> None:
    store = HeldSave()
    async with Broker(store) as b:
        b.bind("acct", Binding.fanout("trade"))
        conn = b.connect("acct")
        message = Message(
            topic="trade",
            message_type="pay-succ",
            body=b"x",
            expired_time=int(NOW) + 3600,
            deliver_limit=2,
        )
        publish = asyncio.create_task(b.core.intake.publish([message], group="pay"))
        await asyncio.wait_for(store.visible.wait(), 5)
        # the scan reads the stored message (it is due) but does not offer it
        assert [r.message_id for r in await store.page_due(NOW + 1, 10)] == [message.message_id]
        assert await b.recover.scan() == 0
        assert conn.drain() == ([], [])
        store.release.set()
        [ack] = await asyncio.wait_for(publish, 5)
        assert ack.ok
        _, deliveries = conn.drain()
        assert [(r.message_id, attempt) for r, attempt in deliveries] == [(message.message_id, 1)]


async def test_a_message_the_full_dispatcher_cannot_take_is_counted_and_left_to_the_scan() -> None:
    async with Broker(max_flights=1) as b:
        b.bind("acct", Binding.fanout("trade"))
        conn = b.connect("acct")

        def message() -> Message:
            return Message(
                topic="trade", message_type="pay-succ", body=b"x", expired_time=int(NOW) + 3600
            )

        first, second = message(), message()
        assert [a.ok for a in await b.core.intake.publish([first], group="pay")] == [True]
        assert [a.ok for a in await b.core.intake.publish([second], group="pay")] == [True]
        assert b.core.intake.left_to_scan == {"trade": 1}
        assert [r.message_id for r, _ in conn.drain()[1]] == [first.message_id]
        b.dispatcher.acked(conn, [(first.message_id, True)])
        assert await b.scan() == 1  # the stored, due message comes back through the scan
        assert [r.message_id for r, _ in conn.drain()[1]] == [second.message_id]
