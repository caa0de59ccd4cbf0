"""Backlog takeover with a real ZooKeeper (a chroot per test) and a real MariaDB.

Two concurrent takers: exactly one moves the rows. An interrupted move is resumed and
every row ends with exactly one owner. The grace period is respected (injected clock),
an alive broker or one on another store is never taken, and a broker that comes back
and dies again is taken again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pymysql
import pytest
from sqlalchemy import event

from kiteq.binding import zk_nodes as nodes
from kiteq.binding.base import BrokerStore
from kiteq.binding.zk_session import ZkSession
from kiteq.binding.zk_takeover import ZkTakeoverNodes
from kiteq.binding.zk_uri import parse_zk_uri
from kiteq.core.errors import StoreUnavailableError
from kiteq.core.message import GroupDelivery, GroupState
from kiteq.handler.takeover import TakeoverLoop
from kiteq.store.base import DeadLetter
from kiteq.store.mysql import MySQLStore
from kiteq.store.url import mysql_options, open_store
from tests._servers import unavailable
from tests._servers.zookeeper import ManagedZooKeeper
from tests.store import mariadb
from tests.store.helpers import NOW, record

DEAD = "10.0.0.9:13800"
N = 60
PARKED = 3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def prefix() -> Iterator[str]:
    if not mariadb.available():
        unavailable("MariaDB")
    with mariadb.databases(4) as name:
        yield name


@pytest.fixture
def zk_uri(zookeeper: ManagedZooKeeper, zk: Any) -> str:
    zk.ensure_path(nodes.ALL_ROOT)
    zk.ensure_path(nodes.ALIVE_ROOT)
    return f"zk://{zookeeper.hosts}{zk.chroot}?timeout=4"


def url(prefix: str, owner: str, **params: object) -> str:
    return mariadb.url(prefix, shardnum=4, flushSeconds=0, kiteServer=owner, **params)


class Cluster:
    """Stores and takeover loops of brokers sharing one database set."""

    def __init__(self, prefix: str, zk_uri: str, zk: Any) -> None:
        self.prefix = prefix
        self.zk_uri = zk_uri
        self.zk = zk
        self.clock = Clock()
        self.closers: list[Any] = []

    async def store(self, owner: str, **params: object) -> MySQLStore:
        store = open_store(url(self.prefix, owner, **params))
        assert isinstance(store, MySQLStore)
        await store.open()
        self.closers.append(store.close)
        return store

    def store_id(self) -> str:
        return mysql_options(url(self.prefix, "x")).sharing_identity

    async def session(self) -> tuple[ZkSession, ZkTakeoverNodes]:
        """A broker's ZooKeeper session (closed with the cluster) and its takeover nodes."""
        session = ZkSession(parse_zk_uri(self.zk_uri))
        await session.open()
        self.closers.append(session.close)
        return session, ZkTakeoverNodes(session)

    async def loop(self, address: str, store: MySQLStore, grace: float = 5.0) -> TakeoverLoop:
        _, records = await self.session()
        loop = TakeoverLoop(
            nodes=records,
            store=store,
            address=address,
            owner=store.owner,
            store_id=self.store_id(),
            grace=grace,
            clock=self.clock,
        )
        await loop.start()
        self.closers.append(loop.stop)
        return loop

    async def dead_broker(self, address: str = DEAD, owner: str = DEAD) -> MySQLStore:
        """A broker that announced itself, stored N messages (some dead-lettered), died."""
        store = await self.store(owner)
        self.zk.ensure_path(f"{nodes.ALL_ROOT}/{address}")
        await self.announce(address, owner)
        records = [record(ndt=NOW) for _ in range(N)]
        for r in records:
            r.kite_server = owner
        for r in records[5 : 5 + PARKED]:
            # waiting for an offline group: counted by the taker's stored backlog
            r.groups["audit"] = GroupDelivery(GroupState.PENDING, 0, r.message.expired_time)
        await store.save(records)
        await store.dead_letter(
            [DeadLetter(r, "deliver_limit", NOW, group="acct") for r in records[:5]]
        )
        return store

    async def announce(self, address: str, owner: str, incarnation: str = "one") -> None:
        session, announcer = await self.session()
        try:
            await announcer.start()
            await announcer.announce(address, BrokerStore(self.store_id(), owner, incarnation))
        finally:
            await session.close()

    def owners(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        with mariadb.connect() as conn, conn.cursor() as cur:
            for shard in range(4):
                for table in (
                    "kite_msg_0",
                    "kite_msg_1",
                    "kite_msg_2",
                    "kite_msg_3",
                    "kite_msg_dlq",
                ):
                    cur.execute(
                        f"SELECT kite_server, COUNT(*) FROM `{self.prefix}_{shard}`.`{table}` "
                        "GROUP BY kite_server"
                    )
                    for owner, count in cur.fetchall():
                        counts[owner] = counts.get(owner, 0) + int(count)
        return counts

    async def close(self) -> None:
        for close in reversed(self.closers):
            await close()


@pytest.fixture
async def cluster(prefix: str, zk_uri: str, zk: Any) -> AsyncIterator[Cluster]:
    c = Cluster(prefix, zk_uri, zk)
    try:
        yield c
    finally:
        await c.close()


async def test_store_take_over_moves_rows_and_counts(cluster: Cluster) -> None:
    await cluster.dead_broker()
    taker = await cluster.store("b")
    assert await taker.backlog() == {}
    taken = await taker.take_over(DEAD)
    assert (taken.messages, taken.dead_letters) == (N - 5, 5)
    assert taken.pending == {("trade", "audit", int(record().publish_time)): PARKED}
    assert await taker.backlog() == {"trade": N - 5}
    assert await taker.dlq_size() == {("trade", "acct"): 5}
    assert len(await taker.page_due(NOW + 1, 1000)) == N - 5
    assert (await taker.take_over(DEAD)).rows == 0  # idempotent
    assert cluster.owners() == {"b": N}
    memory = open_store("memory://")
    await memory.open()
    assert (await memory.take_over("b")).rows == 0
    await memory.close()


async def test_a_taken_over_scheduled_message_keeps_its_delivery_time(cluster: Cluster) -> None:
    dead = await cluster.store(DEAD)
    at = NOW + 3600
    later = record(ndt=at)
    later.message = dataclasses.replace(later.message, deliver_at=at)
    later.kite_server = DEAD
    await dead.save([later])
    taker = await cluster.store("b")
    assert (await taker.take_over(DEAD)).messages == 1
    # due at its delivery time in the taker's index, not before
    assert [r.message_id for r in await taker.page_due(NOW + 1, 10)] == []
    [due] = await taker.page_due(at, 10)
    assert (due.message_id, due.message.deliver_at) == (later.message_id, at)
    assert due.kite_server != DEAD


async def test_two_concurrent_takers_exactly_one_moves(cluster: Cluster) -> None:
    await cluster.dead_broker()
    b = await cluster.loop("10.0.0.1:13800", await cluster.store("b"), grace=0.5)
    c = await cluster.loop("10.0.0.2:13800", await cluster.store("c"), grace=0.5)
    assert await b.check() == 0
    assert await c.check() == 0
    cluster.clock.now += 1
    moved = await asyncio.gather(b.check(), c.check(), b.check(), c.check())
    print(f"concurrent takers moved {moved} (total {sum(moved)} of {N})")
    assert sum(moved) == N
    assert len(b.taken) + len(c.taken) == 1
    winner = "b" if b.taken else "c"
    assert cluster.owners() == {winner: N}
    done = json.loads(cluster.zk.get(f"/kiteq/takeover/{DEAD}/done")[0])
    assert done["incarnation"] == "one"
    assert done["moved"] == N
    assert cluster.zk.exists(f"/kiteq/takeover/{DEAD}/lock") is None
    assert await b.check() == 0
    assert await c.check() == 0


async def test_a_held_lock_keeps_others_out_until_its_session_ends(cluster: Cluster) -> None:
    await cluster.dead_broker()
    holder_session, holder = await cluster.session()
    await holder.start()
    assert await holder.try_lock(DEAD, "10.0.0.7:13800")
    c = await cluster.loop("10.0.0.2:13800", await cluster.store("c"), grace=0.5)
    await c.check()
    cluster.clock.now += 1
    assert await c.check() == 0
    assert cluster.owners() == {DEAD: N}
    await holder_session.close()  # the holder died: its ephemeral lock goes with its session
    assert await c.check() == N
    assert cluster.owners() == {"c": N}


async def test_an_interrupted_move_is_resumed(cluster: Cluster) -> None:
    await cluster.dead_broker()
    store = await cluster.store("b", batchUpdateSize=7)
    b = await cluster.loop("10.0.0.1:13800", store, grace=0.5)
    updates = 0

    def fail_third_update(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal updates
        if statement.startswith("UPDATE") and "SET kite_server" in statement:
            updates += 1
            if updates == 3:
                raise pymysql.err.OperationalError(1105, "injected failure")

    event.listen(store._engine, "before_cursor_execute", fail_third_update)
    await b.check()
    cluster.clock.now += 1
    with pytest.raises(StoreUnavailableError):
        await b.check()
    partial = cluster.owners()
    print(f"interrupted after 2 committed batches: owners {partial}")
    first = partial.get("b", 0)
    assert partial == {"b": first, DEAD: N - first}
    assert 0 < first < N
    assert cluster.zk.exists(f"/kiteq/takeover/{DEAD}/done") is None
    assert cluster.zk.exists(f"/kiteq/takeover/{DEAD}/lock") is None
    event.remove(store._engine, "before_cursor_execute", fail_third_update)
    assert await store.backlog() == {"trade": first}  # counted although it failed
    c = await cluster.loop("10.0.0.2:13800", await cluster.store("c"), grace=0.5)
    await c.check()
    cluster.clock.now += 1
    assert await c.check() == N - first  # another survivor resumes where it stopped
    assert cluster.owners() == {"b": first, "c": N - first}
    assert await b.check() == 0


async def test_grace_alive_and_other_stores_are_respected(cluster: Cluster) -> None:
    await cluster.dead_broker()
    # another broker, on another store, and an alive one
    cluster.zk.ensure_path(f"{nodes.ALL_ROOT}/10.0.0.5:13800")
    session, announcer = await cluster.session()
    await announcer.start()
    await announcer.announce("10.0.0.5:13800", BrokerStore("mysql://elsewhere:3306/k", "e", "x"))
    await session.close()
    c = await cluster.loop("10.0.0.2:13800", await cluster.store("c"), grace=30)
    cluster.zk.create(f"{nodes.ALIVE_ROOT}/{DEAD}", b"{}", ephemeral=True)
    cluster.clock.now += 100
    assert await c.check() == 0  # alive
    cluster.zk.delete(f"{nodes.ALIVE_ROOT}/{DEAD}")
    assert await c.check() == 0  # gone just now
    cluster.clock.now += 29.9
    assert await c.check() == 0  # within the grace
    cluster.clock.now += 0.2
    assert await c.check() == N
    assert [t.address for t in c.taken] == [DEAD]  # never the other store's broker


async def test_a_broker_that_comes_back_and_dies_again_is_taken_again(cluster: Cluster) -> None:
    dead = await cluster.dead_broker()
    c = await cluster.loop("10.0.0.2:13800", await cluster.store("c"), grace=1)
    await c.check()
    cluster.clock.now += 2
    assert await c.check() == N
    # it comes back (a new incarnation), owns nothing old, stores more, dies again
    await cluster.announce(DEAD, DEAD, incarnation="two")
    cluster.zk.create(f"{nodes.ALIVE_ROOT}/{DEAD}", b"{}", ephemeral=True)
    assert await c.check() == 0
    assert await dead.page_due(NOW + 1, 1000) == []
    more = [record(ndt=NOW) for _ in range(10)]
    for r in more:
        r.kite_server = DEAD
    await dead.save(more)
    cluster.zk.delete(f"{nodes.ALIVE_ROOT}/{DEAD}")
    assert await c.check() == 0
    cluster.clock.now += 2
    assert await c.check() == 10
    assert cluster.owners() == {"c": N + 10}


async def test_a_restarting_broker_is_not_taken_over_before_it_registers(
    cluster: Cluster,
) -> None:
    await cluster.dead_broker()
    c = await cluster.loop("10.0.0.2:13800", await cluster.store("c"), grace=1)
    await c.check()
    cluster.clock.now += 2
    assert await c.check() == N
    # it restarts: its new incarnation is announced, it is not registered as alive yet
    await cluster.announce(DEAD, DEAD, incarnation="two")
    cluster.clock.now += 0.5
    assert await c.check() == 0
    assert [t.incarnation for t in c.taken] == ["one"]  # no takeover of "two"
    # still not alive a whole grace later: it died starting, so it is taken over
    cluster.clock.now += 1.1
    assert await c.check() == 0  # nothing of "two" stored
    assert [t.incarnation for t in c.taken] == ["one", "two"]
