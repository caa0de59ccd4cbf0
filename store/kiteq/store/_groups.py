"""Per-group delivery rules every backend applies the same way (issue #10).

Kept out of the backends so memory, RocksDB and MySQL cannot drift apart on what a
redrive does or on how a record written before per-group state reads today.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from kiteq.core.limits import MAX_EXPIRY_SECONDS
from kiteq.core.message import GroupDelivery, GroupState, StoredMessage

__all__ = ["copy_groups", "failed_groups", "legacy_groups", "redrive_groups"]


def copy_groups(groups: Mapping[str, GroupDelivery]) -> dict[str, GroupDelivery]:
    """A copy whose entries the caller may change without touching *groups*."""
    if not groups:
        # the common case (no attempt recorded yet): no comprehension, no copies
        return {}
    return {g: GroupDelivery(d.state, d.attempts, d.next_deliver_time) for g, d in groups.items()}


def failed_groups(groups: Mapping[str, GroupDelivery]) -> tuple[str, ...]:
    """KiteQ's fail_groups, derived: groups that had an attempt and did not ack, sorted."""
    return tuple(
        sorted(
            g
            for g, d in groups.items()
            if d.state is GroupState.DEAD or (d.state is GroupState.PENDING and d.attempts)
        )
    )


def legacy_groups(
    succ_groups: Iterable[str],
    fail_groups: Iterable[str],
    deliver_count: int,
    next_deliver_time: float,
    dead_groups: Iterable[str] = (),
) -> dict[str, GroupDelivery]:
    """The per-group state of a record written before issue #10.

    Such a record counted attempts and its backoff window per message: a group that
    acked is ``ACKED``; a group that failed is ``PENDING`` with the message's count and
    due time (what it would have had then). *dead_groups* are the groups an old dead
    letter named: ``DEAD`` with the message's count.
    """
    groups = {g: GroupDelivery(GroupState.ACKED) for g in succ_groups}
    for g in fail_groups:
        groups[g] = GroupDelivery(GroupState.PENDING, deliver_count, next_deliver_time)
    for g in dead_groups:
        groups[g] = GroupDelivery(GroupState.DEAD, deliver_count, next_deliver_time)
    return groups


def redrive_groups(
    record: StoredMessage, groups: Iterable[str], now: float, *, still_stored: bool
) -> None:
    """Apply a redrive of *groups* to *record* (changed in place), due at *now*.

    Each group is pending again with 0 attempts. A record still stored keeps serving its
    other groups: its ``only_groups`` (if any) widen to the redriven ones. A record stored
    again is delivered only to the redriven groups, so no other group gets it twice. The
    group ``""`` (a ``no_binding`` letter: no group was bound) lifts that restriction, as
    no group ever had the message. An expiry already past becomes now + 7 days.
    """
    named = set(groups)
    for g in named:
        if g:
            record.groups[g] = GroupDelivery(GroupState.PENDING, 0, now)
    named.discard("")
    if still_stored:
        if record.only_groups:
            record.only_groups = tuple(sorted(named.union(record.only_groups)))
        record.next_deliver_time = min(record.next_deliver_time, now)
    else:
        unrestricted = len(named) < len(set(groups))
        record.only_groups = () if unrestricted else tuple(sorted(named))
        record.next_deliver_time = now
        # the groups that will have it are the redriven ones, all at 0 attempts
        record.deliver_count = max(
            (d.attempts for g, d in record.groups.items() if not record.settled(g)), default=0
        )
    if 0 < record.message.expired_time <= now:
        record.message = dataclasses.replace(
            record.message, expired_time=int(now) + MAX_EXPIRY_SECONDS
        )
