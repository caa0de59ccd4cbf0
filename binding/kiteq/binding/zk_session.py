"""One ZooKeeper session of KiteQ: the kazoo client recipe, connect/close, state, node keeper.

The broker's registry (``kiteq.binding.zk``), its takeover records (``zk_takeover``, on the
registry's session) and the client library's discovery open their sessions here, so they
agree on retries, authentication and ACLs. With ``digest=user:password`` a session:

- authenticates with the digest scheme (``auth_data``, which kazoo sends again on every
  connection, so nodes re-created after a lost session are written by the same identity);
- creates every node, the parents ``makepath`` / ``ensure_path`` add included, with
  ``default_acl`` = world READ (anyone discovers brokers and reads bindings) + ALL for
  *user* (only holders of the credentials change or delete them);
- logs through ``kazoo.client.kiteq``, where the password of the ``Auth`` request, which
  kazoo logs with every request it sends at DEBUG, is masked. The logger is a child of
  kazoo's own, so ``logging`` configuration of ``kazoo`` still applies to it.

Threads: kazoo calls its listeners on its own threads; ``hop`` moves such a call onto the
event loop without blocking. Blocking kazoo calls run in worker threads
(``asyncio.to_thread``); ``ZkSession.run`` does that and translates kazoo's errors into
``RegistryError`` / ``RegistryUnavailableError`` (retriable).

Only kazoo (a client dependency) is imported: the client library uses this module.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

from kazoo.client import KazooClient
from kazoo.exceptions import (
    ConnectionClosedError,
    ConnectionLoss,
    KazooException,
    OperationTimeoutError,
    SessionExpiredError,
    SessionMovedError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.serialization import Auth
from kazoo.protocol.states import KazooState
from kazoo.retry import KazooRetry, RetryFailedError
from kazoo.security import make_acl, make_digest_acl

from kiteq.binding import zk_nodes as nodes
from kiteq.binding.zk_uri import ZkSettings
from kiteq.core.errors import RegistryError, RegistryUnavailableError
from kiteq.core.tasks import TaskSet

__all__ = [
    "KAZOO_LOGGER",
    "NodeKeeper",
    "SessionState",
    "ZkSession",
    "digest_acl",
    "hop",
    "new_client",
    "registry_error",
]

# the ZooKeeper modules of kiteq.binding log as one component, the registry's logger
logger = logging.getLogger("kiteq.binding.zk")

KAZOO_LOGGER: Final = "kazoo.client.kiteq"
MASK: Final = "***"
# background retries (node keeper): from _RETRY_MIN doubling up to _RETRY_MAX
_RETRY_MIN: Final = 0.2
_RETRY_MAX: Final = 10.0
# NodeKeeper.release gives up after this; the nodes then vanish with the session
_RELEASE_TIMEOUT: Final = 5.0
# kazoo errors that say "no answer now", not "refused": doing it again may succeed
_UNAVAILABLE: Final = (
    ConnectionClosedError,
    ConnectionLoss,
    OperationTimeoutError,
    RetryFailedError,
    SessionExpiredError,
    SessionMovedError,
    nodes.NodeContendedError,
)

_T = TypeVar("_T")


def digest_acl(user: str, password: str) -> list[Any]:
    """The ACL of the nodes a session with credentials creates: world READ, ALL for *user*."""
    return [make_digest_acl(user, password, all=True), make_acl("world", "anyone", read=True)]


def new_client(settings: ZkSettings, hosts: str | None = None) -> Any:
    """A kazoo client (not started) for *settings*, connecting to *hosts*.

    Args:
        settings: The parsed ``zk://`` URI.
        hosts: The connect string; default ``settings.connect_string`` (with the chroot).
    """
    acl = None
    auth = None
    if settings.digest is not None:
        user, password = settings.digest
        acl = digest_acl(user, password)
        auth = [("digest", f"{user}:{password}")]
    return KazooClient(
        hosts=settings.connect_string if hosts is None else hosts,
        timeout=settings.session_timeout,
        connection_retry=KazooRetry(max_tries=-1, delay=0.2, max_delay=5.0),
        command_retry=KazooRetry(max_tries=5, delay=0.1, max_delay=2.0),
        default_acl=acl,
        auth_data=auth,
        logger=_kazoo_logger,
    )


def registry_error(exc: BaseException, where: str) -> RegistryError:
    """*exc* (a kazoo error) as a ``KiteQError``: retriable unless ZooKeeper refused."""
    retriable = isinstance(exc, (*_UNAVAILABLE, KazooTimeoutError))
    kind = RegistryUnavailableError if retriable else RegistryError
    return kind(f"{where}: {str(exc) or type(exc).__name__}")


def hop(
    loop: asyncio.AbstractEventLoop | None,
    closed: threading.Event,
    callback: Callable[..., None],
    *args: Any,
) -> bool:
    """From a kazoo thread: run *callback* on *loop*, never blocking.

    False once *closed* is set or the loop is gone (a kazoo watch returning it ends).
    """
    if closed.is_set() or loop is None:
        return False
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed
        return False
    return True


class SessionState(enum.Enum):
    """kazoo's connection state, as the loop thread last heard of it."""

    CONNECTED = "connected"
    SUSPENDED = "suspended"  # the session may survive: the server has not expired it yet
    LOST = "lost"  # no session (not yet connected, expired, or closed)

    @classmethod
    def of(cls, state: str) -> SessionState:
        if state == KazooState.CONNECTED:
            return cls.CONNECTED
        return cls.SUSPENDED if state == KazooState.SUSPENDED else cls.LOST


