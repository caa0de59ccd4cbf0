"""Consumers: one session per broker, deliveries handed to the handler a batch at a time.

Data path::

    session reader ─► BrokerPool ─► on_deliveries(batch)
        a handler      ─► HandlerRunner (``_handlers``): one task per batch (async) or one
                          hop to the handler threads (sync) ─► AckWriter ─► DeliverAckBatch
        no handler     ─► the iteration inbox: ``async for`` (or the sync facade's ``for``)
                          yields deliveries that the code answers itself (``_acks``)

The broker keeps at most ``max_in_flight`` unacked deliveries per session, which bounds
what this process holds: unanswered deliveries use up credit, so the broker stops pushing
(never a drop). The blocking ``Consumer`` is in ``_sync``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from typing import Final, Self, Unpack

from kiteq.client import _tracing, _wire
from kiteq.client._acks import AckMode, AckWriter, AsyncDelivery, Delivery, Ledger, Ticket
from kiteq.client._base import AsyncClient
from kiteq.client._channel import Session, fresh_error, open_params
from kiteq.client._discovery import resolve
from kiteq.client._handlers import HandlerRunner, closing_nack
from kiteq.client._options import ConsumerArgs, ConsumerOptions
from kiteq.client._pool import BrokerPool, ClientState
from kiteq.client._tls import Transport
from kiteq.core.errors import ClientClosedError, ConfigError, KiteQError
from kiteq.core.message import ReceivedMessage

__all__ = ["AsyncConsumer"]

logger = logging.getLogger(__name__)

# Seconds a retired broker's session may take to take the last acks.
_RETIRE_GRACE: Final = 1.0


class AsyncConsumer(AsyncClient):
    """Consumes the messages bound to one consumer group (asyncio).

    Connects to every broker serving the bindings' topics and keeps each session open,
    reconnecting with bounded, jittered backoff. A wrong secret or a refused binding is not
    retried: ``start`` raises it, or ``wait`` does when it happens later.

    With ``registry="zk://..."`` the consumer writes its bindings to the persistent
    ``/kiteq/sub/{topic}/{group}-bind`` nodes (KiteQ's JSON; only when they differ) before
    opening its streams, finds the brokers of its topics under ``/kiteq/server/{topic}``
    and follows them: new brokers are dialled, removed ones closed. While ZooKeeper is
    unreachable the last known brokers are kept.

    Args:
        brokers: Broker addresses (``"host:port"``); give this or ``registry``.
        registry: ``"file://path/to/registry.toml"`` or
            ``"zk://h1:2181,h2:2181[/chroot][?timeout=S&digest=user:password]"``.
        group_id: The consumer group; each message goes to one consumer of the group.
        secret_key: The group's secret.
        bindings: What the group consumes (``Binding.direct/regex/fanout``).
        handler: Called with each ``ReceivedMessage``; sync or ``async def``. True or None
            acks; False or an exception nacks, and the broker redelivers. With
            ``ack_mode=AckMode.MANUAL`` it gets an ``AsyncDelivery`` (async handler) or a
            ``Delivery`` (sync handler) instead and answers it itself, then or later.
            Neither handler: iterate the consumer (``async for msg in consumer``), which
            yields ``AsyncDelivery`` objects to answer.
        batch_handler: Instead of ``handler``: called with a list of messages (a delivery
            batch, split among the handler threads) and returns one True/None (ack) or
            False (nack) per message, or None to ack them all; an exception nacks them all.
        ack_mode: ``AckMode.AUTO`` (the handler's result) or ``AckMode.MANUAL``.
        max_in_flight: Unacked deliveries the broker may push to each session.
        warmup_seconds: The broker ramps this consumer's share up over this many seconds.
        max_concurrency: Handler calls in progress at once (threads for a sync handler);
            ``concurrency`` is its older name.
        client_id: A name for this client in broker logs; default host:pid:random.
        connect_timeout: Seconds to open a session.
        reconnect_max_delay: Upper bound of the reconnect backoff (from 0.1 s, doubling).
        tls: Connect to the brokers with TLS (``TlsOptions(ca=..., cert=..., key=...)``);
            None connects in plaintext. A broker that refuses the connection at the TLS
            layer fails the client with ``TlsError`` (not retried).
        close_timeout: Seconds ``close`` waits for running handlers and their acks.

    Raises:
        ConfigError: An option or binding is invalid.

    Examples:
        >>> async def handle(message: ReceivedMessage) -> bool:
        ...     print(message.topic, message.body)
        ...     return True
        >>> async def consume() -> None:
        ...     async with AsyncConsumer(brokers=["127.0.0.1:13800"], group_id="acct-svc",
        ...                              secret_key="s3cret",
        ...                              bindings=[Binding.direct("trade", "pay-succ")],
        ...                              handler=handle) as consumer:
        ...         await consumer.wait()
        >>> async def iterate() -> None:  # no handler: answer each delivery yourself
        ...     async with AsyncConsumer(brokers=["127.0.0.1:13800"], group_id="acct-svc",
        ...                              bindings=[Binding.direct("trade", "pay-succ")],
        ...                              max_in_flight=100) as consumer:
        ...         async for msg in consumer:
        ...             await msg.ack()  # or: await msg.nack(delay=30); msg.in_progress()
    """

    def __init__(self, **options: Unpack[ConsumerArgs]) -> None:
        opts = ConsumerOptions(**options)
        self._options = opts
        self._params = open_params(
            group_id=opts.group_id,
            secret_key=opts.secret_key,
            client_id=opts.client_id,
            warmup_seconds=opts.warmup_seconds,
            bindings=opts.bindings,
            max_in_flight=opts.max_in_flight,
        )
        self._topics = tuple(dict.fromkeys(binding.topic for binding in self._params.bindings))
        self._group_id = opts.group_id
        # no handler: the consumer is iterated, and the iterating code answers
        self._iterated = opts.handler is None and opts.batch_handler is None
        ack_mode = AckMode.MANUAL if self._iterated else opts.ack_mode
        self._pool = BrokerPool(
            "consumer",
            resolve(opts.brokers, opts.registry),
            self._params,
            self,
            wanted=lambda: self._pool.directory.brokers_for_any(self._topics),
            transport=Transport(opts.tls),
            connect_timeout=opts.connect_timeout,
            reconnect_max_delay=opts.reconnect_max_delay,
            retire_grace=_RETIRE_GRACE,
        )
        self._ledger = Ledger(self._answer_from_any_thread)
        self._writer = AckWriter()
        self._runner = HandlerRunner(
            opts.handler,
            opts.batch_handler,
            ack_mode=ack_mode,
            concurrency=opts.handler_concurrency,
            ledger=self._ledger,
            writer=self._writer,
        )
        self._tx_warned = False
        # iteration: tickets not yet taken by the iterating code (loop thread)
        self._inbox: deque[Ticket] = deque()
        self._inbox_ready = asyncio.Event()
        self._paused = False
        # deliveries that arrived while paused (before the broker saw the Flow frame)
        self._held: list[tuple[Session, list[ReceivedMessage]]] = []

    @property
    def closed(self) -> bool:
        """True once ``close`` has been called."""
        return self._pool.shut

    @property
    def error(self) -> KiteQError | None:
        """The non-retriable error that stopped the consumer, if any."""
        return self._pool.error

    @property
    def connected_brokers(self) -> list[str]:
        """Addresses of the brokers with an open session right now."""
        return self._pool.connected()

    async def start(self) -> None:
        """Connect to the brokers and start consuming; idempotent.

        Waits for the first connection attempt to every broker (bounded by
        ``connect_timeout``). Brokers that are down are retried in the background.

        Raises:
            AuthenticationError: The group's secret was refused.
            ConfigError: A broker refused the bindings, or no broker serves their topics.
            ClientClosedError: The consumer was closed.

        Examples:
            >>> async def main(consumer: AsyncConsumer) -> None:
            ...     await consumer.start()
        """
        pool = self._pool
        if pool.shut:
            raise ClientClosedError("consumer is closed")
        if pool.state is not ClientState.NEW:
            return
        addresses = await self._find_brokers()
        pool.start()
        if not self._iterated:
            self._runner.start()
        # in the pool's task set: a failure of the ack writer (a bug) stops the consumer
        pool.tasks.spawn(self._writer.run(), "acks")
        pool.dial(addresses)
        error = await pool.first_attempts(addresses)
        if error is not None:
            await self.close()
            raise error

    async def _find_brokers(self) -> list[str]:
        directory = self._pool.directory
        timeout = self._options.connect_timeout
        try:
            # the bindings first, so a broker has them before the stream opens
            await directory.write_bindings(self._group_id, self._params.bindings, timeout)
            await directory.watch(self._topics, timeout)
        except BaseException:
            await directory.close()
            raise
        addresses = directory.brokers_for_any(self._topics)
        if not addresses:
            if not directory.live:
                raise ConfigError(f"no broker serves the topics {', '.join(self._topics)}")
            logger.warning(
                "no broker registered yet for the topics %s group=%s: waiting for one",
                ", ".join(self._topics),
                self._group_id,
            )
        return addresses

    async def wait(self) -> None:
        """Wait until the consumer is closed, or stopped by a non-retriable error.

        Raises:
            AuthenticationError: The secret was refused after a reconnect.
            ConfigError: A broker refused the bindings after a reconnect.

        Examples:
            >>> async def main(consumer: AsyncConsumer) -> None:
            ...     await consumer.wait()  # until another task calls close()
        """
        await self._pool.stopped.wait()
        if self._pool.error is not None:
            raise fresh_error(self._pool.error)

    async def close(self, timeout: float | None = None) -> None:
        """Stop consuming after running handlers finish and their acks are sent; idempotent.

        Deliveries that arrive meanwhile are nacked so the broker redelivers them to
        another consumer. Handlers still running after *timeout* seconds (default
        ``close_timeout``) are abandoned; the broker redelivers their messages.

        Examples:
            >>> async def main(consumer: AsyncConsumer) -> None:
            ...     await consumer.close(timeout=5.0)
        """
        pool = self._pool
        previous = await pool.begin_close()
        if previous is None:
            return
        self._ledger.close()
        self._inbox_ready.set()
        self._nack_unhandled()
        seconds = self._options.close_timeout if timeout is None else timeout
        try:
            if previous is not ClientState.NEW:
                await self._drain(seconds)
                await pool.close_links(1.0)
                self._runner.shutdown()
        finally:
            await pool.finish_close()

    def _nack_unhandled(self) -> None:
        # taken by no code yet: back to the broker at once
        while self._inbox:
            ticket = self._inbox.popleft()
            self._writer.queue(ticket.session, [closing_nack(ticket.message)])
        held, self._held = self._held, []
        for session, messages in held:
            self._writer.queue(session, [closing_nack(m) for m in messages])

    async def _drain(self, seconds: float) -> None:
        # running handlers finish and their answers go out, within *seconds*
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        batches = self._runner.batches
        joined = await batches.join(seconds)
        if not (joined and await self._writer.wait_quiet(deadline - loop.time())):
            logger.warning(
                "consumer closing with %d batches still in handlers after %.1fs",
                self._runner.in_handlers,
                seconds,
            )
            await batches.cancel()

    # -- PoolListener (loop thread) -----------------------------------------------------

    def on_opened(self, session: Session) -> None:
        """A session is open; deliveries follow (unless the consumer is paused)."""
        logger.debug("consumer session open group=%s broker=%s", self._group_id, session.address)
        if self._paused:
            self._pool.tasks.spawn(
                self._send_flow(session, _wire.FlowState.FLOW_STATE_PAUSED), "flow"
            )

    def on_lost(self, session: Session, reason: KiteQError) -> None:
        """A session ended; its link reconnects and the broker redelivers what was unacked."""
        logger.debug("consumer session lost broker=%s reason=%s", session.address, reason)

    def on_fatal(self, error: KiteQError) -> None:
        """The pool failed: ``wait`` and the iteration raise *error*."""
        self._inbox_ready.set()

    def on_brokers_changed(self) -> None:
        """The pool followed the directory; nothing else to do."""

    def on_store_acks(self, session: Session, results: list[_wire.StoreResult]) -> None:
        """A consumer publishes nothing; store-acks here are a broker bug."""
        logger.warning("ignoring %d store-acks on a consumer session", len(results))

    def on_deliveries(self, session: Session, messages: list[ReceivedMessage]) -> None:
        """Hand the batch to the handler in one hop; nack it when closing."""
        if self._pool.shut:
            self._writer.queue(session, [closing_nack(m) for m in messages])
        elif self._paused:
            self._held.append((session, messages))
        elif self._iterated:
            issue = self._ledger.issue
            self._inbox.extend(issue(session, m) for m in messages)
            self._inbox_ready.set()
        else:
            self._runner.dispatch(session, messages)

    def on_tx_checks(self, session: Session, checks: list[_wire.TxCheckRequest]) -> None:
        """Transaction checks are for producers; ignored here."""
        if not self._tx_warned:
            self._tx_warned = True
            logger.warning(
                "ignoring %d transaction checks on a consumer session broker=%s",
                len(checks),
                session.address,
            )

    # -- iteration, manual answers, pause (loop thread unless said) -----------------------

    def __aiter__(self) -> AsyncIterator[AsyncDelivery]:
        return _AsyncDeliveries(self, self._ledger)

    async def next_ticket(self) -> Ticket | None:
        """The next delivery for the iterating code; None once the consumer is closed.

        Raises:
            ConfigError: The consumer has a handler (it is not iterated).
            AuthenticationError, ConfigError: The error that stopped the consumer.
        """
        if not self._iterated:
            raise ConfigError("a consumer with a handler is not iterated")
        pool = self._pool
        if pool.state is ClientState.NEW:
            await self.start()
        while True:
            if self._inbox and not pool.shut:
                return self._inbox.popleft()
            if pool.error is not None:
                raise fresh_error(pool.error)
            if pool.shut or pool.stopped.is_set():
                return None
            self._inbox_ready.clear()
            await self._inbox_ready.wait()

    def wrap_sync(self, ticket: Ticket) -> Delivery:
        """A ``Delivery`` (blocking answers) for *ticket* (the sync facade's iterator)."""
        _tracing.received(ticket.message)
        return Delivery(ticket, self._ledger)

    @property
    def paused(self) -> bool:
        """True between ``pause`` and ``resume``."""
        return self._paused

    @property
    def unanswered(self) -> int:
        """Deliveries handed to code (iteration, AckMode.MANUAL) and not answered yet."""
        return self._ledger.open

    @property
    def in_handlers(self) -> int:
        """Delivery batches with the handler now, running or waiting for a handler thread.

        A sync handler with ``max_concurrency`` > 1 gets a batch in chunks, each counted.
        ``close`` waits for this to reach 0 (within its timeout).
        """
        return self._runner.in_handlers

    async def pause(self) -> None:
        """Stop deliveries without closing: the brokers push nothing until ``resume``.

        Deliveries already in flight stay unacknowledged and may still be answered; any
        that arrive before a broker has read the pause are held here until ``resume``.

        Examples:
            >>> async def main(consumer: AsyncConsumer) -> None:
            ...     await consumer.pause()
        """
        self._paused = True
        await self._flow_all(_wire.FlowState.FLOW_STATE_PAUSED)

    async def resume(self) -> None:
        """Start deliveries again after ``pause``; idempotent.

        Examples:
            >>> async def main(consumer: AsyncConsumer) -> None:
            ...     await consumer.resume()
        """
        if not self._paused:
            return
        self._paused = False
        held, self._held = self._held, []
        for session, messages in held:
            self.on_deliveries(session, messages)
        await self._flow_all(_wire.FlowState.FLOW_STATE_RUNNING)

    async def _flow_all(self, state: _wire.FlowState.ValueType) -> None:
        sessions = [link.session for link in self._pool.links.values() if link.session is not None]
        await asyncio.gather(*(self._send_flow(s, state) for s in sessions))

    async def _send_flow(self, session: Session, state: _wire.FlowState.ValueType) -> None:
        try:
            await session.send_flow(state)
        except KiteQError as exc:  # the session is gone; a new one is told on_opened
            logger.info("flow frame not sent broker=%s error=%s", session.address, exc)

    def _answer_from_any_thread(self, session: Session, result: _wire.DeliveryResult) -> None:
        # any thread: an explicit answer goes to the ack writer on the loop
        pool = self._pool
        if threading.get_ident() == pool.loop_thread:
            self._writer.queue(session, [result])
            return
        loop = pool.loop
        if loop is not None:
            # RuntimeError: the loop has closed; the broker redelivers
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._writer.queue, session, [result])


class _AsyncDeliveries:
    """``async for`` over a consumer.

    An iterator object, not an async generator: a cancelled ``anext`` (a timeout around
    it) leaves the iteration usable.
    """

    def __init__(self, consumer: AsyncConsumer, ledger: Ledger) -> None:
        self._consumer = consumer
        self._ledger = ledger

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> AsyncDelivery:
        ticket = await self._consumer.next_ticket()
        if ticket is None:
            raise StopAsyncIteration
        _tracing.received(ticket.message)
        return AsyncDelivery(ticket, self._ledger)
