from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from types import MappingProxyType

import pytest

from kiteq.binding.embedded import EmbeddedRegistry
from kiteq.binding.match import BindingLimits, BindingTable, Route
from kiteq.binding.model import Binding, loads
from kiteq.core.acl import Grant, Permissions
from kiteq.core.errors import PermissionDeniedError, RegistryError, StoreUnavailableError


class FakeMeta:
    """A dict-backed MetaStore that counts writes."""

    def __init__(self, data: dict[str, bytes] | None = None) -> None:
        self.data: dict[str, bytes] = dict(data or {})
        self.writes: list[str] = []
        self.fail = False

    async def put_meta(self, key: str, value: bytes | None) -> None:
        if self.fail:
            raise StoreUnavailableError("disk on fire")
        self.writes.append(key)
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = value

    async def get_meta(self, prefix: str) -> Mapping[str, bytes]:
        return {k: v for k, v in self.data.items() if k.startswith(prefix)}


async def _started(
    meta: FakeMeta, table: BindingTable | None = None
) -> tuple[EmbeddedRegistry, BindingTable]:
    registry = EmbeddedRegistry(meta)
    table = BindingTable() if table is None else table
    await registry.start(table)
    return registry, table


async def test_declare_applies_bindings_per_topic_with_the_group_set() -> None:
    registry, table = await _started(FakeMeta())
    declared = [
        Binding.direct("trade", "pay-succ").with_group("someone-else"),
        Binding.regex("trade", "refund", persistent=False),
        Binding.fanout("user", persistent=False),
    ]
    assert await registry.declare("acct", declared)
    assert table.bindings() == [
        Binding.direct("trade", "pay-succ").with_group("acct"),
        Binding.regex("trade", "refund", persistent=False).with_group("acct"),
        Binding.fanout("user", persistent=False).with_group("acct"),
    ]
    assert table.routes("trade", "refund-1") == (Route("acct", False, 0),)
    assert registry.kind == "embedded"
    await registry.stop()


async def test_persistent_bindings_survive_a_restart() -> None:
    meta = FakeMeta()
    registry, _ = await _started(meta)
    await registry.declare(
        "acct",
        [
            Binding.direct("trade", "pay-succ", watermark=100),
            Binding.direct("trade", "refund", persistent=False),
            Binding.fanout("user", persistent=False),
        ],
    )
    assert set(meta.data) == {"bind/trade/acct"}
    stored = json.loads(meta.data["bind/trade/acct"])
    assert stored == [
        {
            "groupId": "acct",
            "topic": "trade",
            "messageType": "pay-succ",
            "bindType": 0,
            "version": "1.0.0",
            "watermark": 100,
            "persistent": True,
        }
    ]
    await registry.stop()

    _, table = await _started(meta)
    assert table.bindings() == [
        Binding.direct("trade", "pay-succ", watermark=100).with_group("acct")
    ]
    assert table.routes("trade", "refund") == ()


async def test_same_declaration_does_not_rewrite_the_store() -> None:
    meta = FakeMeta()
    registry, _ = await _started(meta)
    bindings = [Binding.direct("trade", "pay"), Binding.fanout("user", persistent=False)]
    await registry.declare("acct", bindings)
    await registry.declare("acct", bindings)
    assert meta.writes == ["bind/trade/acct"]

    # after a restart too: what the store holds is known
    registry2, _ = await _started(meta)
    await registry2.declare("acct", bindings)
    assert meta.writes == ["bind/trade/acct"]


async def test_changed_persistent_bindings_are_rewritten_or_deleted() -> None:
    meta = FakeMeta()
    registry, table = await _started(meta)
    await registry.declare("acct", [Binding.direct("trade", "pay")])
    await registry.declare("acct", [Binding.direct("trade", "pay", watermark=5)])
    assert loads(meta.data["bind/trade/acct"]) == [
        Binding.direct("trade", "pay", watermark=5).with_group("acct")
    ]
    await registry.declare("acct", [Binding.direct("trade", "pay", persistent=False)])
    assert meta.data == {}
    assert meta.writes == ["bind/trade/acct"] * 3
    assert table.routes("trade", "pay") == (Route("acct", False, 0),)


async def test_declare_touches_only_the_declared_topics_and_group() -> None:
    registry, table = await _started(FakeMeta())
    await registry.declare("acct", [Binding.direct("trade", "pay"), Binding.fanout("user")])
    await registry.declare("audit", [Binding.fanout("trade")])
    await registry.declare("acct", [Binding.direct("trade", "refund")])
    assert table.bindings() == [
        Binding.direct("trade", "refund").with_group("acct"),
        Binding.fanout("trade").with_group("audit"),
        Binding.fanout("user").with_group("acct"),
    ]
    # a producer-only connection declares nothing
    assert await registry.declare("acct", [])
    assert len(table.bindings()) == 3


