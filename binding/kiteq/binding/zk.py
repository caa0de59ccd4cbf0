"""The ZooKeeper registry (``zk://``), with KiteQ's layout so KiteQ's tooling reads our cluster.

URI (``[registry.<env>] hosts``)::

    zk://h1:2181,h2:2181[/chroot][?timeout=10&digest=user:password]

- ``/chroot`` prefixes every path and is created at start when missing. KiteQ's own clients
  use absolute ``/kiteq/...`` paths: use a chroot only if every client uses the same one.
- ``timeout``: the ZooKeeper session timeout in seconds (default 10; the server clamps it
  to 2..20 ticks). A broker that dies stays listed this long.
- ``digest=user:password`` (percent-encode ``& % +`` and non-ASCII in the password): ZooKeeper
  digest ACLs. The broker authenticates as *user*, and every node it creates gets the ACL
  ``world:anyone`` READ + ``digest:user`` ALL: anyone can discover brokers and read
  bindings, only holders of the credentials can write. Nodes that already exist keep their
  ACLs (this registry never changes an ACL), so create the tree with ACLs from the start.
  Digest credentials cross the network in clear text; use them on a trusted network.
  Python clients given the same URI authenticate likewise and their nodes get the same
  ACL (the one session recipe: ``kiteq.binding._zk_client``). KiteQ's Go clients cannot
  authenticate: with ACLs on they discover brokers but cannot write their ``-bind`` nodes.

Layout (KiteQ's ``kiteq-common/registry``; node data of the broker's nodes:
``{"grpc": "host:port", "protocolVersion": 1, "proto": "kiteq.proto.v1"}``)::

    /kiteq/server/{topic}/{host:port}     ephemeral, one per served topic
    /kiteq/alive_servers/{host:port}      ephemeral
    /kiteq/all_servers/{host:port}        persistent (inventory; kept at shutdown)
    /kiteq/pub/{topic}/{group}/{host}     written by producers
    /kiteq/sub/{topic}/{group}-bind       persistent, JSON array of KiteQ bindings

A broker serving ``["*"]`` watches every topic under ``/kiteq/sub`` and registers under
every topic that appears below ``/kiteq/sub``, ``/kiteq/pub`` or ``/kiteq/server``.

Threads: kazoo runs watch and state callbacks on its own threads. Those callbacks only
hop onto the event loop (``call_soon_threadsafe``); blocking kazoo calls run in worker
threads (``asyncio.to_thread``); the ``BindingTable`` is touched on the loop thread only.

Watches: a DataWatch on each ``/kiteq/sub/{topic}`` node (re-created nodes get a fresh
ChildrenWatch), a ChildrenWatch on it to find ``{group}-bind`` nodes, and a DataWatch on
each of those. Changes apply per group: new data replaces that group's bindings, a deleted
node removes that group only. Other groups of the topic are never touched (KiteQ briefly
drops every group of the topic). A malformed node, or one beyond the binding limits, is
logged and skipped; the group keeps its previous bindings. A node for a topic the group may
not subscribe (the cluster's ``acl``) is not applied; each refused node version is logged
once and counted by the table.

Session: SUSPENDED keeps serving with the last known bindings. After LOST, once connected
again, the broker's ephemeral nodes are re-created, owner-checked (a stale node of an old
session is replaced), retried with backoff until it succeeds. kazoo re-arms the watches.

Declarations: ZooKeeper is authoritative, so ``declare`` returns False and the table follows
ZooKeeper only. So that consumers which declare bindings when their stream opens (the
embedded style) work against a ``zk://`` broker, ``declare`` also writes the declared
bindings to their ``{group}-bind`` node (persistent, KiteQ JSON) when they differ from what
is there, as KiteQ's ``PublishBindings`` does, and waits (briefly) until the watch has
applied them. A group's node is replaced as a whole: its last writer wins.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from kazoo.exceptions import KazooException
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import KazooState
from kazoo.recipe.watchers import ChildrenWatch, DataWatch

from kiteq.binding import _zk_nodes as nodes
from kiteq.binding._zk_client import new_client
from kiteq.binding.model import Binding, loads
from kiteq.core.errors import (
    ConfigError,
    PermissionDeniedError,
    RegistryError,
    RegistryUnavailableError,
)
from kiteq.core.limits import is_name
from kiteq.core.params import query_params

if TYPE_CHECKING:
    from kiteq.binding.match import BindingTable, PreparedBindings
    from kiteq.binding.registry import BrokerInfo

__all__ = ["DEFAULT_SESSION_TIMEOUT", "ZkBindingRegistry", "ZkSettings", "parse_zk_uri"]

logger = logging.getLogger(__name__)

ANY_TOPIC: Final = "*"
DEFAULT_PORT: Final = 2181
DEFAULT_SESSION_TIMEOUT: Final = 10.0
# re-registration backoff: from _RETRY_MIN doubling up to _RETRY_MAX, until it succeeds
_RETRY_MIN: Final = 0.2
_RETRY_MAX: Final = 10.0
# how long declare() waits for its write and for the watch to apply it
_DECLARE_TIMEOUT: Final = 5.0
_APPLY_TIMEOUT: Final = 2.0
# unregister() gives up after this; the nodes then vanish with the session
_UNREGISTER_TIMEOUT: Final = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class ZkSettings:
    """A parsed ``zk://`` URI.

    Attributes:
        hosts: ``host:port,...`` without the chroot.
        chroot: ``""`` or ``/a/b``.
        session_timeout: Seconds.
        digest: ``(user, password)`` for digest ACLs, or None.
    """

    hosts: str
    chroot: str = ""
    session_timeout: float = DEFAULT_SESSION_TIMEOUT
    digest: tuple[str, str] | None = dataclasses.field(default=None, repr=False)

    @property
    def connect_string(self) -> str:
        """What kazoo takes: ``h1:2181,h2:2181/chroot``."""
        return self.hosts + self.chroot

    def redacted(self) -> str:
        """The URI for logs and errors: the digest password is never shown."""
        query = [f"timeout={self.session_timeout:g}"]
        if self.digest is not None:
            query.append(f"digest={self.digest[0]}:***")
        return f"zk://{self.connect_string}?{'&'.join(query)}"


def parse_zk_uri(uri: str) -> ZkSettings:
    """Parse ``zk://h1:2181,h2:2181[/chroot][?timeout=S&digest=user:password]``.

    Raises:
        ConfigError: Bad hosts, chroot or parameter; the password is never in the message.
    """
    scheme, sep, rest = uri.strip().partition("://")
    if scheme.lower() != "zk" or not sep:
        raise ConfigError(f"expected zk://host:port[,host:port...][/chroot], got {scheme}://...")
    rest, _, query = rest.partition("?")
    hosts_part, slash, chroot = rest.partition("/")
    hosts = [_check_host(h.strip()) for h in hosts_part.split(",")] if hosts_part else []
    if not hosts:
        raise ConfigError("zk:// registry: no ZooKeeper host given")
    chroot = ("/" + chroot).rstrip("/") if slash else ""
    if chroot and any(part in {"", ".", ".."} for part in chroot[1:].split("/")):
        raise ConfigError(f"zk:// registry: invalid chroot {chroot!r}")
    params = query_params(query, {"timeout", "digest"}, "zk:// registry")
    timeout = params.number("timeout", DEFAULT_SESSION_TIMEOUT)
    digest: tuple[str, str] | None = None
    if params.has("digest"):
        user, colon, password = params.string("digest", "").partition(":")
        if not (user and colon and password):
            raise ConfigError("zk:// registry: digest must be user:password")
        digest = (user, password)
    return ZkSettings(",".join(hosts), chroot, timeout, digest)


def _check_host(host: str) -> str:
    """``host[:port]`` or ``[v6][:port]``, with the port spelt out."""
    if host.startswith("["):
        name, bracket, rest = host.partition("]")
        name += bracket
        colon, port = rest[:1], rest[1:]
        valid = bool(bracket) and (not rest or colon == ":")
    else:
        name, colon, port = host.partition(":")
        valid = ":" not in port
    port = port if colon else str(DEFAULT_PORT)
    if not (valid and name.strip("[]") and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"zk:// registry: expected host:port, got {host!r}")
    return f"{name}:{port}"


class _Token:
    """Stops one ChildrenWatch: set on the loop thread, read on kazoo's."""

    __slots__ = ("stopped",)

    def __init__(self) -> None:
        self.stopped = False


