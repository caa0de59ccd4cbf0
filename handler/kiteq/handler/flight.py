"""A message being delivered (``Flight``) and one push of it awaiting its ack (``Pending``).

These are the records the delivery stations pass between them: the dispatcher makes a
flight per message and a ``Pending`` per push, a connection's ledger holds the pushes,
settlement decides what the store keeps when the flight's round ends.

Also the convention for a group parked offline: its due time is the message's expiry; and
what a group with no live connection gets (``unreachable``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from kiteq.core.message import GroupDelivery, GroupState, StoredMessage

if TYPE_CHECKING:
    from kiteq.handler.history import History

__all__ = [
    "Flight",
    "Pending",
    "has_parked",
    "is_parked",
    "parked_until",
    "sync_count",
    "unreachable",
]

_NONE: frozenset[str] = frozenset()


class Flight:
    """A message being delivered: the groups still to settle in this round.

    The per-group attempt counts and due times live in ``record.groups``; a flight only
    holds what this round needs. A plain slotted class: one is made per message, so
    construction cost matters.
    """

    __slots__ = (
        "dead",
        "deferred",
        "dirty",
        "due",
        "durable",
        "failed",
        "on_done",
        "parked",
        "pending",
        "record",
        "stored",
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
        # the groups the store holds a pending state for (kiteq.handler.group_backlog):
        # none for a new message; a record read from the store is the store's copy
        self.stored = record.pending_groups() if record.groups else _NONE
        # group -> persistent, for groups queued or in flight
        self.pending: dict[str, bool] = {}
        # groups whose round ended without an ack (their state says when they go on)
        self.failed: set[str] = set()
        # (group, reason) dead-lettered in this round; None until the first (rare)
        self.dead: list[tuple[str, str]] | None = None
        # a persistent group had no live connection: retry later without using an attempt
        self.parked = False
        # a pending group was not due yet (its own backoff window): not offered this round
        self.deferred = False
        # bookkeeping changed and must be written if the message is not deleted
        self.dirty = False

    @property
    def settled_cleanly(self) -> bool:
        """Every group of this round acked and none waits: the message can be deleted."""
        return not (self.failed or self.parked or self.deferred or self.dead)


@dataclasses.dataclass(slots=True, eq=False)
class Pending:
    """One push of a flight to one connection, awaiting the client's ack."""

    flight: Flight
    deadline: float
    attempt: int


def parked_until(record: StoredMessage) -> float:
    """The due time of a group parked offline: the message's expiry.

    A backoff window never ends there (settlement dead-letters such a group), so this time
    marks the group as parked: due whenever it has a live consumer.
    """
    return float(record.message.expired_time)


def is_parked(record: StoredMessage, state: GroupDelivery) -> bool:
    return state.next_deliver_time == record.message.expired_time


def has_parked(record: StoredMessage) -> bool:
    """True when a pending group of *record* is parked (waits for a live consumer)."""
    return any(
        s.state is GroupState.PENDING and is_parked(record, s) for s in record.groups.values()
    )


def sync_count(record: StoredMessage) -> None:
    """KiteQ's deliver_count column: the highest attempt count of any group."""
    for state in record.groups.values():
        if state.attempts > record.deliver_count:
            record.deliver_count = state.attempts


def unreachable(flight: Flight, group: str, history: History, now: float) -> None:
    """*group* has no live connection: park the message for it, or skip it.

    A persistent group is parked without using an attempt: due again at the expiry, so
    the periodic scan never reads it while the group is away (a backlog of an offline group
    costs nothing); the scan after a group arrives reads parked messages too.
    """
    persistent = flight.pending.pop(group)
    record = flight.record
    state = record.groups.get(group)
    if persistent:
        flight.parked = True
        until = parked_until(record)
        if state is None:
            record.groups[group] = GroupDelivery(GroupState.PENDING, 0, until)
        elif state.next_deliver_time != until:
            state.next_deliver_time = until
        else:
            return
        flight.dirty = True
        return
    # KiteQ: a non-persistent group that is offline is skipped for this message; it
    # counts as settled for that group (GroupState has no separate "skipped").
    if state is None:
        record.groups[group] = GroupDelivery(GroupState.ACKED)
    else:
        state.state = GroupState.ACKED
    flight.dirty = True
    history.record(record.message_id, now, "skipped", group=group, detail="group offline")
    history.keep(record.message_id)
