"""The ZooKeeper registry against a real ZooKeeper (one chroot per test).

Layout and node types, KiteQ-format bindings, changes applied per group within 2 s,
malformed nodes, ``["*"]`` brokers, declarations; then sessions: expired for real, a stale
node of an old session, SUSPENDED (a cut connection), retries, digest ACLs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from types import MappingProxyType
from typing import Any, Final

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import make_acl, make_digest_acl

from kiteq.binding.base import BrokerInfo
from kiteq.binding.match import BindingLimits, BindingTable, RefusalReason
from kiteq.binding.model import Binding, dumps, loads
from kiteq.binding.zk import ZkBindingRegistry
from kiteq.binding.zk_uri import parse_zk_uri
from kiteq.core.acl import Grant, Permissions
from kiteq.core.errors import PermissionDeniedError, RegistryUnavailableError
from tests._servers import free_port
from tests._servers.zookeeper import (
    ManagedZooKeeper,
    TcpProxy,
    expire_session,
    owner,
    wait_owner,
)
from tests.binding._changes import Changes

ADDRESS: Final = "10.0.0.7:13800"
BROKER: Final = BrokerInfo(ADDRESS, 1, "kiteq.proto.v1")
NODE_DATA: Final = {"grpc": ADDRESS, "protocolVersion": 1, "proto": "kiteq.proto.v1"}
# exactly what a KiteQ (Go) client writes: json.Marshal of []*registry.Binding
KITEQ_JSON: Final = (
    b'[{"groupId":"acct-svc","topic":"trade","messageType":"pay-.*","bindType":1,'
    b'"version":"1.0.0","watermark":1000,"persistent":true}]'
)
ACCT: Final = "/kiteq/sub/trade/acct-svc-bind"
AUDIT: Final = "/kiteq/sub/trade/audit-svc-bind"
FENCE: Final = "/kiteq/sub/trade/fence-svc-bind"


def groups(table: BindingTable, topic: str = "trade", message_type: str = "pay-succ") -> list[str]:
    """The groups a message of (*topic*, *message_type*) goes to."""
    return [route.group for route in table.routes(topic, message_type)]


class Registries:
    """Opens started registries (with their tables); ``close`` stops them all."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._open: list[ZkBindingRegistry] = []

    async def open(
        self,
        topics: tuple[str, ...] = ("trade",),
        *,
        uri: str | None = None,
        table: BindingTable | None = None,
        **options: Any,
    ) -> tuple[ZkBindingRegistry, BindingTable]:
        registry = ZkBindingRegistry(parse_zk_uri(uri or self.uri), topics=topics, **options)
        table = BindingTable() if table is None else table
        await registry.start(table)
        self._open.append(registry)
        return registry, table

    async def close(self) -> None:
        while self._open:
            await self._open.pop().stop()


