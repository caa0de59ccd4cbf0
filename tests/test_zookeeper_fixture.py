from __future__ import annotations

from typing import Any

from tests._servers.zookeeper import ManagedZooKeeper


def test_zookeeper_answers_four_letter_words(zookeeper: ManagedZooKeeper) -> None:
    assert zookeeper.hosts == f"127.0.0.1:{zookeeper.port}"
    assert zookeeper.four_letter("ruok") == "imok"
    assert "Mode: standalone" in zookeeper.four_letter("srvr")


def test_zk_client_is_chrooted(zk: Any, zookeeper: ManagedZooKeeper) -> None:
    zk.create("/kiteq/server/trade/127.0.0.1:13800", b'{"v":1}', makepath=True)
    data, stat = zk.get("/kiteq/server/trade/127.0.0.1:13800")
    assert data == b'{"v":1}'
    assert stat.version == 0
    assert zk.get_children("/") == ["kiteq"]
    # The node lives under this test's private chroot, not at the server's root.
    chroot = zk.chroot
    assert chroot.startswith("/kiteq-test-")
    from kazoo.client import KazooClient

    root = KazooClient(hosts=zookeeper.hosts, timeout=5)
    root.start(timeout=10)
    try:
        assert root.exists(f"{chroot}/kiteq/server/trade/127.0.0.1:13800") is not None
        assert root.exists("/kiteq/server/trade/127.0.0.1:13800") is None
    finally:
        root.stop()
        root.close()


def test_each_test_gets_a_fresh_chroot(zk: Any) -> None:
    assert zk.get_children("/") == []
