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

Every method runs its kazoo calls on a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from typing import Any, Final

from kazoo.exceptions import NodeExistsError, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError

from kiteq.binding import _zk_nodes as nodes
from kiteq.binding._zk_client import new_client
from kiteq.binding.zk import ZkSettings
from kiteq.core.errors import RegistryUnavailableError

__all__ = ["TAKEOVER_ROOT", "BrokerStore", "ZkTakeoverNodes"]

logger = logging.getLogger(__name__)

TAKEOVER_ROOT: Final = "/kiteq/takeover"


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerStore:
    """What a broker announces for takeover: its store, its owner name, this run."""

    store: str
    owner: str
    incarnation: str

    def dumps(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def loads(cls, data: bytes) -> BrokerStore | None:
        """None when *data* is not a takeover node's JSON."""
        try:
            doc = json.loads(data)
            return cls(str(doc["store"]), str(doc["owner"]), str(doc["incarnation"]))
        except (ValueError, TypeError, KeyError):
            return None


def _broker_path(address: str) -> str:
    return f"{TAKEOVER_ROOT}/{address}"


class ZkTakeoverNodes:
    """The takeover nodes, on a ZooKeeper session of their own.

    Args:
        settings: The registry's parsed ``zk://`` URI (same chroot and credentials).
        connect_timeout: Seconds ``start`` waits for a session.
    """

    def __init__(self, settings: ZkSettings, *, connect_timeout: float = 15.0) -> None:
        self._settings = settings
        self._connect_timeout = connect_timeout
        self._zk: Any = None

    def _client(self) -> Any:
        return new_client(self._settings)

    @property
    def _started(self) -> Any:
        if self._zk is None:
            raise RegistryUnavailableError("takeover: zookeeper session not started")
        return self._zk

    async def start(self) -> None:
        """Open the session (the registry has created the chroot already)."""
        if self._zk is not None:
            return
        zk = self._client()
        try:
            await asyncio.to_thread(zk.start, self._connect_timeout)
        except KazooTimeoutError as exc:
            await asyncio.to_thread(_close, zk)
            raise RegistryUnavailableError(
                f"takeover: ZooKeeper {self._settings.redacted()} did not answer "
                f"within {self._connect_timeout:g}s"
            ) from exc
        self._zk = zk
        await asyncio.to_thread(zk.retry, zk.ensure_path, TAKEOVER_ROOT)

    async def stop(self) -> None:
        """Close the session (a held lock goes with it); idempotent."""
        zk, self._zk = self._zk, None
        if zk is not None:
            await asyncio.to_thread(_close, zk)

    async def announce(self, address: str, info: BrokerStore) -> None:
        """Write this broker's takeover node (a new incarnation)."""
        zk = self._started
        await asyncio.to_thread(
            zk.retry, nodes.ensure_persistent, zk, _broker_path(address), info.dumps()
        )

    async def brokers(self) -> tuple[set[str], set[str]]:
        """(every broker ever registered: ``all_servers``, those alive: ``alive_servers``)."""
        zk = self._started

        def read() -> tuple[set[str], set[str]]:
            found = []
            for root in (nodes.ALL_ROOT, nodes.ALIVE_ROOT):
                try:
                    found.append(set(zk.retry(zk.get_children, root)))
                except NoNodeError:
                    found.append(set())
            return found[0], found[1]

        return await asyncio.to_thread(read)

    async def is_alive(self, address: str) -> bool:
        zk = self._started
        stat = await asyncio.to_thread(zk.retry, zk.exists, nodes.alive_path(address))
        return stat is not None

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
        zk = self._started
        path = f"{_broker_path(address)}/lock"
        data = json.dumps({"taker": taker}).encode()

        def create() -> bool:
            try:
                zk.retry(zk.create, path, data, ephemeral=True, makepath=True)
            except NodeExistsError:
                return False
            return True

        return await asyncio.to_thread(create)

    async def unlock(self, address: str) -> None:
        zk = self._started
        path = f"{_broker_path(address)}/lock"

        def delete() -> None:
            with contextlib.suppress(NoNodeError):
                zk.retry(zk.delete, path)

        await asyncio.to_thread(delete)

    async def mark_done(self, address: str, record: dict[str, Any]) -> None:
        zk = self._started
        path = f"{_broker_path(address)}/done"
        data = json.dumps(record, separators=(",", ":")).encode()
        await asyncio.to_thread(zk.retry, nodes.ensure_persistent, zk, path, data)

    async def _data(self, path: str) -> bytes | None:
        zk = self._started

        def read() -> bytes | None:
            try:
                data, _ = zk.retry(zk.get, path)
            except NoNodeError:
                return None
            return bytes(data)

        return await asyncio.to_thread(read)


def _close(zk: Any) -> None:
    try:
        zk.stop()
    finally:
        zk.close()
