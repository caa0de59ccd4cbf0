"""The producer's accumulator: sends from any thread, until the sender takes them.

``prepare`` validates in the caller's thread (bad input fails before anything is sent);
``submit`` appends to the inbox (a list under a threading.Lock; the writer is woken only
when it goes from empty to non-empty, or fills a batch). The sender's task drains the
inbox on the loop: a ``DeadlineGroup`` (one timer) per drain, and sends of a message id
already in flight follow that send instead of being sent again (dedupe). ``settle``
resolves a send and everything the accumulator counts for it.

Unacknowledged sends are bounded (``max_pending``) by two counters instead of a
semaphore, whose release wakes a blocked sender once per message: senders count under
the inbox lock, the loop thread counts resolutions and wakes blocked senders once per
loop iteration (sync senders through a condition on the inbox lock, async ones through
a future).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Final

from kiteq.client import _tracing
from kiteq.client._channel import Session, fresh_error
from kiteq.client._options import ProducerOptions
from kiteq.client._pool import BrokerPool
from kiteq.core.errors import ClientClosedError, KiteQError, PublishTimeoutError
from kiteq.core.ids import canonical_message_id
from kiteq.core.limits import validate
from kiteq.core.message import Message

__all__ = ["Accumulator", "DeadlineGroup", "Send", "SendResult"]

# What a header adds to the body on the wire, roughly (id, names, numbers, tags).
_HEADER_BYTES: Final = 128


@dataclasses.dataclass(frozen=True, slots=True)
class SendResult:
    """The broker's answer to a successful send: the message is durable.

    Attributes:
        message_id: The id of the stored message.
        broker: The address of the broker that stored it.
        duplicate: The broker had stored this id before (for example a retry of a send
            whose first store-ack was lost), or delivered and deleted it within its
            idempotency window (``dedupWindowSeconds``). Still a success; not delivered
            again.
    """

    message_id: str
    broker: str
    duplicate: bool = False


_Future = asyncio.Future[SendResult] | concurrent.futures.Future[SendResult]


class Send:
    """One send: its message, its future and where it is; the loop's once drained."""

    __slots__ = (
        "attempts",
        "avoid",
        "deadline",
        "done",
        "followers",
        "future",
        "group",
        "last_error",
        "message",
        "session",
        "size",
        "sync",
        "timeout",
    )

    def __init__(self, message: Message, timeout: float, future: _Future, sync: bool) -> None:
        self.message = message
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        # an asyncio future (AsyncProducer) or a concurrent one counted by the sync bound
        self.future = future
        self.sync = sync
        size = len(message.body) + len(message.topic) + len(message.message_type) + _HEADER_BYTES
        if message.properties:
            for key, value in message.properties.items():
                size += len(key) + len(value) + 8
        self.size = size
        self.attempts = 0
        self.done = False
        # the sender's: set while written to this session and not yet acked
        self.session: Session | None = None
        # address that last failed it: the next attempt prefers another broker
        self.avoid = ""
        self.last_error: KiteQError | None = None
        self.group: DeadlineGroup | None = None
        # concurrent sends of the same message id, resolved with this one
        self.followers: list[Send] | None = None

    def resolve(self, outcome: SendResult | KiteQError) -> None:
        """Resolve the future with *outcome* (loop thread)."""
        future = self.future
        # a concurrent future is running (cannot be cancelled); an asyncio one may be
        if self.sync or not future.done():
            if isinstance(outcome, SendResult):
                future.set_result(outcome)
            else:
                # an error instance may be shared by many sends: each waiter gets its own
                future.set_exception(fresh_error(outcome))


class DeadlineGroup:
    """The sends drained from the inbox together share one deadline timer.

    One timer per drain instead of one per message: asyncio's timer heap costs several
    microseconds per entry, a large share of a message's cost in a batch.
    """

    __slots__ = ("remaining", "sends", "timer")

    def __init__(self, sends: list[Send]) -> None:
        self.sends = sends
        self.remaining = len(sends)
        self.timer: asyncio.TimerHandle | None = None


