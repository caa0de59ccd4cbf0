"""``BrokerCore``: the delivery pipeline of one broker, built in one place.

A message's path through it::

    Intake.publish ─ validate, store (group commit), store-ack on the publisher's Connection
        └─ Dispatcher.submit ─ route (BindingTable) → per (topic, group) queue and watermark
              └─ Connection.send_delivery, the push recorded in the connection's Ledger
    Dispatcher.acked / expire / connection_closed ─ the Ledger gives back the push
        └─ Settlement ─ ack → delete; nack/timeout → retry, backoff window or dead letter
              └─ Bookkeeper ─ one store write per batch (delete / reschedule / DLQ)
    RecoverLoop ─ what is due again in the store goes back to Dispatcher.submit
    TxManager ─ uncommitted messages: checks sent to the publishing group, then submit

The transport (``kiteq.broker.service``) and the broker's lifecycle (``kiteq.broker.server``)
sit outside; the handler tests drive this same object without a network.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from kiteq.core.clock import Clock
from kiteq.core.config import ClusterConfig
from kiteq.handler.bookkeeper import Bookkeeper
from kiteq.handler.connection import ConnectionTable
from kiteq.handler.dispatch import Dispatcher
from kiteq.handler.history import History
from kiteq.handler.intake import Intake
from kiteq.handler.ordering import HeadFetcher
from kiteq.handler.recover import RecoverLoop
from kiteq.handler.schedule import ScheduledTally
from kiteq.handler.transactions import TxManager
from kiteq.store.base import MessageStore

if TYPE_CHECKING:
    from kiteq.binding.match import BindingTable
    from kiteq.ops.metrics import BrokerMetrics

__all__ = ["TICK_SECONDS", "BrokerCore"]

# deliveries time out, and watermark buckets release waiting messages, at this pace
TICK_SECONDS: Final = 0.1


class BrokerCore:
    def __init__(
        self,
        *,
        config: ClusterConfig,
        store: MessageStore,
        bindings: BindingTable,
        clock: Clock,
        server_name: str,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.store = store
        self.bindings = bindings
        self.connections = ConnectionTable()
        self.bookkeeper = Bookkeeper(
            store, clock=clock, remember_seconds=config.dedup_window_seconds
        )
        self.history = History(self.bookkeeper.history, capacity=config.history_messages)
        # scheduled messages not yet due, per topic, for the metrics (issue #15)
        self.scheduled = ScheduledTally()
        self.dispatcher = Dispatcher(
            bindings=bindings,
            connections=self.connections,
            bookkeeper=self.bookkeeper,
            history=self.history,
            clock=clock,
            delivery_timeout=config.delivery_seconds,
            max_workers=config.max_deliver_workers,
            no_binding_retention=config.no_binding_retention_seconds,
            max_flights=config.max_flights,
            metrics=metrics,
        )
        # ordered delivery: a lane's new head is read from the store and submitted
        self.head_fetcher = HeadFetcher(
            lanes=self.dispatcher.lanes,
            store=store,
            bookkeeper=self.bookkeeper,
            submit=self.dispatcher.submit,
            tracking=self.dispatcher.tracking,
        )
        self.recover = RecoverLoop(
            store=store,
            dispatcher=self.dispatcher,
            bookkeeper=self.bookkeeper,
            clock=clock,
            period=config.recover_seconds,
            scheduled=self.scheduled,
        )
        recover = self.recover
        lanes = self.dispatcher.lanes

        def binding_changed(_topic: str, _group: str) -> None:
            # messages stored while a group had no binding are in none of its lanes yet
            lanes.hold()
            recover.wake()

        bindings.add_listener(binding_changed)
        self.scheduled.on_stored = recover.due_at
        self.transactions = TxManager(
            store=store,
            dispatcher=self.dispatcher,
            connections=self.connections,
            bookkeeper=self.bookkeeper,
            history=self.history,
            clock=clock,
            check_delay=config.tx_check_delay_seconds,
            check_interval=config.tx_check_interval_seconds,
            check_max=config.tx_check_max,
            scheduled=self.scheduled,
        )
        self.intake = Intake(
            config=config,
            store=store,
            bookkeeper=self.bookkeeper,
            dispatcher=self.dispatcher,
            transactions=self.transactions,
            history=self.history,
            clock=clock,
            server_name=server_name,
            metrics=metrics,
            routes=bindings,
            scheduled=self.scheduled,
        )

    async def load(self) -> None:
        """Read what the store holds that memory must know before serving.

        The uncommitted messages (transactions) and what each group has waiting in the
        store (``group_backlog``).
        """
        await self.transactions.load()
        self.dispatcher.stored_backlog.load(await self.store.pending_counts())

    def loops(self) -> dict[str, Callable[[], Coroutine[Any, Any, None]]]:
        """The background loops to run under supervision, by name."""
        return {
            "bookkeeper": self.bookkeeper.run,
            "recover": self.recover.run,
            "transactions": self.transactions.run,
            "expiry": self.ticks,
            "ordering": self.head_fetcher.run,
        }

    async def ticks(self) -> None:
        """Time out unacked deliveries, release watermark-held ones, hand counts to metrics."""
        dispatcher = self.dispatcher
        while True:
            await asyncio.sleep(TICK_SECONDS)
            dispatcher.expire()
            dispatcher.tick()
            dispatcher.flush_metrics()

    async def flushed(self) -> None:
        """Until every store write queued so far has completed."""
        await self.bookkeeper.flushed()