@dataclasses.dataclass(slots=True)
class _TopicNode:
    czxid: int | None = None  # identity of the /kiteq/sub/{topic} node being watched
    token: _Token | None = None


class ZkBindingRegistry:
    """The broker's bindings from ZooKeeper, and its registration there (KiteQ's layout).

    Args:
        settings: The parsed ``zk://`` URI.
        topics: The topics the broker serves; ``["*"]``: any topic.
        connect_timeout: Seconds ``start`` waits to connect and load the bindings.
        register_timeout: Seconds ``register`` waits for the first registration; after it,
            registration goes on in the background.
    """

    kind: Final = "zk"

    def __init__(
        self,
        settings: ZkSettings,
        *,
        topics: Sequence[str] = (ANY_TOPIC,),
        connect_timeout: float = 15.0,
        register_timeout: float = 10.0,
    ) -> None:
        self._settings = settings
        self._any_topic = ANY_TOPIC in topics
        self._topics = tuple(dict.fromkeys(t for t in topics if t != ANY_TOPIC))
        self._connect_timeout = connect_timeout
        self._register_timeout = register_timeout
        self._zk: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._table: BindingTable | None = None
        # read by kazoo's threads: once set, callbacks stop hopping and end their watches
        self._closed = threading.Event()
        # registration worker threads: one at a time; once set, no more nodes are created
        self._sync_lock = threading.Lock()
        self._unregistering = threading.Event()
        # everything below: loop thread only
        self._state: str = KazooState.LOST
        # sessions lost since start (expired), for kiteq_zookeeper_session_expirations_total
        self.session_losses = 0
        self._topic_nodes: dict[str, _TopicNode] = {}
        self._group_nodes: set[tuple[str, str]] = set()
        self._served: set[str] = set(self._topics)
        self._applied: dict[tuple[str, str], int] = {}
        # the node version whose apply finished (installed or refused) per (topic, group):
        # declare() waits on it, not on _applied, which is set before the build runs
        self._installed: dict[tuple[str, str], int] = {}
        # the node version last refused per (topic, group): each refused version is logged once
        self._refused: dict[tuple[str, str], int] = {}
        # events seen per (topic, group): an apply finishing after a newer event is dropped
        self._events: dict[tuple[str, str], int] = {}
        self._waiters: dict[tuple[str, str], list[tuple[int, asyncio.Future[None]]]] = {}
        self._watch_tasks: set[asyncio.Task[None]] = set()
        self._broker: BrokerInfo | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._resync = asyncio.Event()
        self._registered = asyncio.Event()
        self._own_nodes: set[str] = set()
        self._declare_lock = asyncio.Lock()
        self._failure: BaseException | None = None

    @property
    def settings(self) -> ZkSettings:
        return self._settings

    @property
    def session_id(self) -> int | None:
        """The current ZooKeeper session id, or None while not connected."""
        client_id = None if self._zk is None else self._zk.client_id
        return None if client_id is None else int(client_id[0])

    @property
    def served_topics(self) -> list[str]:
        """Topics this broker registers under ``/kiteq/server`` (grows for ``["*"]``)."""
        return sorted(self._served)

    # -- start and stop ------------------------------------------------------------------

    async def start(self, table: BindingTable) -> None:
        """Connect, load every binding of the served topics into *table*, keep watching.

        Raises:
            RegistryUnavailableError: ZooKeeper did not answer, refused access, or the
                bindings could not be loaded within the connect timeout.
            RegistryError: Already started.
        """
        if self._table is not None:
            raise RegistryError("zk registry already started")
        self._loop = asyncio.get_running_loop()
        self._table = table
        where = self._settings.redacted()
        try:
            await self._connect()
            async with asyncio.timeout(self._connect_timeout):
                await asyncio.to_thread(self._create_base_paths)
                self._start_watches()
                # the first call of every watch is made before its constructor returns
                while self._watch_tasks:
                    await asyncio.wait(set(self._watch_tasks))
        except (KazooException, TimeoutError) as exc:
            await self.stop()
            raise RegistryUnavailableError(
                f"ZooKeeper {where}: cannot load bindings: {exc or type(exc).__name__}"
            ) from exc
        except BaseException:
            await self.stop()
            raise
        logger.info(
            "zookeeper registry started %s session=0x%x topics=%s bindings=%d",
            where,
            self.session_id or 0,
            ",".join(self._topics) or ANY_TOPIC,
            len(table.bindings()),
        )

    async def stop(self) -> None:
        """Stop watching and close the session (its ephemeral nodes go with it); idempotent.

        Raises:
            RegistryError: The registration task had crashed.
        """
        self._closed.set()
        self._unregistering.set()
        await self._cancel_keeper()
        tasks = list(self._watch_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for waiters in self._waiters.values():
            for _, future in waiters:
                future.cancel()
        self._waiters.clear()
        await self._close_client()
        failure, self._failure = self._failure, None
        if failure is not None:
            raise RegistryError("zk registry: the registration task failed") from failure

    async def _connect(self) -> None:
        # bounded by kazoo's own start timeout, so no thread outlives a failed start
        settings = self._settings
        try:
            if settings.chroot:
                await asyncio.to_thread(self._create_chroot)
            zk = self._client(settings.connect_string)
            zk.add_listener(self._kz_state)
            self._zk = zk
            await asyncio.to_thread(zk.start, self._connect_timeout)
        except KazooTimeoutError as exc:
            raise TimeoutError(f"no answer within {self._connect_timeout:g}s") from exc

    def _client(self, hosts: str) -> Any:
        return new_client(self._settings, hosts)

    def _create_chroot(self) -> None:
        # worker thread: kazoo warns when a chroot is missing; create it first, outside it
        zk = self._client(self._settings.hosts)
        try:
            zk.start(self._connect_timeout)
            zk.retry(zk.ensure_path, self._settings.chroot)
        finally:
            zk.stop()
            zk.close()

    def _create_base_paths(self) -> None:
        # worker thread
        zk = self._zk
        paths = [
            nodes.SERVER_ROOT,
            nodes.ALIVE_ROOT,
            nodes.ALL_ROOT,
            nodes.PUB_ROOT,
            nodes.SUB_ROOT,
        ]
        for topic in self._topics:  # KiteQ's broker creates its topics' nodes too
            paths += [f"{root}/{topic}" for root in (nodes.SERVER_ROOT, nodes.PUB_ROOT)]
            paths.append(f"{nodes.SUB_ROOT}/{topic}")
        for path in paths:
            zk.retry(zk.ensure_path, path)

    async def _close_client(self) -> None:
        self._closed.set()
        zk, self._zk = self._zk, None
        if zk is not None:
            await asyncio.to_thread(_close, zk)

    # -- kazoo threads: hop onto the loop, never block -----------------------------------

    def _hop(self, callback: Callable[..., None], *args: Any) -> bool:
        """Run *callback* on the loop; False when closed (the watch then ends)."""
        return nodes.hop(self._loop, self._closed, callback, *args)

    def _kz_state(self, state: str) -> None:
        # kazoo thread; returning True would remove the listener
        self._hop(self._on_state, state)

    def _kz_root(self, root: str, children: list[str]) -> bool:
        return self._hop(self._on_root_children, root, children)

    def _kz_topic(self, topic: str, data: bytes | None, stat: Any, event: Any = None) -> bool:
        return self._hop(self._on_topic_node, topic, None if stat is None else int(stat.czxid))

    def _kz_groups(self, topic: str, token: _Token, children: list[str]) -> bool:
        return not token.stopped and self._hop(self._on_groups, topic, token, children)

    def _kz_bind(
        self, topic: str, group: str, data: bytes | None, stat: Any, event: Any = None
    ) -> bool:
        mzxid = None if stat is None else int(stat.mzxid)
        return self._hop(self._on_bind, topic, group, data, mzxid)

    # -- loop thread: watches --------------------------------------------------------------

    def _start_watches(self) -> None:
        if self._any_topic:
            for root in (nodes.SUB_ROOT, nodes.PUB_ROOT, nodes.SERVER_ROOT):
                self._spawn_watch(ChildrenWatch, root, functools.partial(self._kz_root, root))
        else:
            for topic in self._topics:
                self._watch_topic(topic)

    def _spawn_watch(self, kind: Callable[..., Any], path: str, func: Callable[..., Any]) -> None:
        task = asyncio.create_task(self._start_watch(kind, path, func), name=f"kiteq-zk:{path}")
        self._watch_tasks.add(task)
        task.add_done_callback(self._watch_tasks.discard)

    async def _start_watch(
        self, kind: Callable[..., Any], path: str, func: Callable[..., Any]
    ) -> None:
        delay = _RETRY_MIN
        while not self._closed.is_set():
            try:
                # the constructor makes the first call (which hops) before it returns
                await asyncio.to_thread(kind, self._zk, path, func)
            except KazooException as exc:
                # a half-made watch may still fire later: every handler is idempotent
                logger.warning("cannot watch %s yet (%r); retrying in %.1fs", path, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
            else:
                return

    def _watch_topic(self, topic: str) -> None:
        self._topic_nodes[topic] = _TopicNode()
        path = f"{nodes.SUB_ROOT}/{topic}"
        self._spawn_watch(DataWatch, path, functools.partial(self._kz_topic, topic))

    def _on_root_children(self, root: str, children: list[str]) -> None:
        topics = {child for child in children if is_name(child)}
        if root == nodes.SUB_ROOT:
            for topic in sorted(topics - self._topic_nodes.keys()):
                self._watch_topic(topic)
        new = topics - self._served
        if new:
            self._served |= new
            logger.info("serving topics found in zookeeper: %s", ",".join(sorted(new)))
            if self._broker is not None:
                self._resync.set()

    def _on_topic_node(self, topic: str, czxid: int | None) -> None:
        node = self._topic_nodes[topic]
        if czxid == node.czxid:
            return
        if node.token is not None:
            node.token.stopped = True
            node.token = None
        node.czxid = czxid
        path = f"{nodes.SUB_ROOT}/{topic}"
        if czxid is None:
            # its group nodes are gone too: their own watches remove them one by one
            logger.info("binding topic node absent path=%s", path)
            return
        token = node.token = _Token()
        self._spawn_watch(ChildrenWatch, path, functools.partial(self._kz_groups, topic, token))

    def _on_groups(self, topic: str, token: _Token, children: list[str]) -> None:
        if token.stopped:
            return
        for child in sorted(children):
            group = child.removesuffix(nodes.BIND_SUFFIX)
            if group == child or (topic, group) in self._group_nodes:
                continue
            self._group_nodes.add((topic, group))
            if not is_name(group):
                logger.warning("ignoring binding node with an invalid group name: %s", child)
                continue
            path = nodes.bind_path(topic, group)
            self._spawn_watch(DataWatch, path, functools.partial(self._kz_bind, topic, group))

    def _on_bind(self, topic: str, group: str, data: bytes | None, mzxid: int | None) -> None:
        table = self._table
        if table is None or self._closed.is_set():
            return
        key = (topic, group)
        # every event of a node supersedes the ones before it, a build still running included
        event = self._events[key] = self._events.get(key, 0) + 1
        if mzxid is None:
            if table.remove_group(topic, group):
                path = nodes.bind_path(topic, group)
                logger.info("binding node deleted path=%s: group removed from the topic", path)
            return
        if mzxid < self._applied.get(key, -1) or self._refused.get(key) == mzxid:
            return  # an older read, overtaken, or a version already refused and logged
        self._applied[key] = mzxid
        # parsing and compiling a thousand patterns takes tens of ms: not on the loop
        task = asyncio.create_task(
            self._apply(table, key, data, mzxid, event), name=f"kiteq-zk-apply:{topic}/{group}"
        )
        self._watch_tasks.add(task)
        task.add_done_callback(self._watch_tasks.discard)

    async def _apply(
        self,
        table: BindingTable,
        key: tuple[str, str],
        data: bytes | None,
        mzxid: int,
        event: int,
    ) -> None:
        topic, group = key
        path = nodes.bind_path(topic, group)
        outcome: PreparedBindings | PermissionDeniedError | ValueError
        try:
            outcome = await asyncio.to_thread(_build, table, topic, group, data)
        except (PermissionDeniedError, ValueError) as exc:
            outcome = exc
        if self._events.get(key) != event or self._closed.is_set():
            return  # a newer event of the node is being applied
        if isinstance(outcome, PermissionDeniedError):
            self._refused[key] = mzxid
            table.remove_group(topic, group)
            logger.error(
                "binding node refused path=%s, bindings not applied: %s", path, outcome.reason
            )
        elif isinstance(outcome, ValueError):
            self._refused[key] = mzxid
            logger.error(
                "malformed binding node path=%s, keeping the group's previous bindings: %s",
                path,
                outcome,
            )
        else:
            table.install(outcome)
        self._installed[key] = max(mzxid, self._installed.get(key, -1))
        for waiter_zxid, future in self._waiters.pop(key, ()):
            if waiter_zxid <= mzxid:
                if not future.done():
                    future.set_result(None)
            else:
                self._waiters.setdefault(key, []).append((waiter_zxid, future))

    def _on_state(self, state: str) -> None:
        previous, self._state = self._state, state
        if self._closed.is_set() or state == previous:
            return
        if state == KazooState.CONNECTED:
            logger.info(
                "zookeeper connected session=0x%x%s",
                self.session_id or 0,
                " (new session)" if previous == KazooState.LOST else "",
            )
            if self._broker is not None:
                self._resync.set()
        elif state == KazooState.SUSPENDED:
            logger.warning("zookeeper connection suspended: serving with the last known bindings")
        else:
            self.session_losses += 1
            logger.warning(
                "zookeeper session lost: bindings kept; nodes are re-created on reconnect"
            )

    @property
    def connection_state(self) -> str:
        """``connected``, ``suspended`` or ``lost`` (kazoo's state, lower case)."""
        return str(self._state).lower()

    # -- registration --------------------------------------------------------------------

    async def register(self, broker: BrokerInfo) -> None:
        """Publish this broker's nodes and keep them there across session losses.

        Waits for the first registration up to the register timeout; after that it goes on
        in the background, with backoff, until it succeeds.
        """
        if self._zk is None or self._closed.is_set():
            raise RegistryError("zk registry not started")
        if self._broker is not None:
            raise RegistryError("zk registry: broker already registered")
        self._broker = broker
        self._unregistering.clear()
        self._registered.clear()
        self._resync.set()
        self._keeper = asyncio.create_task(self._keep_registered(), name="kiteq-zk-register")
        self._keeper.add_done_callback(self._keeper_done)
        try:
            await asyncio.wait_for(self._registered.wait(), self._register_timeout)
        except TimeoutError:
            logger.warning(
                "not registered in zookeeper after %gs; still trying", self._register_timeout
            )

    async def unregister(self) -> None:
        """Remove this broker's ephemeral nodes (``all_servers`` stays); idempotent, bounded.

        Bindings keep being watched until ``stop``.
        """
        broker, self._broker = self._broker, None
        if broker is None:
            return
        self._unregistering.set()
        await self._cancel_keeper()
        paths = sorted(self._own_nodes | set(self._wanted(broker)[0]))
        self._own_nodes.clear()
        zk = self._zk
        if zk is None or self._state != KazooState.CONNECTED:
            logger.warning("zookeeper not connected: broker nodes vanish with the session")
            return
        try:
            removed = await asyncio.wait_for(
                asyncio.to_thread(self._delete_nodes, zk, paths), _UNREGISTER_TIMEOUT
            )
        except (KazooException, TimeoutError) as exc:
            logger.warning("could not remove broker nodes (%r): they vanish with the session", exc)
            return
        logger.info("unregistered from zookeeper address=%s nodes=%d", broker.address, removed)

    def _wanted(self, broker: BrokerInfo) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """(ephemeral, persistent) nodes of *broker*: path -> data."""
        data = nodes.node_data(broker.address, broker.protocol_version, broker.proto)
        ephemeral = {nodes.server_path(t, broker.address): data for t in sorted(self._served)}
        ephemeral[nodes.alive_path(broker.address)] = data
        return ephemeral, {nodes.all_path(broker.address): data}

    async def _keep_registered(self) -> None:
        delay = _RETRY_MIN
        while True:
            await self._resync.wait()
            self._resync.clear()
            broker = self._broker
            if broker is None:
                return
            zk = self._zk
            if zk is None or self._state != KazooState.CONNECTED:
                continue  # CONNECTED sets _resync again
            ephemeral, persistent = self._wanted(broker)
            try:
                outcomes = await asyncio.to_thread(self._sync_nodes, zk, ephemeral, persistent)
            except KazooException as exc:
                logger.warning("zookeeper registration failed (%r); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
                self._resync.set()
                continue
            delay = _RETRY_MIN
            self._own_nodes |= ephemeral.keys()
            counts = collections.Counter(o.value for o in outcomes)
            if counts.keys() - {nodes.Outcome.KEPT.value} or not self._registered.is_set():
                logger.info(
                    "registered in zookeeper address=%s session=0x%x topics=%s nodes: %s",
                    broker.address,
                    self.session_id or 0,
                    ",".join(sorted(self._served)) or "-",
                    " ".join(f"{k}={v}" for k, v in sorted(counts.items())),
                )
            self._registered.set()

    def _sync_nodes(
        self, zk: Any, ephemeral: dict[str, bytes], persistent: dict[str, bytes]
    ) -> list[nodes.Outcome]:
        # worker thread
        outcomes = []
        with self._sync_lock:
            for path, data in persistent.items():
                outcomes.append(zk.retry(nodes.ensure_persistent, zk, path, data))
            for path, data in ephemeral.items():
                if self._unregistering.is_set():
                    break
                outcomes.append(zk.retry(nodes.ensure_ephemeral, zk, path, data))
        return outcomes

    def _delete_nodes(self, zk: Any, paths: Sequence[str]) -> int:
        # worker thread; waits for a registration in progress, which then creates no more
        with self._sync_lock:
            return sum(bool(zk.retry(nodes.delete_own, zk, path)) for path in paths)

    async def _cancel_keeper(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.wait([keeper])

    def _keeper_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        failure = task.exception()
        if failure is not None:
            self._failure = failure
            logger.error("zookeeper registration task crashed", exc_info=failure)

    # -- declarations ----------------------------------------------------------------------

    async def declare(self, group: str, bindings: Sequence[Binding]) -> bool:
        """Write *group*'s declared bindings to ZooKeeper; always False (not applied here).

        One ``{group}-bind`` node per declared topic, written only when it differs; the
        table changes when the watch sees the node. A ZooKeeper failure is logged and the
        group keeps what ZooKeeper has.

        Raises:
            ValueError: A binding is invalid or beyond the table's limits; nothing was
                written.
            PermissionDeniedError: *group* may not bind a declared topic; nothing was
                written.
            RegistryError: The registry is not started.
        """
        table = self._table
        if table is None or self._zk is None:
            raise RegistryError("zk registry not started")
        by_topic: dict[str, list[Binding]] = {}
        for binding in bindings:
            by_topic.setdefault(binding.topic, []).append(binding.with_group(group))
        # compiling a thousand patterns takes tens of ms: not on the loop
        declared = await asyncio.to_thread(
            lambda: {
                topic: table.validate(topic, group, items) for topic, items in by_topic.items()
            }
        )
        async with self._declare_lock:
            for topic, wanted in declared.items():
                await self._write_declared(topic, group, wanted)
        return False

    async def _write_declared(self, topic: str, group: str, wanted: tuple[Binding, ...]) -> None:
        path = nodes.bind_path(topic, group)
        zk = self._zk
        if zk is None or self._state != KazooState.CONNECTED:
            logger.warning("zookeeper not connected: declared bindings not written path=%s", path)
            return
        try:
            mzxid, written = await asyncio.wait_for(
                asyncio.to_thread(zk.retry, nodes.write_bindings, zk, path, group, wanted),
                _DECLARE_TIMEOUT,
            )
        except (KazooException, TimeoutError) as exc:
            logger.warning("cannot write declared bindings path=%s: %r", path, exc)
            return
        if written:
            logger.info("wrote declared bindings path=%s bindings=%d", path, len(wanted))
        await self._applied_at_least((topic, group), mzxid)

    async def _applied_at_least(self, key: tuple[str, str], mzxid: int) -> None:
        if self._installed.get(key, -1) >= mzxid:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (mzxid, future)
        self._waiters.setdefault(key, []).append(entry)
        try:
            await asyncio.wait_for(future, _APPLY_TIMEOUT)
        except TimeoutError:
            logger.warning("declared bindings written but not applied yet: %s/%s", *key)
        finally:
            waiters = self._waiters.get(key, [])
            if entry in waiters:
                waiters.remove(entry)


def _build(table: BindingTable, topic: str, group: str, data: bytes | None) -> PreparedBindings:
    # worker thread
    return table.build(topic, group, loads(data or b""))


def _close(zk: Any) -> None:
    # worker thread
    try:
        zk.stop()
    finally:
        zk.close()