StateListener = Callable[[SessionState, SessionState], None]


class ZkSession:
    """One kazoo session for a ``zk://`` URI, seen from the event loop.

    Args:
        settings: The parsed ``zk://`` URI.
        connect_timeout: Seconds ``open`` waits for a session by default.
    """

    def __init__(self, settings: ZkSettings, *, connect_timeout: float = 15.0) -> None:
        self.settings = settings
        self._connect_timeout = connect_timeout
        self._zk: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # read by kazoo's threads: once set, state changes are no longer hopped
        self.closed = threading.Event()
        self._state = SessionState.LOST
        self._listeners: list[StateListener] = []

    @property
    def client(self) -> Any:
        """The started kazoo client (for the recipes of ``kiteq.binding``).

        Raises:
            RegistryError: Not open, or closed.
        """
        if self._zk is None:
            raise RegistryError(f"ZooKeeper {self.settings.redacted()}: session not open")
        return self._zk

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def session_id(self) -> int | None:
        """The current ZooKeeper session id, or None while not connected."""
        client_id = None if self._zk is None else self._zk.client_id
        return None if client_id is None else int(client_id[0])

    def add_listener(self, listener: StateListener) -> None:
        """Call ``listener(previous, state)`` on the loop thread at every change of state."""
        self._listeners.append(listener)

    async def open(self, timeout: float | None = None) -> None:
        """Connect; a missing chroot is created first, outside it (kazoo warns otherwise).

        Bounded by kazoo's own start timeout, so no thread outlives a failed open; after a
        failure nothing is left running and ``open`` may be called again.

        Raises:
            RegistryUnavailableError: No answer within *timeout* (default: the connect
                timeout) seconds.
            RegistryError: ZooKeeper refused (e.g. bad credentials); already open, or closed.
        """
        if self._zk is not None or self.closed.is_set():
            raise RegistryError(f"ZooKeeper {self.settings.redacted()}: session already opened")
        self._loop = asyncio.get_running_loop()
        wait = self._connect_timeout if timeout is None else timeout
        try:
            await asyncio.to_thread(self._connect, wait)
        except KazooTimeoutError as exc:
            raise RegistryUnavailableError(
                f"ZooKeeper {self.settings.redacted()}: no answer within {wait:g}s"
            ) from exc
        except KazooException as exc:
            raise registry_error(exc, f"ZooKeeper {self.settings.redacted()}") from exc

    def _connect(self, timeout: float) -> None:
        # worker thread; the client is published before it starts so that a close() during
        # the start (an open cancelled meanwhile) still closes it
        settings = self.settings
        if settings.chroot:
            _create_chroot(settings, timeout)
        zk = self._zk = new_client(settings)
        zk.add_listener(self._kz_state)
        try:
            zk.start(timeout)
        except BaseException:
            self._zk = None
            close_client(zk)
            raise

    async def close(self) -> None:
        """Close the session (its ephemeral nodes go with it); idempotent."""
        self.closed.set()
        self._state = SessionState.LOST
        zk, self._zk = self._zk, None
        if zk is not None:
            await asyncio.to_thread(close_client, zk)

    async def run(self, func: Callable[..., _T], *args: Any) -> _T:
        """``func(client, *args)`` in a worker thread, kazoo's errors translated.

        Raises:
            RegistryUnavailableError: ZooKeeper did not answer (retriable).
            RegistryError: ZooKeeper refused, or the session is not open.
        """
        zk = self.client
        try:
            return await asyncio.to_thread(func, zk, *args)
        except KazooException as exc:
            raise registry_error(exc, f"ZooKeeper {self.settings.redacted()}") from exc

    def _kz_state(self, state: str) -> None:
        # kazoo thread; returning True would remove the listener
        hop(self._loop, self.closed, self._on_state, SessionState.of(state))

    def _on_state(self, state: SessionState) -> None:
        previous, self._state = self._state, state
        if self.closed.is_set() or state == previous:
            return
        for listener in list(self._listeners):
            listener(previous, state)


