"""Client-side ZooKeeper digest auth (issue #9): ``zk://...?digest=user:password``.

The nodes a client writes (producer nodes, ``-bind`` nodes, their parents, a topic's
``/kiteq/server/{topic}``, the chroot) carry world READ + ALL for the user, in a new
session too; a session without the credentials reads them but cannot change or delete
them; nothing logs the password; a refused node is reported. Last, real broker processes
and clients with the same credentials work together through ZooKeeper.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import make_acl

from kiteq.binding.zk_session import digest_acl
from kiteq.client import Binding, Consumer, Message, Producer
from kiteq.client._zk_directory import ZkDirectory
from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc
from tests._servers.zk_acl import EXPECTED, PASSWORD, USER, acl_of, authed_session, walk
from tests._servers.zookeeper import ManagedZooKeeper
from tests.client._zk import expire_directory_session, opened_directory, wait_for_new_owner
from tests.e2e.broker_process import BrokerProcess
from tests.e2e.collector import Collector
from tests.waiting import eventually, wait_until

pytestmark = pytest.mark.timeout(90)

HOST: Final = socket.gethostname()
SECRET: Final = "s3cret"
OPEN_ACL: Final = [make_acl("world", "anyone", all=True)]


def exists(zk: Any, path: str) -> bool:
    return zk.exists(path) is not None


def refused(operation: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """True when ZooKeeper refuses *operation* for want of permission."""
    try:
        operation(*args, **kwargs)
    except NoAuthError:
        return True
    return False


@pytest.fixture
def authed(zookeeper: ManagedZooKeeper, zk: Any) -> Iterator[Any]:
    """The credentials' holder in the test's chroot; it cleans up what the ACLs protect."""
    with authed_session(zookeeper.hosts + zk.chroot) as client:
        yield client


@pytest.fixture
def secured(zookeeper: ManagedZooKeeper, zk: Any, authed: Any) -> str:
    """The test's chroot as a registry URI with the credentials."""
    return f"zk://{zookeeper.hosts}{zk.chroot}?timeout=4&digest={USER}:{PASSWORD}"


@pytest.fixture
async def directory(secured: str) -> AsyncIterator[ZkDirectory]:
    async with opened_directory(secured) as found:
        yield found


async def test_every_node_the_client_creates_gets_the_acl(
    zookeeper: ManagedZooKeeper, zk: Any, authed: Any
) -> None:
    # a fresh tree: the client creates everything, its chroot included
    pub = f"/app/kiteq/pub/trade/pay-svc/{HOST}"
    bind = "/app/kiteq/sub/trade/acct-svc-bind"
    async with opened_directory(
        f"zk://{zookeeper.hosts}{zk.chroot}/app?digest={USER}:{PASSWORD}"
    ) as found:
        await found.watch(["trade"], timeout=10)
        found.publish_producer("trade", "pay-svc")
        await found.write_bindings("acct-svc", [Binding.direct("trade", "pay-succ")], timeout=10)
        await eventually(lambda: zk.exists(pub) is not None)
        paths = list(walk(authed, "/app"))
        assert paths == [
            "/app",
            "/app/kiteq",
            "/app/kiteq/pub",
            "/app/kiteq/pub/trade",
            "/app/kiteq/pub/trade/pay-svc",
            pub,
            "/app/kiteq/server",
            "/app/kiteq/server/trade",
            "/app/kiteq/sub",
            "/app/kiteq/sub/trade",
            bind,
        ]
        assert {path: acl_of(authed, path) for path in paths} == dict.fromkeys(paths, EXPECTED)

        # without the credentials: read, but neither change nor delete nor add
        assert zk.get(bind)[0].startswith(b'[{"groupId":"acct-svc"')
        assert zk.exists(pub) is not None
        for path in (pub, bind, "/app/kiteq/server/trade"):
            assert refused(zk.set, path, b"x"), path
            assert refused(zk.set_acls, path, OPEN_ACL), path
        assert refused(zk.delete, pub)
        assert refused(zk.delete, bind)
        assert refused(zk.create, "/app/kiteq/sub/trade/intruder-bind", b"[]")
        assert refused(zk.create, "/app/kiteq/server/trade/10.6.6.6:1", b"", ephemeral=True)
        # nor with a wrong password
        wrong = KazooClient(
            hosts=zookeeper.hosts + zk.chroot, auth_data=[("digest", f"{USER}:guess")], timeout=5
        )
        wrong.start(timeout=10)
        try:
            assert refused(wrong.set, bind, b"[]")
            assert refused(wrong.delete, pub)
        finally:
            wrong.stop()
            wrong.close()
        # the credentials' holder can: the refusals above were the ACL's
        authed.set(bind, b"[]")
        assert zk.get(bind)[0] == b"[]"


