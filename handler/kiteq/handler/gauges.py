"""Per-(topic, group) figures for the metrics, the console and ``kiteq-admin``.

Read from memory only — the dispatcher's flights and queues, the connections' pushes
and the stored-backlog counts — so a metrics update never reads the store.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from kiteq.handler.connection import ConnectionTable
from kiteq.handler.flight import Flight
from kiteq.handler.group_backlog import StoredBacklog
from kiteq.handler.ordering import LaneGauge

__all__ = ["GroupGauges", "measure"]

_Key = tuple[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class GroupGauges:
    """Per (topic, group) figures.

    ``unacked``: pushed, no answer yet. ``waiting``: held in memory (watermark, credits,
    workers). ``backlog``: every message the group has still to settle, in memory or in
    the store. ``oldest``: seconds since publish of the oldest of those (a stored one to
    ``group_backlog.BUCKET_SECONDS``). ``lanes``: the ordering keys' figures
    (``Lanes.gauges``), read once for both.
    """

    unacked: Mapping[_Key, int]
    waiting: Mapping[_Key, int]
    backlog: Mapping[_Key, int]
    oldest: Mapping[_Key, float]
    lanes: Mapping[_Key, LaneGauge]


def measure(
    *,
    connections: ConnectionTable,
    flights: Iterable[Flight],
    queues: Mapping[_Key, Sequence[Flight]],
    stored: StoredBacklog,
    lanes: Mapping[_Key, LaneGauge],
    now: float,
) -> GroupGauges:
    """Walks the in-flight pushes, the heads of the waiting queues and every flight.

    A flight pending for a group that the store also counts for it (a retry read back
    from the store) is counted once; keyed messages waiting behind their lane's head
    (``kiteq.handler.ordering``) count in the backlog too.
    """
    unacked: Counter[_Key] = Counter()
    oldest: dict[_Key, float] = stored.oldest_ages(now)
    for conn in connections.consumers():
        for pending in conn.inflight:
            record = pending.flight.record
            key = (record.message.topic, conn.group)
            unacked[key] += 1
            oldest[key] = max(oldest.get(key, 0.0), now - record.publish_time)
    waiting: dict[_Key, int] = {}
    for key, queue in queues.items():
        if queue:
            waiting[key] = len(queue)
            oldest[key] = max(oldest.get(key, 0.0), now - queue[0].record.publish_time)
    backlog: Counter[_Key] = Counter(stored.counts())
    for key, lane in lanes.items():
        if lane.waiting:
            backlog[key] += lane.waiting
            oldest[key] = max(oldest.get(key, 0.0), now - lane.oldest_waiting)
    for flight in flights:
        topic = flight.record.message.topic
        stored_groups = flight.stored
        for group in flight.pending:
            if group not in stored_groups:
                backlog[(topic, group)] += 1
    return GroupGauges(dict(unacked), waiting, dict(backlog), oldest, lanes)
