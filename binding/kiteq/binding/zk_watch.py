"""The ZooKeeper registry's watches: ``/kiteq/sub`` followed into a ``BindingTable``.

A DataWatch on each ``/kiteq/sub/{topic}`` node (re-created nodes get a fresh
ChildrenWatch), a ChildrenWatch on it to find ``{group}-bind`` nodes, and a DataWatch on
each of those. With ``["*"]`` a ChildrenWatch on ``/kiteq/sub``, ``/kiteq/pub`` and
``/kiteq/server`` finds the topics. Changes apply per group: new data replaces that group's
bindings, a deleted node removes that group only. A malformed node, or one beyond the
binding limits, is logged and skipped; the group keeps its previous bindings. A node for a
topic the group may not subscribe is not applied; each refused node version is logged once.

Threads: kazoo calls the watch functions on its own threads; they only hop onto the loop
(``zk_session.hop``); building a group's bindings runs in a worker thread; the table is
touched on the loop thread only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Set
from typing import TYPE_CHECKING, Any, Final

from kazoo.exceptions import KazooException
from kazoo.recipe.watchers import ChildrenWatch, DataWatch

from kiteq.binding import zk_nodes as nodes
from kiteq.binding.model import loads
from kiteq.binding.zk_session import ZkSession, hop
from kiteq.core.errors import PermissionDeniedError
from kiteq.core.limits import is_name
from kiteq.core.tasks import TaskSet

if TYPE_CHECKING:
    from kiteq.binding.match import BindingTable, PreparedBindings

__all__ = ["BindingWatches"]

# the ZooKeeper modules of kiteq.binding log as one component, the registry's logger
logger = logging.getLogger("kiteq.binding.zk")

# a watch that cannot be set yet is retried: from _RETRY_MIN doubling up to _RETRY_MAX
_RETRY_MIN: Final = 0.2
_RETRY_MAX: Final = 10.0
# how long applied_at_least waits for the watch to apply a written node version
_APPLY_TIMEOUT: Final = 2.0

_Key = tuple[str, str]  # (topic, group)


class _Token:
    """Stops one ChildrenWatch: set on the loop thread, read on kazoo's."""

    __slots__ = ("stopped",)

    def __init__(self) -> None:
        self.stopped = False


@dataclasses.dataclass(slots=True)
class _TopicNode:
    czxid: int | None = None  # identity of the /kiteq/sub/{topic} node being watched
    token: _Token | None = None


