"""Explicit answers to deliveries: ``ack()``, ``nack(delay=...)``, ``in_progress()``.

A ``Ticket`` is one delivery handed to user code (iteration, or a handler in
``AckMode.MANUAL``). The consumer's ``Ledger`` decides whether an answer may still go to
the broker: a settled ticket ignores further answers (a double ack is a no-op), a ticket
whose session ended or whose ``deliverySeconds`` passed raises ``DeliveryExpiredError``
(the broker redelivers it), a closed consumer raises ``ClientClosedError``. Answers may
come from any task or thread, in any order; the ledger hands them to the consumer's ack
writer through *sink*, which is thread-safe.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping

from kiteq.client import _wire
from kiteq.client._channel import Session, check_positive
from kiteq.core.errors import ClientClosedError, DeliveryExpiredError, KiteQError
from kiteq.core.message import ReceivedMessage

__all__ = ["AckMode", "AckWriter", "AsyncDelivery", "Delivery", "Ledger", "Ticket"]

logger = logging.getLogger(__name__)

_FEEDBACK_CHARS = 512


class AckMode(enum.Enum):
    """How deliveries handed to a handler are answered."""

    # the handler's return value: True/None acks, False or an exception nacks
    AUTO = "auto"
    # the handler (or the iterating code) calls ack()/nack()/in_progress() itself
    MANUAL = "manual"


class _State(enum.Enum):
    OPEN = "open"
    SETTLED = "settled"


class Ticket:
    """One delivery awaiting its answer (a plain slotted class: one per message)."""

    __slots__ = ("deadline", "message", "session", "state")

    def __init__(self, session: Session, message: ReceivedMessage, deadline: float) -> None:
        self.session = session
        self.message = message
        self.deadline = deadline
        self.state = _State.OPEN


Sink = Callable[[Session, _wire.DeliveryResult], None]


class Ledger:
    """The consumer's open tickets; thread-safe."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._lock = threading.Lock()
        self._closed = False
        self.open = 0

    def issue(self, session: Session, message: ReceivedMessage) -> Ticket:
        """A ticket for *message*, just delivered on *session*."""
        seconds = session.limits.delivery_seconds
        deadline = time.monotonic() + seconds if seconds else float("inf")
        with self._lock:
            self.open += 1
        return Ticket(session, message, deadline)

    def close(self) -> None:
        """The consumer closed: later answers raise ClientClosedError."""
        with self._lock:
            self._closed = True

    def answer(self, ticket: Ticket, result: _wire.DeliveryResult) -> None:
        """Send *result* for *ticket* (a settlement, or an in-progress extension).

        Raises:
            ClientClosedError: The consumer is closed (the broker redelivers the message).
            DeliveryExpiredError: The session ended or ``deliverySeconds`` passed.
        """
        settle = result.action == _wire.SETTLE
        with self._lock:
            if ticket.state is _State.SETTLED:
                return  # answered already: a double ack (or ack after nack) changes nothing
            message = ticket.message
            if self._closed:
                raise ClientClosedError(
                    f"consumer is closed: message {message.message_id} is redelivered"
                )
            now = time.monotonic()
            if not ticket.session.alive or now > ticket.deadline:
                ticket.state = _State.SETTLED
                self.open -= 1
                raise DeliveryExpiredError(
                    f"delivery of message {message.message_id} (attempt {message.attempt}) "
                    "expired: its session ended or deliverySeconds passed; the broker "
                    "redelivers it"
                )
            if settle:
                ticket.state = _State.SETTLED
                self.open -= 1
            else:
                seconds = ticket.session.limits.delivery_seconds
                ticket.deadline = now + seconds if seconds else float("inf")
        self._sink(ticket.session, result)


class _Answerable:
    """What a delivery handed to user code shows: the message and its answers."""

    __slots__ = ("_ledger", "_ticket")

    def __init__(self, ticket: Ticket, ledger: Ledger) -> None:
        self._ticket = ticket
        self._ledger = ledger

    def __repr__(self) -> str:
        m = self._ticket.message
        return f"<{type(self).__name__} {m.topic}/{m.message_type} id={m.message_id}>"

    @property
    def message(self) -> ReceivedMessage:
        """The message as delivered."""
        return self._ticket.message

    @property
    def message_id(self) -> str:
        return self._ticket.message.message_id

    @property
    def topic(self) -> str:
        return self._ticket.message.topic

    @property
    def message_type(self) -> str:
        return self._ticket.message.message_type

    @property
    def body(self) -> bytes:
        return self._ticket.message.body

    @property
    def properties(self) -> Mapping[str, str]:
        return self._ticket.message.properties

    @property
    def attempt(self) -> int:
        """1 for the first delivery of the message to this group, then 2, 3, ..."""
        return self._ticket.message.attempt

    @property
    def settled(self) -> bool:
        """True once acked or nacked (or found expired)."""
        return self._ticket.state is _State.SETTLED

    def _ack(self) -> None:
        self._ledger.answer(self._ticket, _wire.DeliveryResult(self.message_id, True))

    def _nack(self, delay: float, reason: str) -> None:
        check_positive("delay", delay, allow_zero=True)
        feedback = (reason or "nacked")[:_FEEDBACK_CHARS]
        self._ledger.answer(
            self._ticket, _wire.DeliveryResult(self.message_id, False, feedback, float(delay))
        )

    def _in_progress(self) -> None:
        self._ledger.answer(
            self._ticket,
            _wire.DeliveryResult(self.message_id, False, action=_wire.IN_PROGRESS),
        )