async def kz(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A blocking kazoo call, off the loop (the registry's hops must keep flowing)."""
    return await asyncio.to_thread(func, *args, **kwargs)


class RegistryLog(logging.Handler):
    """The registry's log records; tests wait for events that change no table."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        # any thread: the registry's worker threads log too
        self.messages.append(record.getMessage())
        self._loop.call_soon_threadsafe(self._event.set)

    @property
    def text(self) -> str:
        return "\n".join(self.messages)

    def clear(self) -> None:
        self.messages.clear()

    async def until(self, text: str, timeout: float = 5.0) -> None:
        """Wait for a record containing *text*."""
        async with asyncio.timeout(timeout):
            while not any(text in message for message in self.messages):
                self._event.clear()
                await self._event.wait()


@pytest.fixture
async def zk_log() -> AsyncIterator[RegistryLog]:
    logger = logging.getLogger("kiteq.binding.zk")
    handler = RegistryLog()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def zk_uri(zookeeper: ManagedZooKeeper, zk: Any) -> str:
    return f"zk://{zookeeper.hosts}{zk.chroot}?timeout=4"


@pytest.fixture
async def registries(zk_uri: str) -> AsyncIterator[Registries]:
    opened = Registries(zk_uri)
    try:
        yield opened
    finally:
        await opened.close()


class Proxied:
    """Registries that reach ZooKeeper through a ``TcpProxy`` the test can cut."""

    def __init__(self, registries: Registries, proxy: TcpProxy, chroot: str) -> None:
        self.proxy = proxy
        self._registries = registries
        self._chroot = chroot

    async def registered(self, timeout: int) -> tuple[ZkBindingRegistry, BindingTable]:
        """A registry through the proxy (session timeout *timeout* s), BROKER registered."""
        registry, table = await self._registries.open(
            uri=f"zk://{self.proxy.hosts}{self._chroot}?timeout={timeout}"
        )
        await registry.register(BROKER)
        return registry, table


@pytest.fixture
async def proxied(
    registries: Registries, zk: Any, zookeeper: ManagedZooKeeper
) -> AsyncIterator[Proxied]:
    proxy = TcpProxy(zookeeper.port)
    try:
        yield Proxied(registries, proxy, zk.chroot)
    finally:
        # the registries stop before their path to ZooKeeper goes
        await registries.close()
        proxy.close()


# -- layout ------------------------------------------------------------------------------


async def test_registration_layout(registries: Registries, zk: Any) -> None:
    registry, _ = await registries.open(("trade", "user-profile"))
    await registry.register(BROKER)
    session = registry.session_id
    assert session
    for path in (
        f"/kiteq/server/trade/{ADDRESS}",
        f"/kiteq/server/user-profile/{ADDRESS}",
        f"/kiteq/alive_servers/{ADDRESS}",
    ):
        data, stat = zk.get(path)
        assert stat.ephemeralOwner == session, path
        assert json.loads(data) == NODE_DATA, path
    data, stat = zk.get(f"/kiteq/all_servers/{ADDRESS}")
    assert stat.ephemeralOwner == 0
    assert json.loads(data) == NODE_DATA
    # the persistent topic nodes KiteQ's broker creates
    for path in (
        "/kiteq/server",
        "/kiteq/sub/trade",
        "/kiteq/pub/trade",
        "/kiteq/sub/user-profile",
    ):
        assert owner(zk, path) == 0, path
    assert sorted(zk.get_children("/kiteq")) == [
        "alive_servers",
        "all_servers",
        "pub",
        "server",
        "sub",
    ]


async def test_unregister_removes_the_ephemeral_nodes_and_keeps_watching(
    registries: Registries, zk: Any
) -> None:
    registry, table = await registries.open()
    await registry.register(BROKER)
    await registry.unregister()
    assert zk.exists(f"/kiteq/server/trade/{ADDRESS}") is None
    assert zk.exists(f"/kiteq/alive_servers/{ADDRESS}") is None
    assert owner(zk, f"/kiteq/all_servers/{ADDRESS}") == 0  # the inventory stays
    await registry.unregister()  # idempotent
    # draining: bindings still follow ZooKeeper until stop()
    changes = Changes(table)
    await kz(zk.create, ACCT, KITEQ_JSON, makepath=True)
    await changes.until(lambda: groups(table) == ["acct-svc"])


async def test_stop_closes_the_session_and_its_nodes(
    registries: Registries, zk: Any, zk_uri: str
) -> None:
    registry, _ = await registries.open()
    await registry.register(BROKER)
    await registry.stop()
    await registry.stop()  # idempotent
    assert zk.exists(f"/kiteq/alive_servers/{ADDRESS}") is None
    assert registry.session_id is None


# -- bindings ----------------------------------------------------------------------------


async def test_kiteq_json_routes_at_start_and_live(registries: Registries, zk: Any) -> None:
    zk.create(ACCT, KITEQ_JSON, makepath=True)
    _, table = await registries.open()
    # loaded before start() returns
    assert groups(table) == ["acct-svc"]
    (route,) = table.routes("trade", "pay-fail")  # unanchored RE2, as Go's MatchString
    assert (route.group, route.persistent, route.watermark) == ("acct-svc", True, 1000)
    assert table.routes("trade", "refund") == ()
    changes = Changes(table)
    # a fanout written by KiteQ for another group, while running
    await kz(
        zk.create,
        AUDIT,
        b'[{"groupId":"audit-svc","topic":"trade","messageType":"*","bindType":2,'
        b'"version":"1.0.0","watermark":0,"persistent":false}]',
    )
    await changes.until(lambda: groups(table, message_type="refund") == ["audit-svc"])
    assert not table.routes("trade", "refund")[0].persistent


async def test_add_change_remove_applied_within_two_seconds(
    registries: Registries, zk: Any
) -> None:
    _, table = await registries.open()
    changes = Changes(table)
    assert groups(table) == []

    await kz(zk.create, ACCT, dumps([Binding.direct("trade", "pay-succ")]))
    await changes.until(lambda: groups(table) == ["acct-svc"])

    await kz(zk.set, ACCT, dumps([Binding.direct("trade", "pay-fail")]))
    await changes.until(lambda: groups(table, message_type="pay-fail") == ["acct-svc"])
    assert groups(table) == []

    await kz(zk.delete, ACCT)
    await changes.until(lambda: table.bindings() == [])

    # re-created after its deletion: the same watch sees it again
    await kz(zk.create, ACCT, KITEQ_JSON)
    await changes.until(lambda: groups(table) == ["acct-svc"])


@pytest.mark.parametrize("action", ["delete", "change"])
async def test_one_groups_change_never_touches_another(
    registries: Registries, zk: Any, action: str
) -> None:
    zk.create(ACCT, KITEQ_JSON, makepath=True)
    zk.create(AUDIT, dumps([Binding.fanout("trade").with_group("audit-svc")]))
    _, table = await registries.open()
    assert groups(table) == ["acct-svc", "audit-svc"]
    changes = Changes(table)
    samples = 0
    missing = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal samples, missing
        while not done.is_set():
            samples += 1
            if "audit-svc" not in groups(table):
                missing += 1
            await asyncio.sleep(0)

    sampler = asyncio.create_task(sample())
    try:
        if action == "delete":
            await kz(zk.delete, ACCT)
        else:
            await kz(zk.set, ACCT, dumps([Binding.direct("trade", "refund")]))
        await changes.until(lambda: "acct-svc" not in groups(table))
        # late events (the topic's children watch) arrive while sampling: a third group's
        # node, created after the change, is seen after every event the change caused
        await kz(zk.create, FENCE, dumps([Binding.fanout("trade").with_group("fence-svc")]))
        await changes.until(lambda: "fence-svc" in groups(table))
    finally:
        done.set()
        await sampler
    assert samples > 100
    assert missing == 0
    assert ("trade", "audit-svc") not in changes.log
    assert groups(table) == ["audit-svc", "fence-svc"]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json", "not JSON"),
        (b'{"groupId":"acct-svc"}', "must be a JSON array"),
        (b'[{"topic":"trade","messageType":"(a","bindType":1}]', "invalid regex"),
        (b'[{"topic":"trade","messageType":"x","bindType":7}]', "malformed binding"),
        (b'[{"groupId":"other","topic":"trade","messageType":"x"}]', "of group 'other'"),
        (b'[{"groupId":"acct-svc","topic":"news","messageType":"x"}]', "for topic 'news'"),
    ],
)
async def test_malformed_node_is_logged_and_the_group_keeps_its_bindings(
    registries: Registries, zk: Any, zk_log: RegistryLog, data: bytes, reason: str
) -> None:
    zk.create(ACCT, KITEQ_JSON, makepath=True)
    _, table = await registries.open()
    changes = Changes(table)
    await kz(zk.set, ACCT, data)
    await zk_log.until(f"malformed binding node path={ACCT}")
    assert reason in zk_log.text
    assert groups(table) == ["acct-svc"]
    assert changes.log == []
    # the watch goes on
    await kz(zk.set, ACCT, dumps([Binding.direct("trade", "refund")]))
    await changes.until(lambda: groups(table, message_type="refund") == ["acct-svc"])


async def test_malformed_node_at_start_is_skipped(
    registries: Registries, zk: Any, zk_log: RegistryLog
) -> None:
    zk.create(ACCT, b"[{", makepath=True)
    zk.create(AUDIT, dumps([Binding.fanout("trade")]))
    zk.create("/kiteq/sub/trade/bad name-bind", KITEQ_JSON)
    zk.create("/kiteq/sub/trade/not-a-binding", b"")
    _, table = await registries.open()
    assert groups(table) == ["audit-svc"]
    assert f"malformed binding node path={ACCT}" in zk_log.text
    assert "invalid group name: bad name-bind" in zk_log.text
    # an empty node: the group has no bindings (a KiteQ tool may create it so)
    changes = Changes(table)
    await kz(zk.set, AUDIT, b"")
    await changes.until(lambda: table.bindings() == [])


async def test_topic_node_deleted_and_recreated(registries: Registries, zk: Any) -> None:
    zk.create(ACCT, KITEQ_JSON, makepath=True)
    zk.create(AUDIT, dumps([Binding.fanout("trade")]))
    _, table = await registries.open()
    changes = Changes(table)
    await kz(zk.delete, "/kiteq/sub/trade", recursive=True)
    await changes.until(lambda: table.bindings() == [])
    # a fresh topic node gets a fresh children watch
    await kz(zk.create, ACCT, KITEQ_JSON, makepath=True)
    await changes.until(lambda: groups(table) == ["acct-svc"])


async def test_unserved_topics_are_not_watched(registries: Registries, zk: Any) -> None:
    _, table = await registries.open(("trade",))
    changes = Changes(table)
    await kz(
        zk.create, "/kiteq/sub/news/acct-svc-bind", dumps([Binding.fanout("news")]), makepath=True
    )
    await kz(zk.create, ACCT, KITEQ_JSON)
    await changes.until(lambda: groups(table) == ["acct-svc"])
    assert table.topics() == ["trade"]


async def test_any_topic_broker_watches_and_serves_every_topic(
    registries: Registries, zk: Any
) -> None:
    zk.create("/kiteq/sub/news/reader-bind", dumps([Binding.fanout("news")]), makepath=True)
    registry, table = await registries.open(("*",))
    assert groups(table, "news", "x") == ["reader"]
    await registry.register(BROKER)
    assert owner(zk, f"/kiteq/server/news/{ADDRESS}") == registry.session_id
    changes = Changes(table)
    # a topic that appears later: its bindings are watched, the broker serves it
    await kz(zk.create, ACCT, KITEQ_JSON, makepath=True)
    await changes.until(lambda: groups(table) == ["acct-svc"])
    session = registry.session_id
    await wait_owner(zk, f"/kiteq/server/trade/{ADDRESS}", lambda o: o == session, timeout=2)
    # a producer's pub node, and another broker's topic, make it serve those too
    await kz(zk.create, "/kiteq/pub/weather/pub-svc/host1", makepath=True)
    await kz(zk.create, "/kiteq/server/stocks/10.0.0.8:13800", makepath=True)
    for topic in ("weather", "stocks"):
        path = f"/kiteq/server/{topic}/{ADDRESS}"
        await wait_owner(zk, path, lambda o: o == session, timeout=2)
    assert registry.served_topics == ["news", "stocks", "trade", "weather"]
    # a consumer declaring for a brand-new topic: applied when declare returns
    assert await registry.declare("fresh-svc", [Binding.fanout("fresh")]) is False
    assert groups(table, "fresh", "x") == ["fresh-svc"]
    await wait_owner(zk, f"/kiteq/server/fresh/{ADDRESS}", lambda o: o == session, timeout=2)


# -- declarations ------------------------------------------------------------------------


async def test_declare_writes_the_groups_node_when_it_differs(
    registries: Registries, zk: Any
) -> None:
    registry, table = await registries.open(("trade", "news"))
    declared = [Binding.direct("trade", "pay-succ", watermark=50), Binding.fanout("news")]
    assert await registry.declare("acct-svc", declared) is False
    # applied through the watch by the time declare returns
    assert groups(table) == ["acct-svc"]
    assert groups(table, "news", "x") == ["acct-svc"]
    data, stat = zk.get(ACCT)
    assert stat.ephemeralOwner == 0  # persistent, as KiteQ's clients create it
    assert json.loads(data) == [
        {
            "groupId": "acct-svc",
            "topic": "trade",
            "messageType": "pay-succ",
            "bindType": 0,
            "version": "1.0.0",
            "watermark": 50,
            "persistent": True,
        }
    ]
    # the same again (also from a KiteQ-formatted node): nothing written
    assert await registry.declare("acct-svc", declared[:1]) is False
    assert zk.exists(ACCT).mzxid == stat.mzxid
    # different: rewritten, the table follows
    assert await registry.declare("acct-svc", [Binding.regex("trade", "pay-.*")]) is False
    assert loads(zk.get(ACCT)[0]) == [Binding.regex("trade", "pay-.*").with_group("acct-svc")]
    assert groups(table, message_type="pay-fail") == ["acct-svc"]
    assert groups(table, "news", "x") == ["acct-svc"]  # topics not declared keep theirs


async def test_declare_overwrites_a_malformed_node(registries: Registries, zk: Any) -> None:
    zk.create(ACCT, b"garbage", makepath=True)
    registry, table = await registries.open()
    assert await registry.declare("acct-svc", [Binding.direct("trade", "pay-succ")]) is False
    assert groups(table) == ["acct-svc"]


async def test_declare_of_an_equivalent_kiteq_node_writes_nothing(
    registries: Registries, zk: Any
) -> None:
    zk.create(ACCT, KITEQ_JSON, makepath=True)
    registry, _ = await registries.open()
    before = zk.exists(ACCT).mzxid
    binding = Binding.regex("trade", "pay-.*", watermark=1000)
    assert await registry.declare("acct-svc", [binding]) is False
    assert zk.exists(ACCT).mzxid == before
    assert zk.get(ACCT)[0] == KITEQ_JSON


async def test_invalid_declaration_raises_and_writes_nothing(
    registries: Registries, zk: Any
) -> None:
    registry, table = await registries.open()
    with pytest.raises(ValueError, match="invalid regex"):
        await registry.declare("acct-svc", [Binding.fanout("trade"), Binding.regex("trade", "(")])
    assert zk.exists(ACCT) is None
    assert table.bindings() == []


async def test_nodes_outside_the_acl_or_limits_are_skipped_logged_once_and_counted(
    registries: Registries, zk: Any, zk_log: RegistryLog
) -> None:
    spy = "/kiteq/sub/trade/spy-svc-bind"
    granted = Grant(subscribe=frozenset({"trade"}))
    refused: list[RefusalReason] = []
    table = BindingTable(
        limits=BindingLimits(max_per_group_topic=2),
        permissions=Permissions(MappingProxyType({"acct-svc": granted, "audit-svc": granted})),
        on_refused=refused.append,
    )
    zk.create(ACCT, KITEQ_JSON, makepath=True)
    zk.create(spy, dumps([Binding.fanout("trade")]))
    registry, _ = await registries.open(table=table)
    assert groups(table) == ["acct-svc"]
    assert f"binding node refused path={spy}" in zk_log.text
    assert "'spy-svc' may not subscribe to topic 'trade'" in zk_log.text
    assert refused == [RefusalReason.PERMISSION]

    # over the limit: skipped, the group keeps what it had
    changes = Changes(table)
    await kz(zk.create, AUDIT, dumps([Binding.fanout("trade")]))
    await changes.until(lambda: groups(table) == ["acct-svc", "audit-svc"])
    three = [Binding.direct("trade", t) for t in ("a", "b", "c")]
    await kz(zk.set, AUDIT, dumps(three))
    await zk_log.until("limit is 2 (maxBindingsPerGroupTopic)")
    assert groups(table) == ["acct-svc", "audit-svc"]
    assert refused == [RefusalReason.PERMISSION, RefusalReason.LIMIT]

    # a later change of a permitted group applies; the refused node stays unapplied and
    # its version was logged once
    refund = Binding.direct("trade", "refund").with_group("acct-svc")
    await kz(zk.set, ACCT, dumps([refund]))
    await changes.until(lambda: table.bindings("trade")[0] == refund)
    assert zk_log.text.count(f"binding node refused path={spy}") == 1
    assert table.groups("trade") == ["acct-svc", "audit-svc"]

    # a declaration outside the acl is refused before anything is written
    with pytest.raises(PermissionDeniedError, match="'other-svc' may not subscribe"):
        await registry.declare("other-svc", [Binding.fanout("trade")])
    assert zk.exists("/kiteq/sub/trade/other-svc-bind") is None
    with pytest.raises(ValueError, match="maxBindingsPerGroupTopic"):
        await registry.declare("acct-svc", three)
    assert loads(zk.get(ACCT)[0]) == [refund]


# -- sessions ----------------------------------------------------------------------------


async def test_session_expired_for_real_nodes_come_back(
    registries: Registries, zk: Any, zookeeper: ManagedZooKeeper, zk_log: RegistryLog
) -> None:
    zk.create(ACCT, KITEQ_JSON, makepath=True)
    registry, table = await registries.open()
    await registry.register(BROKER)
    alive = f"/kiteq/alive_servers/{ADDRESS}"
    server = f"/kiteq/server/trade/{ADDRESS}"
    old = owner(zk, alive)
    assert old == registry.session_id
    password = registry.session.client.client_id[1]  # the test plays the server's part
    await kz(expire_session, zookeeper.hosts, old, password)
    await zk_log.until("zookeeper session lost")
    # served throughout with the last known bindings
    assert groups(table) == ["acct-svc"]
    new = await wait_owner(zk, alive, lambda o: o not in (None, old))
    assert new == registry.session_id
    assert await wait_owner(zk, server, lambda o: o == new) == new
    assert json.loads(zk.get(server)[0]) == NODE_DATA
    assert groups(table) == ["acct-svc"]
    # the watches are armed again in the new session
    changes = Changes(table)
    await kz(zk.delete, ACCT)
    await changes.until(lambda: groups(table) == [])


async def test_stale_node_of_an_old_session_is_replaced(
    registries: Registries, zk: Any, zookeeper: ManagedZooKeeper, zk_log: RegistryLog
) -> None:
    # a broker crashed and restarted within its session timeout: its old session still
    # holds the nodes at the same paths
    old = KazooClient(hosts=zookeeper.hosts + zk.chroot, timeout=10)
    old.start(timeout=10)
    try:
        for path in (f"/kiteq/server/trade/{ADDRESS}", f"/kiteq/alive_servers/{ADDRESS}"):
            old.create(path, b"old", ephemeral=True, makepath=True)
        registry, _ = await registries.open()
        await registry.register(BROKER)
        for path in (f"/kiteq/server/trade/{ADDRESS}", f"/kiteq/alive_servers/{ADDRESS}"):
            data, stat = zk.get(path)
            assert stat.ephemeralOwner == registry.session_id != old.client_id[0]
            assert json.loads(data) == NODE_DATA
        assert "replacing a stale node" in zk_log.text
    finally:
        old.stop()
        old.close()
    # the old session's end does not take the new nodes with it
    assert owner(zk, f"/kiteq/alive_servers/{ADDRESS}") == registry.session_id


async def test_suspended_keeps_serving_and_keeps_the_session(
    proxied: Proxied, zk: Any, zk_log: RegistryLog
) -> None:
    zk.create(ACCT, KITEQ_JSON, makepath=True)
    registry, table = await proxied.registered(timeout=10)
    session = registry.session_id
    proxied.proxy.cut()
    await zk_log.until("zookeeper connection suspended")
    assert groups(table) == ["acct-svc"]
    # a consumer opening meanwhile is not held up (a write attempt would wait 5 s for
    # ZooKeeper), and nothing is applied
    declaring = registry.declare("audit-svc", [Binding.fanout("trade")])
    assert await asyncio.wait_for(declaring, 2.5) is False
    assert groups(table) == ["acct-svc"]
    assert "declared bindings not written" in zk_log.text
    zk_log.clear()
    proxied.proxy.restore()
    await zk_log.until(f"zookeeper connected session=0x{session:x}")
    assert registry.session_id == session
    assert owner(zk, f"/kiteq/alive_servers/{ADDRESS}") == session
    changes = Changes(table)
    await kz(zk.set, ACCT, dumps([Binding.fanout("trade")]))
    await changes.until(lambda: groups(table, message_type="refund") == ["acct-svc"])


async def test_cut_longer_than_the_session_timeout_re_registers(
    proxied: Proxied, zk: Any, zk_log: RegistryLog
) -> None:
    zk.create(ACCT, KITEQ_JSON, makepath=True)
    registry, table = await proxied.registered(timeout=4)
    alive = f"/kiteq/alive_servers/{ADDRESS}"
    old = registry.session_id
    proxied.proxy.cut()
    # the server expires the silent session and deletes its nodes
    await wait_owner(zk, alive, lambda o: o is None, timeout=15)
    # meanwhile a binding changes: seen once the broker is back
    await kz(zk.set, ACCT, dumps([Binding.fanout("trade")]))
    assert groups(table) == ["acct-svc"]
    assert groups(table, message_type="refund") == []
    proxied.proxy.restore()
    new = await wait_owner(zk, alive, lambda o: o not in (None, old))
    assert new == registry.session_id
    assert owner(zk, f"/kiteq/server/trade/{ADDRESS}") == new
    await Changes(table).until(
        lambda: groups(table, message_type="refund") == ["acct-svc"], timeout=5
    )
    assert "zookeeper session lost" in zk_log.text


async def test_registration_retries_until_it_succeeds(
    registries: Registries, zk: Any, zk_log: RegistryLog
) -> None:
    # another identity owns /kiteq/alive_servers and lets nobody else create in it
    zk.ensure_path("/kiteq")
    zk.create(
        "/kiteq/alive_servers",
        acl=[make_digest_acl("ops", "x", all=True), make_acl("world", "anyone", read=True)],
    )
    registry, _ = await registries.open(register_timeout=0.5)
    await registry.register(BROKER)
    assert "not registered in zookeeper after 0.5s" in zk_log.text
    assert "zookeeper registration failed (NoAuthError" in zk_log.text
    assert zk.exists(f"/kiteq/alive_servers/{ADDRESS}") is None
    # the operator fixes the ACL: a later retry succeeds
    zk.add_auth("digest", "ops:x")
    await kz(zk.set_acls, "/kiteq/alive_servers", [make_acl("world", "anyone", all=True)])
    session = registry.session_id
    await wait_owner(zk, f"/kiteq/alive_servers/{ADDRESS}", lambda o: o == session, timeout=15)


async def test_digest_acl(registries: Registries, zk: Any, zookeeper: ManagedZooKeeper) -> None:
    uri = f"zk://{zookeeper.hosts}{zk.chroot}?digest=kiteq:s3cret"
    authed = KazooClient(
        hosts=zookeeper.hosts + zk.chroot, auth_data=[("digest", "kiteq:s3cret")], timeout=5
    )
    authed.start(timeout=10)
    try:
        registry, table = await registries.open(uri=uri)
        await registry.register(BROKER)
        await registry.declare("acct-svc", [Binding.direct("trade", "pay-succ")])
        server = f"/kiteq/server/trade/{ADDRESS}"
        acl, _ = zk.get_acls(server)
        assert sorted((a.id.scheme, a.perms) for a in acl) == [("digest", 31), ("world", 1)]
        # anyone reads: discovery and bindings
        assert json.loads(zk.get(server)[0]) == NODE_DATA
        assert loads(zk.get(ACCT)[0])[0].message_type == "pay-succ"
        # nobody else writes
        with pytest.raises(NoAuthError):
            zk.set(server, b"{}")
        with pytest.raises(NoAuthError):
            zk.set(ACCT, b"[]")
        with pytest.raises(NoAuthError):
            zk.create("/kiteq/sub/trade/intruder-bind", KITEQ_JSON)
        with pytest.raises(NoAuthError):
            zk.delete(f"/kiteq/alive_servers/{ADDRESS}")
        # the credentials' holder does
        changes = Changes(table)
        authed.create(AUDIT, dumps([Binding.fanout("trade")]))
        await changes.until(lambda: groups(table) == ["acct-svc", "audit-svc"])
    finally:
        await registries.close()
        # the fixture's unauthenticated cleanup could not delete these
        authed.delete("/kiteq", recursive=True)
        authed.stop()
        authed.close()


async def test_unreachable_zookeeper_fails_start(zk: Any) -> None:
    registry = ZkBindingRegistry(
        parse_zk_uri(f"zk://127.0.0.1:{free_port()}"), topics=("trade",), connect_timeout=1
    )
    # connect_timeout=1, not the default 15 s: a start that ignored it would not fail in 5 s
    with pytest.raises(RegistryUnavailableError, match=r"^ZooKeeper zk://127\.0\.0\.1:"):
        await asyncio.wait_for(registry.start(BindingTable()), 5)
    await registry.stop()


async def test_missing_chroot_is_created(zookeeper: ManagedZooKeeper, zk: Any) -> None:
    registries = Registries(f"zk://{zookeeper.hosts}{zk.chroot}/deeper/still")
    try:
        registry, _ = await registries.open()
        await registry.register(BROKER)
        assert owner(zk, f"/deeper/still/kiteq/alive_servers/{ADDRESS}") == registry.session_id
    finally:
        await registries.close()
