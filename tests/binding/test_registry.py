from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from kiteq.binding.base import BindingRegistry
from kiteq.binding.embedded import EmbeddedRegistry
from kiteq.binding.file import FileBindingRegistry
from kiteq.binding.match import BindingTable
from kiteq.binding.model import Binding
from kiteq.binding.registry import open_registry
from kiteq.binding.zk import ZkBindingRegistry
from kiteq.core.errors import ConfigError

DEMO = Path(__file__).resolve().parents[2] / "conf" / "registry_demo.toml"


class NullMeta:
    async def put_meta(self, key: str, value: bytes | None) -> None:
        raise AssertionError("nothing should be stored")

    async def get_meta(self, prefix: str) -> Mapping[str, bytes]:
        return {}


def test_embedded() -> None:
    registry = open_registry("embedded://", NullMeta())
    assert isinstance(registry, EmbeddedRegistry)
    assert registry.kind == "embedded"


async def test_file_path_relative_to_the_working_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(DEMO.parents[1])
    registry = open_registry("file://conf/registry_demo.toml", NullMeta(), reload_seconds=5)
    assert isinstance(registry, FileBindingRegistry)
    assert registry.kind == "file"
    table = BindingTable()
    await registry.start(table)
    try:
        assert table.groups("trade") == ["acct-svc", "audit-svc"]
        assert not await registry.declare("acct-svc", [Binding.fanout("trade")])
    finally:
        await registry.stop()


def test_file_absolute_path(tmp_path: Path) -> None:
    registry = open_registry(f"file://{tmp_path}/r.toml", NullMeta())
    assert isinstance(registry, FileBindingRegistry)


def test_zookeeper() -> None:
    registry = open_registry(
        "zk://127.0.0.1:2181,127.0.0.2:2181/kiteq?timeout=4", NullMeta(), topics=["trade"]
    )
    assert isinstance(registry, ZkBindingRegistry)
    assert registry.kind == "zk"


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("etcd://h:2379", "unsupported scheme 'etcd'"),
        ("conf/registry_demo.toml", "expected embedded://"),
        ("", "expected embedded://"),
        ("file://", "file:// needs a path"),
        ("embedded://somewhere", "takes no address"),
    ],
)
def test_bad_uris(uri: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        open_registry(uri, NullMeta())


def test_bad_reload_interval() -> None:
    with pytest.raises(ConfigError, match="reload interval"):
        open_registry("file://conf/registry_demo.toml", NullMeta(), reload_seconds=0)


def test_implementations_satisfy_the_protocol() -> None:
    registries: list[BindingRegistry] = [
        EmbeddedRegistry(NullMeta()),
        FileBindingRegistry(DEMO),
    ]
    assert [r.kind for r in registries] == ["embedded", "file"]
