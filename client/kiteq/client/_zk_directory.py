"""Brokers found in ZooKeeper, followed live: the ``zk://`` registry of ``_discovery``.

A module of its own so that kazoo is imported only by clients given a ``zk://`` registry
(``_discovery.resolve`` imports it then): ``import kiteq.client`` and ``brokers=[...]``
clients never load it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from kazoo.exceptions import KazooException, NoAuthError, NoNodeError
from kazoo.recipe.watchers import ChildrenWatch

from kiteq.binding import zk_nodes as nodes
from kiteq.binding.model import Binding
from kiteq.binding.zk_session import NodeKeeper, SessionState, ZkSession, hop
from kiteq.binding.zk_uri import parse_zk_uri
from kiteq.client._base import brokers_for_any
from kiteq.core.errors import ClientClosedError, RegistryError, RegistryUnavailableError
from kiteq.core.tasks import TaskSet

__all__ = ["ZkDirectory", "broker_address"]

logger = logging.getLogger("kiteq.client.discovery")

# the key of the ``/kiteq/alive_servers`` watch (every live broker: where a tx_checker listens)
_ALIVE: Final = ""
# how long to wait for ZooKeeper, and the backoff of background retries
_RETRY_MIN: Final = 0.2
_RETRY_MAX: Final = 5.0


@dataclasses.dataclass(slots=True)
class _Watch:
    """One ChildrenWatch: the brokers listed under a path (loop thread)."""

    path: str
    addresses: tuple[str, ...] = ()
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    latest: list[str] | None = None  # children not resolved to addresses yet
    resolving: bool = False
    stopped: bool = False  # read by kazoo's thread: the watch ends at its next call


def broker_address(name: str, data: bytes | None) -> str | None:
    """Where to dial the broker of a ``/kiteq/server/{topic}/{name}`` node.

    The node data's ``grpc`` field (our brokers); else the node name (KiteQ's brokers
    write no data; ``:port``, KiteQ's ``-bind=:port``, means this host). None when neither
    is a ``host:port``.
    """
    if data:
        try:
            decoded = json.loads(data)
        except ValueError:
            decoded = None
        grpc_address = decoded.get("grpc") if isinstance(decoded, dict) else None
        if isinstance(grpc_address, str) and _is_address(grpc_address):
            return grpc_address
    if name.startswith(":"):
        name = "localhost" + name
    return name if _is_address(name) else None


def _is_address(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


class ZkDirectory:
    """Brokers found in ZooKeeper (KiteQ's layout), followed live.

    ``/kiteq/server/{topic}`` is watched (a kazoo ChildrenWatch) from the first time a
    topic is used; each child is a broker serving the topic, dialled at its node data's
    ``grpc`` address (the node name for KiteQ's brokers, which write no data). kazoo's
    callbacks only hop onto the client's event loop; blocking calls run in worker threads.
    While ZooKeeper is unreachable (SUSPENDED, LOST) the last known brokers are kept; kazoo
    re-arms the watches once connected, and the producer nodes (ephemeral) are re-created
    after a LOST session. The client itself never restarts (KiteQ's client does).

    Every method but ``start``'s worker threads runs on the client's event loop.
    """

    static = False
    live = True

    def __init__(self, uri: str) -> None:
        self.settings = parse_zk_uri(uri)
        self._where = self.settings.redacted()
        digest = self.settings.digest
        # who the ZooKeeper ACLs see (for errors; never the password)
        self._who = "an unauthenticated session" if digest is None else f"digest user {digest[0]}"
        self._zk: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._closed = threading.Event()  # read by kazoo's threads
        # the one ZooKeeper session module of kiteq.binding (ACLs, chroot, state translation)
        self._session = ZkSession(self.settings)
        self._session.add_listener(self._on_state)
        # the first connect is not a reconnect: state changes count once start succeeded
        self._opened = False
        self._watches: dict[str, _Watch] = {}
        self._names: dict[str, str | None] = {}  # node path -> dial address (cache)
        self._listeners: list[Callable[[], None]] = []
        self._own: dict[str, bytes] = {}  # ephemeral nodes to keep: path -> data
        self._tasks = TaskSet("kiteq-zk-discovery")
        # the producer nodes, kept by the session module's keeper: written where nobody
        # holds them yet (another process of this host may), again after a LOST session
        self._keeper = NodeKeeper(
            self._session,
            lambda: (self._own, {}),
            what="producer nodes",
            on_synced=lambda _counts, _first: None,
            ensure=nodes.ensure_unless_held,
            on_denied=self._refused,
        )

    # -- queries (loop thread) --------------------------------------------------------------

    @property
    def session(self) -> ZkSession:
        """The directory's ZooKeeper session (opened by ``start``, closed by ``close``)."""
        return self._session

    def watching(self, topic: str) -> bool:
        """True once *topic*'s brokers are known (the watch has made its first call)."""
        watch = self._watches.get(topic)
        return watch is not None and watch.ready.is_set()

    def brokers_for(self, topic: str) -> list[str]:
        """The brokers serving *topic* right now (none before ``watch``)."""
        watch = self._watches.get(topic)
        return [] if watch is None else list(watch.addresses)

    def brokers_for_any(self, topics: Iterable[str]) -> list[str]:
        """Every address serving at least one of *topics*, without repeats, in order."""
        return brokers_for_any(self, topics)

    def every(self) -> list[str]:
        """Every broker known: of the watched topics, and alive ones once watched."""
        seen: dict[str, None] = {}
        for watch in self._watches.values():
            seen.update(dict.fromkeys(watch.addresses))
        return list(seen)

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call *listener* (on the loop thread) whenever a watched list of brokers changes."""
        self._listeners.append(listener)

    # -- life cycle -------------------------------------------------------------------------

    async def start(self, timeout: float) -> None:
        """Connect to ZooKeeper (once; concurrent callers share the attempt).

        Raises:
            RegistryUnavailableError: No answer within *timeout* seconds (retriable).
            ClientClosedError: Closed.
        """
        if self._closed.is_set():
            raise ClientClosedError("registry closed")
        if self._connecting is None or (
            self._connecting.done()
            and (self._connecting.cancelled() or self._connecting.exception() is not None)
        ):
            self._loop = asyncio.get_running_loop()
            self._connecting = asyncio.create_task(self._connect(timeout), name="kiteq-zk-connect")
        await asyncio.shield(self._connecting)

    async def _connect(self, timeout: float) -> None:
        try:
            await self._session.open(timeout)
        except RegistryError as exc:
            raise RegistryUnavailableError(str(exc)) from exc
        if self._closed.is_set():
            await self._session.close()
            raise ClientClosedError("registry closed")
        self._zk = self._session.client
        self._opened = True
        self._keeper.start()
        logger.info("client connected to zookeeper %s", self._where)

    async def close(self) -> None:
        """Stop the watches and close the ZooKeeper session (its nodes go with it)."""
        self._closed.set()
        for watch in self._watches.values():
            watch.stopped = True
        connecting = self._connecting
        if connecting is not None and not connecting.done():
            connecting.cancel()
            await asyncio.wait([connecting])
        await self._tasks.cancel()
        try:
            await self._keeper.stop()
        except RegistryError:
            logger.exception("producer nodes: the keeper had failed")
        self._zk = None
        await self._session.close()

    # -- watches ----------------------------------------------------------------------------

    async def watch(self, topics: Iterable[str], timeout: float) -> None:
        """Watch the brokers of *topics*; return once each is known (bounded by *timeout*).

        Raises:
            RegistryUnavailableError: ZooKeeper did not answer in time (retriable).
            ClientClosedError: Closed.
        """
        async with asyncio.timeout(timeout):
            await self.start(timeout)
            for topic in dict.fromkeys(topics):
                await self._watch(topic, f"{nodes.SERVER_ROOT}/{topic}")

    async def watch_alive(self, timeout: float) -> None:
        """Watch ``/kiteq/alive_servers`` too: ``every`` then lists every live broker."""
        async with asyncio.timeout(timeout):
            await self.start(timeout)
            await self._watch(_ALIVE, nodes.ALIVE_ROOT)

    async def _watch(self, key: str, path: str) -> None:
        watch = self._watches.get(key)
        if watch is None:
            zk = self._zk
            if zk is None or self._closed.is_set():
                raise ClientClosedError("registry closed")
            watch = self._watches[key] = _Watch(path)
            try:
                # KiteQ's brokers create the topic's node; a ChildrenWatch of a missing
                # node ends silently, so make sure it is there
                await asyncio.to_thread(zk.retry, zk.ensure_path, path)
                # the constructor makes the first call (which hops) before it returns
                await asyncio.to_thread(
                    ChildrenWatch, zk, path, functools.partial(self._kz_children, watch)
                )
            except BaseException as exc:
                watch.stopped = True  # a half-made watch ends at its first call
                if self._watches.get(key) is watch:
                    del self._watches[key]
                if isinstance(exc, KazooException):
                    raise RegistryUnavailableError(
                        f"ZooKeeper {self._where}: cannot watch {path}: {exc!r}"
                    ) from exc
                raise
        await watch.ready.wait()

    def _hop(self, callback: Callable[..., None], *args: Any) -> bool:
        # kazoo thread: never block; False when closed
        return hop(self._loop, self._closed, callback, *args)

    def _kz_children(self, watch: _Watch, children: list[str]) -> bool:
        # kazoo thread; False ends the watch
        return not watch.stopped and self._hop(self._on_children, watch, list(children))

    def _on_children(self, watch: _Watch, children: list[str]) -> None:
        watch.latest = children
        if not watch.resolving:
            watch.resolving = True
            self._tasks.spawn(self._resolve(watch), f"kiteq-zk-resolve:{watch.path}")

    async def _resolve(self, watch: _Watch) -> None:
        # one per watch at a time: applies the latest children, reading new nodes' data

        delay = _RETRY_MIN
        try:
            while watch.latest is not None and not self._closed.is_set():
                children = watch.latest
                paths = [f"{watch.path}/{child}" for child in children]
                unknown = [p for p in paths if p not in self._names]
                zk = self._zk
                if unknown and zk is not None:

                    def read(zk: Any = zk, unknown: list[str] = unknown) -> dict[str, bytes]:
                        found = {}
                        for path in unknown:
                            try:
                                found[path] = zk.retry(zk.get, path)[0] or b""
                            except NoNodeError:
                                found[path] = b""  # gone already; the next call drops it
                        return found

                    try:
                        read_data = await asyncio.to_thread(read)
                    except KazooException as exc:
                        logger.warning(
                            "cannot read broker nodes under %s (%r); retrying in %.1fs",
                            watch.path,
                            exc,
                            delay,
                        )
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, _RETRY_MAX)
                        continue
                    for path, data in read_data.items():
                        self._names[path] = broker_address(path.rpartition("/")[2], data)
                if watch.latest is not children:
                    continue  # changed while reading: apply the newest
                watch.latest = None
                addresses = tuple(
                    dict.fromkeys(a for p in paths if (a := self._names.get(p)) is not None)
                )
                for path in paths:
                    if self._names.get(path, "") is None:
                        logger.warning("ignoring broker node %s: no host:port to dial", path)
                        del self._names[path]
                if addresses != watch.addresses or not watch.ready.is_set():
                    if addresses != watch.addresses:
                        logger.info(
                            "brokers under %s: %s",
                            watch.path,
                            ",".join(addresses) or "(none)",
                        )
                    watch.addresses = addresses
                    watch.ready.set()
                    for listener in list(self._listeners):
                        listener()
        finally:
            watch.resolving = False

    def _on_state(self, previous: SessionState, state: SessionState) -> None:
        if self._closed.is_set() or not self._opened:
            return
        if state is SessionState.CONNECTED:
            logger.info("zookeeper connected again %s", self._where)
        elif state is SessionState.SUSPENDED:
            logger.warning("zookeeper connection suspended: using the last known brokers")
        else:
            logger.warning("zookeeper session lost: using the last known brokers")

    # -- nodes this client writes -----------------------------------------------------------

    def publish_producer(self, topic: str, group: str) -> None:
        """Keep ``/kiteq/pub/{topic}/{group}/{hostname}`` (ephemeral) while this client lives.

        Informational (nobody reads it in KiteQ); a broker serving ``*`` serves the topic
        once it appears under ``/kiteq/pub``. Written in the background, again after a LOST
        session; a node another process of this host already holds is left alone, one the
        ZooKeeper ACLs refuse is logged as an error once per session.
        """
        path = f"{nodes.PUB_ROOT}/{topic}/{group}/{socket.gethostname()}"
        if path not in self._own:
            self._own[path] = b""
            self._keeper.resync()

    def _refused(self, paths: list[str]) -> None:
        # not retried in this session: only a changed ACL would help
        for path in paths:
            logger.error("no permission to create producer node %s as %s", path, self._who)

    async def write_bindings(self, group: str, bindings: Sequence[Binding], timeout: float) -> None:
        """Write *group*'s bindings to ``/kiteq/sub/{topic}/{group}-bind`` (KiteQ's JSON).

        Persistent, one node per topic, written only when its bindings differ. A failure
        (ZooKeeper unreachable, no write permission) is logged: the broker also writes what
        a consumer's stream declares.
        """
        by_topic: dict[str, dict[Binding, None]] = {}
        for binding in bindings:
            by_topic.setdefault(binding.topic, {})[binding.with_group(group)] = None
        try:
            await self.start(timeout)
        except RegistryUnavailableError as exc:
            logger.warning("bindings not written to zookeeper: %s", exc)
            return
        zk = self._zk
        for topic, wanted in by_topic.items():
            path = nodes.bind_path(topic, group)
            try:
                _, written = await asyncio.wait_for(
                    asyncio.to_thread(
                        zk.retry, nodes.write_bindings, zk, path, group, tuple(wanted)
                    ),
                    timeout,
                )
            except NoAuthError:
                logger.warning("no permission to write bindings path=%s as %s", path, self._who)
                continue
            except (KazooException, TimeoutError) as exc:
                logger.warning("cannot write bindings path=%s: %r", path, exc)
                continue
            if written:
                logger.info("wrote bindings path=%s bindings=%d", path, len(wanted))
