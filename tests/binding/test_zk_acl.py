"""The one kazoo recipe of every KiteQ ZooKeeper session (``kiteq.binding.zk_session``).

Its ACL and options; then, against the real ZooKeeper, the broker's sessions (registry and
takeover) through it: every node they create, parents and chroot included, carries world
READ + ALL for the digest user, and kazoo's DEBUG log of the ``Auth`` request is masked
(a plain kazoo client logs the password there).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Final

import pytest
from kazoo.exceptions import NoAuthError
from kazoo.protocol.serialization import Auth
from kazoo.security import make_acl

from kiteq.binding.base import BrokerInfo
from kiteq.binding.match import BindingTable
from kiteq.binding.model import Binding
from kiteq.binding.zk import ZkBindingRegistry
from kiteq.binding.zk_session import KAZOO_LOGGER, digest_acl, new_client
from kiteq.binding.zk_uri import parse_zk_uri
from tests._servers.zk_acl import EXPECTED, PASSWORD, USER, acl_of, authed_session, walk
from tests._servers.zookeeper import ManagedZooKeeper, expire_session, wait_owner

ADDRESS: Final = "10.0.0.7:13800"


@pytest.fixture
def authed(zookeeper: ManagedZooKeeper, zk: Any) -> Iterator[Any]:
    """The credentials' holder in the test's chroot; it cleans up what the ACLs protect."""
    with authed_session(zookeeper.hosts + zk.chroot) as client:
        yield client


def test_digest_acl_is_world_read_and_all_for_the_user() -> None:
    acl = digest_acl(USER, PASSWORD)
    assert {(a.id.scheme, a.id.id, a.perms) for a in acl} == EXPECTED


def test_client_options_with_and_without_credentials() -> None:
    secured = new_client(parse_zk_uri(f"zk://127.0.0.1:1/app?timeout=3&digest={USER}:{PASSWORD}"))
    try:
        assert secured.auth_data == {("digest", f"{USER}:{PASSWORD}")}
        assert {(a.id.scheme, a.id.id, a.perms) for a in secured.default_acl} == EXPECTED
        assert secured.logger.name == KAZOO_LOGGER
        assert secured.hosts == [("127.0.0.1", 1)]
        assert secured.chroot == "/app"
    finally:
        secured.close()
    plain = new_client(parse_zk_uri("zk://127.0.0.1:1/app"), "127.0.0.1:1")
    try:
        assert plain.auth_data == set()
        assert plain.default_acl is None  # kazoo's default: OPEN_ACL_UNSAFE
        assert plain.chroot == ""
    finally:
        plain.close()


def test_the_auth_request_is_masked_in_the_sessions_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, KAZOO_LOGGER)
    logger = logging.getLogger(KAZOO_LOGGER)
    logger.debug("Sending request(xid=%s): %s", -4, Auth(0, "digest", f"{USER}:{PASSWORD}"))
    logger.debug("Sending request(xid=%s): %s", -4, Auth(0, "x509", PASSWORD))
    logger.debug("unrelated %s %s", 1, "two")
    assert [r.getMessage() for r in caplog.records] == [
        f"Sending request(xid=-4): Auth(auth_type=0, scheme='digest', auth='{USER}:***')",
        "Sending request(xid=-4): Auth(auth_type=0, scheme='x509', auth='***')",
        "unrelated 1 two",
    ]


async def test_broker_nodes_parents_and_chroot_get_the_acl(
    zookeeper: ManagedZooKeeper, zk: Any, authed: Any
) -> None:
    settings = parse_zk_uri(f"zk://{zookeeper.hosts}{zk.chroot}/app?digest={USER}:{PASSWORD}")
    registry = ZkBindingRegistry(settings, topics=("trade",))
    takeover = registry.takeover_nodes()
    try:
        await registry.start(BindingTable())
        await registry.register(BrokerInfo(ADDRESS, 1, "kiteq.proto.v1"))
        await registry.declare("acct-svc", [Binding.direct("trade", "pay-succ")])
        await takeover.start()
        paths = list(walk(zk, "/app"))
        assert {
            "/app",
            "/app/kiteq",
            "/app/kiteq/server/trade",
            f"/app/kiteq/server/trade/{ADDRESS}",
            f"/app/kiteq/alive_servers/{ADDRESS}",
            f"/app/kiteq/all_servers/{ADDRESS}",
            "/app/kiteq/pub/trade",
            "/app/kiteq/sub/trade/acct-svc-bind",
            "/app/kiteq/takeover",
        } <= set(paths)
        # read as the owner: ZooKeeper shows a digest id only to sessions with ADMIN on the node
        assert {path: acl_of(authed, path) for path in paths} == dict.fromkeys(paths, EXPECTED)
        with pytest.raises(NoAuthError):
            zk.set_acls(
                f"/app/kiteq/all_servers/{ADDRESS}", [make_acl("world", "anyone", all=True)]
            )
    finally:
        await takeover.stop()
        await registry.stop()


async def test_broker_session_never_logs_the_password(
    zookeeper: ManagedZooKeeper, zk: Any, authed: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(1)  # everything, kazoo's BLATHER (5) included
    registry = ZkBindingRegistry(
        parse_zk_uri(f"zk://{zookeeper.hosts}{zk.chroot}?timeout=4&digest={USER}:{PASSWORD}"),
        topics=("trade",),
    )
    alive = f"/kiteq/alive_servers/{ADDRESS}"
    try:
        await registry.start(BindingTable())
        await registry.register(BrokerInfo(ADDRESS, 1, "kiteq.proto.v1"))
        old, session_password = registry.session.client.client_id
        await wait_owner(zk, alive, lambda o: o == old)
        # a new session authenticates again, and its re-created nodes keep the ACL
        expire_session(zookeeper.hosts, old, session_password)
        new = await wait_owner(zk, alive, lambda o: o not in (None, old))
        assert acl_of(authed, alive) == EXPECTED
        assert new == registry.session_id
    finally:
        await registry.stop()
    messages = [record.getMessage() for record in caplog.records]
    sent_auth = [m for m in messages if "Auth(" in m and "Sending request" in m]
    assert len(sent_auth) >= 2, messages  # once per session: the records were there to see
    assert all(f"auth='{USER}:***'" in m for m in sent_auth)
    assert any(f"digest={USER}:***" in m for m in messages)  # the registry's redacted URI
    assert [m for m in messages if PASSWORD in m] == []
