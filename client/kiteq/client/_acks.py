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

import enum
import threading
import time
from collections.abc import Callable, Mapping

from kiteq.client import _wire
from kiteq.client._channel import Session, check_positive
from kiteq.core.errors import ClientClosedError, DeliveryExpiredError
from kiteq.core.message import ReceivedMessage

__all__ = ["AckMode", "AsyncDelivery", "Delivery", "Ledger", "Ticket"]

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
