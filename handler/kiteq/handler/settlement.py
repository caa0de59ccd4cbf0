"""What the store keeps when a flight's round ends: delete, reschedule or dead-letter.

The dispatcher decides, per push, whether a group acked, retries at once, or ended its
round; here a group's ended round becomes a backoff window or a dead letter, and a flight
whose groups all ended becomes one store write through the ``Bookkeeper``:

- every group of the round acked and none waits → delete;
- a group waits (backoff window, parked offline, not yet due) → reschedule to the earliest
  due time of the pending bound groups, and only when something changed;
- groups dead-lettered → their letters, with the message kept when another group still
  needs it.

Runs on the event loop and never awaits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kiteq.core.message import GroupDelivery, GroupState
from kiteq.handler.backoff import redelivery_delay
from kiteq.handler.bookkeeper import Bookkeeper
from kiteq.handler.flight import Flight, sync_count
from kiteq.handler.group_backlog import StoredBacklog
from kiteq.handler.history import History
from kiteq.handler.tally import DeliveryTally
from kiteq.store.base import DeadLetter

if TYPE_CHECKING:
    from kiteq.binding.match import BindingTable, Route

__all__ = ["Settlement", "bury"]

_DELETED: frozenset[str] = frozenset()

logger = logging.getLogger(__name__)


def bury(flight: Flight, group: str, reason: str) -> None:
    """Dead-letter the message for *group*; the letter is written when the round ends."""
    if flight.dead is None:
        flight.dead = []
    flight.dead.append((group, reason))
    flight.dirty = True
    if group:
        state = flight.record.groups.get(group)
        if state is None:
            flight.record.groups[group] = GroupDelivery(GroupState.DEAD)
        else:
            state.state = GroupState.DEAD


class Settlement:
    def __init__(
        self,
        *,
        bindings: BindingTable,
        bookkeeper: Bookkeeper,
        history: History,
        tally: DeliveryTally,
        backlog: StoredBacklog,
    ) -> None:
        self._bindings = bindings
        self._bookkeeper = bookkeeper
        self._history = history
        self._tally = tally
        self._backlog = backlog

    def round_failed(
        self, flight: Flight, group: str, state: GroupDelivery, now: float, delay: float = 0.0
    ) -> None:
        """*group* used its immediate attempts or asked for *delay*: a window, or a letter.

        The window is the later of *delay* and the group's own backoff.
        """
        record = flight.record
        message = record.message
        if state.attempts >= message.deliver_limit:
            bury(flight, group, "deliver_limit")
            return
        due = now + max(delay, redelivery_delay(state.attempts))
        if due >= message.expired_time:
            # the group's next window opens after the expiry: it can never have it
            bury(flight, group, "expired")
            return
        state.next_deliver_time = due
        if flight.durable:
            self._history.record(
                record.message_id,
                now,
                "rescheduled",
                group=group,
                attempt=state.attempts,
                detail=f"next attempt after {due - now:.0f}s",
            )
            self._history.keep(record.message_id)

    def expired(self, flight: Flight, routes: Sequence[Route], now: float) -> None:
        """Dead-letter an expired message for every group that had not acked it.

        That includes bound groups never attempted; a message no group was ever bound to
        gets one letter with no group.
        """
        record = flight.record
        names = {route.group for route in routes}
        names.update(g for g, d in record.groups.items() if d.state is GroupState.PENDING)
        unsettled = sorted(g for g in names if not record.settled(g))
        if unsettled:
            for group in unsettled:
                bury(flight, group, "expired")
        elif not names:
            bury(flight, "", "expired")
        self.finish(flight, now)

    def finish(self, flight: Flight, now: float) -> None:
        """Every group of the round has a result: write what the store must keep."""
        record = flight.record
        if flight.on_done is not None:
            sync_count(record)
            flight.on_done(flight)
            return
        if not flight.durable:
            if flight.failed or flight.parked or flight.dead:
                logger.warning(
                    "fly message not delivered to every group id=%s failed=%s dead=%s",
                    record.message_id,
                    sorted(flight.failed),
                    flight.dead or [],
                )
            return
        if flight.settled_cleanly:
            # the common case: every group this round was for acked, none is waiting
            self._bookkeeper.delete(record)
            if flight.stored:
                self._wrote(flight, _DELETED)
            return
        due = self._earliest_due(flight)
        keep = due != math.inf
        # a group due already keeps the message's place in the due order
        next_due = due if due > now else min(record.next_deliver_time, now)
        sync_count(record)
        if flight.dead:
            if keep:
                record.next_deliver_time = next_due
            self.dead_letter(flight, flight.dead, now, keep)
            self._wrote(flight, record.pending_groups() if keep else _DELETED)
            return
        if not keep:
            self._bookkeeper.delete(record)
            self._wrote(flight, _DELETED)
            return
        if not flight.dirty and next_due == flight.due:
            return  # parked and unchanged: the store already has it so; nothing to write
        record.next_deliver_time = next_due
        self._bookkeeper.reschedule(record, flight.due)
        self._wrote(flight, record.pending_groups())

    def write_state(self, flight: Flight) -> None:
        """Write *flight*'s per-group state now, while other groups are still in it.

        (A group acked a keyed message: its lane goes on once the ack is durable.)
        """
        record = flight.record
        sync_count(record)
        self._bookkeeper.reschedule(record, flight.due)
        self._wrote(flight, record.pending_groups())

    def checkpoint(self, flights: Sequence[Flight], now: float) -> int:
        """Write the bookkeeping of *flights* still in memory (shutdown); how many written."""
        dirty = [f for f in flights if f.dirty and f.durable]
        for flight in dirty:
            sync_count(flight.record)
            if flight.dead:
                # groups dead-lettered while others were in flight: their letters and the
                # state go together, or the groups would be dead with no letter
                self.dead_letter(flight, flight.dead, now, keep=True)
            else:
                self._bookkeeper.reschedule(flight.record, flight.due)
            self._wrote(flight, flight.record.pending_groups())
        return len(dirty)

    def dead_letter(
        self, flight: Flight, dead: list[tuple[str, str]], now: float, keep: bool
    ) -> None:
        record = flight.record
        letters = []
        for group, reason in dead:
            # counted and summarised periodically (kiteq.broker.logs), not a line each
            self._tally.buried(record.topic, group, reason)
            logger.debug(
                "dead letter id=%s topic=%s group=%s reason=%s",
                record.message_id,
                record.topic,
                group,
                reason,
            )
            self._history.record(
                record.message_id, now, "dead_lettered", group=group, detail=reason
            )
            letters.append(DeadLetter(record, reason, now, group=group, keep=keep))
        self._history.keep(record.message_id)
        self._bookkeeper.dead_letter(letters)

    def _wrote(self, flight: Flight, after: frozenset[str]) -> None:
        """A write of *flight*'s record leaves the store with *after* pending groups."""
        record = flight.record
        self._backlog.changed(record.message.topic, record.publish_time, flight.stored, after)
        flight.stored = after

    def _earliest_due(self, flight: Flight) -> float:
        """The message-level due time: the earliest of its pending bound groups.

        A group without state (e.g. parked before its first push) is due at once.
        """
        record = flight.record
        message = record.message
        due = math.inf
        for route in self._bindings.routes(message.topic, message.message_type):
            group = route.group
            if record.settled(group):
                continue
            state = record.groups.get(group)
            due = min(due, 0.0 if state is None else state.next_deliver_time)
        return due
