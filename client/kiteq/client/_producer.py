"""Producers: messages are batched into ``PublishBatch`` frames and resolved by store-ack.

Data path (all on one event loop, except ``_submit`` which any thread may call)::

    send / send_async ─► validate (caller's thread: bad input fails before anything is sent)
                      ─► _inbox (a list under a threading.Lock; the writer is woken only when
                         it goes from empty to non-empty, or fills a batch)
    writer task       ─► drain: one deadline timer per drained group, index by message id
                      ─► linger (only while earlier batches await their acks) ─► one frame
                         per batch to a random open session (KiteQ's clamps applied there)
    session reader    ─► store-acks resolve sends by message id; a retriable refusal or a
                         lost stream re-queues the same message (same id) with backoff,
                         preferring another broker

Transactions (``_tx``) ride on this path: ``send_transactional`` is a ``send`` of the
message uncommitted, then the local transaction, then a decision queued in the
``TxOutbox``, whose task writes one ``TxAckBatch`` per broker for everything queued; the
broker's checks go to the ``CheckRunner`` and its answers to the same outbox.

Futures are always resolved on the loop thread; the sync facade's (``_producer_sync``)
``concurrent.futures.Future`` is thread-safe for that.

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
import logging
import random
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

from kiteq.client import _tracing, _wire
from kiteq.client._channel import (
    Link,
    Session,
    backoff_delay,
    check_positive,
    fresh_error,
    open_params,
)
from kiteq.client._discovery import BrokerDirectory, is_zookeeper, resolve
from kiteq.client._tls import Transport
from kiteq.client._tx import (
    CheckRunner,
    LocalTransaction,
    TxChecker,
    TxOutbox,
    TxResult,
    TxStatus,
    feedback_of,
    run_local_tx,
)
from kiteq.core.errors import (
    ClientClosedError,
    ConfigError,
    KiteQError,
    NotConnectedError,
    PublishTimeoutError,
    RegistryUnavailableError,
)
from kiteq.core.ids import canonical_message_id
from kiteq.core.limits import MAX_BATCH_MESSAGES, validate
from kiteq.core.message import Message, ReceivedMessage
from kiteq.core.tasks import TaskSet
from kiteq.core.tls import TlsOptions

__all__ = ["AsyncProducer", "SendResult", "uncommitted"]

if TYPE_CHECKING:
    from kiteq.client._zk_directory import ZkDirectory

logger = logging.getLogger(__name__)

# What a header adds to the body on the wire, roughly (id, names, numbers, tags).
_HEADER_BYTES: Final = 128
_RETRY_BASE: Final = 0.1
_RETRY_MAX: Final = 2.0
# Seconds close() gives queued transaction decisions even when its timeout is spent.
_TX_FLUSH_MIN: Final = 0.5
# zk://: backoff of a failed look-up of a topic's brokers; seconds a retired broker's
# session may take to return its last acks
_DISCOVERY_RETRY_MIN: Final = 0.2
_DISCOVERY_RETRY_MAX: Final = 5.0
_RETIRE_GRACE: Final = 2.0


@dataclasses.dataclass(frozen=True, slots=True)
class SendResult:
    """The broker's answer to a successful send: the message is durable.

    Attributes:
        message_id: The id of the stored message.
        broker: The address of the broker that stored it.
        duplicate: The broker had stored this id before (for example a retry of a send
            whose first store-ack was lost). Still a success.
    """

    message_id: str
    broker: str
    duplicate: bool = False


_Future = asyncio.Future[SendResult] | concurrent.futures.Future[SendResult]


def uncommitted(message: Message, group_id: str) -> Message:
    """The copy of *message* that ``send_transactional`` publishes: uncommitted, grouped.

    Raises:
        TypeError: *message* is not a ``Message``.
    """
    if not isinstance(message, Message):
        raise TypeError(f"expected a kiteq Message, got {type(message).__name__}")
    return dataclasses.replace(message, commit=False, group_id=group_id)


class _Send:
    """One send in flight; owned by the loop thread once it leaves the inbox."""

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
        # set while written to this session and not yet acked
        self.session: Session | None = None
        # address that last failed it: the next attempt prefers another broker
        self.avoid = ""
        self.last_error: KiteQError | None = None
        self.group: _DeadlineGroup | None = None
        # concurrent sends of the same message id, resolved with this one
        self.followers: list[_Send] | None = None


class _DeadlineGroup:
    """The sends drained from the inbox together share one deadline timer.

    One timer per drain instead of one per message: asyncio's timer heap costs several
    microseconds per entry, a large share of a message's cost in a batch.
    """

    __slots__ = ("remaining", "sends", "timer")

    def __init__(self, sends: list[_Send]) -> None:
        self.sends = sends
        self.remaining = len(sends)
        self.timer: asyncio.TimerHandle | None = None


class AsyncProducer:
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

    def __init__(
        self,
        *,
        brokers: Sequence[str] | None = None,
        registry: str | None = None,
        group_id: str,
        secret_key: str = "",
        client_id: str | None = None,
        timeout: float = 5.0,
        linger: float = 0.002,
        max_batch: int = 500,
        max_batch_bytes: int = 1024 * 1024,
        max_pending: int = 10_000,
        retries: int = 3,
        connect_timeout: float = 5.0,
        reconnect_max_delay: float = 30.0,
        close_timeout: float = 10.0,
        tls: TlsOptions | None = None,
        tx_checker: TxChecker | None = None,
        tx_check_timeout: float = 10.0,
        tx_check_concurrency: int = 4,
    ) -> None:
        if tx_checker is not None and not callable(tx_checker):
            raise ConfigError(f"tx_checker must be callable, got {tx_checker!r}")
        for name, value in (
            ("timeout", timeout),
            ("connect_timeout", connect_timeout),
            ("reconnect_max_delay", reconnect_max_delay),
            ("tx_check_timeout", tx_check_timeout),
        ):
            check_positive(name, value)
        for name, value in (("linger", linger), ("close_timeout", close_timeout)):
            check_positive(name, value, allow_zero=True)
        for name, count in (
            ("max_batch", max_batch),
            ("max_batch_bytes", max_batch_bytes),
            ("max_pending", max_pending),
            ("tx_check_concurrency", tx_check_concurrency),
        ):
            check_positive(name, count, integer=True)
        check_positive("retries", retries, allow_zero=True, integer=True)
        if max_batch > MAX_BATCH_MESSAGES:
            raise ConfigError(f"max_batch must be <= {MAX_BATCH_MESSAGES}, got {max_batch}")
        self._params = open_params(group_id=group_id, secret_key=secret_key, client_id=client_id)
        self._transport = Transport(tls)
        self._directory: BrokerDirectory | ZkDirectory = resolve(brokers, registry)
        self._dynamic = is_zookeeper(self._directory)
        self._group_id = group_id
        self._timeout = float(timeout)
        self._linger = float(linger)
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._max_pending = max_pending
        self._retries = int(retries)
        self._connect_timeout = float(connect_timeout)
        self._reconnect_max_delay = float(reconnect_max_delay)
        self._close_timeout = float(close_timeout)

        # any thread: the inbox and whether it still takes sends
        self._lock = threading.Lock()
        self._inbox: list[_Send] = []
        self._inbox_bytes = 0
        self._accepting = True
        self._fatal: KiteQError | None = None
        # the bound: sends submitted (under the lock) minus sends resolved (loop thread)
        # are unacknowledged; blocked senders wait on _room (threads, counted under the
        # lock) or on a future in _room_futures (the loop's tasks)
        self._room = threading.Condition(self._lock)
        self._room_waiters = 0
        self._room_futures: list[asyncio.Future[None]] = []
        self._submitted = 0
        self._resolved = 0
        self._room_wake_pending = False

        # loop thread only from here on
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._closed_event = asyncio.Event()
        self._closing = False
        self._closed = False
        self._active: dict[str, _Send] = {}
        self._ready: collections.deque[_Send] = collections.deque()
        self._parked: list[_Send] = []
        self._outstanding = 0  # drained from the inbox, not yet resolved
        self._unacked = 0  # written, store-ack not yet received
        self._links: dict[str, Link] = {}
        self._open: dict[str, Session] = {}
        self._topic_brokers: dict[str, tuple[str, ...]] = {}
        # zk://: topics whose brokers are being looked up, and why the last look-up failed
        self._discovering: set[str] = set()
        self._registry_error: KiteQError | None = None
        self._tasks = TaskSet("kiteq-producer", self._task_failed)
        self._link_tasks = TaskSet("kiteq-producer", self._task_failed)
        # transactions: decisions and check answers waiting for their frame, and checks
        self._outbox = TxOutbox(self._open.get)
        self._checks = CheckRunner(
            tx_checker,
            timeout=float(tx_check_timeout),
            concurrency=tx_check_concurrency,
            answer=self._outbox.put,
            owner="kiteq-producer",
        )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """True once ``close`` has been called."""
        return self._closed

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
        if self._closed:
            raise ClientClosedError("producer is closed")
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._tasks.spawn(self._write_loop(), "writer")
        self._tasks.spawn(self._outbox.run(), "tx-writer")
        self._directory.add_listener(self._on_brokers_changed)
        if self._checks.checker is not None:
            await self._connect_all()

    async def _connect_all(self) -> None:
        # a tx_checker must be reachable before this group publishes anything
        try:
            await self._directory.watch_alive(self._connect_timeout)
        except KiteQError as exc:
            logger.warning("cannot list the live brokers yet group=%s: %s", self._group_id, exc)
        addresses = tuple(self._directory.every())
        self._connect(addresses)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._connect_timeout + 1.0):
                for address in addresses:
                    await self._links[address].attempted.wait()
        if self._fatal is not None:
            error = fresh_error(self._fatal)
            await self.close()
            raise error
        if not self._open:
            logger.warning(
                "no broker reachable yet group=%s brokers=%s: retrying in the background",
                self._group_id,
                ",".join(addresses),
            )

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
        seconds = self._timeout if timeout is None else timeout
        prepared = self._prepare(message)
        if self._loop is None:
            await self.start()
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise RuntimeError("an AsyncProducer must be used on the event loop that started it")
        if self._submitted - self._resolved >= self._max_pending:
            await self._wait_for_room_async(seconds)
        future: asyncio.Future[SendResult] = loop.create_future()
        self._submit(_Send(prepared, seconds, future, False))
        return future

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
        pending = uncommitted(message, self._group_id)
        stored = await self.send(pending, timeout=timeout)
        status, error = await run_local_tx(local_tx, pending)
        self._decide(stored.broker, pending, status, error)
        return TxResult(pending.message_id, status, stored.broker, error)

    def _decide(
        self, address: str, message: Message, status: TxStatus, error: Exception | None
    ) -> None:
        # loop thread: the session that stored it, or a later one to the same broker
        feedback = "" if error is None else feedback_of(error)
        self._outbox.put(
            address, _wire.TxAnswer(message.message_id, message.topic, status, feedback)
        )

    def _decide_threadsafe(
        self, address: str, message: Message, status: TxStatus, error: Exception | None
    ) -> None:
        try:
            self._running_loop.call_soon_threadsafe(self._decide, address, message, status, error)
        except RuntimeError:  # the loop has closed
            logger.warning(
                "decision not sent id=%s status=%s: producer closed (the broker checks later)",
                message.message_id,
                status.name,
            )

    async def close(self, timeout: float | None = None) -> None:
        """Stop taking sends, flush the pending ones and wait for their acks; idempotent.

        Sends still unacknowledged after *timeout* seconds (default ``close_timeout``)
        fail with ``ClientClosedError``; transaction decisions already made are written;
        checks in progress are abandoned (the broker asks again); then the sessions close.

        Examples:
            >>> async def main(producer: AsyncProducer) -> None:
            ...     await producer.close(timeout=2.0)
        """
        if self._closed:
            await self._closed_event.wait()
            return
        self._closed = True
        with self._lock:
            self._accepting = False
            self._room.notify_all()
        seconds = self._close_timeout if timeout is None else timeout
        try:
            if self._loop is not None:
                deadline = time.monotonic() + seconds
                await self._flush(seconds)
                # checks in progress are abandoned (the broker asks again); decisions and
                # answers made go out before the sessions close
                await self._checks.close()
                await self._outbox.flush(max(deadline - time.monotonic(), _TX_FLUSH_MIN))
                await self._tasks.cancel()
                await asyncio.gather(*(link.stop(1.0) for link in self._links.values()))
                await self._link_tasks.cancel()
        finally:
            try:
                await self._directory.close()
            finally:
                self._closed_event.set()

    # -- any thread -------------------------------------------------------------------

    def _prepare(self, message: Message) -> Message:
        if not isinstance(message, Message):
            raise TypeError(f"expected a kiteq Message, got {type(message).__name__}")
        if self._fatal is not None:
            raise fresh_error(self._fatal)
        if not self._accepting:
            raise ClientClosedError("producer is closed")
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

    def _submit(self, send: _Send, room_timeout: float = 0.0) -> None:
        """Queue *send* for the writer; a sync send first waits for room (the bound).

        Raises:
            PublishTimeoutError: A sync send found no room within *room_timeout* seconds
                (at once on the loop thread, where waiting would deadlock).
            ClientClosedError: The producer is closed or not started.
        """
        loop = self._loop
        if loop is None:
            raise ClientClosedError("producer is not started")
        with self._lock:
            if self._fatal is not None:
                raise fresh_error(self._fatal)
            if not self._accepting:
                raise ClientClosedError("producer is closed")
            # an async send has waited for room already (on the loop, so it still has it)
            if send.sync and self._submitted - self._resolved >= self._max_pending:
                self._wait_for_room(room_timeout)
                # its timeout runs from when it is queued, as an async send's does
                send.deadline = time.monotonic() + send.timeout
            self._submitted += 1
            inbox = self._inbox
            inbox.append(send)
            before = self._inbox_bytes
            self._inbox_bytes = before + send.size
            count = len(inbox)
        # wake the writer on the first message, and again when a batch is full
        if (
            count == 1
            or count == self._max_batch
            or before < self._max_batch_bytes <= before + send.size
        ):
            if threading.get_ident() == self._loop_thread:
                self._wake.set()
            else:
                # RuntimeError: the loop closed meanwhile; close() has failed this send
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._wake.set)

    def _wait_for_room(self, timeout: float) -> None:
        # any thread, holding self._lock; on the loop thread (a future's callback) waiting
        # would deadlock the loop: no wait at all there
        wait = 0.0 if threading.get_ident() == self._loop_thread else timeout
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
                if self._fatal is not None:
                    raise fresh_error(self._fatal)
                if not self._accepting:
                    raise ClientClosedError("producer is closed")
        finally:
            self._room_waiters -= 1

    async def _wait_for_room_async(self, timeout: float) -> None:
        # loop thread
        loop = self._running_loop
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
        # loop thread, once per iteration that resolved sends while senders waited
        self._room_wake_pending = False
        futures, self._room_futures = self._room_futures, []
        for room in futures:
            if not room.done():
                room.set_result(None)
        if self._room_waiters:
            with self._lock:
                self._room.notify_all()

    # -- loop thread: the writer ------------------------------------------------------

    @property
    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the producer is not started")
        return self._loop

    def _should_linger(self) -> bool:
        # Nagle-style: a batch waits only while earlier ones await their acks, so one
        # send() at a time is not slowed down by the linger
        return (
            self._linger > 0
            and self._unacked > 0
            and not self._closing
            and len(self._inbox) < self._max_batch
            and self._inbox_bytes < self._max_batch_bytes
        )

    async def _write_loop(self) -> None:
        wake = self._wake
        while True:
            await wake.wait()
            wake.clear()
            if self._should_linger():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._linger):
                        while self._should_linger():
                            await wake.wait()
                            wake.clear()
            self._drain_inbox()
            await self._write_ready()

    def _drain_inbox(self) -> None:
        with self._lock:
            sends = self._inbox
            if not sends:
                return
            self._inbox = []
            self._inbox_bytes = 0
        group = _DeadlineGroup(sends)
        first_deadline = sends[0].deadline
        active = self._active
        ready = self._ready
        self._outstanding += len(sends)
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
        group.timer = self._running_loop.call_later(
            first_deadline - time.monotonic(), self._expire_group, group
        )

    def _expire_group(self, group: _DeadlineGroup) -> None:
        group.timer = None
        now = time.monotonic() + 0.001
        for send in group.sends:
            if not send.done and send.deadline <= now:
                self._expire(send)
        if group.remaining:
            group.sends = [send for send in group.sends if not send.done]
            first_deadline = min(send.deadline for send in group.sends)
            group.timer = self._running_loop.call_later(
                first_deadline - time.monotonic(), self._expire_group, group
            )

    async def _write_ready(self) -> None:
        ready = self._ready
        while ready:
            head = ready[0]
            if head.done:
                ready.popleft()
                continue
            topic = head.message.topic
            if self._dynamic and not self._directory.watching(topic):
                # zk://: the topic's brokers are looked up once, then followed
                self._parked.append(ready.popleft())
                self._discover(topic)
                continue
            addresses = self._brokers_for(topic)
            if not addresses and self._dynamic:
                # none registered right now: wait for one to appear (or the deadline)
                self._parked.append(ready.popleft())
                continue
            if not addresses:
                ready.popleft()
                self._finish(
                    head, NotConnectedError(f"no broker serves topic {head.message.topic!r}")
                )
                continue
            session = self._pick(head, addresses)
            if session is None:
                # not connected yet: wait for on_opened (or the deadline)
                self._parked.append(ready.popleft())
                self._connect(addresses)
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
                    self._requeue_session(session, exc)

    def _brokers_for(self, topic: str) -> tuple[str, ...]:
        if self._dynamic:
            return tuple(self._directory.brokers_for(topic))
        addresses = self._topic_brokers.get(topic)
        if addresses is None:
            addresses = tuple(self._directory.brokers_for(topic))
            self._topic_brokers[topic] = addresses
        return addresses

    def _pick(self, send: _Send, addresses: tuple[str, ...]) -> Session | None:
        if self._directory.static:
            candidates = [s for s in self._open.values() if s.alive]
        else:
            candidates = [self._open[a] for a in addresses if a in self._open]
            candidates = [s for s in candidates if s.alive]
        if len(candidates) > 1 and send.avoid:
            candidates = [s for s in candidates if s.address != send.avoid] or candidates
        if not candidates:
            return None
        return candidates[0] if len(candidates) == 1 else random.choice(candidates)  # noqa: S311

    def _take_batch(self, session: Session) -> list[_Send]:
        limits = session.limits
        max_count = min(self._max_batch, limits.max_batch_messages or self._max_batch)
        max_bytes = min(self._max_batch_bytes, limits.max_batch_bytes or self._max_batch_bytes)
        ready = self._ready
        any_broker = self._directory.static
        batch: list[_Send] = []
        skipped: list[_Send] = []
        total = 0
        while ready and len(batch) < max_count:
            send = ready[0]
            if send.done:
                ready.popleft()
                continue
            if batch and total + send.size > max_bytes:
                break
            ready.popleft()
            if any_broker or session.address in self._brokers_for(send.message.topic):
                batch.append(send)
                total += send.size
            else:
                skipped.append(send)
        ready.extendleft(reversed(skipped))
        return batch

    def _connect(self, addresses: tuple[str, ...]) -> None:
        for address in addresses:
            if address not in self._links:
                link = Link(
                    address,
                    self._params,
                    self,
                    connect_timeout=self._connect_timeout,
                    max_delay=self._reconnect_max_delay,
                    transport=self._transport,
                )
                self._links[address] = link
                link.start(self._link_tasks)

    # -- loop thread: zk:// discovery -------------------------------------------------

    def _discover(self, topic: str) -> None:
        if topic not in self._discovering:
            self._discovering.add(topic)
            self._tasks.spawn(self._look_up(topic), f"discover:{topic}")

    async def _look_up(self, topic: str) -> None:
        # retried with backoff until found: parked sends meanwhile expire at their deadline
        delay = _DISCOVERY_RETRY_MIN
        try:
            while True:
                try:
                    await self._directory.watch([topic], self._connect_timeout)
                except (KiteQError, TimeoutError) as exc:
                    error = exc if isinstance(exc, KiteQError) else None
                    self._registry_error = error or RegistryUnavailableError(
                        f"no answer from the registry within {self._connect_timeout}s"
                    )
                    if isinstance(exc, ClientClosedError):
                        return
                    logger.warning(
                        "cannot look up the brokers of topic %r (%s); retrying in %.1fs",
                        topic,
                        self._registry_error,
                        delay,
                    )
                    await asyncio.sleep(backoff_delay(delay))
                    delay = min(delay * 2, _DISCOVERY_RETRY_MAX)
                else:
                    break
        finally:
            self._discovering.discard(topic)
        self._registry_error = None
        self._directory.publish_producer(topic, self._group_id)
        self._on_brokers_changed()

    def _on_brokers_changed(self) -> None:
        """zk://: dial brokers that appeared, retire those gone; parked sends go again."""
        if self._closed:
            return
        wanted = tuple(self._directory.every())
        for address in [a for a in self._links if a not in wanted]:
            link = self._links.pop(address)
            # half-closed: acks still on the way arrive; what stays unacked is re-sent
            # elsewhere when the session ends (on_lost)
            logger.info("broker left the registry: closing its session broker=%s", address)
            self._tasks.spawn(link.stop(_RETIRE_GRACE), f"retire:{address}")
        self._connect(wanted)
        if self._parked:
            self._ready.extendleft(reversed(self._parked))
            self._parked.clear()
        self._wake.set()

    # -- loop thread: outcomes --------------------------------------------------------

    def _finish(self, send: _Send, outcome: SendResult | KiteQError) -> None:
        if send.done:
            return
        send.done = True
        if send.session is not None:
            send.session = None
            self._unacked -= 1
        group = send.group
        if group is not None:
            group.remaining -= 1
            if group.remaining == 0 and group.timer is not None:
                group.timer.cancel()
                group.timer = None
                group.sends = []
        message_id = send.message.message_id
        if self._active.get(message_id) is send:
            del self._active[message_id]
        self._outstanding -= 1
        self._resolved += 1
        if (self._room_waiters or self._room_futures) and not self._room_wake_pending:
            # once for all the sends this iteration resolves, not once per send
            self._room_wake_pending = True
            self._running_loop.call_soon(self._wake_room)
        future = send.future
        # a concurrent future is running (cannot be cancelled); an asyncio one may be
        if send.sync or not future.done():
            if isinstance(outcome, SendResult):
                future.set_result(outcome)
            else:
                # an error instance may be shared by many sends: each waiter gets its own
                future.set_exception(fresh_error(outcome))
        if send.followers is not None:
            for follower in send.followers:
                if not follower.done:
                    self._finish(follower, outcome)
        if self._closing and self._outstanding == 0 and not self._inbox:
            self._drained.set()

    def _expire(self, send: _Send) -> None:
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
            reasons = [
                str(self._links[a].last_error)
                for a in self._brokers_for(send.message.topic)
                if a in self._links and self._links[a].last_error is not None
            ]
            if not reasons and self._registry_error is not None:
                reasons = [str(self._registry_error)]
            error = NotConnectedError(
                f"no broker reachable for topic {send.message.topic!r} within {send.timeout}s"
                + (f" ({reasons[0]})" if reasons else "")
            )
        self._finish(send, error)

    def _retry(self, send: _Send, error: KiteQError, *, delay: float) -> None:
        if send.session is not None:
            send.session = None
            self._unacked -= 1
        send.last_error = error
        if not error.retriable or send.attempts > self._retries:
            self._finish(send, error)
        elif delay <= 0:
            self._requeue(send)
        else:
            self._running_loop.call_later(delay, self._requeue, send)

    def _requeue(self, send: _Send) -> None:
        if send.done:
            return
        self._ready.appendleft(send)
        self._wake.set()

    def _requeue_session(self, session: Session, reason: KiteQError) -> None:
        error = NotConnectedError(
            f"stream to broker {session.address} lost before the store-ack ({reason})"
        )
        lost = [s for s in self._active.values() if s.session is session and not s.done]
        # re-queued in their original order, ahead of newer sends
        for send in reversed(lost):
            send.avoid = session.address
            self._retry(send, error, delay=0)

    def _fail_all(self, error: KiteQError) -> None:
        self._drain_inbox()
        for send in list(self._active.values()):
            if not send.done:
                self._finish(send, error)
        self._ready.clear()
        self._parked.clear()

    async def _flush(self, timeout: float) -> None:
        self._closing = True
        self._wake.set()
        if self._outstanding or self._inbox:
            try:
                async with asyncio.timeout(timeout):
                    await self._drained.wait()
            except TimeoutError:
                logger.warning(
                    "producer closing with %d sends unacknowledged after %.1fs",
                    self._outstanding + len(self._inbox),
                    timeout,
                )
        self._fail_all(ClientClosedError("producer closed before the store-ack"))

    def _task_failed(self, exc: BaseException) -> None:
        error = exc if isinstance(exc, KiteQError) else KiteQError(f"producer failed: {exc!r}")
        self._fail(error)

    def _fail(self, error: KiteQError) -> None:
        with self._lock:
            if self._fatal is None:
                self._fatal = error
            self._room.notify_all()
        self._fail_all(error)

    # -- SessionListener (loop thread) ------------------------------------------------

    def on_opened(self, session: Session) -> None:
        """A session is open: parked sends may go."""
        self._open[session.address] = session
        self._outbox.wake()
        if self._parked:
            self._ready.extendleft(reversed(self._parked))
            self._parked.clear()
            self._wake.set()

    def on_lost(self, session: Session, reason: KiteQError) -> None:
        """A session ended: what it had not acked is sent again (same ids)."""
        if self._open.get(session.address) is session:
            del self._open[session.address]
        self._requeue_session(session, reason)

    def on_failed(self, address: str, error: KiteQError) -> None:
        """A non-retriable error (wrong secret): every send fails with it, now and later."""
        logger.error("producer failed group=%s broker=%s error=%s", self._group_id, address, error)
        self._fail(error)
        for link in self._links.values():
            if link.address != address:
                self._tasks.spawn(link.stop(0), f"stop:{link.address}")

    def on_store_acks(self, session: Session, results: list[_wire.StoreResult]) -> None:
        """Resolve sends by message id."""
        active = self._active
        address = session.address
        finish = self._finish
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
        if self._unacked == 0 and (self._inbox or self._ready):
            self._wake.set()

    def on_deliveries(self, session: Session, messages: list[ReceivedMessage]) -> None:
        """A producer session consumes nothing; a delivery here is a broker bug."""
        logger.warning(
            "ignoring %d deliveries on a producer session broker=%s", len(messages), session.address
        )

    def on_tx_checks(self, session: Session, checks: list[_wire.TxCheckRequest]) -> None:
        """Answer with the ``tx_checker`` (UNKNOWN without one), on the same broker."""
        self._checks.submit(session.address, checks)