class Delivery(_Answerable):
    """A delivery of the blocking ``Consumer``; answer it from any thread, in any order.

    Raises (each answer):
        ClientClosedError: The consumer is closed.
        DeliveryExpiredError: Its session ended or ``deliverySeconds`` passed.
    """

    __slots__ = ()

    def ack(self) -> None:
        """Processed: the broker settles the message for this group. Again: no-op."""
        self._ack()

    def nack(self, *, delay: float = 0, reason: str = "") -> None:
        """Failed: redeliver, no earlier than *delay* seconds from now (0: at once)."""
        self._nack(delay, reason)

    def in_progress(self) -> None:
        """Still working: restart this delivery's ``deliverySeconds``."""
        self._in_progress()


class AsyncDelivery(_Answerable):
    """A delivery of ``AsyncConsumer``; the answers never block (they queue a frame).

    Raises (each answer):
        ClientClosedError: The consumer is closed.
        DeliveryExpiredError: Its session ended or ``deliverySeconds`` passed.
    """

    __slots__ = ()

    async def ack(self) -> None:
        """Processed: the broker settles the message for this group. Again: no-op."""
        self._ack()

    async def nack(self, *, delay: float = 0, reason: str = "") -> None:
        """Failed: redeliver, no earlier than *delay* seconds from now (0: at once)."""
        self._nack(delay, reason)

    async def in_progress(self) -> None:
        """Still working: restart this delivery's ``deliverySeconds``."""
        self._in_progress()


class AckWriter:
    """A consumer's answers on their way to the brokers (loop thread).

    Answers queued per session go out as one ``DeliverAckBatch`` per session for
    everything answered since the previous write (``run``, the writer task); ``write``
    sends one batch at once. ``quiet`` is set while no answer is expected from a handler
    thread (``expect``/``arrived``), none is queued and none is being written: what
    ``close`` waits for.
    """

    def __init__(self) -> None:
        self._queued: dict[Session, list[_wire.DeliveryResult]] = {}
        self._ready = asyncio.Event()
        self._writing = False
        self.expected = 0
        self.quiet = asyncio.Event()
        self.quiet.set()

    def expect(self) -> None:
        """A handler thread took a chunk: its answers are to come."""
        self.expected += 1
        self.quiet.clear()

    def arrived(self, count: int) -> None:
        """The answers of *count* chunks have come back (queued, if any)."""
        self.expected -= count
        self._update_quiet()

    def queue(self, session: Session, results: list[_wire.DeliveryResult]) -> None:
        """Queue *results* for the next frame to *session*."""
        queued = self._queued.get(session)
        if queued is None:
            self._queued[session] = results
        else:
            queued.extend(results)
        self.quiet.clear()
        self._ready.set()

    async def run(self) -> None:
        """Write what is queued, one frame per session, as answers come (the writer task)."""
        queued = self._queued
        while True:
            await self._ready.wait()
            self._ready.clear()
            while queued:
                session = next(iter(queued))
                results = queued.pop(session)
                self._writing = True
                try:
                    await self.write(session, results)
                finally:
                    self._writing = False
            self._update_quiet()

    async def write(self, session: Session, results: list[_wire.DeliveryResult]) -> None:
        """Send *results* on *session* now; a session gone is logged (the broker redelivers)."""
        if not session.alive:
            logger.info(
                "dropping %d acks: session to broker=%s is gone (it redelivers)",
                len(results),
                session.address,
            )
            return
        try:
            await session.send_acks(results)
        except KiteQError as exc:
            logger.info("acks not sent broker=%s error=%s (it redelivers)", session.address, exc)

    async def wait_quiet(self, timeout: float) -> bool:
        """Wait at most *timeout* seconds for ``quiet``; True when it is set."""
        if self.quiet.is_set():
            return True
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                await self.quiet.wait()
        except TimeoutError:
            return False
        return True

    def _update_quiet(self) -> None:
        if not self.expected and not self._queued and not self._writing:
            self.quiet.set()
