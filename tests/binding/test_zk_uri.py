"""``zk://`` URIs: hosts, chroot, session timeout, digest ACL credentials (no server needed)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from kiteq.binding.base import NO_REGISTRATION, BrokerInfo
from kiteq.binding.embedded import EmbeddedRegistry
from kiteq.binding.registry import open_registry, redact_registry_uri
from kiteq.binding.zk import ZkBindingRegistry
from kiteq.binding.zk_takeover import ZkTakeoverNodes
from kiteq.binding.zk_uri import DEFAULT_SESSION_TIMEOUT, ZkSettings, parse_zk_uri
from kiteq.core.errors import ConfigError


class NullMeta:
    async def put_meta(self, key: str, value: bytes | None) -> None:
        raise AssertionError("nothing should be stored")

    async def get_meta(self, prefix: str) -> Mapping[str, bytes]:
        return {}


@pytest.mark.parametrize(
    ("uri", "hosts", "chroot"),
    [
        ("zk://127.0.0.1:2181", "127.0.0.1:2181", ""),
        ("zk://h1:2181,h2:2182", "h1:2181,h2:2182", ""),
        ("zk://h1", "h1:2181", ""),
        ("zk://h1:2181,h2:2181/", "h1:2181,h2:2181", ""),
        ("ZK://h1:2181/kiteq-prod", "h1:2181", "/kiteq-prod"),
        ("zk://h1:2181/a/b/", "h1:2181", "/a/b"),
        ("zk://[::1]:2181,h2", "[::1]:2181,h2:2181", ""),
        ("  zk://h1:2181  ", "h1:2181", ""),
    ],
)
def test_hosts_and_chroot(uri: str, hosts: str, chroot: str) -> None:
    settings = parse_zk_uri(uri)
    assert (settings.hosts, settings.chroot) == (hosts, chroot)
    assert settings.connect_string == hosts + chroot
    assert settings.session_timeout == DEFAULT_SESSION_TIMEOUT
    assert settings.digest is None


def test_parameters() -> None:
    settings = parse_zk_uri("zk://h:2181/c?timeout=4.5&digest=kiteq:p%40ss%3Aw%26rd")
    assert settings.session_timeout == 4.5
    assert settings.digest == ("kiteq", "p@ss:w&rd")
    assert "p@ss" not in repr(settings)
    assert settings.redacted() == "zk://h:2181/c?timeout=4.5&digest=kiteq:***"


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("zk://", "no ZooKeeper host"),
        ("zk:///chroot", "no ZooKeeper host"),
        ("zk://h:21x81", "expected host:port"),
        ("zk://h:0", "expected host:port"),
        ("zk://h:2181,,h2", "expected host:port"),
        ("zk://[::1", "expected host:port"),
        ("zk://h:2181//x", "invalid chroot"),
        ("zk://h:2181/a/../b", "invalid chroot"),
        ("zk://h?timeout=0", "timeout: must be > 0"),
        ("zk://h?timeout=soon", "timeout: expected a number"),
        ("zk://h?timeout=inf", "timeout: must be > 0"),
        ("zk://h?digest=nopassword", "digest must be user:password"),
        ("zk://h?digest=:pw", "digest must be user:password"),
        ("zk://h?digest=a:b&digest=a:c", "given twice"),
        ("zk://h?sessionTimeout=5", "unknown parameter 'sessionTimeout'"),
        ("file://x", "expected zk://"),
    ],
)
def test_bad_uris(uri: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as info:
        parse_zk_uri(uri)
    assert "pw" not in str(info.value)


def test_open_registry_makes_a_zk_registry() -> None:
    registry = open_registry("zk://127.0.0.1:2181/x?timeout=4", NullMeta(), topics=["trade"])
    assert isinstance(registry, ZkBindingRegistry)
    assert registry.kind == "zk"
    assert registry.settings == ZkSettings("127.0.0.1:2181", "/x", 4.0)
    assert registry.served_topics == ["trade"]
    assert registry.registration is registry
    assert isinstance(registry.takeover_nodes(), ZkTakeoverNodes)


def test_bad_zk_uri_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="expected host:port"):
        open_registry("zk://h:notaport", NullMeta())


async def test_other_registries_register_nothing() -> None:
    registry = EmbeddedRegistry(NullMeta())
    registration = registry.registration
    assert registration is NO_REGISTRATION
    assert registry.takeover_nodes() is None  # no takeover without ZooKeeper
    assert await registry.brokers() == []  # nobody else is known without a registry server
    await registration.register(BrokerInfo("127.0.0.1:13800", 1, "kiteq.proto.v1"))
    await registration.unregister()


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("zk://h:2181/c?digest=kiteq:secret", "zk://h:2181/c?timeout=10&digest=kiteq:***"),
        ("zk://h:bad?digest=kiteq:secret", "zk://h:bad"),
        ("file://conf/registry_demo.toml", "file://conf/registry_demo.toml"),
        ("embedded://", "embedded://"),
    ],
)
def test_redacted_uri(uri: str, shown: str) -> None:
    assert redact_registry_uri(uri) == shown
