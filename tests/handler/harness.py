"""A broker without the network: the broker's own ``BrokerCore`` (real store, bookkeeper,
dispatcher, recover scan, transactions, intake), consumer connections driven by the test,
time from a ManualClock."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path

from kiteq.binding.match import BindingTable
from kiteq.binding.model import Binding
from kiteq.core.clock import ManualClock
from kiteq.core.config import load_cluster
from kiteq.core.message import Message, StoredMessage
from kiteq.core.webhook import WebhookPolicy
from kiteq.handler.connection import Connection
from kiteq.handler.core import BrokerCore
from kiteq.store.base import Saved
from kiteq.store.memory import MemoryStore

NOW = 1_700_000_000.0
CONFIG = Path(__file__).resolve().parents[2] / "conf" / "cluster.toml"


class Broker:
    def __init__(
        self,
        store: MemoryStore | None = None,
        *,
        timeout: float = 5.0,
        retention: float = 3600.0,
        check_max: int = 15,
        max_workers: int = 10_000,
        max_flights: int = 200_000,
        history_messages: int = 100_000,
        webhooks: WebhookPolicy | None = None,
    ) -> None:
        self.clock = ManualClock(NOW)
        self.table = BindingTable(webhooks=webhooks)
        self.store = store or MemoryStore(maxcap=100_000)
        config = dataclasses.replace(
            load_cluster(CONFIG, "memory_dev"),
            delivery_seconds=timeout,
            max_deliver_workers=max_workers,
            max_flights=max_flights,
            history_messages=history_messages,
            no_binding_retention_seconds=retention,
            recover_seconds=10,
            tx_check_delay_seconds=6,
            tx_check_interval_seconds=30,
            tx_check_max=check_max,
        )
        self.core = BrokerCore(
            config=config,
            store=self.store,
            bindings=self.table,
            clock=self.clock,
            server_name="harness",
        )
        self.connections = self.core.connections
        self.bookkeeper = self.core.bookkeeper
        self.history = self.core.history
        self.dispatcher = self.core.dispatcher
        self.tx = self.core.transactions
        self.recover = self.core.recover
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Broker:
        await self.store.open()
        self._task = asyncio.create_task(self.bookkeeper.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.settle()
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.store.close()

    def bind(self, group: str, binding: Binding) -> None:
        self.table.replace(binding.topic, group, [binding.with_group(group)])

    def producer(self, group: str) -> Connection:
        return self.connect(group, max_in_flight=0)

    def connect(self, group: str, max_in_flight: int = 100, warmup: float = 0.0) -> Connection:
        conn = Connection(
            group=group,
            client_id=f"c{len(self.connections)}",
            peer="test",
            max_in_flight=max_in_flight,
            warmup_seconds=warmup,
            opened_at=self.clock.monotonic(),
        )
        self.connections.add(conn)
        self.dispatcher.connection_opened(conn)
        return conn

    async def publish(
        self,
        *,
        topic: str = "trade",
        message_type: str = "pay-succ",
        deliver_limit: int = 100,
        ttl: int = 3600,
        commit: bool = True,
        publisher: Connection | None = None,
    ) -> StoredMessage:
        message = Message(
            topic=topic,
            message_type=message_type,
            body=b"x",
            expired_time=int(self.clock.now()) + ttl,
            deliver_limit=deliver_limit,
            commit=commit,
            group_id=publisher.group if publisher else "pay",
        )
        now = self.clock.now()
        record = StoredMessage(
            message, publish_time=now, next_deliver_time=now if commit else now + 6
        )
        assert await self.store.save([record]) == [Saved.STORED]
        self.history.record(record.message_id, record.publish_time, "published")
        if commit:
            self.dispatcher.submit(record)
        else:
            self.tx.track(record, publisher)
        return record

    async def settle(self) -> None:
        """Until the store writes are done and every new lane head is read and submitted."""
        while True:
            await asyncio.wait_for(self.bookkeeper.flushed(), 5)
            if not self.dispatcher.lanes.wanted:
                return
            await self.core.head_fetcher.fetch_once()

    async def scan(self) -> int:
        await self.settle()
        offered = await self.recover.scan()
        await self.settle()
        return offered

    def answer(
        self, conn: Connection, decide: Callable[[StoredMessage, int], bool]
    ) -> list[tuple[str, int]]:
        """Process what *conn* was sent; returns (id, attempt) pairs."""
        _, deliveries = conn.drain()
        self.dispatcher.acked(conn, [(r.message_id, decide(r, a)) for r, a in deliveries])
        return [(r.message_id, a) for r, a in deliveries]
