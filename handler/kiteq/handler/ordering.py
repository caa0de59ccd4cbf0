"""Ordered delivery (issue #16): one lane per (topic, group, ordering key).

A lane holds the stored messages of one key that one group has still to settle, in store
order: ``(publish_time, message_id)`` (the intake makes keyed publish times strictly
increasing, so a batch keeps its order). Its first message is the *head*; only the head
is offered to the group. The head stays the head through nacks, timeouts, lost
connections, backoff windows and parking; it leaves when its group's state is final
(acked, dead-lettered, skipped), and the next message becomes the head.

Only the head of a lane is a flight in memory: the messages behind it are ``(time, id)``
entries, whatever brought them (the intake, the recover scan, a commit, a redrive). When
a message becomes the head, its record is read again from the store by the
``HeadFetcher`` and submitted to the dispatcher; so memory holds one flight per busy lane,
and a backlog of one key costs a few dozen bytes per message. The fetcher reads a new
head only once the store write that settled the previous one has landed: a broker that
crashes after pushing message n+1 never redelivers message n after it.

After a start the lanes are *held*: a keyed message offered for a lane that does not
exist yet is only entered in it, until the recover scan has read the whole due index once
(``release``). Then the lanes hold every stored keyed message (those in a backoff window
are entered by the scan as it skips them), and each lane's earliest one becomes its head:
a later message of a key never overtakes an earlier one across a restart. A binding
change and a takeover hold new lanes again (``hold``) until the next full scan that
started after it: messages stored while a group had no binding, or by a dead broker, are
not in any lane yet. Lanes that exist go on meanwhile.

A committed keyed message is stored due at its expiry (``keyed_due``), as a message parked
for an offline group is: the periodic recover scan, which reads only what is due, never
reads the messages waiting in lanes (the lanes know them; the full scans after a start,
a binding change or a takeover read every record). A head that fails gets its backoff
window as any message does, and the periodic scan brings it back; one that expires in
its lane is read at its expiry and dead-lettered.

Runs on the event loop and never awaits, except the fetcher's task.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from kiteq.core.clock import Clock
from kiteq.core.errors import StoreError
from kiteq.core.message import GroupState, Message, StoredMessage
from kiteq.handler.bookkeeper import Bookkeeper
from kiteq.handler.history import History
from kiteq.store.base import MessageStore

if TYPE_CHECKING:
    from kiteq.binding.match import BindingTable

__all__ = ["HeadFetcher", "LaneGauge", "Lanes", "keyed_due"]

# (topic, group, ordering key)
LaneKey = tuple[str, str, str]
# a message's place in its lane: (publish_time, message_id)
_Place = tuple[float, str]

# heads read from the store per round of the fetcher
_FETCH_BATCH: Final = 200
_RETRY_DELAY: Final = 1.0

logger = logging.getLogger(__name__)


def keyed_due(message: Message) -> float:
    """The due time a committed keyed message is stored with: its expiry; 0.0: not keyed."""
    return float(message.expired_time) if message.ordering_key else 0.0


class _Lane:
    __slots__ = ("head", "queue", "since")

    def __init__(self, head: _Place | None, since: float) -> None:
        # None only while the lanes are held
        self.head = head
        # wall time the head became the head (the age metric)
        self.since = since
        # the messages behind the head, sorted
        self.queue: list[_Place] = []

    def insert(self, place: _Place) -> None:
        queue = self.queue
        if not queue or queue[-1] < place:
            queue.append(place)  # the common case: a newer message of the key
            return
        i = bisect.bisect_left(queue, place)
        if i == len(queue) or queue[i] != place:
            queue.insert(i, place)

    def remove(self, place: _Place) -> None:
        queue = self.queue
        i = bisect.bisect_left(queue, place)
        if i < len(queue) and queue[i] == place:
            del queue[i]


@dataclasses.dataclass(slots=True)
class LaneGauge:
    """One (topic, group)'s lanes, for the metrics."""

    # lanes with messages waiting behind their head
    blocked: int = 0
    # seconds since the oldest current head became the head
    oldest_head_age: float = 0.0
    # messages waiting behind heads (in no flight and with no stored state for the group:
    # only a head is ever pushed), and the publish time of the oldest of them
    waiting: int = 0
    oldest_waiting: float = math.inf


