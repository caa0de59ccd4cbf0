"""The producer's sender: routing, batching, sends in flight, retries, store-acks.

Its task (``run``) lingers (only while earlier batches await their acks), drains the
accumulator and writes one ``PublishBatch`` per batch to a random open session serving
the topic (KiteQ's clamps applied there). Store-acks resolve sends by message id; a
retriable refusal or a lost stream re-queues the same message (same id) with backoff,
preferring another broker. A send waits ("parked") while its topic's brokers are looked
up or not connected yet, until its deadline. A message with an ordering key goes to its
key's broker instead (``_affinity.rank``): the first in the key's ranking that has a
session, waiting for one whose first connection attempt is still running, passing over
one that is down. Loop thread only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from typing import Final

from kiteq.client import _wire
from kiteq.client._accumulator import Accumulator, Send, SendResult
from kiteq.client._affinity import rank
from kiteq.client._channel import Session, backoff_delay
from kiteq.client._options import ProducerOptions
from kiteq.client._pool import BrokerPool
from kiteq.core.errors import ClientClosedError, KiteQError, NotConnectedError, PublishTimeoutError

__all__ = ["Sender"]

logger = logging.getLogger(__name__)

_RETRY_BASE: Final = 0.1
_RETRY_MAX: Final = 2.0


class Sender:
    """Writes a producer's sends as batches and resolves them by store-ack.

    Args:
        options: The producer's options.
        pool: Its broker pool.
    """

    def __init__(self, options: ProducerOptions, pool: BrokerPool) -> None:
        self._pool = pool
        self._directory = pool.directory
        self._group_id = options.group_id
        self._linger = options.linger
        self._retries = options.retries
        self.accumulator = Accumulator(options, pool, self._expire)
        self._ready: collections.deque[Send] = collections.deque()
        self._parked: list[Send] = []
        self._unacked = 0  # written, store-ack not yet received
        self._topic_brokers: dict[str, tuple[str, ...]] = {}

    # -- the writer task ----------------------------------------------------------------

    def _should_linger(self) -> bool:
        # Nagle-style: a batch waits only while earlier ones await their acks, so one
        # send() at a time is not slowed down by the linger
        acc = self.accumulator
        return (
            self._linger > 0
            and self._unacked > 0
            and len(acc.inbox) < acc.max_batch
            and acc.inbox_bytes < acc.max_batch_bytes
            and not self._pool.shut
        )

    async def run(self) -> None:
        """Linger, drain the accumulator, write; whenever woken (the writer task)."""
        wake = self.accumulator.wake
        while True:
            await wake.wait()
            wake.clear()
            if self._should_linger():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._linger):
                        while self._should_linger():
                            await wake.wait()
                            wake.clear()
            self.accumulator.drain_into(self._ready)
            await self._write_ready()

    async def _write_ready(self) -> None:
        ready = self._ready
        while ready:
            head = ready[0]
            if head.done:
                ready.popleft()
                continue
            session = self._route(head)
            if session is None:
                continue
            batch = self._take_batch(session)
            if not batch:
                continue
            self._unacked += len(batch)
            for send in batch:
                send.session = session
                send.attempts += 1
            try:
                await session.publish([send.message for send in batch], self._group_id)
            except KiteQError as exc:
                # the session's reader reports the loss too; re-queueing is idempotent
                logger.debug("publish write failed broker=%s error=%s", session.address, exc)
                if not session.alive:
                    self.requeue_session(session, exc)

    def _route(self, head: Send) -> Session | None:
        # the session for the head of the queue; None: it was parked or failed
        topic = head.message.topic
        live = self._directory.live
        if live and not self._directory.watching(topic):
            # a live registry: the topic's brokers are looked up once, then followed
            self._parked.append(self._ready.popleft())
            self._pool.discover(topic, self._group_id)
            return None
        addresses = self._brokers_for(topic)
        if not addresses:
            send = self._ready.popleft()
            if live:
                # none registered right now: wait for one to appear (or the deadline)
                self._parked.append(send)
            else:
                self.finish(send, NotConnectedError(f"no broker serves topic {topic!r}"))
            return None
        session = self._pick(head, addresses)
        if session is None:
            # not connected yet: wait for on_opened (or the deadline)
            self._parked.append(self._ready.popleft())
            self._pool.dial(addresses)
        return session

    def _brokers_for(self, topic: str) -> tuple[str, ...]:
        if self._directory.live:
            return tuple(self._directory.brokers_for(topic))
        addresses = self._topic_brokers.get(topic)
        if addresses is None:
            addresses = tuple(self._directory.brokers_for(topic))
            self._topic_brokers[topic] = addresses
        return addresses

    def _pick(self, send: Send, addresses: tuple[str, ...]) -> Session | None:
        if send.message.ordering_key:
            return self._pick_keyed(send.message.ordering_key, addresses)
        sessions = self._pool.sessions
        if self._directory.static:
            candidates = [s for s in sessions.values() if s.alive]
        else:
            candidates = [s for a in addresses if (s := sessions.get(a)) is not None and s.alive]
        if len(candidates) > 1 and send.avoid:
            candidates = [s for s in candidates if s.address != send.avoid] or candidates
        if not candidates:
            return None
        return candidates[0] if len(candidates) == 1 else random.choice(candidates)  # noqa: S311

    def _pick_keyed(self, key: str, addresses: tuple[str, ...]) -> Session | None:
        # the same broker for a key from every producer (a retry's ``avoid`` is ignored)
        sessions = self._pool.sessions
        links = self._pool.links
        for address in rank(key, addresses):
            session = sessions.get(address)
            if session is not None and session.alive:
                return session
            link = links.get(address)
            if link is None or not link.attempted.is_set():
                return None  # still connecting: wait rather than reorder the key
        return None

    def _take_batch(self, session: Session) -> list[Send]:
        limits = session.limits
        acc = self.accumulator
        max_count = min(acc.max_batch, limits.max_batch_messages or acc.max_batch)
        max_bytes = min(acc.max_batch_bytes, limits.max_batch_bytes or acc.max_batch_bytes)
        ready = self._ready
        any_broker = self._directory.static
        batch: list[Send] = []
        skipped: list[Send] = []
        total = 0
        while ready and len(batch) < max_count:
            send = ready[0]
            if send.done:
                ready.popleft()
                continue
            if batch and total + send.size > max_bytes:
                break
            ready.popleft()
            message = send.message
            if message.ordering_key:
                mine = self._pick_keyed(message.ordering_key, self._brokers_for(message.topic))
                fits = mine is session
            else:
                fits = any_broker or session.address in self._brokers_for(message.topic)
            if fits:
                batch.append(send)
                total += send.size
            else:
                skipped.append(send)
        ready.extendleft(reversed(skipped))
        return batch

    def release_parked(self) -> None:
        """Sessions or brokers changed: the parked sends go again."""
        if self._parked:
            self._ready.extendleft(reversed(self._parked))
            self._parked.clear()
            self.accumulator.wake.set()

    # -- outcomes -----------------------------------------------------------------------

    def finish(self, send: Send, outcome: SendResult | KiteQError) -> None:
        """Resolve *send* with *outcome*, once; it is no longer in flight."""
        if send.done:
            return
        if send.session is not None:
            send.session = None
            self._unacked -= 1
        self.accumulator.settle(send, outcome)

    def _expire(self, send: Send) -> None:
        if send.done:
            return
        if send.session is not None:
            error: KiteQError = PublishTimeoutError(
                f"no store-ack for message {send.message.message_id} from broker "
                f"{send.session.address} within {send.timeout}s"
            )
        elif send.last_error is not None:
            error = send.last_error
        else:
            error = self._unreachable(send)
        self.finish(send, error)

    def _unreachable(self, send: Send) -> NotConnectedError:
        links = self._pool.links
        reasons = [
            str(link.last_error)
            for a in self._brokers_for(send.message.topic)
            if (link := links.get(a)) is not None and link.last_error is not None
        ]
        if not reasons and self._pool.registry_error is not None:
            reasons = [str(self._pool.registry_error)]
        return NotConnectedError(
            f"no broker reachable for topic {send.message.topic!r} within {send.timeout}s"
            + (f" ({reasons[0]})" if reasons else "")
        )

    def _retry(self, send: Send, error: KiteQError, *, delay: float) -> None:
        if send.session is not None:
            send.session = None
            self._unacked -= 1
        send.last_error = error
        if not error.retriable or send.attempts > self._retries:
            self.finish(send, error)
        elif delay <= 0:
            self._requeue(send)
        else:
            loop = self._pool.loop
            assert loop is not None  # noqa: S101 - acked on the loop: started
            loop.call_later(delay, self._requeue, send)

    def _requeue(self, send: Send) -> None:
        if send.done:
            return
        self._ready.appendleft(send)
        self.accumulator.wake.set()

    def requeue_session(self, session: Session, reason: KiteQError) -> None:
        """*session* ended: what it had not acked goes again, in order, to another broker."""
        error = NotConnectedError(
            f"stream to broker {session.address} lost before the store-ack ({reason})"
        )
        active = self.accumulator.active.values()
        lost = [s for s in active if s.session is session and not s.done]
        # re-queued in their original order, ahead of newer sends
        for send in reversed(lost):
            send.avoid = session.address
            self._retry(send, error, delay=0)

    def fail_all(self, error: KiteQError) -> None:
        """Resolve every send not resolved yet with *error*."""
        acc = self.accumulator
        acc.drain_into(self._ready)
        for send in list(acc.active.values()):
            if not send.done:
                self.finish(send, error)
        self._ready.clear()
        self._parked.clear()

    async def flush(self, timeout: float) -> None:
        """Wait at most *timeout* seconds for the pending sends; then fail what is left."""
        acc = self.accumulator
        acc.wake.set()
        if acc.pending:
            try:
                async with asyncio.timeout(timeout):
                    await acc.drained.wait()
            except TimeoutError:
                logger.warning(
                    "producer closing with %d sends unacknowledged after %.1fs",
                    acc.pending,
                    timeout,
                )
        self.fail_all(ClientClosedError("producer closed before the store-ack"))

    def on_store_acks(self, session: Session, results: list[_wire.StoreResult]) -> None:
        """Resolve sends by message id."""
        active = self.accumulator.active
        address = session.address
        finish = self.finish
        for message_id, error, duplicate in results:
            send = active.get(message_id)
            if send is None or send.done:
                continue  # late ack after a timeout, or a second ack after a retry
            if error is None:
                finish(send, SendResult(message_id, address, duplicate))
            elif send.session is session:
                if isinstance(error, NotConnectedError):
                    send.avoid = address
                delay = min(_RETRY_BASE * 2 ** max(send.attempts - 1, 0), _RETRY_MAX)
                self._retry(send, error, delay=backoff_delay(delay))
        if self._unacked == 0 and (self.accumulator.inbox or self._ready):
            self.accumulator.wake.set()
