"""Delivery: route each stored message to its groups and push it to one connection of each.

Rules (DESIGN §5):

- every group whose binding matches gets the message once; delivery state is kept per
  (message, group) in ``StoredMessage.groups`` (issue #10): a group that acked has it, and
  one group's attempts, backoff window, deliverLimit or dead letter never decide another
  group's delivery;
- inside a group, one random live connection with credit (its ``maxInFlight`` not used
  up), weighted by warm-up;
- each (topic, group) is held to its binding's watermark (messages per second, token
  bucket with KiteQ's burst of half the rate); a push held back by it, by credits or by
  ``maxDeliverWorkers`` waits in memory and does not use up an attempt;
- an ack settles the group; a nack, a timeout (``deliverySeconds``) or a lost connection
  retries at once (on another connection of the group when there is one) until the
  group has had ``IMMEDIATE_ATTEMPTS`` attempts; after that the group's backoff window
  is set by its own attempt count and the recover scan brings the message back to that
  group (only) once the window has passed;
- a persistent group with no live connection does not use up an attempt: the message
  stays due in the store and the recover scan offers it again (at once when a connection
  of the group opens); a non-persistent group with no live connection is skipped for this
  message, as in KiteQ, and the history says so;
- a group that used up ``deliverLimit`` attempts, or whose next window would open after
  the expiry, dead-letters the message for that group only; an expired message is
  dead-lettered for every group that had not acked it; one that matched no binding for
  longer than ``noBindingRetentionSeconds`` is dead-lettered with no group: nothing is
  dropped silently, nothing is delivered after its expiry;
- a message is never pushed to a group while a push of it to that group is unresolved;
- when every bound group has acked or dead-lettered the message, it is deleted;
- a message with an ordering key (issue #16) is offered to a group only while it heads
  its lane (``kiteq.handler.ordering``): one message of a key in flight per group, in
  store order; a message without a key never touches the lanes.

The store indexes one due time per message: the earliest due time of its pending groups
(``StoredMessage.next_deliver_time``), kept here whenever a group's state changes.

Everything here runs on the event loop and never awaits: store writes go through the
``Bookkeeper``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kiteq.core.clock import Clock
from kiteq.core.message import GroupDelivery, GroupState, StoredMessage
from kiteq.handler.backoff import IMMEDIATE_ATTEMPTS
from kiteq.handler.bookkeeper import Bookkeeper
from kiteq.handler.connection import Connection, ConnectionTable
from kiteq.handler.flight import Flight, Pending, is_parked, unreachable
from kiteq.handler.gauges import GroupGauges, measure
from kiteq.handler.group_backlog import StoredBacklog
from kiteq.handler.history import History
from kiteq.handler.limiter import TokenBucket
from kiteq.handler.ordering import Lanes
from kiteq.handler.settlement import Settlement, bury
from kiteq.handler.tally import DeliveryTally

if TYPE_CHECKING:
    from kiteq.binding.match import BindingTable, Route
    from kiteq.ops.metrics import BrokerMetrics

# waiting messages are keyed by (topic, group): each pair has its own watermark
_Key = tuple[str, str]


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
        self._history = history
        self._clock = clock
        self._timeout = delivery_timeout
        self._max_workers = max_workers
        self._no_binding_retention = no_binding_retention
        self._max_flights = max_flights
        self.tally = DeliveryTally(metrics)
        # what the store holds for each group (loaded at start: BrokerCore.load_backlog)
        self.stored_backlog = StoredBacklog()
        self._settlement = Settlement(
            bindings=bindings,
            bookkeeper=bookkeeper,
            history=history,
            tally=self.tally,
            backlog=self.stored_backlog,
        )
        self._flights: dict[str, Flight] = {}
        # ordered delivery: per (topic, group, key), only the head is offered
        self.lanes = Lanes(clock=clock, history=history, bindings=bindings)
        self._waiting: dict[_Key, deque[Flight]] = {}
        # (topic, group) -> watermark bucket; groups -> their waiting keys
        self._limits: dict[_Key, TokenBucket] = {}
        self._keys_of: dict[str, set[_Key]] = {}
        self._inflight = 0
        # a push waited for maxDeliverWorkers: the next released worker must pump every
        # group, not only the group whose ack released it (that group would keep them all)
        self._starved = False
        # wall and monotonic time, read once per entry point: everything an entry point
        # does happens at one instant, and a clock read per message per step added up
        self._now = clock.now()
        self._mono = clock.monotonic()
        self._paused = False
        self._idle = asyncio.Event()
        self._idle.set()
        # groups that got their first live consumer: the recover scan then reads the
        # messages parked for offline groups too (``parked_until``)
        self.arrivals = 0

    # -- state -------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return self._inflight

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
        """Start delivering *record* (committed) to its groups that are due.

        When the message is already in flight, the groups that are due and not in that
        flight join it (the flight's record is the current state; *record* may be a
        stale store copy): one group's round never holds back another group.

        *durable* False: not stored (fly, deliveryFirst), so no store bookkeeping.
        *on_done*: deliveryFirst; each group gets one attempt, no retry, and *on_done*
        receives the flight when every group has a result (``failed``/``parked`` say
        which groups still need the message).
        """
        message = record.message
        current = self._flights.get(record.message_id)
        self._stamp()
        if current is not None:
            if current.on_done is None:
                self._join(current)
            return
        now = self._now
        if message.deliver_at > now:
            # scheduled (issue #15): stored due at deliver_at; whatever offered it early (a
            # full scan, a redrive, a commit), the recover scan brings it when it is due
            return
        flight = Flight(record, durable, on_done)
        routes = self._bindings.routes(message.topic, message.message_type)
        if message.expired_time <= now:
            self._settlement.expired(flight, routes, now)
            if message.ordering_key:
                self.lanes.finished(record)
            return
        if not routes:
            flight.parked = True
            if on_done is not None:
                on_done(flight)
            elif record.groups or now - record.publish_time <= self._no_binding_retention:
                pass  # no binding (yet): keep it due, never delete on arrival; nothing to write
            else:
                bury(flight, "", "no_binding")
                self._settlement.finish(flight, now)
            return
        self._flights[message.message_id] = flight
        self._admit(flight, routes)
        self._maybe_finish(flight)

    def redriven(self, record: StoredMessage, groups: Sequence[str]) -> None:
        """A redrive made *groups* pending again; *record* is the store's copy after it.

        A message still in flight for other groups has its state in that flight, which
        would otherwise write the redriven groups back as dead when its round ends.
        """
        pending = record.pending_groups()
        self.stored_backlog.changed(
            record.message.topic, record.publish_time, pending - set(groups), pending
        )
        flight = self._flights.get(record.message_id)
        if flight is not None and flight.on_done is None:
            mine = flight.record
            for group in groups:
                state = record.groups.get(group)
                if group and state is not None:
                    mine.groups[group] = GroupDelivery(
                        state.state, state.attempts, state.next_deliver_time
                    )
            mine.only_groups = record.only_groups
            # the store holds them pending now (counted above)
            flight.stored |= pending & set(groups)
            if mine.message.expired_time != record.message.expired_time:
                mine.message = record.message  # a redrive extends a past expiry
                mine.wire = None
            flight.dirty = True
        self.submit(record)

    def acked(
        self,
        conn: Connection,
        results: list[tuple[str, bool]],
        delays: dict[str, float] | None = None,
    ) -> int:
        """Results from *conn*'s client: (message id, processed).

        Only deliveries in flight on *conn* itself are settled: an ack can never settle a
        push to another connection, whatever id it names. Returns how many results named
        no delivery in flight here (late after a timeout, duplicate, or foreign).
        *delays*: message id -> seconds a nack asks the redelivery to wait (issue #17).
        """
        self._stamp()
        stray = 0
        for message_id, ok in results:
            pending = conn.inflight.take(message_id)
            if pending is None:
                stray += 1
                continue
            self._released(1)
            delay = delays.get(message_id, 0.0) if delays else 0.0
            self._settle(pending, conn, ok, "ack" if ok else "nack", delay)
        self._pump_released(conn.group)
        return stray

    def extend(self, conn: Connection, message_ids: list[str]) -> int:
        """*conn*'s client is still handling these: restart their ``deliverySeconds``.

        Returns how many ids named no delivery in flight on *conn*.
        """
        self._stamp()
        deadline = self._mono + self._timeout
        stray = 0
        for message_id in message_ids:
            if not conn.inflight.extend(message_id, deadline):
                stray += 1
        return stray

    def flow(self, conn: Connection, paused: bool) -> None:
        """*conn*'s client paused or resumed its deliveries (its credit counts as zero)."""
        self._stamp()
        conn.paused = paused
        if not paused:
            self._pump(conn.group)

    def connection_opened(self, conn: Connection) -> None:
        self._stamp()
        if conn.consumer:
            if len(self._connections.consumers(conn.group)) == 1:
                self.arrivals += 1
            self._pump(conn.group)

    def connection_closed(self, conn: Connection) -> None:
        """*conn* is gone: its unacked deliveries fail and go to other connections."""
        self._stamp()
        self._connections.remove(conn)
        lost = conn.inflight.clear()
        self._released(len(lost))
        for pending in lost:
            self._settle(pending, conn, False, "disconnected")
        if not self._connections.has_consumers(conn.group):
            self._park_waiting(conn.group)
        self._pump_all()

    def expire(self) -> int:
        """Fail deliveries whose ack did not come within the timeout; returns how many."""
        self._stamp()
        expired = 0
        for conn in self._connections.consumers():
            lost = conn.inflight.expired(self._mono)
            if lost:
                self._released(len(lost))
                expired += len(lost)
                for pending in lost:
                    self._settle(pending, conn, False, "timeout")
                self._pump_released(conn.group)
        return expired

    def tick(self) -> None:
        """Periodic: watermark buckets have refilled, let waiting messages go."""
        self._stamp()
        self._pump_all()

    async def settled(self) -> None:
        """Wait until no delivery is unacknowledged."""
        await self._idle.wait()

    def flush_metrics(self) -> None:
        """Hand the counts gathered since the last call to the metrics."""
        self.tally.flush()

    def group_gauges(self) -> GroupGauges:
        """Per-(topic, group) figures from memory (``kiteq.handler.gauges``)."""
        return measure(
            connections=self._connections,
            flights=self._flights.values(),
            queues=self._waiting,
            stored=self.stored_backlog,
            lanes=self.lanes.gauges(),
            now=self._clock.now(),
        )

    def pause(self) -> None:
        """Start no new push (shutdown); in-flight ones still settle."""
        self._paused = True

    def checkpoint(self) -> int:
        """Write the bookkeeping of every message still in memory (shutdown).

        Acks already received are then not redelivered after a restart. Returns how many.
        """
        self._stamp()
        written = self._settlement.checkpoint(list(self._flights.values()), self._now)
        self._flights.clear()
        self._waiting.clear()
        self._keys_of.clear()
        self.lanes.clear()
        return written

    # -- internals ---------------------------------------------------------------------

    def _stamp(self) -> None:
        self._now = self._clock.now()
        self._mono = self._clock.monotonic()

    def _released(self, n: int) -> None:
        self._inflight -= n
        if not self._inflight:
            self._idle.set()

    def _admit(self, flight: Flight, routes: Sequence[Route]) -> None:
        """Add the groups of *routes* that are due to *flight* and offer it to them.

        A group is due when it has not settled the message (acked, dead-lettered, or left
        out by a redrive's ``only_groups``), is not in this flight already, and its own
        backoff window has passed. A group that used up deliverLimit is dead-lettered.
        """
        record = flight.record
        groups = record.groups
        only = record.only_groups
        limit = record.message.deliver_limit
        now = self._now
        topic = record.message.topic
        keyed = record.message.ordering_key
        for route in routes:
            group = route.group
            if group in flight.pending:
                continue
            if groups or only:
                # a message with delivery history; new messages skip all of this
                if only and group not in only:
                    continue
                state = groups.get(group)
                if state is not None:
                    if state.state is not GroupState.PENDING:
                        continue
                    if state.attempts >= limit:
                        bury(flight, group, "deliver_limit")
                        continue
                    if state.next_deliver_time > now and not is_parked(record, state):
                        flight.deferred = True
                        continue
            if keyed and not self.lanes.admit(record, group):
                flight.deferred = True  # behind its lane's head: read again in its turn
                continue
            flight.pending[group] = route.persistent
            key = (topic, group)
            bucket = self._limits.get(key)
            if route.watermark <= 0:
                if bucket is not None:
                    del self._limits[key]
            elif bucket is None or bucket.rate != route.watermark:
                # KiteQ: rate = watermark, burst = half of it
                self._limits[key] = TokenBucket(route.watermark, route.watermark / 2, self._clock)
            # offering cannot end the flight: that waits for the caller's _maybe_finish
            self._offer(flight, group, None)

    def _join(self, flight: Flight) -> None:
        """The recover scan found a message in flight: offer it to its other due groups."""
        message = flight.record.message
        routes = self._bindings.routes(message.topic, message.message_type)
        if message.expired_time <= self._now:
            return  # the flight's own groups see the expiry when their round ends
        self._admit(flight, routes)
        self._maybe_finish(flight)

    def _offer(self, flight: Flight, group: str, exclude: Connection | None) -> None:
        if not self._connections.has_consumers(group):
            unreachable(flight, group, self._history, self._now)
            return
        key = (flight.record.message.topic, group)
        queue = self._waiting.get(key)
        if not queue and not self._paused:
            if self._inflight < self._max_workers:
                conn = self._connections.pick(group, self._mono, exclude)
                if conn is not None:
                    bucket = self._limits.get(key)
                    if bucket is None or bucket.take(1):
                        self._push(flight, group, conn)
                        return
                    self.tally.held(*key)
            else:
                self._starved = True
        if queue is None:
            queue = self._waiting[key] = deque()
            self._keys_of.setdefault(group, set()).add(key)
        queue.append(flight)

    def _push(self, flight: Flight, group: str, conn: Connection) -> None:
        record = flight.record
        state = record.groups.get(group)
        if state is None:
            attempt = 1
            record.groups[group] = GroupDelivery(GroupState.PENDING, 1)
        else:
            attempt = state.attempts + 1
            state.attempts = attempt
        flight.dirty = True
        conn.inflight.add(flight, self._mono + self._timeout, attempt)
        self._inflight += 1
        self._idle.clear()
        message = record.message
        self.tally.pushed(
            message.topic, group, attempt, self._now - record.publish_time, len(message.body)
        )
        self._history.record(
            record.message_id,
            self._now,
            "delivered",
            group=group,
            connection=conn.name,
            attempt=attempt,
        )
        conn.send_delivery(record, attempt)

    def _settle(
        self, pending: Pending, conn: Connection, ok: bool, result: str, delay: float = 0.0
    ) -> None:
        flight = pending.flight
        group = conn.group
        record = flight.record
        topic = record.message.topic
        self.tally.result(topic, group, result)
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
        state = record.groups[group]
        if ok:
            self.tally.acked(topic, group, self._mono - pending.deadline + self._timeout)
            del flight.pending[group]
            state.state = GroupState.ACKED
        elif (
            flight.on_done is None
            and not delay
            and state.attempts < IMMEDIATE_ATTEMPTS
            and state.attempts < record.message.deliver_limit
            and record.message.expired_time > self._now
        ):
            self._offer(flight, group, conn)
        else:
            del flight.pending[group]
            flight.failed.add(group)
            if flight.on_done is None:
                self._settlement.round_failed(flight, group, state, self._now, delay)
        if ok and record.message.ordering_key:
            # the lane goes on once the ack is durable: written now if the flight goes on
            # (a dead head: when the flight ends and its letter is written)
            if flight.pending and flight.durable:
                self._settlement.write_state(flight)
            self.lanes.ended(record, group)
        self._maybe_finish(flight)

    def _maybe_finish(self, flight: Flight) -> None:
        if not flight.pending:
            record = flight.record
            if self._flights.get(record.message_id) is flight:
                del self._flights[record.message_id]
            self._settlement.finish(flight, self._now)
            if record.message.ordering_key:
                self.lanes.finished(record)

    def _pump_released(self, group: str) -> None:
        """Workers were released by *group*: pump it, and every group if one waited for them."""
        if self._starved and self._inflight < self._max_workers:
            self._starved = False
            self._pump_all()
        else:
            self._pump(group)

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
            while queue and not self._paused:
                if self._inflight >= self._max_workers:
                    self._starved = True
                    break
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
        served = []
        for group in list(self._keys_of):
            if self._inflight >= self._max_workers:
                self._starved = True
                break
            self._pump(group)
            served.append(group)
        # the groups served go to the back: when workers are scarce, the groups that had
        # no turn go first next time, instead of the first group taking every worker
        for group in served:
            keys = self._keys_of.pop(group, None)
            if keys is not None:
                self._keys_of[group] = keys

    def _park_waiting(self, group: str) -> None:
        for key in self._keys_of.pop(group, ()):
            for flight in self._waiting.pop(key, ()):
                if (
                    group in flight.pending
                    and self._flights.get(flight.record.message_id) is flight
                ):
                    unreachable(flight, group, self._history, self._now)
                    self._maybe_finish(flight)


_RESULT_EVENTS = {
    "ack": "acked",
    "nack": "nacked",
    "timeout": "timeout",
    "disconnected": "disconnected",
}