class Lanes:
    """The lanes of every (topic, group, key) with something still to settle."""

    def __init__(self, *, clock: Clock, history: History, bindings: BindingTable) -> None:
        self._clock = clock
        self._history = history
        self._bindings = bindings
        self._lanes: dict[LaneKey, _Lane] = {}
        # message id -> the lanes it heads (one per group)
        self._heads: dict[str, set[LaneKey]] = {}
        self._held = True
        # counts holds: only a full scan that started after the latest one releases
        self.generation = 0
        # heads to read from the store (the fetcher takes them) -> the previous head of
        # their lane, whose settling write must land first ("": none)
        self.wanted: dict[str, str] = {}
        self.wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._lanes)

    @property
    def held(self) -> bool:
        return self._held

    def admit(self, record: StoredMessage, group: str) -> bool:
        """*record* is due for *group*: True when it heads its lane and may be offered.

        Otherwise it is entered in its lane (once) and waits for its turn.
        """
        key = (record.message.topic, group, record.message.ordering_key)
        place = (record.publish_time, record.message_id)
        lane = self._lanes.get(key)
        if lane is None:
            if self._held:
                lane = self._lanes[key] = _Lane(None, 0.0)
                lane.queue.append(place)
                return False
            self._lanes[key] = _Lane(place, self._clock.now())
            self._heads.setdefault(place[1], set()).add(key)
            return True
        if lane.head is not None and lane.head[1] == place[1]:
            return True
        lane.insert(place)
        return False

    def enter(self, record: StoredMessage, *, fetch: bool = True) -> bool:
        """Enter keyed *record* in the lanes of its unsettled groups without offering it.

        True when it heads one of them (none is held): then the caller submits it, or
        with *fetch* the fetcher reads it from the store (the intake had no room; the
        recover scan skips it out of its due time).
        """
        message = record.message
        heads = False
        for route in self._bindings.routes(message.topic, message.message_type):
            group = route.group
            if not record.settled(group) and self.admit(record, group) and not self._held:
                heads = True
        if heads and fetch:
            self._want(record.message_id, "")
        return heads

    def ended(self, record: StoredMessage, group: str) -> None:
        """*record*'s state for *group* is final: its lane goes on with the next message."""
        message = record.message
        key = (message.topic, group, message.ordering_key)
        lane = self._lanes.get(key)
        if lane is None:
            return
        message_id = record.message_id
        if lane.head is None or lane.head[1] != message_id:
            lane.remove((record.publish_time, message_id))
            return
        state = record.groups.get(group)
        now = self._clock.now()
        if state is not None and state.state is GroupState.DEAD:
            self._history.record(
                message_id,
                now,
                "unblocked",
                group=group,
                detail=f"ordering key {message.ordering_key!r} goes on with its next message",
            )
            self._history.keep(message_id)
        self._advance(key, lane, now)

    def finished(self, record: StoredMessage) -> None:
        """*record*'s flight ended: each of its groups whose state is final is done with it."""
        for group, state in record.groups.items():
            if state.state is not GroupState.PENDING:
                self.ended(record, group)

    def gone(self, message_id: str) -> None:
        """A head is no longer in the store (settled elsewhere, cancelled): skip it."""
        now = self._clock.now()
        for key in list(self._heads.get(message_id, ())):
            lane = self._lanes.get(key)
            if lane is not None:
                self._advance(key, lane, now)

    def hold(self) -> None:
        """Lanes that do not exist yet wait for the next full scan (binding change, takeover)."""
        self._held = True
        self.generation += 1

    def release(self, generation: int) -> None:
        """New lanes go: each one's earliest message is its head.

        *generation*: when the full scan that entered the store's keyed messages started.
        """
        if not self._held or generation != self.generation:
            return
        self._held = False
        now = self._clock.now()
        for key, lane in list(self._lanes.items()):
            if lane.head is None:
                self._advance(key, lane, now)

    def clear(self) -> None:
        """Forget every lane (shutdown): the next start rebuilds them from the store."""
        self._lanes.clear()
        self._heads.clear()
        self.wanted.clear()
        self._held = True

    def gauges(self) -> dict[tuple[str, str], LaneGauge]:
        """Per (topic, group): blocked lanes and the age of the oldest head."""
        now = self._clock.now()
        out: dict[tuple[str, str], LaneGauge] = {}
        for (topic, group, _key), lane in self._lanes.items():
            gauge = out.get((topic, group))
            if gauge is None:
                gauge = out[(topic, group)] = LaneGauge()
            if lane.queue and lane.head is not None:
                gauge.blocked += 1
            if lane.head is not None:
                gauge.oldest_head_age = max(gauge.oldest_head_age, now - lane.since)
            if lane.queue:
                gauge.waiting += len(lane.queue)
                gauge.oldest_waiting = min(gauge.oldest_waiting, lane.queue[0][0])
        return out

    def _advance(self, key: LaneKey, lane: _Lane, now: float) -> None:
        old = lane.head
        if old is not None:
            heads = self._heads.get(old[1])
            if heads is not None:
                heads.discard(key)
                if not heads:
                    del self._heads[old[1]]
        if not lane.queue:
            del self._lanes[key]
            return
        place = lane.queue.pop(0)
        lane.head = place
        lane.since = now
        self._heads.setdefault(place[1], set()).add(key)
        self._want(place[1], "" if old is None else old[1])

    def _want(self, message_id: str, after: str) -> None:
        if after or message_id not in self.wanted:
            self.wanted[message_id] = after
        self.wake.set()


