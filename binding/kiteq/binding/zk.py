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
  ACL (the one session recipe: ``kiteq.binding.zk_session``). KiteQ's Go clients cannot
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

Watches (``zk_watch``): one per topic node, group list and ``{group}-bind`` node. Changes
apply per group; other groups of the topic are never touched (KiteQ briefly drops every
group of the topic). kazoo's threads only hop onto the event loop.

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
import logging
from collections.abc import Sequence, Set
from typing import TYPE_CHECKING, Any, Final

from kiteq.binding import zk_nodes as nodes
from kiteq.binding.base import BrokerInfo, BrokerRegistration
from kiteq.binding.model import Binding
from kiteq.binding.zk_session import NodeKeeper, SessionState, Wanted, ZkSession
from kiteq.binding.zk_takeover import ZkTakeoverNodes
from kiteq.binding.zk_uri import ZkSettings
from kiteq.binding.zk_watch import BindingWatches
from kiteq.core.errors import RegistryError, RegistryUnavailableError

if TYPE_CHECKING:
    from kiteq.binding.match import BindingTable

__all__ = ["ZkBindingRegistry"]

logger = logging.getLogger(__name__)

ANY_TOPIC: Final = "*"
# how long declare() waits for its write (and then, zk_watch, for the watch to apply it)
_DECLARE_TIMEOUT: Final = 5.0


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
        self._session = ZkSession(settings, connect_timeout=connect_timeout)
        self._session.add_listener(self._on_state)
        self._keeper = NodeKeeper(
            self._session, self._wanted, what="registration", on_synced=self._registered
        )
        self._table: BindingTable | None = None
        self._watches: BindingWatches | None = None
        self._session_losses = 0
        self._served: set[str] = set(self._topics)
        self._broker: BrokerInfo | None = None
        self._declare_lock = asyncio.Lock()

    @property
    def settings(self) -> ZkSettings:
        return self._settings

    @property
    def session(self) -> ZkSession:
        """The registry's ZooKeeper session (opened by ``start``, closed by ``stop``)."""
        return self._session

    @property
    def session_id(self) -> int | None:
        """The current ZooKeeper session id, or None while not connected."""
        return self._session.session_id

    @property
    def session_losses(self) -> int:
        """Sessions lost (expired) since start, for kiteq_zookeeper_session_expirations_total."""
        return self._session_losses

    async def brokers(self) -> list[str]:
        """The children of ``/kiteq/alive_servers``: every broker with a live session."""
        return await self._session.run(_alive_brokers)

    @property
    def connection_state(self) -> str:
        """``connected``, ``suspended`` or ``lost`` (kazoo's state, lower case)."""
        return self._session.state.value

    @property
    def served_topics(self) -> list[str]:
        """Topics this broker registers under ``/kiteq/server`` (grows for ``["*"]``)."""
        return sorted(self._served)

    @property
    def registration(self) -> BrokerRegistration:
        """This registry publishes the broker's nodes itself."""
        return self

    def takeover_nodes(self) -> ZkTakeoverNodes:
        """The takeover records, on this registry's session (usable once started)."""
        return ZkTakeoverNodes(self._session)

    # -- start and stop ------------------------------------------------------------------

    async def start(self, table: BindingTable) -> None:
        """Connect, load every binding of the served topics into *table*, keep watching.

        Raises:
            RegistryUnavailableError: ZooKeeper did not answer, or the bindings could not
                be loaded within the connect timeout (retriable).
            RegistryError: ZooKeeper refused access; already started.
        """
        if self._table is not None:
            raise RegistryError("zk registry already started")
        self._table = table
        where = self._settings.redacted()
        try:
            await self._session.open()
            async with asyncio.timeout(self._connect_timeout):
                await self._session.run(self._create_base_paths)
                topics = None if self._any_topic else self._topics
                self._watches = BindingWatches(self._session, table, topics, self._found_topics)
                await self._watches.start(self._connect_timeout)
        except TimeoutError as exc:
            await self.stop()
            raise RegistryUnavailableError(
                f"ZooKeeper {where}: cannot load bindings: {str(exc) or type(exc).__name__}"
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
        watches, self._watches = self._watches, None
        try:
            await self._keeper.stop()
        finally:
            if watches is not None:
                await watches.stop()
            await self._session.close()

    def _create_base_paths(self, zk: Any) -> None:
        # worker thread
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

    def _found_topics(self, topics: Set[str]) -> None:
        new = topics - self._served
        if new:
            self._served |= new
            logger.info("serving topics found in zookeeper: %s", ",".join(sorted(new)))
            self._keeper.resync()

    def _on_state(self, previous: SessionState, state: SessionState) -> None:
        if state == SessionState.CONNECTED:
            logger.info(
                "zookeeper connected session=0x%x%s",
                self.session_id or 0,
                " (new session)" if previous == SessionState.LOST else "",
            )
        elif state == SessionState.SUSPENDED:
            logger.warning("zookeeper connection suspended: serving with the last known bindings")
        else:
            self._session_losses += 1
            logger.warning(
                "zookeeper session lost: bindings kept; nodes are re-created on reconnect"
            )

    # -- registration --------------------------------------------------------------------

    async def register(self, broker: BrokerInfo) -> None:
        """Publish this broker's nodes and keep them there across session losses.

        Waits for the first registration up to the register timeout; after that it goes on
        in the background, with backoff, until it succeeds.
        """
        if self._watches is None or self._session.closed.is_set():
            raise RegistryError("zk registry not started")
        if self._broker is not None:
            raise RegistryError("zk registry: broker already registered")
        self._broker = broker
        self._keeper.start()
        try:
            await asyncio.wait_for(self._keeper.synced.wait(), self._register_timeout)
        except TimeoutError:
            logger.warning(
                "not registered in zookeeper after %gs; still trying", self._register_timeout
            )

    async def unregister(self) -> None:
        """Remove this broker's ephemeral nodes (``all_servers`` stays); idempotent, bounded.

        Bindings keep being watched until ``stop``.
        """
        broker = self._broker
        if broker is None:
            return
        removed = await self._keeper.release()
        self._broker = None
        if removed is not None:
            logger.info("unregistered from zookeeper address=%s nodes=%d", broker.address, removed)

    def _wanted(self) -> Wanted:
        """(ephemeral, persistent) nodes of the registered broker: path -> data."""
        broker = self._broker
        if broker is None:
            return {}, {}
        data = nodes.node_data(broker.address, broker.protocol_version, broker.proto)
        ephemeral = {nodes.server_path(t, broker.address): data for t in sorted(self._served)}
        ephemeral[nodes.alive_path(broker.address)] = data
        return ephemeral, {nodes.all_path(broker.address): data}

    def _registered(self, counts: collections.Counter[str], first: bool) -> None:
        broker = self._broker
        if broker is not None and (first or counts.keys() - {nodes.Outcome.KEPT.value}):
            logger.info(
                "registered in zookeeper address=%s session=0x%x topics=%s nodes: %s",
                broker.address,
                self.session_id or 0,
                ",".join(sorted(self._served)) or "-",
                " ".join(f"{k}={v}" for k, v in sorted(counts.items())),
            )

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
        table, watches = self._table, self._watches
        if table is None or watches is None:
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
                mzxid = await self._write_declared(topic, group, wanted)
                if mzxid is not None:
                    await watches.applied_at_least((topic, group), mzxid)
        return False

    async def _write_declared(
        self, topic: str, group: str, wanted: tuple[Binding, ...]
    ) -> int | None:
        """Write the node; its ``mzxid`` afterwards, or None when it could not be written."""
        path = nodes.bind_path(topic, group)
        if self._session.state != SessionState.CONNECTED:
            logger.warning("zookeeper not connected: declared bindings not written path=%s", path)
            return None
        try:
            mzxid, written = await asyncio.wait_for(
                self._session.run(
                    lambda zk: zk.retry(nodes.write_bindings, zk, path, group, wanted)
                ),
                _DECLARE_TIMEOUT,
            )
        except (RegistryError, TimeoutError) as exc:
            logger.warning("cannot write declared bindings path=%s: %r", path, exc)
            return None
        if written:
            logger.info("wrote declared bindings path=%s bindings=%d", path, len(wanted))
        return int(mzxid)


def _alive_brokers(zk: Any) -> list[str]:
    # worker thread
    return sorted(zk.get_children(nodes.ALIVE_ROOT))