async def test_the_producer_node_keeps_the_acl_in_a_new_session(
    directory: ZkDirectory, zookeeper: ManagedZooKeeper, zk: Any, authed: Any
) -> None:
    await directory.start(10)
    directory.publish_producer("trade", "pay-svc")
    path = f"/kiteq/pub/trade/pay-svc/{HOST}"
    await eventually(lambda: zk.exists(path) is not None)
    kazoo = directory.session.client
    old_session = await expire_directory_session(directory, zookeeper.hosts)
    assert await wait_for_new_owner(zk, path, old_session) == kazoo.client_id[0]
    assert acl_of(authed, path) == EXPECTED
    assert refused(zk.delete, path)


async def test_the_password_is_never_logged(
    directory: ZkDirectory, zookeeper: ManagedZooKeeper, zk: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(1)  # everything, kazoo's BLATHER (5) included
    await directory.watch(["trade"], timeout=10)
    directory.publish_producer("trade", "pay-svc")
    await directory.write_bindings("acct-svc", [Binding.direct("trade", "pay-succ")], timeout=10)
    path = f"/kiteq/pub/trade/pay-svc/{HOST}"
    await eventually(lambda: zk.exists(path) is not None)
    old_session = await expire_directory_session(directory, zookeeper.hosts)
    await wait_for_new_owner(zk, path, old_session)
    await directory.close()
    messages = [record.getMessage() for record in caplog.records]
    sent_auth = [m for m in messages if "Sending request" in m and "Auth(" in m]
    assert len(sent_auth) >= 2, messages  # once per session: the records were there to see
    assert all(f"auth='{USER}:***'" in m for m in sent_auth)
    assert any("client connected to zookeeper" in m and f"digest={USER}:***" in m for m in messages)
    assert [m for m in messages if PASSWORD in m] == []
    # nor in the objects users print
    assert PASSWORD not in repr(directory.settings)


async def test_refused_nodes_are_reported_once_per_session(
    zookeeper: ManagedZooKeeper, zk: Any, authed: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "kiteq.client.discovery")
    # a tree the credentials' holder owns (as a broker with digest= leaves it)
    for path in ("/kiteq/pub/trade", "/kiteq/sub/trade"):
        authed.ensure_path(path, acl=digest_acl(USER, PASSWORD))
    authed.ensure_path("/kiteq/pub/open", acl=OPEN_ACL)
    where = f"zk://{zookeeper.hosts}{zk.chroot}?timeout=4"
    denied = f"/kiteq/pub/trade/pay-svc/{HOST}"
    async with (
        opened_directory(where) as anonymous,
        opened_directory(f"{where}&digest={USER}:guess") as guessing,
    ):
        await anonymous.start(10)
        anonymous.publish_producer("trade", "pay-svc")
        error = f"no permission to create producer node {denied} as an unauthenticated session"
        await eventually(lambda: error in caplog.text)
        # more nodes: the producer nodes are written again (one round after the other: the
        # second node exists only once the first node's round has logged what it refused),
        # but the refused node is not tried again
        for group in ("pay-svc", "ops-svc"):
            anonymous.publish_producer("open", group)
            node = f"/kiteq/pub/open/{group}/{HOST}"
            await eventually(functools.partial(exists, zk, node))
        assert caplog.text.count(error) == 1
        assert zk.exists(denied) is None

        await guessing.write_bindings("acct-svc", [Binding.direct("trade", "x")], timeout=10)
        assert (
            "no permission to write bindings path=/kiteq/sub/trade/acct-svc-bind"
            " as digest user kiteq" in caplog.text
        )
        assert zk.exists("/kiteq/sub/trade/acct-svc-bind") is None
        assert "guess" not in caplog.text


def test_discovery_imports_with_the_client_dependencies_only(tmp_path: Path) -> None:
    # the server extras are absent in a client-only install: refuse to import them
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        SERVER_ONLY = {"re2", "rocksdict", "sqlalchemy", "pymysql", "prometheus_client",
                       "grpc_health", "grpc_reflection", "uvloop"}

        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in SERVER_ONLY:
                    raise ModuleNotFoundError(name)
                return None

        sys.meta_path.insert(0, Absent())
        import kiteq.client, kiteq.client._zk_directory, kiteq.binding.zk, kiteq.binding.zk_session
        loaded = sorted(m for m in sys.modules if m.startswith(("kiteq.handler", "kiteq.store",
                                                                 "kiteq.broker", "kiteq.ops")))
        print("ok", loaded)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok []"), done.stderr


# -- with real brokers ----------------------------------------------------------------------


def bindings_of(broker: BrokerProcess, topic: str) -> list[tuple[str, str]]:
    """(group, message type) of the broker's bindings for *topic* (admin ListBindings)."""
    with grpc.insecure_channel(broker.address) as channel:
        reply = admin_pb2_grpc.AdminStub(channel).ListBindings(
            admin_pb2.ListBindingsRequest(topic=topic), timeout=5
        )
    return sorted((b.groupId, b.messageType) for b in reply.bindings)


@pytest.fixture
def broker(
    zookeeper: ManagedZooKeeper, zk: Any, authed: Any, tmp_path: Path
) -> Iterator[BrokerProcess]:
    """A broker process registered in the test's chroot with the credentials."""
    config = tmp_path / "cluster.toml"
    config.write_text(
        f"""
[registry.zk]
hosts = "zk://{zookeeper.hosts}{zk.chroot}?timeout=4&digest={USER}:{PASSWORD}"

[clusters.e2e]
env = "zk"
topics = ["trade"]
db = "rocksdb://{tmp_path / "db"}?fsync=batch"
acceptAnySecret = true
deliverySeconds = 5
recoverSeconds = 1
"""
    )
    process = BrokerProcess(config)
    process.start()
    try:
        yield process
    finally:
        process.stop_quietly()


async def test_broker_and_clients_with_the_same_credentials_work_together(
    broker: BrokerProcess, secured: str, zk: Any, authed: Any
) -> None:
    # the broker's own nodes are protected as well
    assert acl_of(authed, f"/kiteq/server/trade/{broker.address}") == EXPECTED
    got = Collector()
    consumer = Consumer(
        registry=secured,
        group_id="acct-svc",
        secret_key=SECRET,
        bindings=[Binding.direct("trade", "pay-succ")],
        handler=got,
    )
    producer = Producer(registry=secured, group_id="pay-svc", secret_key=SECRET, timeout=15)

    pub = f"/kiteq/pub/trade/pay-svc/{HOST}"

    def publish_and_consume() -> tuple[str, set[tuple[str, str, int]]]:
        with consumer, producer:
            message = Message(topic="trade", message_type="pay-succ", body=b"with acls")
            result = producer.send(message)
            got.wait_count(1)
            # the producer node is written in the background: wait for it (bounded)
            wait_until(lambda: zk.exists(pub) is not None, 10, f"{pub} written")
            return result.message_id, acl_of(authed, pub)

    message_id, pub_acl = await asyncio.to_thread(publish_and_consume)
    assert got.ids() == [message_id]
    assert pub_acl == EXPECTED
    assert acl_of(authed, "/kiteq/pub/trade/pay-svc") == EXPECTED  # a parent the client made
    bind = "/kiteq/sub/trade/acct-svc-bind"
    assert acl_of(authed, bind) == EXPECTED
    assert refused(zk.set, bind, b"[]")

    # bindings a client writes (no stream declares them) are applied by the broker
    async with opened_directory(secured) as writer:
        await writer.write_bindings("audit-svc", [Binding.regex("trade", "pay-.*")], timeout=10)
    assert acl_of(authed, "/kiteq/sub/trade/audit-svc-bind") == EXPECTED
    wanted = [("acct-svc", "pay-succ"), ("audit-svc", "pay-.*")]
    await eventually(lambda: bindings_of(broker, "trade") == wanted)
    assert not [line for line in broker.output if PASSWORD in line]