class HeadFetcher:
    """Reads new lane heads from the store and submits them to the dispatcher.

    A read may be stale for a message with a store write still settling (another group's
    round of it ended meanwhile): such a head is read again after the bookkeeper's
    writes, as the recover scan does (``Bookkeeper.settled_since``).
    """

    def __init__(
        self,
        *,
        lanes: Lanes,
        store: MessageStore,
        bookkeeper: Bookkeeper,
        submit: Callable[[StoredMessage], None],
        tracking: Callable[[str], bool],
    ) -> None:
        self._lanes = lanes
        self._store = store
        self._bookkeeper = bookkeeper
        self._submit = submit
        self._tracking = tracking

    async def run(self) -> None:
        lanes = self._lanes
        while True:
            await lanes.wake.wait()
            lanes.wake.clear()
            while lanes.wanted:
                await self.fetch_once()

    async def fetch_once(self) -> None:
        """Read and submit up to one batch of the wanted heads."""
        wanted = self._lanes.wanted
        batch = list(itertools.islice(wanted, _FETCH_BATCH))
        after = [a for a in (wanted.pop(mid) for mid in batch) if a]
        # the previous heads' acks (deletes, state writes) are durable first
        await self._bookkeeper.landed(after)
        epoch = self._bookkeeper.scan_started()
        try:
            records = await asyncio.gather(*(self._store.get(mid) for mid in batch))
        except StoreError as exc:
            # nothing is lost: the heads stay wanted, their keys wait (as the bookkeeper)
            logger.warning("reading %d new lane heads failed; retrying: %s", len(batch), exc)
            for message_id in batch:
                wanted.setdefault(message_id, "")
            await asyncio.sleep(_RETRY_DELAY)
            return
        finally:
            self._bookkeeper.scan_finished()
        stale = []
        for message_id, record in zip(batch, records, strict=True):
            if record is None or not record.message.commit:
                self._lanes.gone(message_id)
            elif not self._tracking(message_id) and self._bookkeeper.settled_since(
                message_id, epoch
            ):
                stale.append(message_id)
            else:
                self._submit(record)
        if stale:
            await self._bookkeeper.landed(stale)
            for message_id in stale:
                wanted.setdefault(message_id, "")
