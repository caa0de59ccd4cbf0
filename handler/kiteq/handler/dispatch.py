"""Delivery: route each stored message to its groups and push it to one connection of each.

Rules (DESIGN §5):

- every group whose binding matches gets the message once; groups in ``succ_groups``
  already have it;
- inside a group, one random live connection with credit (its ``maxInFlight`` not used
  up), weighted by warm-up;
- an ack settles the group; a nack, a timeout (``deliverySeconds``) or a lost connection
  retries at once (on another connection of the group when there is one) until the
  group has had ``IMMEDIATE_ATTEMPTS`` attempts; after that the message is rescheduled in
  the store and the recover scan brings it back after the backoff window;
- a persistent group with no live connection does not use up an attempt: the message
  stays due in the store and the recover scan offers it again (at once when a connection
  of the group opens); a non-persistent group with no live connection is skipped for this
  message, as in KiteQ;
- a message is never pushed to a group while a push of it to that group is unresolved;
- when every group has the message, it is deleted.

Everything here runs on the event loop and never awaits: store writes go through the
``Bookkeeper``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from typing import TYPE_CHECKING, Final

from kiteq.core.clock import Clock
from kiteq.core.message import StoredMessage
from kiteq.handler.backoff import IMMEDIATE_ATTEMPTS, redelivery_delay
from kiteq.handler.bookkeeper import Bookkeeper
from kiteq.handler.connection import Connection, ConnectionTable, Pending

if TYPE_CHECKING:
    from kiteq.binding.match import BindingTable
    from kiteq.ops.metrics import BrokerMetrics

logger = logging.getLogger(__name__)

# How long a message whose limits ran out waits before it is looked at again; the
# dead-letter queue of issue #4 replaces this holding pattern.
_EXHAUSTED_HOLD_SECONDS: Final = 3600.0


class Flight:
    """A message being delivered: the groups still to settle in this round.

    A plain slotted class: one is made per message, so construction cost matters.
    """

    __slots__ = ("attempts", "dirty", "due", "durable", "failed", "parked", "pending", "record")

    def __init__(self, record: StoredMessage, durable: bool) -> None:
        self.record = record
        self.durable = durable
        # the next_deliver_time the store holds for the record
        self.due = record.next_deliver_time
        # group -> persistent, for groups queued or in flight
        self.pending: dict[str, bool] = {}
        self.attempts: dict[str, int] = {}
        self.failed: set[str] = set()
        # a persistent group had no live connection: retry later without using an attempt
        self.parked = False
        # bookkeeping changed and must be written if the message is not deleted
        self.dirty = False


class Dispatcher:
    def __init__(
        self,
        *,
        bindings: BindingTable,
        connections: ConnectionTable,
        bookkeeper: Bookkeeper,
        clock: Clock,
        delivery_timeout: float,
        max_workers: int,
        max_flights: int = 200_000,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self._bindings = bindings
        self._connections = connections
        self._bookkeeper = bookkeeper
        self._clock = clock
        self._timeout = delivery_timeout
        self._max_workers = max_workers
        self._max_flights = max_flights
        self._metrics = metrics
        self._flights: dict[str, Flight] = {}
        self._waiting: dict[str, deque[Flight]] = {}
        self._inflight = 0
        self._paused = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.delivered = 0
        self.redelivered = 0
        # (topic, group, result) -> count, handed to metrics by ``flush_metrics``
        self._tally: Counter[tuple[str, str, str]] = Counter()
        self._retries: Counter[tuple[str, str]] = Counter()

    # -- state -------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def flights(self) -> int:
        return len(self._flights)

    @property
    def has_room(self) -> bool:
        """False when memory-bound: new messages then wait in the store for the scan."""
        return len(self._flights) < self._max_flights

    def tracking(self, message_id: str) -> bool:
        return message_id in self._flights

    def waiting(self, group: str) -> int:
        return len(self._waiting.get(group, ()))

    # -- entry points ------------------------------------------------------------------

    def submit(self, record: StoredMessage, *, durable: bool = True) -> None:
        """Start delivering *record* (stored, committed) unless it is already in flight."""
        message = record.message
        if message.message_id in self._flights:
            return
        now = self._clock.now()
        flight = Flight(record, durable)
        if message.expired_time <= now or record.deliver_count >= message.deliver_limit:
            self._hold_exhausted(flight, now)
            return
        done = set(record.succ_groups)
        routes = [
            r
            for r in self._bindings.routes(message.topic, message.message_type)
            if r.group not in done
        ]
        if not routes:
            flight.parked = True  # no binding (yet): keep it, never delete on arrival
            self._finish(flight)
            return
        self._flights[message.message_id] = flight
        for route in routes:
            flight.pending[route.group] = route.persistent
            flight.attempts[route.group] = record.deliver_count
        for route in routes:
            self._offer(flight, route.group, None)
        self._maybe_finish(flight)

    def acked(self, conn: Connection, results: list[tuple[str, bool]]) -> None:
        """Results from *conn*'s client: (message id, processed)."""
        for message_id, ok in results:
            pending = conn.inflight.pop(message_id, None)
            if pending is None:
                continue  # late ack after a timeout, or a duplicate ack
            self._released(1)
            self._settle(pending.flight, conn, ok, "ack" if ok else "nack")
        self._pump(conn.group)

    def connection_opened(self, conn: Connection) -> None:
        if conn.consumer:
            self._pump(conn.group)

    def connection_closed(self, conn: Connection) -> None:
        """*conn* is gone: its unacked deliveries fail and go to other connections."""
        self._connections.remove(conn)
        lost = list(conn.inflight.values())
        conn.inflight.clear()
        conn.expiry.clear()
        self._released(len(lost))
        for pending in lost:
            self._settle(pending.flight, conn, False, "disconnected")
        if not self._connections.has_consumers(conn.group):
            self._park_waiting(conn.group)
        else:
            self._pump(conn.group)
        self._pump_all()

    def expire(self) -> int:
        """Fail deliveries whose ack did not come within the timeout; returns how many."""
        now = self._clock.monotonic()
        expired = 0
        for conn in self._connections.consumers():
            queue = conn.expiry
            while queue and queue[0][0] <= now:
                deadline, message_id = queue.popleft()
                pending = conn.inflight.get(message_id)
                if pending is None or pending.deadline != deadline:
                    continue
                del conn.inflight[message_id]
                self._released(1)
                expired += 1
                self._settle(pending.flight, conn, False, "timeout")
            if expired:
                self._pump(conn.group)
        return expired

    async def settled(self) -> None:
        """Wait until no delivery is unacknowledged."""
        await self._idle.wait()

    def _released(self, n: int) -> None:
        self._inflight -= n
        if not self._inflight:
            self._idle.set()

    def flush_metrics(self) -> None:
        """Hand the counts gathered since the last call to the metrics.

        One update per label set instead of one per message.
        """
        metrics = self._metrics
        if metrics is None:
            self._tally.clear()
            self._retries.clear()
            return
        for (topic, group, result), n in self._tally.items():
            metrics.delivered(topic, group, result, n)
        for (topic, group), n in self._retries.items():
            metrics.redelivered(topic, group, n)
        self._tally.clear()
        self._retries.clear()

    def pause(self) -> None:
        """Start no new push (shutdown); in-flight ones still settle."""
        self._paused = True

    def checkpoint(self) -> int:
        """Write the bookkeeping of every message still in memory (shutdown).

        Acks already received are then not redelivered after a restart. Returns how many.
        """
        flights = [f for f in self._flights.values() if f.dirty and f.durable]
        for flight in flights:
            self._bookkeeper.reschedule(flight.record, flight.due)
        self._flights.clear()
        self._waiting.clear()
        return len(flights)

    def retry_parked(self) -> None:
        """Give waiting messages another chance (a binding or connection appeared)."""
        self._pump_all()

    # -- internals ---------------------------------------------------------------------

    def _offer(self, flight: Flight, group: str, exclude: Connection | None) -> None:
        if not self._connections.has_consumers(group):
            self._unreachable(flight, group)
            return
        if self._inflight < self._max_workers and not self._paused:
            conn = self._connections.pick(group, self._clock.monotonic(), exclude)
            if conn is not None:
                self._push(flight, group, conn)
                return
        self._waiting.setdefault(group, deque()).append(flight)

    def _unreachable(self, flight: Flight, group: str) -> None:
        persistent = flight.pending.pop(group)
        if persistent:
            flight.parked = True
            return
        # KiteQ: a non-persistent group that is offline is skipped for this message.
        flight.record.succ_groups = (*flight.record.succ_groups, group)
        flight.dirty = True
        logger.debug(
            "skipped offline non-persistent group=%s id=%s", group, flight.record.message_id
        )

    def _push(self, flight: Flight, group: str, conn: Connection) -> None:
        attempt = flight.attempts[group] + 1
        flight.attempts[group] = attempt
        flight.dirty = True
        deadline = self._clock.monotonic() + self._timeout
        message_id = flight.record.message_id
        conn.inflight[message_id] = Pending(flight, deadline, attempt)
        conn.expiry.append((deadline, message_id))
        self._inflight += 1
        self._idle.clear()
        if attempt > 1:
            self.redelivered += 1
            self._retries[flight.record.message.topic, group] += 1
        conn.send_delivery(flight.record, attempt)

    def _settle(self, flight: Flight, conn: Connection, ok: bool, result: str) -> None:
        group = conn.group
        self._tally[flight.record.message.topic, group, result] += 1
        if group not in flight.pending:
            return
        if ok:
            self.delivered += 1
            del flight.pending[group]
            flight.record.succ_groups = (*flight.record.succ_groups, group)
        elif (
            flight.attempts[group] < IMMEDIATE_ATTEMPTS
            and flight.record.message.expired_time > self._clock.now()
        ):
            self._offer(flight, group, conn)
        else:
            del flight.pending[group]
            flight.failed.add(group)
        self._maybe_finish(flight)

    def _maybe_finish(self, flight: Flight) -> None:
        if not flight.pending:
            self._flights.pop(flight.record.message_id, None)
            self._finish(flight)

    def _finish(self, flight: Flight) -> None:
        record = flight.record
        if flight.attempts:
            record.deliver_count = max(record.deliver_count, *flight.attempts.values())
        if not flight.failed and not flight.parked:
            if flight.durable:
                self._bookkeeper.delete(record)
            return
        if not flight.durable:
            logger.warning(
                "fly message not delivered to every group id=%s failed=%s",
                record.message_id,
                sorted(flight.failed),
            )
            return
        now = self._clock.now()
        if flight.failed:
            record.fail_groups = tuple(sorted(flight.failed))
            record.next_deliver_time = now + redelivery_delay(record.deliver_count)
        elif not flight.dirty and record.next_deliver_time <= now:
            return  # parked and unchanged: the store already has it due; nothing to write
        else:
            record.next_deliver_time = min(record.next_deliver_time, now)
        self._bookkeeper.reschedule(record, flight.due)

    def _hold_exhausted(self, flight: Flight, now: float) -> None:
        record = flight.record
        logger.warning(
            "not delivering id=%s topic=%s: %s; held in the store",
            record.message_id,
            record.topic,
            "expired" if record.message.expired_time <= now else "delivery limit reached",
        )
        if flight.durable:
            record.next_deliver_time = now + _EXHAUSTED_HOLD_SECONDS
            self._bookkeeper.reschedule(record, flight.due)

    def _pump(self, group: str) -> None:
        queue = self._waiting.get(group)
        if not queue:
            return
        if not self._connections.has_consumers(group):
            self._park_waiting(group)
            return
        now = self._clock.monotonic()
        while queue and self._inflight < self._max_workers and not self._paused:
            flight = queue[0]
            if (
                group not in flight.pending
                or self._flights.get(flight.record.message_id) is not flight
            ):
                queue.popleft()
                continue
            conn = self._connections.pick(group, now)
            if conn is None:
                break
            queue.popleft()
            self._push(flight, group, conn)
        if not queue:
            del self._waiting[group]

    def _pump_all(self) -> None:
        for group in list(self._waiting):
            self._pump(group)

    def _park_waiting(self, group: str) -> None:
        queue = self._waiting.pop(group, None)
        for flight in queue or ():
            if group in flight.pending and self._flights.get(flight.record.message_id) is flight:
                self._unreachable(flight, group)
                self._maybe_finish(flight)