class Accumulator:
    """The inbox, the pending bound, dedupe and the deadlines of one producer's sends.

    Args:
        options: The producer's options.
        pool: Its broker pool (the loop, the state, the fatal error).
        expire: Called (loop thread) for a send whose deadline has passed.
    """

    def __init__(
        self, options: ProducerOptions, pool: BrokerPool, expire: Callable[[Send], None]
    ) -> None:
        self._pool = pool
        self._expire = expire
        self._max_pending = options.max_pending
        self.max_batch = options.max_batch
        self.max_batch_bytes = options.max_batch_bytes
        # any thread, under the lock
        self._lock = threading.Lock()
        self.inbox: list[Send] = []
        self.inbox_bytes = 0
        # the bound: sends submitted (under the lock) minus sends resolved (loop thread)
        # are unacknowledged; blocked senders wait on _room (threads, counted under the
        # lock) or on a future in _room_futures (the loop's tasks)
        self._room = threading.Condition(self._lock)
        self._room_waiters = 0
        self._room_futures: list[asyncio.Future[None]] = []
        self._submitted = 0
        self._resolved = 0
        self._room_wake_pending = False
        # loop thread: the writer's wake-up, drained sends by message id and their count
        self.wake = asyncio.Event()
        self.drained = asyncio.Event()
        self.active: dict[str, Send] = {}
        self.outstanding = 0

    @property
    def pending(self) -> int:
        """Sends not resolved yet, in the inbox or drained."""
        return self.outstanding + len(self.inbox)

    @property
    def waiting_for_room(self) -> int:
        """Sends waiting for room now: blocked threads and the loop's waiting tasks."""
        futures = self._room_futures  # any thread: the loop may swap the list meanwhile
        return self._room_waiters + sum(not room.done() for room in futures)

    @property
    def has_room(self) -> bool:
        """True while fewer than ``max_pending`` sends are unacknowledged."""
        return self._submitted - self._resolved < self._max_pending

    # -- any thread -------------------------------------------------------------------

    def prepare(self, message: Message) -> Message:
        """The message as it is sent: traced, validated, its id canonical.

        Raises:
            TypeError: *message* is not a ``Message``.
            InvalidMessageError: The message is invalid.
            KiteQError: The producer has failed (a copy of its error).
            ClientClosedError: The producer is closed.
        """
        if not isinstance(message, Message):
            raise TypeError(f"expected a kiteq Message, got {type(message).__name__}")
        self._pool.check_accepting()
        # the trace context first, so that the property limits count it
        message = _tracing.publishing(message)
        # the broker applies KiteQ's clamps; the frame carries them too (see publish_frame)
        validate(message, time.time())
        canonical = canonical_message_id(message.message_id)
        if canonical != message.message_id:
            # the broker stores and acks the one spelling; the result and the consumers
            # then name the same id (a copy: the caller's message is left as it is)
            return dataclasses.replace(message, message_id=canonical)
        return message

    def submit(self, send: Send, room_timeout: float = 0.0) -> None:
        """Queue *send* for the writer; a sync send first waits for room (the bound).

        Raises:
            PublishTimeoutError: A sync send found no room within *room_timeout* seconds
                (at once on the loop thread, where waiting would deadlock).
            ClientClosedError: The producer is closed or not started.
        """
        pool = self._pool
        loop = pool.loop
        if loop is None:
            raise ClientClosedError("producer is not started")
        with self._lock:
            pool.check_accepting()
            # an async send has waited for room already (on the loop, so it still has it)
            if send.sync and self._submitted - self._resolved >= self._max_pending:
                self._wait_for_room(room_timeout)
                # its timeout runs from when it is queued, as an async send's does
                send.deadline = time.monotonic() + send.timeout
            self._submitted += 1
            inbox = self.inbox
            inbox.append(send)
            before = self.inbox_bytes
            self.inbox_bytes = before + send.size
            count = len(inbox)
        # wake the writer on the first message, and again when a batch is full
        if (
            count == 1
            or count == self.max_batch
            or before < self.max_batch_bytes <= before + send.size
        ):
            if threading.get_ident() == pool.loop_thread:
                self.wake.set()
            else:
                # RuntimeError: the loop closed meanwhile; close() has failed this send
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self.wake.set)

    def _wait_for_room(self, timeout: float) -> None:
        # any thread, holding self._lock; on the loop thread (a future's callback) waiting
        # would deadlock the loop: no wait at all there
        wait = 0.0 if threading.get_ident() == self._pool.loop_thread else timeout
        deadline = time.monotonic() + wait
        self._room_waiters += 1
        try:
            while self._submitted - self._resolved >= self._max_pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PublishTimeoutError(
                        f"{self._max_pending} sends stayed unacknowledged for {timeout}s"
                    )
                self._room.wait(remaining)
                self._pool.check_accepting()
        finally:
            self._room_waiters -= 1

    def wake_blocked(self) -> None:
        """Wake the threads waiting for room: the producer closes or has failed."""
        with self._lock:
            self._room.notify_all()

    # -- loop thread ------------------------------------------------------------------

    async def wait_for_room(self, timeout: float) -> None:
        """Wait until fewer than ``max_pending`` sends are unacknowledged.

        Raises:
            PublishTimeoutError: Not within *timeout* seconds.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while self._submitted - self._resolved >= self._max_pending:
                    room: asyncio.Future[None] = loop.create_future()
                    self._room_futures.append(room)
                    await room
        except TimeoutError:
            raise PublishTimeoutError(
                f"{self._max_pending} sends stayed unacknowledged for {timeout}s"
            ) from None

    def _wake_room(self) -> None:
        # once per iteration that resolved sends while senders waited
        self._room_wake_pending = False
        futures, self._room_futures = self._room_futures, []
        for room in futures:
            if not room.done():
                room.set_result(None)
        if self._room_waiters:
            with self._lock:
                self._room.notify_all()

    def drain_into(self, ready: collections.deque[Send]) -> None:
        """Move the inbox to *ready*: one deadline timer, followers of sends in flight."""
        with self._lock:
            sends = self.inbox
            if not sends:
                return
            self.inbox = []
            self.inbox_bytes = 0
        group = DeadlineGroup(sends)
        first_deadline = sends[0].deadline
        active = self.active
        self.outstanding += len(sends)
        for send in sends:
            send.group = group
            if send.deadline < first_deadline:
                first_deadline = send.deadline
            message_id = send.message.message_id
            leader = active.get(message_id)
            if leader is None:
                active[message_id] = send
                ready.append(send)
            elif leader.followers is None:
                leader.followers = [send]
            else:
                leader.followers.append(send)
        group.timer = self._call_later(first_deadline, group)

    def _call_later(self, deadline: float, group: DeadlineGroup) -> asyncio.TimerHandle:
        loop = self._pool.loop
        assert loop is not None  # noqa: S101 - drained on the loop: started
        return loop.call_later(deadline - time.monotonic(), self._expire_group, group)

    def _expire_group(self, group: DeadlineGroup) -> None:
        group.timer = None
        now = time.monotonic() + 0.001
        for send in group.sends:
            if not send.done and send.deadline <= now:
                self._expire(send)
        if group.remaining:
            group.sends = [send for send in group.sends if not send.done]
            group.timer = self._call_later(min(send.deadline for send in group.sends), group)

    def settle(self, send: Send, outcome: SendResult | KiteQError) -> None:
        """Resolve *send* and its followers with *outcome* (the sender has released it)."""
        send.done = True
        group = send.group
        if group is not None:
            group.remaining -= 1
            if group.remaining == 0 and group.timer is not None:
                group.timer.cancel()
                group.timer = None
                group.sends = []
        message_id = send.message.message_id
        if self.active.get(message_id) is send:
            del self.active[message_id]
        self.outstanding -= 1
        self._resolved += 1
        if (self._room_waiters or self._room_futures) and not self._room_wake_pending:
            # once for all the sends this iteration resolves, not once per send
            self._room_wake_pending = True
            loop = self._pool.loop
            assert loop is not None  # noqa: S101 - settled on the loop: started
            loop.call_soon(self._wake_room)
        send.resolve(outcome)
        if send.followers is not None:
            for follower in send.followers:
                if not follower.done:
                    self.settle(follower, outcome)
        if not self.outstanding and not self.inbox and self._pool.shut:
            self.drained.set()