async def test_invalid_declaration_changes_nothing() -> None:
    meta = FakeMeta()
    registry, table = await _started(meta)
    await registry.declare("acct", [Binding.direct("trade", "pay")])
    with pytest.raises(ValueError, match="invalid regex"):
        await registry.declare(
            "acct", [Binding.direct("user", "x"), Binding.regex("trade", "(?=lookahead)")]
        )
    with pytest.raises(ValueError, match="invalid group"):
        await registry.declare("no/slash", [Binding.direct("user", "x")])
    assert table.bindings() == [Binding.direct("trade", "pay").with_group("acct")]
    assert meta.writes == ["bind/trade/acct"]


async def test_store_failure_leaves_the_table_unchanged() -> None:
    meta = FakeMeta()
    registry, table = await _started(meta)
    meta.fail = True
    with pytest.raises(StoreUnavailableError):
        await registry.declare("acct", [Binding.direct("trade", "pay")])
    assert table.bindings() == []
    meta.fail = False
    await registry.declare("acct", [Binding.direct("trade", "pay")])
    assert "bind/trade/acct" in meta.data


async def test_start_loads_kiteq_json_and_skips_corrupt_entries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kiteq_json = (
        b'[{"groupId":"s-mts-test","topic":"trade","messageType":"pay-succ","bindType":0,'
        b'"version":"1.0.0","watermark":1000,"persistent":true}]'
    )
    meta = FakeMeta(
        {
            "bind/trade/s-mts-test": kiteq_json,
            "bind/trade/broken": b"{not json",
            "bind/trade/other": kiteq_json,  # groupId does not match the key
            "bind/no-group": b"[]",
            "other/key": b"ignored",
        }
    )
    with caplog.at_level(logging.ERROR, logger="kiteq.binding.embedded"):
        registry, table = await _started(meta)
    assert table.bindings() == loads(kiteq_json)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    for key in ("bind/no-group", "bind/trade/broken", "bind/trade/other"):
        assert any(f"key={key}:" in m for m in messages), key

    # the group's next declaration replaces its corrupt entry, even with nothing persistent
    await registry.declare("broken", [Binding.fanout("trade", persistent=False)])
    assert "bind/trade/broken" not in meta.data
    await registry.declare("other", [Binding.fanout("trade")])
    assert loads(meta.data["bind/trade/other"]) == [Binding.fanout("trade").with_group("other")]


async def test_unbind_removes_stored_and_live_bindings() -> None:
    meta = FakeMeta()
    registry, table = await _started(meta)
    await registry.declare(
        "acct", [Binding.direct("trade", "pay"), Binding.fanout("user", persistent=False)]
    )
    await registry.declare("audit", [Binding.fanout("trade")])
    assert await registry.unbind("trade", "acct")
    assert await registry.unbind("user", "acct")
    assert not await registry.unbind("user", "acct")
    assert set(meta.data) == {"bind/trade/audit"}
    assert table.bindings() == [Binding.fanout("trade").with_group("audit")]


async def test_not_started_or_started_twice() -> None:
    registry = EmbeddedRegistry(FakeMeta())
    with pytest.raises(RegistryError, match="not started"):
        await registry.declare("g", [Binding.fanout("t")])
    with pytest.raises(RegistryError, match="not started"):
        await registry.unbind("t", "g")
    await registry.start(BindingTable())
    with pytest.raises(RegistryError, match="already started"):
        await registry.start(BindingTable())


ACCT_ONLY = Permissions(MappingProxyType({"acct": Grant(subscribe=frozenset({"trade"}))}))


async def test_declarations_outside_the_acl_or_limits_store_and_apply_nothing() -> None:
    meta = FakeMeta()
    table = BindingTable(limits=BindingLimits(max_per_group_topic=2), permissions=ACCT_ONLY)
    registry, _ = await _started(meta, table)
    await registry.declare("acct", [Binding.direct("trade", "pay")])
    with pytest.raises(PermissionDeniedError, match="'acct' may not subscribe to topic 'user'"):
        await registry.declare("acct", [Binding.direct("trade", "x"), Binding.fanout("user")])
    with pytest.raises(PermissionDeniedError, match="'spy' may not subscribe"):
        await registry.declare("spy", [Binding.fanout("trade")])
    with pytest.raises(ValueError, match="limit is 2"):
        await registry.declare("acct", [Binding.direct("trade", t) for t in "abc"])
    assert table.bindings() == [Binding.direct("trade", "pay").with_group("acct")]
    assert meta.writes == ["bind/trade/acct"]


async def test_stored_bindings_the_acl_now_refuses_are_not_loaded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stored = Binding.fanout("trade")
    meta = FakeMeta(
        {
            "bind/trade/acct": dumps_one(stored.with_group("acct")),
            "bind/trade/spy": dumps_one(stored.with_group("spy")),
        }
    )
    with caplog.at_level(logging.ERROR, logger="kiteq.binding.embedded"):
        _, table = await _started(meta, BindingTable(permissions=ACCT_ONLY))
    assert table.bindings() == [stored.with_group("acct")]
    assert [r.getMessage() for r in caplog.records] == [
        "skipping stored bindings key=bind/trade/spy: "
        "group 'spy' may not subscribe to topic 'trade'"
    ]


def dumps_one(binding: Binding) -> bytes:
    return json.dumps([binding.to_json_obj()]).encode()
