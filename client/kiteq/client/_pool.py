"""The brokers a client talks to: directory, links, sessions, one task set, one state.

A ``BrokerPool`` sits under both the producer and the consumer. It dials a ``Link`` per
broker the owner wants, keeps the open sessions by address, follows the directory (new
brokers are dialled, removed ones retired: half-closed, so the acks on their way still
arrive), looks a topic's brokers up in a live registry on first use, and turns a
non-retriable error (a refused secret, a crashed task) into the client's fatal error.
Frames are passed on to the owner (a ``PoolListener``). Loop thread, except ``state``
and ``error``, which any thread may read.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from kiteq.client import _wire
from kiteq.client._base import BrokerDirectory, PoolListener
from kiteq.client._channel import Link, Session, backoff_delay, fresh_error
from kiteq.client._tls import Transport
from kiteq.core.errors import ClientClosedError, KiteQError, RegistryUnavailableError
from kiteq.core.message import ReceivedMessage
from kiteq.core.tasks import TaskSet

__all__ = ["BrokerPool", "ClientState"]

logger = logging.getLogger(__name__)

# backoff of a failed look-up of a topic's brokers in a live registry
_DISCOVERY_RETRY_MIN: Final = 0.2
_DISCOVERY_RETRY_MAX: Final = 5.0


class ClientState(enum.StrEnum):
    """Where a producer or consumer is in its life; one value, checked at every call."""

    NEW = "new"  # built, not started
    RUNNING = "running"
    FAILED = "failed"  # a non-retriable error: every call raises it
    CLOSING = "closing"  # close() called: no new work, what is pending drains
    CLOSED = "closed"


# close() has been called: such a client takes no new work
_SHUT: Final = frozenset({ClientState.CLOSING, ClientState.CLOSED})


class BrokerPool:
    """Links to the brokers of one client, and the client's state and fatal error.

    Args:
        role: ``"producer"`` or ``"consumer"``, for logs and task names.
        directory: Where the brokers are.
        params: What each session declares when it opens.
        listener: Told about sessions, frames and the fatal error.
        wanted: The addresses the owner wants connected (asked when the directory changes).
        transport: Plaintext or TLS.
        connect_timeout: Seconds to open a session.
        reconnect_max_delay: Upper bound of a link's reconnect backoff.
        retire_grace: Seconds a retired broker's session may take to return its last acks.
    """

    def __init__(
        self,
        role: str,
        directory: BrokerDirectory,
        params: _wire.OpenParams,
        listener: PoolListener,
        *,
        wanted: Callable[[], Sequence[str]],
        transport: Transport,
        connect_timeout: float,
        reconnect_max_delay: float,
        retire_grace: float,
    ) -> None:
        self.role = role
        self.directory = directory
        self.state = ClientState.NEW
        self.error: KiteQError | None = None
        self.links: dict[str, Link] = {}
        self.sessions: dict[str, Session] = {}
        self.tasks = TaskSet(f"kiteq-{role}", self._task_failed)
        # set once closed or failed (what a consumer's wait() waits for)
        self.stopped = asyncio.Event()
        # why the last look-up of a topic's brokers failed (live registries)
        self.registry_error: KiteQError | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread = 0
        self._params = params
        self._listener = listener
        self._wanted = wanted
        self._transport = transport
        self._connect_timeout = connect_timeout
        self._reconnect_max_delay = reconnect_max_delay
        self._retire_grace = retire_grace
        self._closed = asyncio.Event()
        self._discovering: set[str] = set()

    # -- state (any thread reads) -------------------------------------------------------

    @property
    def shut(self) -> bool:
        """True once ``close`` has begun."""
        return self.state in _SHUT

    def check_accepting(self) -> None:
        """Raise unless new work is taken (any thread).

        Raises:
            KiteQError: A copy of the fatal error.
            ClientClosedError: The client is closing or closed.
        """
        if self.error is not None:
            raise fresh_error(self.error)
        if self.state in _SHUT:
            raise ClientClosedError(f"{self.role} is closed")

    def _set_state(self, state: ClientState) -> None:
        if state is not self.state:
            logger.debug("%s state %s -> %s", self.role, self.state, state)
            self.state = state

    # -- life cycle (loop thread) -------------------------------------------------------

    def start(self) -> None:
        """Bind the pool to the running loop and follow the directory."""
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self._set_state(ClientState.RUNNING)
        self.directory.add_listener(self._on_directory_changed)

    async def begin_close(self) -> ClientState | None:
        """Enter CLOSING; return the state left, or None (once closed) if it had begun."""
        previous = self.state
        if previous in _SHUT:
            await self._closed.wait()
            return None
        self._set_state(ClientState.CLOSING)
        return previous

    async def close_links(self, grace: float) -> None:
        """Half-close every session (waiting at most *grace* seconds), then end every task."""
        await asyncio.gather(*(link.stop(grace) for link in self.links.values()))
        await self.tasks.cancel()

    async def finish_close(self) -> None:
        """Close the directory and enter CLOSED."""
        try:
            await self.directory.close()
        finally:
            self._set_state(ClientState.CLOSED)
            self.stopped.set()
            self._closed.set()

    # -- links (loop thread) ------------------------------------------------------------

    def connected(self) -> list[str]:
        """Addresses of the brokers with an open session right now."""
        return [address for address, link in self.links.items() if link.session is not None]

    def dial(self, addresses: Iterable[str]) -> None:
        """Start a link to each of *addresses* not linked yet."""
        for address in addresses:
            if address not in self.links:
                link = Link(
                    address,
                    self._params,
                    self,
                    connect_timeout=self._connect_timeout,
                    max_delay=self._reconnect_max_delay,
                    transport=self._transport,
                )
                self.links[address] = link
                link.start(self.tasks)

    async def first_attempts(self, addresses: Sequence[str]) -> KiteQError | None:
        """Wait (bounded by ``connect_timeout``) for the first attempt of each link.

        Returns:
            A copy of the fatal error when one came up meanwhile, else None.
        """
        try:
            async with asyncio.timeout(self._connect_timeout + 1.0):
                for address in addresses:
                    await self.links[address].attempted.wait()
        except TimeoutError:
            logger.debug("first connection attempts still running role=%s", self.role)
        if self.error is not None:
            return fresh_error(self.error)
        if not self.sessions:
            logger.warning(
                "no broker reachable yet group=%s brokers=%s: retrying in the background",
                self._params.group_id,
                ",".join(addresses),
            )
        return None

    def _on_directory_changed(self) -> None:
        # dial the brokers that appeared, retire those gone
        if self.state is not ClientState.RUNNING:
            return
        wanted = self._wanted()
        for address in [a for a in self.links if a not in wanted]:
            link = self.links.pop(address)
            # half-closed: acks still on the way arrive; what stays unacked is the owner's
            # to send again when the session ends (on_lost)
            logger.info("broker left the registry: closing its session broker=%s", address)
            self.tasks.spawn(link.stop(self._retire_grace), f"retire:{address}")
        for address in wanted:
            if address not in self.links:
                logger.info("broker joined the registry broker=%s", address)
        self.dial(wanted)
        self._listener.on_brokers_changed()

    # -- live registries: a topic's brokers, looked up on first use (loop thread) --------

    def discover(self, topic: str, group: str) -> None:
        """Look up and follow *topic*'s brokers in the background (once at a time)."""
        if topic not in self._discovering:
            self._discovering.add(topic)
            self.tasks.spawn(self._look_up(topic, group), f"discover:{topic}")

    async def _look_up(self, topic: str, group: str) -> None:
        # retried with backoff until found: the owner's waiting sends expire meanwhile
        delay = _DISCOVERY_RETRY_MIN
        try:
            while True:
                try:
                    await self.directory.watch([topic], self._connect_timeout)
                except (KiteQError, TimeoutError) as exc:
                    error = exc if isinstance(exc, KiteQError) else None
                    self.registry_error = error or RegistryUnavailableError(
                        f"no answer from the registry within {self._connect_timeout}s"
                    )
                    if isinstance(exc, ClientClosedError):
                        return
                    logger.warning(
                        "cannot look up the brokers of topic %r (%s); retrying in %.1fs",
                        topic,
                        self.registry_error,
                        delay,
                    )
                    await asyncio.sleep(backoff_delay(delay))
                    delay = min(delay * 2, _DISCOVERY_RETRY_MAX)
                else:
                    break
        finally:
            self._discovering.discard(topic)
        self.registry_error = None
        self.directory.publish_producer(topic, group)
        self._on_directory_changed()

    # -- the fatal error (loop thread) --------------------------------------------------

    def fail(self, error: KiteQError) -> None:
        """Record the fatal *error* (the first one stays) and tell the owner."""
        if self.error is None:
            self.error = error
        if self.state not in _SHUT:
            self._set_state(ClientState.FAILED)
        self.stopped.set()
        self._listener.on_fatal(error)

    def _task_failed(self, exc: BaseException) -> None:
        # a task crashed (a bug, not a network error): the client stops with it
        error = exc if isinstance(exc, KiteQError) else KiteQError(f"{self.role} failed: {exc!r}")
        self.fail(error)

    # -- SessionListener (loop thread) --------------------------------------------------

    def on_opened(self, session: Session) -> None:
        """Keep *session* by address, then tell the owner."""
        self.sessions[session.address] = session
        self._listener.on_opened(session)

    def on_lost(self, session: Session, reason: KiteQError) -> None:
        """Forget *session*, then tell the owner."""
        if self.sessions.get(session.address) is session:
            del self.sessions[session.address]
        self._listener.on_lost(session, reason)

    def on_failed(self, address: str, error: KiteQError) -> None:
        """A link gave up (wrong secret, refused binding): the client fails with *error*."""
        logger.error(
            "%s failed group=%s broker=%s error=%s",
            self.role,
            self._params.group_id,
            address,
            error,
        )
        self.fail(error)
        for link in self.links.values():
            if link.address != address:
                self.tasks.spawn(link.stop(0), f"stop:{link.address}")

    def on_store_acks(self, session: Session, results: list[_wire.StoreResult]) -> None:
        """Passed on to the owner."""
        self._listener.on_store_acks(session, results)

    def on_deliveries(self, session: Session, messages: list[ReceivedMessage]) -> None:
        """Passed on to the owner."""
        self._listener.on_deliveries(session, messages)

    def on_tx_checks(self, session: Session, checks: list[_wire.TxCheckRequest]) -> None:
        """Passed on to the owner."""
        self._listener.on_tx_checks(session, checks)