class BindingWatches:
    """The watches of one registry over *session*, applied to *table*.

    Args:
        session: The registry's open session.
        table: Where the bindings go.
        topics: The topics to watch, or None: every topic found (``["*"]``).
        on_topics: Called on the loop with the topics listed under a root (``["*"]`` only).
    """

    def __init__(
        self,
        session: ZkSession,
        table: BindingTable,
        topics: tuple[str, ...] | None,
        on_topics: Callable[[Set[str]], None],
    ) -> None:
        self._session = session
        self._table = table
        self._topics = topics
        self._on_topics = on_topics
        self._loop = asyncio.get_running_loop()
        # read by kazoo's threads: once set, callbacks stop hopping and end their watches
        self._closed = threading.Event()
        self._tasks = TaskSet("kiteq-zk")
        # everything below: loop thread only
        self._topic_nodes: dict[str, _TopicNode] = {}
        self._group_nodes: set[_Key] = set()
        self._applied: dict[_Key, int] = {}
        # the node version whose apply finished (installed or refused): applied_at_least
        # waits on it, not on _applied, which is set before the build runs
        self._installed: dict[_Key, int] = {}
        # the node version last refused: each refused version is logged once
        self._refused: dict[_Key, int] = {}
        # events seen: an apply finishing after a newer event is dropped
        self._events: dict[_Key, int] = {}
        self._waiters: dict[_Key, list[tuple[int, asyncio.Future[None]]]] = {}

    async def start(self, timeout: float) -> None:
        """Set the watches and wait (up to *timeout*) until each has made its first call.

        Raises:
            TimeoutError: Not every watch was set in time.
        """
        if self._topics is None:
            for root in (nodes.SUB_ROOT, nodes.PUB_ROOT, nodes.SERVER_ROOT):
                self._spawn_watch(ChildrenWatch, root, functools.partial(self._kz_root, root))
        else:
            for topic in self._topics:
                self._watch_topic(topic)
        # the first call of every watch is made before its constructor returns
        if not await self._tasks.join(timeout):
            raise TimeoutError(f"watches not set within {timeout:g}s")

    async def stop(self) -> None:
        """End every watch and wake every waiter; idempotent."""
        self._closed.set()
        await self._tasks.cancel()
        for waiters in self._waiters.values():
            for _, future in waiters:
                future.cancel()
        self._waiters.clear()

    async def applied_at_least(self, key: _Key, mzxid: int) -> None:
        """Wait (briefly) until the node version *mzxid* of *key* was applied or refused."""
        if self._installed.get(key, -1) >= mzxid:
            return
        future: asyncio.Future[None] = self._loop.create_future()
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

    # -- kazoo threads: hop onto the loop, never block -----------------------------------

    def _hop(self, callback: Callable[..., None], *args: Any) -> bool:
        """Run *callback* on the loop; False when closed (the watch then ends)."""
        return hop(self._loop, self._closed, callback, *args)

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

    # -- loop thread -----------------------------------------------------------------------

    def _spawn_watch(self, kind: Callable[..., Any], path: str, func: Callable[..., Any]) -> None:
        self._tasks.spawn(self._start_watch(kind, path, func), path)

    async def _start_watch(
        self, kind: Callable[..., Any], path: str, func: Callable[..., Any]
    ) -> None:
        delay = _RETRY_MIN
        while not self._closed.is_set():
            try:
                # the constructor makes the first call (which hops) before it returns
                await asyncio.to_thread(kind, self._session.client, path, func)
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
        self._on_topics(topics)

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
        if self._closed.is_set():
            return
        key = (topic, group)
        # every event of a node supersedes the ones before it, a build still running included
        event = self._events[key] = self._events.get(key, 0) + 1
        if mzxid is None:
            if self._table.remove_group(topic, group):
                path = nodes.bind_path(topic, group)
                logger.info("binding node deleted path=%s: group removed from the topic", path)
            return
        if mzxid < self._applied.get(key, -1) or self._refused.get(key) == mzxid:
            return  # an older read, overtaken, or a version already refused and logged
        self._applied[key] = mzxid
        # parsing and compiling a thousand patterns takes tens of ms: not on the loop
        self._tasks.spawn(self._apply(key, data, mzxid, event), f"apply:{topic}/{group}")

    async def _apply(self, key: _Key, data: bytes | None, mzxid: int, event: int) -> None:
        topic, group = key
        outcome: PreparedBindings | PermissionDeniedError | ValueError
        try:
            outcome = await asyncio.to_thread(_build, self._table, topic, group, data)
        except (PermissionDeniedError, ValueError) as exc:
            outcome = exc
        if self._events.get(key) != event or self._closed.is_set():
            return  # a newer event of the node is being applied
        self._settle(key, mzxid, outcome)
        self._installed[key] = max(mzxid, self._installed.get(key, -1))
        for waiter_zxid, future in self._waiters.pop(key, ()):
            if waiter_zxid <= mzxid:
                if not future.done():
                    future.set_result(None)
            else:
                self._waiters.setdefault(key, []).append((waiter_zxid, future))

    def _settle(
        self, key: _Key, mzxid: int, outcome: PreparedBindings | PermissionDeniedError | ValueError
    ) -> None:
        topic, group = key
        path = nodes.bind_path(topic, group)
        if isinstance(outcome, PermissionDeniedError):
            self._refused[key] = mzxid
            self._table.remove_group(topic, group)
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
            self._table.install(outcome)


def _build(table: BindingTable, topic: str, group: str, data: bytes | None) -> PreparedBindings:
    # worker thread
    return table.build(topic, group, loads(data or b""))
