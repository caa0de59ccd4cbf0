"""The ZooKeeper side of backlog takeover (``kiteq.handler.takeover``).

Nodes (next to KiteQ's layout, which is untouched)::

    /kiteq/takeover/{host:port}        persistent, written by that broker at every start:
                                       {"store": "<store identity>", "owner": "<kite_server>",
                                        "incarnation": "<random, new at every start>"}
    /kiteq/takeover/{host:port}/lock   ephemeral, created by the broker taking it over
                                       (atomic create: one taker at a time); {"taker": addr}
    /kiteq/takeover/{host:port}/done   persistent, written when a takeover completed:
                                       {"taker": addr, "incarnation": ..., "moved": n,
                                        "time": unix seconds}

A broker without a ``/kiteq/takeover/{host:port}`` node (a RocksDB or memory broker, or a
KiteQ Go broker) is never taken over. ``done`` names the incarnation it took: when that
broker comes back (a new incarnation) and dies again, it is taken over again.

The lock is ephemeral: a taker that dies mid-move releases it with its session, and the
next survivor resumes the move (which is idempotent).

The records live on the registry's own session (``ZkBindingRegistry.takeover_nodes``): the
alive node and the lock then die together. Every method runs its kazoo calls on a worker
thread and raises only ``RegistryError`` / ``RegistryUnavailableError`` (retriable).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Final

from kazoo.exceptions import NodeExistsError, NoNodeError

from kiteq.binding import zk_nodes as nodes
from kiteq.binding.base import BrokerStore
from kiteq.binding.zk_session import ZkSession

__all__ = ["TAKEOVER_ROOT", "ZkTakeoverNodes"]

TAKEOVER_ROOT: Final = "/kiteq/takeover"


def _broker_path(address: str) -> str:
    return f"{TAKEOVER_ROOT}/{address}"


def _lock_path(address: str) -> str:
    return f"{_broker_path(address)}/lock"


class ZkTakeoverNodes:
    """The takeover nodes (``kiteq.binding.base.TakeoverNodes``) on an open session.

    Args:
        session: The registry's session, opened already; closing it stays its owner's job.
    """

    def __init__(self, session: ZkSession) -> None:
        self._session = session
        self._locked: set[str] = set()

    async def start(self) -> None:
        """Create the takeover root (the registry has created the chroot already)."""
        await self._session.run(lambda zk: zk.retry(zk.ensure_path, TAKEOVER_ROOT))

    async def stop(self) -> None:
        """Release the locks still held (a taker stopping mid-move); idempotent."""
        if self._session.closed.is_set():
            self._locked.clear()  # they went with the session
        for address in sorted(self._locked):
            await self.unlock(address)

    async def announce(self, address: str, info: BrokerStore) -> None:
        """Write this broker's takeover node (a new incarnation)."""
        await self._persistent(_broker_path(address), info.dumps())

    async def brokers(self) -> tuple[set[str], set[str]]:
        """(every broker ever registered: ``all_servers``, those alive: ``alive_servers``)."""

        def read(zk: Any) -> tuple[set[str], set[str]]:
            found = []
            for root in (nodes.ALL_ROOT, nodes.ALIVE_ROOT):
                try:
                    found.append(set(zk.retry(zk.get_children, root)))
                except NoNodeError:
                    found.append(set())
            return found[0], found[1]

        return await self._session.run(read)

    async def is_alive(self, address: str) -> bool:
        path = nodes.alive_path(address)
        return await self._session.run(lambda zk: zk.retry(zk.exists, path) is not None)

    async def store_of(self, address: str) -> BrokerStore | None:
        """What *address* announced, or None (no node, or not ours)."""
        data = await self._data(_broker_path(address))
        return None if data is None else BrokerStore.loads(data)

    async def done(self, address: str) -> dict[str, Any] | None:
        """The completion marker of the last takeover of *address*, or None."""
        data = await self._data(f"{_broker_path(address)}/done")
        if data is None:
            return None
        try:
            doc = json.loads(data)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    async def try_lock(self, address: str, taker: str) -> bool:
        """Create the ephemeral lock of *address*; False when another taker holds it."""
        path = _lock_path(address)
        data = json.dumps({"taker": taker}).encode()

        def create(zk: Any) -> bool:
            try:
                zk.retry(zk.create, path, data, ephemeral=True, makepath=True)
            except NodeExistsError:
                return False
            return True

        locked = await self._session.run(create)
        if locked:
            self._locked.add(address)
        return locked

    async def unlock(self, address: str) -> None:
        path = _lock_path(address)

        def delete(zk: Any) -> None:
            with contextlib.suppress(NoNodeError):
                zk.retry(zk.delete, path)

        await self._session.run(delete)
        self._locked.discard(address)

    async def mark_done(self, address: str, record: dict[str, Any]) -> None:
        await self._persistent(
            f"{_broker_path(address)}/done", json.dumps(record, separators=(",", ":")).encode()
        )

    async def _persistent(self, path: str, data: bytes) -> None:
        await self._session.run(lambda zk: zk.retry(nodes.ensure_persistent, zk, path, data))

    async def _data(self, path: str) -> bytes | None:
        def read(zk: Any) -> bytes | None:
            try:
                data, _ = zk.retry(zk.get, path)
            except NoNodeError:
                return None
            return bytes(data)

        return await self._session.run(read)
