"""Producers: messages are batched into ``PublishBatch`` frames and resolved by store-ack.

Data path (all on one event loop, except ``Accumulator.prepare/submit``, which any thread
may call)::

    send / send_async ─► Accumulator (``_accumulator``): validate in the caller's thread,
                         the inbox, the pending bound; drained with one deadline timer
                         per drain, duplicates of a message id in flight follow it
    Sender (``_sender``) ─► linger, route to a random open session serving the topic,
                         one frame per batch; store-acks resolve sends by message id, a
                         retriable refusal or a lost stream re-queues the same message
    BrokerPool (``_pool``) ─► links, sessions, the directory, the state, the fatal error

Transactions (``_tx``, ``_tx_checks``) ride on this path: ``send_transactional`` is a
``send`` of the message uncommitted, then the local transaction, then a decision queued
in the ``TxOutbox``, whose task writes one ``TxAckBatch`` per broker for everything
queued; the broker's checks go to the ``CheckRunner`` and its answers to the same outbox.

``ProducerCore`` is what ``AsyncProducer`` and the blocking ``Producer`` (``_sync``)
share. Futures are always resolved on the loop thread; the sync facade's
``concurrent.futures.Future`` is thread-safe for that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final, Unpack

from kiteq.client import _wire
from kiteq.client._accumulator import Send, SendResult
from kiteq.client._base import AsyncClient
from kiteq.client._channel import Session, open_params
from kiteq.client._discovery import resolve
from kiteq.client._options import ProducerArgs, ProducerOptions
from kiteq.client._pool import BrokerPool, ClientState
from kiteq.client._sender import Sender
from kiteq.client._tls import Transport
from kiteq.client._tx import LocalTransaction, TxOutbox, TxResult, run_local_tx, uncommitted
from kiteq.client._tx_checks import CheckRunner
from kiteq.core.errors import ClientClosedError, KiteQError
from kiteq.core.message import Message, ReceivedMessage

__all__ = ["AsyncProducer", "ProducerCore", "SendResult"]

logger = logging.getLogger(__name__)

# Seconds close() gives queued transaction decisions even when its timeout is spent.
_TX_FLUSH_MIN: Final = 0.5
# Seconds a retired broker's session may take to return its last acks.
_RETIRE_GRACE: Final = 2.0


class ProducerCore:
    """A producer's parts: pool, accumulator, sender, transaction outbox and checks.

    Loop thread, except ``accumulator.prepare/submit`` and ``outbox.decide_threadsafe``.
    """

    def __init__(self, options: ProducerOptions) -> None:
        self.options = options
        self.group_id = options.group_id
        params = open_params(
            group_id=options.group_id, secret_key=options.secret_key, client_id=options.client_id
        )
        transport = Transport(options.tls)
        self.pool = BrokerPool(
            "producer",
            resolve(options.brokers, options.registry),
            params,
            self,
            wanted=lambda: self.pool.directory.every(),
            transport=transport,
            connect_timeout=options.connect_timeout,
            reconnect_max_delay=options.reconnect_max_delay,
            retire_grace=_RETIRE_GRACE,
        )
        self.sender = Sender(options, self.pool)
        self.accumulator = self.sender.accumulator
        # transactions: decisions and check answers waiting for their frame, and checks
        self.outbox = TxOutbox(self.pool.sessions.get)
        self._checks = CheckRunner(
            options.tx_checker,
            timeout=options.tx_check_timeout,
            concurrency=options.tx_check_concurrency,
            answer=self.outbox.put,
            owner="kiteq-producer",
        )

    async def start(self) -> None:
        """Bind to the running loop; with a ``tx_checker``, connect to every broker.

        Raises:
            AuthenticationError: With a ``tx_checker``: the group's secret was refused.
            ClientClosedError: The producer was closed.
        """
        pool = self.pool
        if pool.shut:
            raise ClientClosedError("producer is closed")
        if pool.state is not ClientState.NEW:
            return
        pool.start()
        pool.tasks.spawn(self.sender.run(), "writer")
        pool.tasks.spawn(self.outbox.run(), "tx-writer")
        if self._checks.checker is not None:
            await self._connect_all()

    async def _connect_all(self) -> None:
        # a tx_checker must be reachable before this group publishes anything
        pool = self.pool
        try:
            await pool.directory.watch_alive(self.options.connect_timeout)
        except KiteQError as exc:
            logger.warning("cannot list the live brokers yet group=%s: %s", self.group_id, exc)
        addresses = pool.directory.every()
        pool.dial(addresses)
        error = await pool.first_attempts(addresses)
        if error is not None:
            await self.close(None)
            raise error

    async def send_async(
        self, message: Message, timeout: float | None
    ) -> asyncio.Future[SendResult]:
        """``AsyncProducer.send_async``."""
        seconds = self.options.timeout if timeout is None else timeout
        accumulator = self.accumulator
        prepared = accumulator.prepare(message)
        pool = self.pool
        if pool.state is ClientState.NEW:
            await self.start()
        loop = asyncio.get_running_loop()
        if loop is not pool.loop:
            raise RuntimeError("an AsyncProducer must be used on the event loop that started it")
        if not accumulator.has_room:
            await accumulator.wait_for_room(seconds)
        future: asyncio.Future[SendResult] = loop.create_future()
        accumulator.submit(Send(prepared, seconds, future, False))
        return future

    async def close(self, timeout: float | None) -> None:
        """``AsyncProducer.close``."""
        pool = self.pool
        previous = await pool.begin_close()
        if previous is None:
            return
        self.accumulator.wake_blocked()
        seconds = self.options.close_timeout if timeout is None else timeout
        try:
            if previous is not ClientState.NEW:
                deadline = time.monotonic() + seconds
                await self.sender.flush(seconds)
                # checks in progress are abandoned (the broker asks again); decisions and
                # answers made go out before the sessions close
                await self._checks.close()
                await self.outbox.flush(max(deadline - time.monotonic(), _TX_FLUSH_MIN))
                await pool.close_links(1.0)
        finally:
            await pool.finish_close()

    # -- PoolListener (loop thread) -----------------------------------------------------

    def on_opened(self, session: Session) -> None:
        """A session is open: parked sends and queued decisions may go."""
        self.outbox.wake()
        self.sender.release_parked()

    def on_lost(self, session: Session, reason: KiteQError) -> None:
        """A session ended: what it had not acked is sent again (same ids)."""
        self.sender.requeue_session(session, reason)

    def on_fatal(self, error: KiteQError) -> None:
        """A non-retriable error (wrong secret): every send fails with it, now and later."""
        self.accumulator.wake_blocked()
        self.sender.fail_all(error)

    def on_brokers_changed(self) -> None:
        """The pool followed the registry: parked sends go again."""
        self.sender.release_parked()
        self.accumulator.wake.set()

    def on_store_acks(self, session: Session, results: list[_wire.StoreResult]) -> None:
        """Resolve sends by message id."""
        self.sender.on_store_acks(session, results)

    def on_deliveries(self, session: Session, messages: list[ReceivedMessage]) -> None:
        """A producer session consumes nothing; a delivery here is a broker bug."""
        logger.warning(
            "ignoring %d deliveries on a producer session broker=%s", len(messages), session.address
        )

    def on_tx_checks(self, session: Session, checks: list[_wire.TxCheckRequest]) -> None:
        """Answer with the ``tx_checker`` (UNKNOWN without one), on the same broker."""
        self._checks.submit(session.address, checks)


class AsyncProducer(AsyncClient):
    """Publishes messages for one producer group (asyncio).

    Sends are batched transparently: messages sent while earlier batches await their
    store-acks are collected for at most ``linger`` seconds (or until ``max_batch``
    messages or ``max_batch_bytes``) and written as one frame. Brokers are dialled on the
    first send; each batch goes to a random connected broker serving its topic. When a
    broker refuses a batch as retriable, or its stream drops before the store-acks, the
    unacknowledged messages are sent again, with the same ids, to another broker.

    With ``registry="zk://..."`` the brokers of each topic are found in ZooKeeper
    (``/kiteq/server/{topic}``) when the topic is first used, and followed: new brokers
    are dialled, removed ones are no longer chosen (their session is closed once their
    acks are in). The producer also keeps an ephemeral ``/kiteq/pub/{topic}/{group}/
    {hostname}`` node (KiteQ's is persistent and never cleaned; ours goes with the
    session). While ZooKeeper is unreachable the last known brokers are used.

    Transactional messages (``send_transactional``) are stored uncommitted and delivered
    only once committed. The broker asks the group's ``tx_checker`` about those it has
    no decision for; a producer with a ``tx_checker`` connects to every broker at
    ``start`` and stays connected, so the broker can reach it.

    Args:
        brokers: Broker addresses (``"host:port"``); give this or ``registry``.
        registry: ``"file://path/to/registry.toml"`` or
            ``"zk://h1:2181,h2:2181[/chroot][?timeout=S&digest=user:password]"``.
        group_id: The producer group; set as every message's ``group_id``.
        secret_key: The group's secret.
        client_id: A name for this client in broker logs; default host:pid:random.
        timeout: Seconds a send may take until its store-ack, retries included.
        linger: Seconds to wait for more messages before writing a batch.
        max_batch: Messages per batch (at most 1000, the protocol's limit).
        max_batch_bytes: Approximate bytes per batch.
        max_pending: Sends awaiting their store-ack before ``send`` waits (bounds memory).
        retries: Further attempts after a retriable refusal or a lost stream; same id.
        connect_timeout: Seconds to open a session.
        reconnect_max_delay: Upper bound of the reconnect backoff (from 0.1 s, doubling).
        tls: Connect to the brokers with TLS (``TlsOptions(ca=..., cert=..., key=...)``);
            None connects in plaintext. A broker that refuses the connection at the TLS
            layer fails the client with ``TlsError`` (not retried).
        close_timeout: Seconds ``close`` waits for pending store-acks.
        tx_checker: Answers the broker's checks of undecided transactional messages
            (this group's, whichever process published them): called with the message's
            header (the body is empty), returns a ``TxStatus`` or a bool; sync (run on
            a small thread pool) or ``async def``. An exception, a timeout or None
            answers UNKNOWN. Without one every check is answered UNKNOWN.
        tx_check_timeout: Seconds a ``tx_checker`` call may take before it answers UNKNOWN.
        tx_check_concurrency: ``tx_checker`` calls in progress at once (threads for a
            sync checker; one that overran ``tx_check_timeout`` no longer counts).

    Raises:
        ConfigError: An option is invalid.

    Examples:
        >>> async def publish() -> None:
        ...     async with AsyncProducer(brokers=["127.0.0.1:13800"], group_id="pay-svc",
        ...                              secret_key="s3cret") as producer:
        ...         result = await producer.send(
        ...             Message(topic="trade", message_type="pay-succ", body=b"42"))
        ...         print(result.message_id)
    """

    def __init__(self, **options: Unpack[ProducerArgs]) -> None:
        self._core = ProducerCore(ProducerOptions(**options))

    @property
    def closed(self) -> bool:
        """True once ``close`` has been called."""
        return self._core.pool.shut

    @property
    def connected_brokers(self) -> list[str]:
        """Addresses of the brokers with an open session right now."""
        return self._core.pool.connected()

    @property
    def waiting_for_room(self) -> int:
        """Sends waiting right now because ``max_pending`` sends are unacknowledged."""
        return self._core.accumulator.waiting_for_room

    async def start(self) -> None:
        """Bind the producer to the running event loop; idempotent.

        Brokers are dialled on the first send; with a ``tx_checker``, every broker (of
        ``brokers`` or the registry) at once, and ``start`` waits for the first attempts
        (bounded by ``connect_timeout``; brokers that are down are retried in the
        background). ``async with`` and the first ``send`` call this for you.

        Raises:
            AuthenticationError: With a ``tx_checker``: the group's secret was refused.
            ClientClosedError: The producer was closed.

        Examples:
            >>> async def main(producer: AsyncProducer) -> None:
            ...     await producer.start()
        """
        await self._core.start()

    async def send(self, message: Message, *, timeout: float | None = None) -> SendResult:
        """Send one message and wait until the broker has made it durable.

        Args:
            message: The message; its ``group_id`` is replaced by the producer's group.
            timeout: Seconds until the store-ack, retries included; default the
                producer's ``timeout``.

        Returns:
            The store result (message id, broker, duplicate flag).

        Raises:
            InvalidMessageError: The message is invalid (checked before sending) or the
                broker refused it; ``UnknownTopicError`` and ``ExpiredMessageError`` say
                why more precisely.
            FlowLimitedError: The broker's receive rate stayed exhausted through retries.
            StoreFullError: The broker's store stayed full through retries.
            StoreUnavailableError: The store stayed unavailable through retries.
            NotConnectedError: No broker was reachable, or brokers were shutting down.
            PublishTimeoutError: No store-ack in time; sending it again is safe.
            AuthenticationError: The group's secret was refused.
            ClientClosedError: The producer was closed.

        Examples:
            >>> async def main(producer: AsyncProducer) -> None:
            ...     message = Message(topic="trade", message_type="pay-succ", body=b"42")
            ...     result = await producer.send(message, timeout=3.0)
            ...     assert result.message_id == message.message_id
        """
        return await (await self.send_async(message, timeout=timeout))

    async def send_async(
        self, message: Message, *, timeout: float | None = None
    ) -> asyncio.Future[SendResult]:
        """Queue one message and return a future of its ``SendResult`` without waiting.

        Waits only while ``max_pending`` sends are unacknowledged. The future fails with
        the errors listed for ``send``.

        Raises:
            InvalidMessageError: The message is invalid; nothing was sent.
            PublishTimeoutError: ``max_pending`` sends stayed unacknowledged for ``timeout``.
            ClientClosedError: The producer was closed.

        Examples:
            >>> async def burst(producer: AsyncProducer, messages: list[Message]) -> None:
            ...     futures = [await producer.send_async(m) for m in messages]
            ...     results = await asyncio.gather(*futures)
        """
        return await self._core.send_async(message, timeout)

    async def send_transactional(
        self, message: Message, local_tx: LocalTransaction, *, timeout: float | None = None
    ) -> TxResult:
        """Publish *message* uncommitted, run *local_tx*, then commit or roll it back.

        The broker stores the message and delivers it only once committed. After the
        store-ack, ``local_tx(message)`` runs (``async def`` or sync; a sync one runs on
        the event loop: keep it short or make it async); it returns ``TxStatus`` or a
        bool (True commits, False rolls back). None, UNKNOWN or an exception send
        UNKNOWN: the broker then asks this group's ``tx_checker`` later. The decision
        goes to the broker that stored the message, without waiting for an answer. If
        this call is cancelled after the store-ack, nothing is decided: the broker asks
        the ``tx_checker``.

        Args:
            message: The message; published with ``commit=False`` and the producer's group
                (``local_tx`` gets that copy).
            local_tx: The local transaction.
            timeout: Seconds until the store-ack, retries included; default the
                producer's ``timeout``. The local transaction is not bounded.

        Returns:
            The decision (message id, status, broker, and the local transaction's
            exception if it raised one).

        Raises:
            TypeError: *message* is not a ``Message`` or *local_tx* is not callable.
            KiteQError: The publish failed, as ``send`` does; ``local_tx`` was not run.
                After a ``PublishTimeoutError`` the message may be stored all the same:
                the broker then asks the ``tx_checker``.

        Examples:
            >>> async def pay(producer: AsyncProducer, order: str) -> None:
            ...     async def debit(message: Message) -> bool:
            ...         return await ledger.debit(message.properties["order"])
            ...     message = Message(topic="trade", message_type="pay-succ", body=b"42",
            ...                       properties={"order": order})
            ...     result = await producer.send_transactional(message, debit)
            ...     print(result.status)  # TxStatus.COMMIT
        """
        if not callable(local_tx):
            raise TypeError(f"local_tx must be callable, got {local_tx!r}")
        core = self._core
        pending = uncommitted(message, core.group_id)
        stored = await self.send(pending, timeout=timeout)
        status, error = await run_local_tx(local_tx, pending)
        core.outbox.decide(stored.broker, pending, status, error)
        return TxResult(pending.message_id, status, stored.broker, error)

    async def close(self, timeout: float | None = None) -> None:
        """Stop taking sends, flush the pending ones and wait for their acks; idempotent.

        Sends still unacknowledged after *timeout* seconds (default ``close_timeout``)
        fail with ``ClientClosedError``; transaction decisions already made are written;
        checks in progress are abandoned (the broker asks again); then the sessions close.

        Examples:
            >>> async def main(producer: AsyncProducer) -> None:
            ...     await producer.close(timeout=2.0)
        """
        await self._core.close(timeout)