def _create_chroot(settings: ZkSettings, timeout: float) -> None:
    # worker thread
    root = new_client(settings, settings.hosts)
    try:
        root.start(timeout)
        root.retry(root.ensure_path, settings.chroot)
    finally:
        close_client(root)


def close_client(zk: Any) -> None:
    """Stop and close a kazoo client (worker thread)."""
    try:
        zk.stop()
    finally:
        zk.close()


Wanted = tuple[Mapping[str, bytes], Mapping[str, bytes]]


class NodeKeeper:
    """Keeps a session's nodes in ZooKeeper: written now, ephemeral ones again after LOST.

    Ephemeral nodes are owner-checked (``zk_nodes.ensure_ephemeral``: a stale node of an
    old session is replaced), or with *ensure* ``zk_nodes.ensure_unless_held`` created only
    where nobody holds them; persistent ones are written when they differ. A failed sync
    is retried with backoff until it succeeds. A node the ACLs refuse (``DENIED``) is not
    tried again in this session; *on_denied* hears of it once.

    Args:
        session: The session the nodes belong to.
        wanted: (ephemeral, persistent) nodes, path -> data; asked at every sync.
        what: What the nodes are, for logs (``zookeeper {what} failed``).
        on_synced: Called on the loop after each sync with the count of each
            ``zk_nodes.Outcome`` value and whether it was the first sync.
        ensure: How one ephemeral node is written (``zk_nodes.ensure_ephemeral``).
        on_denied: Called on the loop with the nodes newly refused by the ACLs.
    """

    def __init__(
        self,
        session: ZkSession,
        wanted: Callable[[], Wanted],
        *,
        what: str,
        on_synced: Callable[[collections.Counter[str], bool], None],
        ensure: Callable[[Any, str, bytes], nodes.Outcome] = nodes.ensure_ephemeral,
        on_denied: Callable[[list[str]], None] | None = None,
    ) -> None:
        self._session = session
        self._wanted = wanted
        self._what = what
        self._on_synced = on_synced
        self._ensure = ensure
        self._on_denied = on_denied
        # ephemeral nodes the ACLs refused in this session: not tried again until a new one
        self._denied: set[str] = set()
        self._tasks = TaskSet(f"kiteq-zk-{what}", self._failed)
        self._failure: BaseException | None = None
        self._resync = asyncio.Event()
        self.synced = asyncio.Event()
        self._own: set[str] = set()
        # worker threads: one sync or release at a time; once set, no more nodes are created
        self._sync_lock = threading.Lock()
        self._releasing = threading.Event()
        session.add_listener(self._on_state)

    def start(self) -> None:
        """Start keeping the nodes (the first sync runs now)."""
        self._releasing.clear()
        self.synced.clear()
        self._resync.set()
        self._tasks.spawn(self._keep(), "keep")

    def resync(self) -> None:
        """The wanted nodes changed: sync again."""
        self._resync.set()

    async def release(self) -> int | None:
        """Stop keeping the nodes and delete this session's ephemeral ones (bounded).

        Returns:
            How many were deleted; None when they are left to vanish with the session.
        """
        self._releasing.set()
        await self._tasks.cancel()
        paths = sorted(self._own | set(self._wanted()[0]))
        self._own.clear()
        if self._session.state != SessionState.CONNECTED:
            logger.warning("zookeeper not connected: %s nodes vanish with the session", self._what)
            return None
        try:
            return await asyncio.wait_for(self._session.run(self._delete, paths), _RELEASE_TIMEOUT)
        except (RegistryError, TimeoutError) as exc:
            logger.warning(
                "could not remove %s nodes (%r): they vanish with the session", self._what, exc
            )
            return None

    async def stop(self) -> None:
        """Stop keeping the nodes (they stay until the session ends).

        Raises:
            RegistryError: The keeper task had crashed.
        """
        self._releasing.set()
        await self._tasks.cancel()
        failure, self._failure = self._failure, None
        if failure is not None:
            raise RegistryError(f"zookeeper {self._what} task failed") from failure

    def _failed(self, exc: BaseException) -> None:
        self._failure = exc

    def _on_state(self, previous: SessionState, state: SessionState) -> None:
        if state == SessionState.CONNECTED:
            if previous == SessionState.LOST:
                self._denied.clear()  # a new session: the refused ones are tried once more
            self._resync.set()

    async def _keep(self) -> None:
        delay = _RETRY_MIN
        while True:
            await self._resync.wait()
            self._resync.clear()
            if self._session.state != SessionState.CONNECTED:
                continue  # CONNECTED sets _resync again
            ephemeral, persistent = self._wanted()
            ephemeral = {p: d for p, d in ephemeral.items() if p not in self._denied}
            try:
                outcomes = await self._session.run(self._sync, ephemeral, persistent)
            except RegistryError as exc:
                logger.warning(
                    "zookeeper %s failed (%r); retrying in %.1fs",
                    self._what,
                    exc.__cause__ or exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
                self._resync.set()
                continue
            delay = _RETRY_MIN
            denied = [path for path, outcome in outcomes if outcome is nodes.Outcome.DENIED]
            if denied:
                self._denied.update(denied)
                if self._on_denied is not None:
                    self._on_denied(denied)
            self._own |= ephemeral.keys() - self._denied
            self._on_synced(
                collections.Counter(o.value for _, o in outcomes), not self.synced.is_set()
            )
            self.synced.set()

    def _sync(
        self, zk: Any, ephemeral: Mapping[str, bytes], persistent: Mapping[str, bytes]
    ) -> list[tuple[str, nodes.Outcome]]:
        # worker thread
        outcomes = []
        with self._sync_lock:
            for path, data in persistent.items():
                outcomes.append((path, zk.retry(nodes.ensure_persistent, zk, path, data)))
            for path, data in ephemeral.items():
                if self._releasing.is_set():
                    break
                outcomes.append((path, zk.retry(self._ensure, zk, path, data)))
        return outcomes

    def _delete(self, zk: Any, paths: Sequence[str]) -> int:
        # worker thread; waits for a sync in progress, which then creates no more
        with self._sync_lock:
            return sum(bool(zk.retry(nodes.delete_own, zk, path)) for path in paths)


def _masked(auth: Auth) -> Auth:
    user, colon, _ = str(auth.auth).partition(":")
    return auth._replace(auth=f"{user}:{MASK}" if colon else MASK)


class _MaskAuth(logging.Filter):
    """Masks the credential of kazoo's ``Auth`` requests in its records' arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(arg, Auth) for arg in args):
            record.args = tuple(_masked(arg) if isinstance(arg, Auth) else arg for arg in args)
        return True


# A logger's filters see only the records logged on that logger, not those propagated to
# it: the filter sits on the logger the sessions are given, never on kazoo's global one.
_kazoo_logger = logging.getLogger(KAZOO_LOGGER)
_kazoo_logger.addFilter(_MaskAuth())
