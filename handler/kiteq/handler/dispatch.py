"""Delivery: route each stored message to its groups and push it to one connection of each.

Rules (DESIGN §5):

- every group whose binding matches gets the message once; groups in ``succ_groups``
  already have it;
- inside a group, one random live connection with credit (its ``maxInFlight`` not used
  up), weighted by warm-up;
- each (topic, group) is held to its binding's watermark (messages per second, token
  bucket with KiteQ's burst of half the rate); a push held back by it, by credits or by
  ``maxDeliverWorkers`` waits in memory and does not use up an attempt;
- an ack settles the group; a nack, a timeout (``deliverySeconds``) or a lost connection
  retries at once (on another connection of the group when there is one) until the
  group has had ``IMMEDIATE_ATTEMPTS`` attempts; after that the message is rescheduled in
  the store and the recover scan brings it back after the backoff window;
- a persistent group with no live connection does not use up an attempt: the message
  stays due in the store and the recover scan offers it again (at once when a connection
  of the group opens); a non-persistent group with no live connection is skipped for this
  message, as in KiteQ, and the history says so;
- a message that has expired or used up ``deliverLimit`` attempts goes to the dead-letter
  queue with that reason, and so does one that matched no binding for longer than
  ``noBindingRetentionSeconds``: nothing is dropped silently, nothing is delivered after
  its expiry;
- a message is never pushed to a group while a push of it to that group is unresolved;
- when every group has the message, it is deleted.

Everything here runs on the event loop and never awaits: store writes go through the
``Bookkeeper``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from kiteq.core.clock import Clock
from kiteq.core.message import StoredMessage
from kiteq.handler.backoff import IMMEDIATE_ATTEMPTS, redelivery_delay
from kiteq.handler.bookkeeper import Bookkeeper
from kiteq.handler.connection import Connection, ConnectionTable, Pending
from kiteq.handler.history import History
from kiteq.handler.limiter import TokenBucket
from kiteq.store.base import DeadLetter

if TYPE_CHECKING:
    from kiteq.binding.match import BindingTable
    from kiteq.ops.metrics import BrokerMetrics

logger = logging.getLogger(__name__)

# waiting messages are keyed by (topic, group): each pair has its own watermark
_Key = tuple[str, str]


class Flight:
    """A message being delivered: the groups still to settle in this round.

    A plain slotted class: one is made per message, so construction cost matters.
    """

    __slots__ = (
        "attempts",
        "dirty",
        "due",
        "durable",
        "failed",
        "on_done",
        "parked",
        "pending",
        "record",
    )

    def __init__(
        self,
        record: StoredMessage,
        durable: bool,
        on_done: Callable[[Flight], None] | None = None,
    ) -> None:
        self.record = record
        self.durable = durable
        # deliveryFirst: one attempt per group, then the caller decides what to store
        self.on_done = on_done
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
        history: History,
        clock: Clock,
        delivery_timeout: float,
        max_workers: int,
        no_binding_retention: float = 3600.0,
        max_flights: int = 200_000,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self._bindings = bindings
        self._connections = connections
        self._bookkeeper = bookkeeper
        self._history = history
        self._clock = clock
        self._timeout = delivery_timeout
        self._max_workers = max_workers
        self._no_binding_retention = no_binding_retention
        self._max_flights = max_flights
        self._metrics = metrics
        self._flights: dict[str, Flight] = {}
        self._waiting: dict[_Key, deque[Flight]] = {}
        # (topic, group) -> watermark bucket; groups -> their waiting keys
        self._limits: dict[_Key, TokenBucket] = {}
        self._keys_of: dict[str, set[_Key]] = {}
        self._inflight = 0
        # wall and monotonic time, read once per entry point: everything an entry point
        # does happens at one instant, and a clock read per message per step added up
        self._now = clock.now()
        self._mono = clock.monotonic()
        self._paused = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.delivered = 0
        self.redelivered = 0
        self.dead_lettered = 0
        self.flow_limited = 0
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
        return sum(len(self._waiting[key]) for key in self._keys_of.get(group, ()))

    # -- entry points ------------------------------------------------------------------

    def submit(
        self,
        record: StoredMessage,
        *,
        durable: bool = True,
        on_done: Callable[[Flight], None] | None = None,
    ) -> None:
        """Start delivering *record* (committed) unless it is already in flight.

        *durable* False: not stored (fly, deliveryFirst), so no store bookkeeping.
        *on_done*: deliveryFirst; each group gets one attempt, no retry, and *on_done*
        receives the flight when every group has a result (``failed``/``parked`` say
        which groups still need the message).
        """
        message = record.message
        if message.message_id in self._flights:
            return
        self._stamp()
        now = self._now
        flight = Flight(record, durable, on_done)
        if message.expired_time <= now:
            self._dead_letter(flight, "expired", now)
            return
        if record.deliver_count >= message.deliver_limit:
            self._dead_letter(flight, "deliver_limit", now)
            return
        done = record.succ_groups
        routes = self._bindings.routes(message.topic, message.message_type)
        if done:
            routes = tuple(r for r in routes if r.group not in done)
        if not routes:
            if on_done is not None:
                flight.parked = True
                on_done(flight)
            elif done or now - record.publish_time <= self._no_binding_retention:
                flight.parked = True  # no binding (yet): keep it, never delete on arrival
                self._finish(flight)
            else:
                self._dead_letter(flight, "no_binding", now)
            return
        self._flights[message.message_id] = flight
        for route in routes:
            flight.pending[route.group] = route.persistent
            flight.attempts[route.group] = record.deliver_count
            key = (message.topic, route.group)
            bucket = self._limits.get(key)
            if route.watermark <= 0:
                if bucket is not None:
                    del self._limits[key]
            elif bucket is None or bucket.rate != route.watermark:
                # KiteQ: rate = watermark, burst = half of it
                self._limits[key] = TokenBucket(route.watermark, route.watermark / 2, self._clock)
        for route in routes:
            self._offer(flight, route.group, None)
        self._maybe_finish(flight)

    def acked(self, conn: Connection, results: list[tuple[str, bool]]) -> int:
        """Results from *conn*'s client: (message id, processed).

        Only deliveries in flight on *conn* itself are settled: an ack can never settle a
        push to another connection, whatever id it names. Returns how many results named
        no delivery in flight here (late after a timeout, duplicate, or foreign).
        """
        self._stamp()
        stray = 0
        for message_id, ok in results:
            pending = conn.inflight.pop(message_id, None)
            if pending is None:
                stray += 1
                continue
            self._released(1)
            self._settle(pending, conn, ok, "ack" if ok else "nack")
        self._pump(conn.group)
        return stray

    def connection_opened(self, conn: Connection) -> None:
        self._stamp()
        if conn.consumer:
            self._pump(conn.group)

    def connection_closed(self, conn: Connection) -> None:
        """*conn* is gone: its unacked deliveries fail and go to other connections."""
        self._stamp()
        self._connections.remove(conn)
        lost = list(conn.inflight.values())
        conn.inflight.clear()
        conn.expiry.clear()
        self._released(len(lost))
        for pending in lost:
            self._settle(pending, conn, False, "disconnected")
        if not self._connections.has_consumers(conn.group):
            self._park_waiting(conn.group)
        self._pump_all()

    def expire(self) -> int:
        """Fail deliveries whose ack did not come within the timeout; returns how many."""
        self._stamp()
        now = self._mono
        expired = 0
        for conn in self._connections.consumers():
            queue = conn.expiry
            before = expired
            while queue and queue[0][0] <= now:
                deadline, message_id = queue.popleft()
                pending = conn.inflight.get(message_id)
                if pending is None or pending.deadline != deadline:
                    continue
                del conn.inflight[message_id]
                self._released(1)
                expired += 1
                self._settle(pending, conn, False, "timeout")
            if expired > before:
                self._pump(conn.group)
        return expired

    def tick(self) -> None:
        """Periodic: watermark buckets have refilled, let waiting messages go."""
        self._stamp()
        self._pump_all()

    async def settled(self) -> None:
        """Wait until no delivery is unacknowledged."""
        await self._idle.wait()

    def flush_metrics(self) -> None:
        """Hand the counts gathered since the last call to the metrics.

        One update per label set instead of one per message.
        """
        metrics = self._metrics
        if metrics is not None:
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
            self._sync_count(flight)
            self._bookkeeper.reschedule(flight.record, flight.due)
        self._flights.clear()
        self._waiting.clear()
        self._keys_of.clear()
        return len(flights)

    # -- internals ---------------------------------------------------------------------

    def _stamp(self) -> None:
        self._now = self._clock.now()
        self._mono = self._clock.monotonic()

    def _released(self, n: int) -> None:
        self._inflight -= n
        if not self._inflight:
            self._idle.set()

    def _offer(self, flight: Flight, group: str, exclude: Connection | None) -> None:
        if not self._connections.has_consumers(group):
            self._unreachable(flight, group)
            return
        key = (flight.record.message.topic, group)
        queue = self._waiting.get(key)
        if not queue and self._inflight < self._max_workers and not self._paused:
            conn = self._connections.pick(group, self._mono, exclude)
            if conn is not None:
                bucket = self._limits.get(key)
                if bucket is None or bucket.take(1):
                    self._push(flight, group, conn)
                    return
                self.flow_limited += 1
        if queue is None:
            queue = self._waiting[key] = deque()
            self._keys_of.setdefault(group, set()).add(key)
        queue.append(flight)

    def _unreachable(self, flight: Flight, group: str) -> None:
        persistent = flight.pending.pop(group)
        if persistent:
            flight.parked = True
            return
        # KiteQ: a non-persistent group that is offline is skipped for this message.
        record = flight.record
        record.succ_groups = (*record.succ_groups, group)
        flight.dirty = True
        self._history.record(
            record.message_id, self._now, "skipped", group=group, detail="group offline"
        )
        self._history.keep(record.message_id)

    def _push(self, flight: Flight, group: str, conn: Connection) -> None:
        attempt = flight.attempts[group] + 1
        flight.attempts[group] = attempt
        flight.dirty = True
        deadline = self._mono + self._timeout
        record = flight.record
        message_id = record.message_id
        conn.inflight[message_id] = Pending(flight, deadline, attempt)
        conn.expiry.append((deadline, message_id))
        self._inflight += 1
        self._idle.clear()
        if attempt > 1:
            self.redelivered += 1
            self._retries[record.message.topic, group] += 1
        self._history.record(
            message_id,
            self._now,
            "delivered",
            group=group,
            connection=conn.name,
            attempt=attempt,
        )
        conn.send_delivery(record, attempt)

    def _settle(self, pending: Pending, conn: Connection, ok: bool, result: str) -> None:
        flight = pending.flight
        group = conn.group
        record = flight.record
        self._tally[record.message.topic, group, result] += 1
        self._history.record(
            record.message_id,
            self._now,
            _RESULT_EVENTS[result],
            group=group,
            connection=conn.name,
            attempt=pending.attempt,
        )
        if group not in flight.pending:
            return
        if ok:
            self.delivered += 1
            del flight.pending[group]
            record.succ_groups = (*record.succ_groups, group)
        elif (
            flight.on_done is None
            and flight.attempts[group] < IMMEDIATE_ATTEMPTS
            and flight.attempts[group] < record.message.deliver_limit
            and record.message.expired_time > self._now
        ):
            self._offer(flight, group, conn)
        else:
            del flight.pending[group]
            flight.failed.add(group)
        self._maybe_finish(flight)

    def _maybe_finish(self, flight: Flight) -> None:
        if not flight.pending:
            if self._flights.get(flight.record.message_id) is flight:
                del self._flights[flight.record.message_id]
            self._finish(flight)

    def _sync_count(self, flight: Flight) -> None:
        if flight.attempts:
            record = flight.record
            record.deliver_count = max(record.deliver_count, *flight.attempts.values())

    def _finish(self, flight: Flight) -> None:
        record = flight.record
        self._sync_count(flight)
        if flight.on_done is not None:
            flight.on_done(flight)
            return
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
        now = self._now
        if flight.failed:
            message = record.message
            if record.deliver_count >= message.deliver_limit:
                self._dead_letter(flight, "deliver_limit", now)
                return
            record.fail_groups = tuple(sorted(flight.failed))
            record.next_deliver_time = now + redelivery_delay(record.deliver_count)
            if record.next_deliver_time >= message.expired_time:
                # the next window opens after the expiry: it can never be delivered
                self._dead_letter(flight, "expired", now)
                return
            self._history.record(
                record.message_id,
                now,
                "rescheduled",
                detail=f"next attempt after {record.next_deliver_time - now:.0f}s",
            )
            self._history.keep(record.message_id)
        elif not flight.dirty and record.next_deliver_time <= now:
            return  # parked and unchanged: the store already has it due; nothing to write
        else:
            record.next_deliver_time = min(record.next_deliver_time, now)
        self._bookkeeper.reschedule(record, flight.due)

    def _dead_letter(self, flight: Flight, reason: str, now: float) -> None:
        record = flight.record
        if not flight.durable:
            logger.warning("fly message %s not delivered: %s", record.message_id, reason)
            return
        done = set(record.succ_groups)
        groups = sorted(
            {r.group for r in self._bindings.routes(record.topic, record.message.message_type)}
            - done
            | flight.failed
        )
        self.dead_lettered += 1
        logger.info(
            "dead letter id=%s topic=%s reason=%s groups=%s",
            record.message_id,
            record.topic,
            reason,
            groups,
        )
        self._history.record(record.message_id, now, "dead_lettered", detail=reason)
        self._history.keep(record.message_id)
        self._bookkeeper.dead_letter(DeadLetter(record, reason, now, tuple(groups)))

    def _pump(self, group: str) -> None:
        keys = self._keys_of.get(group)
        if not keys:
            return
        if not self._connections.has_consumers(group):
            self._park_waiting(group)
            return
        now = self._mono
        for key in list(keys):
            queue = self._waiting[key]
            bucket = self._limits.get(key)
            while queue and self._inflight < self._max_workers and not self._paused:
                flight = queue[0]
                if (
                    group not in flight.pending
                    or self._flights.get(flight.record.message_id) is not flight
                ):
                    queue.popleft()
                    continue
                conn = self._connections.pick(group, now)
                if conn is None or (bucket is not None and not bucket.take(1)):
                    break
                queue.popleft()
                self._push(flight, group, conn)
            if not queue:
                del self._waiting[key]
                keys.discard(key)
        if not keys:
            del self._keys_of[group]

    def _pump_all(self) -> None:
        for group in list(self._keys_of):
            self._pump(group)

    def _park_waiting(self, group: str) -> None:
        for key in self._keys_of.pop(group, ()):
            for flight in self._waiting.pop(key, ()):
                if (
                    group in flight.pending
                    and self._flights.get(flight.record.message_id) is flight
                ):
                    self._unreachable(flight, group)
                    self._maybe_finish(flight)


_RESULT_EVENTS = {
    "ack": "acked",
    "nack": "nacked",
    "timeout": "timeout",
    "disconnected": "disconnected",
}
