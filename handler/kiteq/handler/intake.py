"""Accept → validate → persist → store-ack → hand to the dispatcher, for one batch.

The store-ack is only ``OK`` once the store says the message is durable (group commit),
and a refused message gets a code and a reason: nothing is dropped silently.

A batch is published for one group, the session's: a message without a ``group_id`` gets
it, a message naming another group is refused with ``PERMISSION_DENIED`` (it would make
consumers and transaction checks trust a group that never sent it). A store-ack names the
message with the id as the publisher spelled it; the store has its canonical spelling.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from kiteq.core.clock import Clock
from kiteq.core.codes import AckCode, Disposition, code_for
from kiteq.core.config import ClusterConfig
from kiteq.core.errors import MessageRejectedError, StoreError, UnknownTopicError
from kiteq.core.limits import normalize
from kiteq.core.message import Message, StoredMessage
from kiteq.handler.bookkeeper import Bookkeeper
from kiteq.handler.connection import Connection, StoreAck
from kiteq.handler.dispatch import Dispatcher
from kiteq.handler.flight import Flight
from kiteq.handler.history import History
from kiteq.handler.limiter import TokenBucket
from kiteq.handler.schedule import ScheduledTally
from kiteq.handler.transactions import TxManager
from kiteq.store.base import MessageStore, Saved

if TYPE_CHECKING:
    from kiteq.binding.match import BindingTable
    from kiteq.ops.metrics import BrokerMetrics

logger = logging.getLogger(__name__)

_NONE: frozenset[str] = frozenset()
# keyed publish times step by at least this (a float near 1.7e9 resolves 0.24 us)
_KEYED_STEP: Final = 1e-6


class Intake:
    def __init__(
        self,
        *,
        config: ClusterConfig,
        store: MessageStore,
        bookkeeper: Bookkeeper,
        dispatcher: Dispatcher,
        transactions: TxManager,
        history: History,
        clock: Clock,
        server_name: str,
        metrics: BrokerMetrics | None = None,
        routes: BindingTable | None = None,
        scheduled: ScheduledTally | None = None,
    ) -> None:
        self._config = config
        self._scheduled = scheduled
        self._store = store
        self._bookkeeper = bookkeeper
        self._dispatcher = dispatcher
        self._transactions = transactions
        self._check_delay = config.tx_check_delay_seconds
        self._history = history
        self._clock = clock
        self._server_name = server_name
        self._metrics = metrics
        self._routes = routes
        rate = config.recieve_permits_per_second
        self._limiter = TokenBucket(rate, rate / 2, clock)
        self._last_keyed = 0.0
        self._accepting = True
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.received = 0
        self.rejected = 0
        # refused messages by reason since the last log summary (kiteq.broker.logs)
        self.refusals: Counter[str] = Counter()
        # stored messages left to the recover scan because the dispatcher was full, by topic
        self.left_to_scan: Counter[str] = Counter()

    @property
    def active(self) -> int:
        """Publish batches being handled (validated, stored or acked)."""
        return self._active

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_accepting(self) -> None:
        """From now on every publish is refused with the retriable NOT_SERVING."""
        self._accepting = False

    async def drained(self) -> None:
        """Wait until no publish is between validation and its store-ack."""
        await self._idle.wait()

    async def publish(
        self,
        messages: Sequence[Message],
        *,
        group: str,
        wires: Sequence[object] | None = None,
        origin: Connection | None = None,
    ) -> list[StoreAck]:
        """Accept a batch that *group* (the authenticated session's) publishes.

        Returns one outcome per message, in order. *wires*, when given, are the
        transport's encodings of *messages* (same order); they ride along with the stored
        records so a push need not rebuild them.
        """
        self._active += 1
        self._idle.clear()
        try:
            return await self._publish(messages, group, wires, origin)
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def _publish(
        self,
        messages: Sequence[Message],
        group: str,
        wires: Sequence[object] | None,
        origin: Connection | None,
    ) -> list[StoreAck]:
        outcomes: list[StoreAck | None] = [None] * len(messages)
        if not self._accepting:
            return self._count(
                [
                    StoreAck(m.message_id, AckCode.NOT_SERVING, "broker is shutting down")
                    for m in messages
                ],
                messages,
            )
        now = self._clock.now()
        granted = self._limiter.take(len(messages))
        records: list[StoredMessage] = []
        positions: list[int] = []
        fly: list[StoredMessage] = []
        for i, raw in enumerate(messages):
            if i >= granted:
                outcomes[i] = StoreAck(
                    raw.message_id, AckCode.OVERFLOW, "receive rate exceeded; retry later"
                )
                continue
            admitted = self._admit(raw, group, now)
            if isinstance(admitted, StoreAck):
                outcomes[i] = admitted
                continue
            message = admitted
            record = self._record(message, now, None if wires is None else wires[i])
            if message.fly:
                outcomes[i] = StoreAck(
                    raw.message_id, AckCode.OK, "fly: not stored", Disposition.FLY
                )
                fly.append(record)
            else:
                records.append(record)
                positions.append(i)
        if self._routes is not None and (records or fly):
            # new message types of regex-bound topics are matched off the event loop
            await self._routes.prepare(
                (r.topic, r.message.message_type) for r in (*records, *fly) if r.message.commit
            )
        if records and self._config.delivery_first:
            records, positions = await self._deliver_first(records, positions, outcomes, messages)
        if records:
            await self._persist(records, positions, outcomes, messages, group, origin)
        for record in fly:
            self._dispatcher.submit(record, durable=False)
        done = [o for o in outcomes if o is not None]
        return self._count(done, messages)

    def _record(self, message: Message, now: float, wire: object) -> StoredMessage:
        publish_time = now
        if message.ordering_key:
            # strictly increasing: a keyed message's place in its lane (the messages of a
            # batch share *now*, and their ids would order them at random)
            publish_time = self._last_keyed = max(now, self._last_keyed + _KEYED_STEP)
        if not message.commit:
            due = now + self._check_delay  # its first transaction check
        elif message.ordering_key:
            # out of the periodic scan's way: its lane knows it (``ordering.keyed_due``)
            due = float(message.expired_time)
        else:
            # a scheduled one is due at its delivery time (the due index keeps it away
            # from every periodic scan until then)
            due = max(now, message.deliver_at)
        return StoredMessage(
            message,
            publish_time=publish_time,
            next_deliver_time=due,
            kite_server=self._server_name,
            wire=wire,
        )

    def _admit(self, raw: Message, group: str, now: float) -> Message | StoreAck:
        """*raw* normalized for storing, or the refusal: another group's, invalid, not served."""
        if raw.group_id != group:
            if raw.group_id:
                return StoreAck(
                    raw.message_id,
                    AckCode.PERMISSION_DENIED,
                    f"a session of group {group!r} cannot publish for group {raw.group_id[:64]!r}",
                )
            raw = dataclasses.replace(raw, group_id=group)
        try:
            message = normalize(raw, now)
            if not self._config.serves(message.topic):
                raise UnknownTopicError(
                    message.message_id, f"topic {message.topic!r} is not served by this broker"
                )
            self._config.acl.check_publish(group, message.topic, raw.message_id)
        except MessageRejectedError as exc:
            return StoreAck(raw.message_id, code_for(exc), exc.reason)
        return message

    async def _deliver_first(
        self,
        records: list[StoredMessage],
        positions: list[int],
        outcomes: list[StoreAck | None],
        messages: Sequence[Message],
    ) -> tuple[list[StoredMessage], list[int]]:
        """deliveryFirst: push before storing; return what still has to be stored.

        A message every group acked on its first push is acknowledged as delivered and never
        stored. The others are stored with the groups that did ack, and the recover scan
        retries the rest; their store-ack is the store's answer. (KiteQ acks such messages
        with status false, so producers resend them: duplicates.)
        """
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future[Flight | None]] = []
        for record in records:
            done: asyncio.Future[Flight | None] = loop.create_future()
            waits.append(done)
            if (
                record.message.commit
                and not record.message.scheduled(record.publish_time)
                and not record.message.ordering_key
            ):
                self._dispatcher.submit(
                    record, durable=False, on_done=functools.partial(_resolve, done)
                )
            else:
                # uncommitted: stored, delivered after the commit; scheduled: stored,
                # delivered by the recover scan when due; keyed: stored first, delivered
                # in its lane's order
                done.set_result(None)
        timeout = self._config.delivery_seconds + 1.0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(asyncio.gather(*waits)), timeout)
        left_records: list[StoredMessage] = []
        left_positions: list[int] = []
        for i, record, wait in zip(positions, records, waits, strict=True):
            flight = wait.result() if wait.done() else None
            if flight is not None and not flight.failed and not flight.parked:
                outcomes[i] = StoreAck(
                    messages[i].message_id,
                    AckCode.OK,
                    "delivered before storing",
                    Disposition.DELIVERED,
                )
                continue
            # not (fully) delivered, or still waiting: store it; its per-group state says
            # which groups acked (never delivered again) and which had an attempt
            if record.message.commit and not record.message.ordering_key:
                record.next_deliver_time = max(self._clock.now(), record.message.deliver_at)
            record.wire = None
            left_records.append(record)
            left_positions.append(i)
        return left_records, left_positions

    async def _persist(
        self,
        records: list[StoredMessage],
        positions: list[int],
        outcomes: list[StoreAck | None],
        messages: Sequence[Message],
        group: str,
        origin: Connection | None,
    ) -> None:
        started = self._clock.monotonic()
        ids = [record.message_id for record in records]
        # the recover scan leaves them alone until the dispatcher has them (below)
        self._bookkeeper.saving(ids)
        try:
            results = await self._store.save(records)
        except StoreError as exc:
            logger.exception("store save failed for %d messages", len(records))
            code = code_for(exc)
            for i in positions:
                outcomes[i] = StoreAck(messages[i].message_id, code, str(exc))
            return
        finally:
            self._bookkeeper.saved(ids)
        if self._metrics is not None:
            done = self._clock.monotonic()
            self._metrics.observe_store("save", done - started, len(records))
            if records:
                # from the batch's arrival (its publish_time), once per topic of the batch
                # weighted by its messages: the acks go out together
                waited = self._clock.now() - records[0].publish_time
                latency = self._metrics.store_ack_latency
                for topic, n in Counter(r.message.topic for r in records).items():
                    latency.observe((topic,), waited, n)
        duplicates: Counter[str] = Counter()
        # every message of the batch is the session's group's (``_admit``): the history of
        # each shares these strings, not a copy per message (100,000 kept in memory)
        uncommitted = f"{group} (uncommitted)"
        for i, record, result in zip(positions, records, results, strict=True):
            sent_id = messages[i].message_id
            if result is Saved.STORED:
                outcomes[i] = StoreAck(sent_id, AckCode.OK, "", Disposition.STORED)
                if record.groups:
                    # deliveryFirst stores the groups that had an attempt
                    self._dispatcher.stored_backlog.changed(
                        record.message.topic, record.publish_time, _NONE, record.pending_groups()
                    )
                self._history.record(
                    record.message_id,
                    record.publish_time,
                    "published",
                    detail=group if record.message.commit else uncommitted,
                )
                self._hand_on(record, origin)
            elif result is Saved.DUPLICATE:
                outcomes[i] = StoreAck(
                    sent_id,
                    AckCode.OK,
                    "duplicate: stored or delivered already",
                    Disposition.DUPLICATE,
                )
                duplicates[record.topic] += 1
            else:
                outcomes[i] = StoreAck(sent_id, code_for(result), str(result))
        if self._metrics is not None:
            for topic, n in duplicates.items():
                self._metrics.duplicates(topic, n)

    def _hand_on(self, record: StoredMessage, origin: Connection | None) -> None:
        """A stored message goes to its next station: transactions, schedule, dispatch."""
        if not record.message.commit:
            self._transactions.track(record, origin)
        elif record.message.scheduled(record.publish_time):
            # stored due at its delivery time: the recover scan delivers it then
            if self._scheduled is not None:
                self._scheduled.stored(record, record.publish_time)
        elif record.message.ordering_key:
            # behind its lane's head it is only an entry (read again in its turn); a head
            # with no room in memory is read again by the fetcher
            room = self._dispatcher.has_room
            if self._dispatcher.lanes.enter(record, fetch=not room) and room:
                self._dispatcher.submit(record)
        elif not self._config.delivery_first:
            if self._dispatcher.has_room:
                self._dispatcher.submit(record)
            else:
                # memory-bound: stored and due, the recover scan brings it (said in
                # the broker's periodic summary, not silently)
                self.left_to_scan[record.topic] += 1

    def _count(self, outcomes: list[StoreAck], messages: Sequence[Message]) -> list[StoreAck]:
        ok = sum(1 for o in outcomes if o.ok)
        self.received += ok
        self.rejected += len(outcomes) - ok
        if self._metrics is not None:
            # one labelled update per (topic, result) and batch, not per message
            tally: Counter[tuple[str, AckCode]] = Counter(
                (m.topic, o.code) for m, o in zip(messages, outcomes, strict=True)
            )
            for (topic, code), n in tally.items():
                if code is AckCode.OK:
                    self._metrics.received(topic, n)
                else:
                    self._metrics.rejected(topic, code.metric_reason, n)
                    self.refusals[code.metric_reason] += n
            sizes: Counter[str] = Counter()
            for m, o in zip(messages, outcomes, strict=True):
                if o.ok:
                    sizes[m.topic] += len(m.body)
            for topic, n in sizes.items():
                self._metrics.received_bytes(topic, n)
        return outcomes


def _resolve(done: asyncio.Future[Flight | None], flight: Flight) -> None:
    if not done.done():
        done.set_result(flight)
