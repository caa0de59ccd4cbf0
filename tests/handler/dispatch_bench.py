"""The dispatcher's common case in process: one group, acked at once (issue #10 cost check).

    python tests/handler/dispatch_bench.py

Records live as in the broker, from their batch's intake until their delete is queued,
under the broker's GC thresholds; CPU time, best of five. The same file run against an
older tree (its directories first on PYTHONPATH) gives the figure to compare with.
"""

from __future__ import annotations

import asyncio
import gc
import time

from kiteq.binding.match import BindingTable
from kiteq.binding.model import Binding
from kiteq.core.clock import ManualClock
from kiteq.core.message import Message, StoredMessage
from kiteq.handler.bookkeeper import Bookkeeper
from kiteq.handler.connection import Connection, ConnectionTable
from kiteq.handler.dispatch import Dispatcher
from kiteq.handler.history import History
from kiteq.store.base import HistoryEvent
from kiteq.store.memory import MemoryStore

BATCH, ROUNDS, TRIALS = 500, 400, 5


def _forget(events: list[HistoryEvent]) -> None:
    del events


async def main() -> None:
    clock = ManualClock()
    table = BindingTable()
    table.replace("trade", "acct", [Binding.fanout("trade").with_group("acct")])
    connections = ConnectionTable()
    # its flush task never runs: the queued deletes are cleared after each batch
    bookkeeper = Bookkeeper(MemoryStore(maxcap=1))
    dispatcher = Dispatcher(
        bindings=table,
        connections=connections,
        bookkeeper=bookkeeper,
        history=History(_forget),
        clock=clock,
        delivery_timeout=5,
        max_workers=10**9,
    )
    conn = Connection(
        group="acct",
        client_id="c",
        peer="p",
        max_in_flight=10**9,
        warmup_seconds=0,
        opened_at=0,
    )
    connections.add(conn)
    dispatcher.connection_opened(conn)
    gc.set_threshold(100_000, 50, 100)  # kiteq.broker.cli's
    best = float("inf")
    for _ in range(TRIALS):
        spent = 0.0
        for _ in range(ROUNDS):
            now = clock.now()
            records = [
                StoredMessage(
                    Message(
                        topic="trade",
                        message_type="t",
                        body=b"x",
                        expired_time=int(now) + 3600,
                        deliver_limit=100,
                    ),
                    publish_time=now,
                    next_deliver_time=now,
                )
                for _ in range(BATCH)
            ]
            started = time.process_time()
            for record in records:
                dispatcher.submit(record)
            _, deliveries = conn.drain()
            dispatcher.acked(conn, [(r.message_id, True) for r, _ in deliveries])
            bookkeeper._deletes.clear()  # its flush task is not running
            bookkeeper._pending.clear()
            del records, deliveries
            spent += time.process_time() - started
        best = min(best, spent)
    print(f"{best / (BATCH * ROUNDS) * 1e6:.2f} us/msg submit+push+ack+delete (CPU, best of 5)")


if __name__ == "__main__":
    asyncio.run(main())
