"""Backlog takeover: surviving brokers sharing one MySQL store take over a dead broker's rows.

KiteQ owns stored messages by host name (``kite_server``) and never recovers a dead
broker's messages. Here each broker owns its rows under a name unique per broker (by
default its advertised ``host:port``), and:

* at start, every broker with a MySQL store and a ``zk://`` registry announces its store
  identity, owner name and a fresh incarnation (``/kiteq/takeover/{host:port}``);
* every ``interval`` seconds, it compares ``/kiteq/all_servers`` with
  ``/kiteq/alive_servers``: a broker listed in the first and missing from the second for
  longer than ``takeoverGraceSeconds`` (as seen by this broker) is dead;
* a dead broker that announced the **same store** (and another owner name), whose current
  incarnation was not taken over yet, is taken over by whoever first creates its
  ephemeral lock node; under the lock the taker checks again that the broker is still not
  alive and not taken, then moves the rows (``MessageStore.take_over``: batched,
  transactional per batch, idempotent), writes the ``done`` marker naming the taken
  incarnation, wakes its recover scan (which delivers them) and refreshes its counts;
* a second survivor then finds the lock taken or the ``done`` marker; if it ever ran the
  move anyway it would move nothing, because rows are moved by
  ``UPDATE … WHERE kite_server = dead``: a row is never moved twice.

A broker that comes back on the same address keeps running, owning nothing old (its rows
were moved); it announces a new incarnation, so if it dies again it is taken over again.
A taker that dies mid-move releases the lock with its ZooKeeper session; the next
survivor resumes the move. Delivery stays at-least-once: a broker cut off from ZooKeeper
for longer than the grace (but still running) loses its rows to a peer, and messages it
was delivering at that moment may be delivered by both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

from kiteq.binding.base import BrokerStore, TakeoverNodes
from kiteq.core.errors import KiteQError
from kiteq.store.base import MessageStore, TakenOver

__all__ = ["TakeoverLoop", "check_interval"]

logger = logging.getLogger(__name__)

# the detection period: a quarter of the grace, within these bounds
_MIN_INTERVAL: Final = 0.2
_MAX_INTERVAL: Final = 5.0


def check_interval(grace: float) -> float:
    """How often the takeover loop looks at ZooKeeper for *grace*."""
    return max(_MIN_INTERVAL, min(_MAX_INTERVAL, grace / 4))


@dataclasses.dataclass(frozen=True, slots=True)
class Taken:
    """One completed takeover."""

    address: str
    owner: str
    incarnation: str
    moved: int


class TakeoverLoop:
    """Detect dead brokers sharing this store and take over their backlog.

    Args:
        nodes: The shared takeover records (``registry.takeover_nodes()``).
        store: This broker's store (``take_over`` moves the rows).
        address: This broker's advertised ``host:port`` (its ZooKeeper name).
        owner: This broker's ``kite_server``.
        store_id: the store's sharing identity (``StoreOwnership.sharing``).
        grace: Seconds a broker's alive node must be missing before it is taken over.
        on_taken: Called (awaited) with what moved after each takeover that moved some:
            wake the recover scan, reload transactions, refresh counts.
        clock: Monotonic seconds (tests inject one).
        interval: Seconds between looks (default ``check_interval(grace)``).
    """

    def __init__(
        self,
        *,
        nodes: TakeoverNodes,
        store: MessageStore,
        address: str,
        owner: str,
        store_id: str,
        grace: float,
        on_taken: Callable[[TakenOver], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float | None = None,
    ) -> None:
        self._nodes = nodes
        self._store = store
        self._address = address
        self._owner = owner
        self._store_id = store_id
        self._grace = grace
        self._on_taken = on_taken
        self._clock = clock
        self._interval = check_interval(grace) if interval is None else interval
        self.incarnation = uuid.uuid4().hex
        self._missing: dict[str, float] = {}
        self._skipped: set[tuple[str, str]] = set()
        self.taken: list[Taken] = []

    async def start(self) -> None:
        """Ready the records and announce this broker (call before it registers as alive)."""
        await self._nodes.start()
        await self._nodes.announce(
            self._address, BrokerStore(self._store_id, self._owner, self.incarnation)
        )
        logger.info(
            "takeover: announced address=%s owner=%s store=%s grace=%gs",
            self._address,
            self._owner,
            self._store_id,
            self._grace,
        )

    async def stop(self) -> None:
        await self._nodes.stop()

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except (KiteQError, OSError) as exc:
                # the store or ZooKeeper is unavailable for now: look again later
                logger.warning("takeover check failed (%r); retrying", exc)
            await asyncio.sleep(self._interval)

    async def check(self) -> int:
        """One look at ZooKeeper; takes over every dead broker due. Returns rows moved."""
        every, alive = await self._nodes.brokers()
        now = self._clock()
        for address in list(self._missing):
            if address in alive or address not in every:
                del self._missing[address]
        moved = 0
        for address in sorted(every - alive - {self._address}):
            since = self._missing.setdefault(address, now)
            if now - since < self._grace:
                continue
            moved += await self.take(address)
        return moved

    async def take(self, address: str) -> int:
        """Take over *address* if it shares this store and is not taken; rows moved."""
        info = await self._nodes.store_of(address)
        if info is None or info.store != self._store_id or info.owner == self._owner:
            self._skip(address, info)
            return 0
        if await self._taken(address, info):
            self._settled(address)
            return 0
        if not await self._nodes.try_lock(address, self._address):
            logger.debug("takeover of %s: another broker holds the lock", address)
            return 0
        try:
            # under the lock: still dead, still not taken (another taker may just have)
            if await self._nodes.is_alive(address) or await self._taken(address, info):
                return 0
            logger.info(
                "takeover of %s (owner %r, incarnation %s): moving its rows",
                address,
                info.owner,
                info.incarnation,
            )
            taken = await self._store.take_over(info.owner)
            moved = taken.rows
            latest = await self._nodes.store_of(address)
            if (
                latest is not None and latest.incarnation == info.incarnation
            ) and not await self._nodes.is_alive(address):
                await self._nodes.mark_done(
                    address,
                    {
                        "taker": self._address,
                        "owner": info.owner,
                        "incarnation": info.incarnation,
                        "moved": moved,
                        "time": time.time(),
                    },
                )
            else:
                logger.info("takeover of %s: it came back during the move", address)
        finally:
            await self._nodes.unlock(address)
        self._settled(address)
        self.taken.append(Taken(address, info.owner, info.incarnation, moved))
        logger.info("takeover of %s done: %d rows now owned by %r", address, moved, self._owner)
        if moved and self._on_taken is not None:
            await self._on_taken(taken)
        return moved

    def _settled(self, address: str) -> None:
        """*address*'s incarnation is taken over: forget since when it was missing.

        A broker that restarts announces its new incarnation before it registers as
        alive; that one must be missing a whole grace of its own before it is taken over.
        """
        self._missing.pop(address, None)

    async def _taken(self, address: str, info: BrokerStore) -> bool:
        done = await self._nodes.done(address)
        return done is not None and done.get("incarnation") == info.incarnation

    def _skip(self, address: str, info: BrokerStore | None) -> None:
        why = (
            "it announced no takeover store (not MySQL, or no takeover)"
            if info is None
            else "it uses another store"
            if info.store != self._store_id
            else f"it has this broker's owner name {info.owner!r}"
        )
        if (address, why) not in self._skipped:
            self._skipped.add((address, why))
            logger.info("broker %s is gone; not taking it over: %s", address, why)
