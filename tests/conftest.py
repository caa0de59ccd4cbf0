"""Shared fixtures: a real ZooKeeper per session and a chrooted kazoo client per test.

Helpers for test modules live in ``tests._servers`` (``CI``, ``unavailable``,
``free_port``) and are re-exported here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kazoo.client import KazooClient

from tests._servers import CI, free_port, unavailable
from tests._servers.zookeeper import ManagedZooKeeper, missing_zookeeper

__all__ = ["CI", "free_port", "unavailable"]


def pytest_exception_interact(
    node: pytest.Item | pytest.Collector,
    call: pytest.CallInfo[Any],
    report: pytest.CollectReport | pytest.TestReport,
) -> None:
    """Attach the tail of ZooKeeper's log to the report of a failed test that used it."""
    server = getattr(node, "funcargs", {}).get("zookeeper")
    if isinstance(server, ManagedZooKeeper):
        report.sections.append(("zookeeper log (tail)", server.log_tail()))


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedZooKeeper]:
    """A standalone ZooKeeper for the whole session (``.hosts``, ``.stop()``)."""
    missing = missing_zookeeper()
    if missing is not None:
        unavailable(missing)
    server = ManagedZooKeeper(tmp_path_factory.mktemp("zookeeper"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def zk(zookeeper: ManagedZooKeeper) -> Iterator[Any]:
    """A started ``KazooClient`` chrooted to a fresh ``/kiteq-test-<uuid>``.

    Tests never see each other's znodes; the chroot is deleted afterwards.
    """
    chroot = f"/kiteq-test-{uuid.uuid4().hex}"
    admin = KazooClient(hosts=zookeeper.hosts, timeout=5)
    admin.start(timeout=10)
    try:
        admin.ensure_path(chroot)
        client = KazooClient(hosts=zookeeper.hosts + chroot, timeout=5)
        client.start(timeout=10)
        try:
            yield client
        finally:
            client.stop()
            client.close()
        admin.delete(chroot, recursive=True)
    finally:
        admin.stop()
        admin.close()
