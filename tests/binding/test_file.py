from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import MappingProxyType

import pytest

from kiteq.binding.file import (
    BrokerEntry,
    FileBindingRegistry,
    RegistryFile,
    parse_registry,
    read_registry_file,
)
from kiteq.binding.match import BindingLimits, BindingTable, Route, check_binding
from kiteq.binding.model import Binding
from kiteq.core.acl import Grant, Permissions
from kiteq.core.errors import RegistryError
from tests.binding._changes import Changes

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "conf" / "registry_demo.toml"

BASE = """
[[brokers]]
address = "127.0.0.1:13800"
topics = ["trade"]

[[bindings]]
groupIds = ["acct", "ledger"]
topic = "trade"
messageType = "pay-succ"
bindType = "direct"
watermark = 1000

[[bindings]]
groupIds = ["audit"]
topic = "trade"
messageType = "pay-.*"
bindType = "regx"
persistent = false
"""


def _write(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text))


def test_reads_the_demo_file() -> None:
    registry = read_registry_file(DEMO, check=check_binding)
    assert registry.brokers == (BrokerEntry("127.0.0.1:13800", ("trade", "user-profile")),)
    assert registry.bindings == (
        Binding.direct("trade", "pay-succ", watermark=1000).with_group("acct-svc"),
        Binding.regex("trade", "pay-.*").with_group("audit-svc"),
        Binding.fanout("user-profile", persistent=False).with_group("profile-svc"),
    )
    assert registry.brokers_for("user-profile") == ["127.0.0.1:13800"]


def test_one_binding_per_group_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    _write(
        path,
        """
        [[bindings]]
        groupIds = ["a", "b"]
        topic = "trade"
        messageType = "pay"

        [[bindings]]
        groupIds = ["c"]
        topic = "trade"
        bindType = "fanout"
        """,
    )
    assert read_registry_file(str(path)) == RegistryFile(
        brokers=(),
        bindings=(
            Binding.direct("trade", "pay").with_group("a"),
            Binding.direct("trade", "pay").with_group("b"),
            Binding.fanout("trade").with_group("c"),
        ),
    )


def test_brokers_for_is_a_linear_lookup() -> None:
    # KiteQ binary-searches this unsorted list and misses "relation"
    registry = RegistryFile(
        brokers=(
            BrokerEntry("h1:13800", ("relation", "message", "user-profile")),
            BrokerEntry("h2:13800", ("message",)),
            BrokerEntry("h3:13800", ("*",)),
        )
    )
    assert registry.brokers_for("relation") == ["h1:13800", "h3:13800"]
    assert registry.brokers_for("message") == ["h1:13800", "h2:13800", "h3:13800"]
    assert registry.brokers_for("other") == ["h3:13800"]
    assert RegistryFile().brokers_for("x") == []


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[[brokers]\n", "invalid TOML"),
        ("env = 'dev'\n", "unknown key 'env'"),
        ("brokers = 1\n", "brokers must be an array of tables"),
        ("brokers = [1]\n", r"\[\[brokers\]\] entry 1: not a table"),
        (
            '[[brokers]]\naddress = "h:1"\ntopics = []\ncolour = 1\n',
            "entry 1: unknown key 'colour'",
        ),
        ('[[brokers]]\naddress = "h"\ntopics = []\n', "entry 1: address must be host:port"),
        ('[[brokers]]\naddress = "h:0"\ntopics = []\n', "address must be host:port"),
        ("[[brokers]]\ntopics = []\n", "address is missing"),
        ('[[brokers]]\naddress = "h:1"\ntopics = ["a/b"]\n', "invalid topic 'a/b'"),
        (
            '[[brokers]]\naddress = "h:1"\ntopics = []\n[[brokers]]\naddress = "h:1"\ntopics = []\n',
            r"\[\[brokers\]\] entry 2: duplicate address 'h:1'",
        ),
        (
            '[[bindings]]\ngroupIds = []\ntopic = "t"\nmessageType = "x"\n',
            "groupIds must be a non-empty",
        ),
        (
            '[[bindings]]\ngroupIds = [1]\ntopic = "t"\nmessageType = "x"\n',
            "groupIds must be a non-empty",
        ),
        ('[[bindings]]\ngroupIds = "g"\ntopic = "t"\nmessageType = "x"\n', "groupIds must be list"),
        ('[[bindings]]\ngroupIds = ["g"]\nmessageType = "x"\n', "topic is missing"),
        ('[[bindings]]\ngroupIds = ["g"]\ntopic = "t"\n', "messageType is missing"),
        (
            '[[bindings]]\ngroupIds = ["g"]\ntopic = "t"\nmessageType = "x"\nbindType = "topic"\n',
            "unknown bind type",
        ),
        (
            '[[bindings]]\ngroupIds = ["g"]\ntopic = "t"\nmessageType = "x"\nwatermark = true\n',
            "watermark must be int",
        ),
        (
            '[[bindings]]\ngroupIds = ["g"]\ntopic = "t"\nmessageType = "x"\npersistent = 1\n',
            "persistent must be bool",
        ),
        (
            '[[bindings]]\ngroupIds = ["g", "a b"]\ntopic = "t"\nmessageType = "x"\n',
            "invalid binding group",
        ),
        (
            '[[bindings]]\ngroupId = ["g"]\ntopic = "t"\nmessageType = "x"\n',
            "unknown key 'groupId'",
        ),
    ],
)
def test_invalid_files_name_the_file_and_entry(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RegistryError, match=reason) as info:
        read_registry_file(path)
    assert str(info.value).startswith(f"{path}: ")


def test_entry_index_counts_entries_in_file_order(tmp_path: Path) -> None:
    text = (
        BASE
        + '\n[[bindings]]\ngroupIds = ["g"]\ntopic = "trade"\nmessageType = "(?=x)"\nbindType = "regex"\n'
    )
    # the client-side parse has no RE2: regex syntax is the broker's check
    assert len(parse_registry(text.encode(), source="mem").bindings) == 4
    with pytest.raises(
        RegistryError, match=r"^mem: \[\[bindings\]\] entry 3: invalid regex pattern"
    ):
        parse_registry(text.encode(), source="mem", check=check_binding)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"cannot read registry file .*missing\.toml"):
        read_registry_file(tmp_path / "missing.toml")
    (tmp_path / "latin1.toml").write_bytes(b"# \xff\n")
    with pytest.raises(RegistryError, match="invalid TOML"):
        read_registry_file(tmp_path / "latin1.toml")


def test_client_side_parser_does_not_import_re2() -> None:
    roots = [str(ROOT / d) for d in (".", "binding")]
    code = (
        "import sys, kiteq.binding.file as f, kiteq.binding.model\n"
        f"f.read_registry_file({str(DEMO)!r})\n"
        "assert 're2' not in sys.modules and 'kiteq.binding.match' not in sys.modules, sorted(sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(roots)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


async def _start(
    path: Path, reload_seconds: float = 3600.0
) -> tuple[FileBindingRegistry, BindingTable]:
    registry = FileBindingRegistry(path, reload_seconds=reload_seconds)
    table = BindingTable()
    await registry.start(table)
    return registry, table


async def test_start_loads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    _write(path, BASE)
    registry, table = await _start(path)
    try:
        assert registry.kind == "file"
        assert table.routes("trade", "pay-succ") == (
            Route("acct", True, 1000),
            Route("audit", False, 0),
            Route("ledger", True, 1000),
        )
        assert not await registry.declare("other", [Binding.fanout("trade")])
        assert table.groups("trade") == ["acct", "audit", "ledger"]
    finally:
        await registry.stop()
    await registry.stop()


async def test_the_listed_brokers_follow_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    _write(path, BASE)
    registry, _ = await _start(path)
    try:
        assert await registry.brokers() == ["127.0.0.1:13800"]
        _write(
            path,
            BASE + '[[brokers]]\naddress = "10.0.0.2:13800"\ntopics = ["trade"]\n',
        )
        await registry.reload()
        assert await registry.brokers() == ["10.0.0.2:13800", "127.0.0.1:13800"]
    finally:
        await registry.stop()


async def test_start_fails_on_an_invalid_file(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    _write(path, BASE.replace('"pay-.*"', '"pay-(?!x)"'))
    table = BindingTable()
    registry = FileBindingRegistry(path, reload_seconds=1)
    with pytest.raises(RegistryError, match=r"\[\[bindings\]\] entry 2: invalid regex"):
        await registry.start(table)
    assert table.bindings() == []
    with pytest.raises(RegistryError, match="not started"):
        await registry.reload()
    with pytest.raises(RegistryError, match="cannot read"):
        await FileBindingRegistry(tmp_path / "none.toml").start(table)
    with pytest.raises(ValueError, match="reload_seconds"):
        FileBindingRegistry(path, reload_seconds=0)


async def test_reload_applies_additions_changes_and_removals(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    _write(path, BASE)
    registry, table = await _start(path)
    changes = Changes(table)
    try:
        assert not await registry.reload()
        _write(
            path,
            """
            [[bindings]]
            groupIds = ["acct"]
            topic = "trade"
            messageType = "pay-succ"
            bindType = "direct"
            watermark = 1000

            [[bindings]]
            groupIds = ["ledger"]
            topic = "trade"
            messageType = "refund"
            bindType = "direct"

            [[bindings]]
            groupIds = ["profile"]
            topic = "user"
            bindType = "fanout"
            """,
        )
        assert await registry.reload()
        # acct unchanged (not touched), ledger changed, audit removed, profile added
        assert sorted(changes.log) == [
            ("trade", "audit"),
            ("trade", "ledger"),
            ("user", "profile"),
        ]
        assert table.routes("trade", "pay-succ") == (Route("acct", True, 1000),)
        assert table.routes("trade", "refund") == (Route("ledger", True, 0),)
        assert table.groups("user") == ["profile"]

        _write(path, "")
        assert await registry.reload()
        assert table.bindings() == []
    finally:
        await registry.stop()


async def test_invalid_file_keeps_the_last_good_state_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "r.toml"
    _write(path, BASE)
    registry, table = await _start(path)
    before = table.bindings()
    try:
        with caplog.at_level(logging.INFO, logger="kiteq.binding.file"):
            _write(path, BASE + "\n[[bindings]]\ntopic = 'trade'\n")
            for _ in range(3):
                assert not await registry.reload()
            path.unlink()
            for _ in range(3):
                assert not await registry.reload()
            assert table.bindings() == before
            errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 2
            assert "[[bindings]] entry 3: groupIds is missing" in errors[0]
            assert "cannot read registry file" in errors[1]

            # back to the last good content: nothing to apply, but the error is over
            _write(path, BASE)
            assert not await registry.reload()
            assert any("valid again" in r.getMessage() for r in caplog.records)
            _write(path, BASE.replace("pay-.*", "refund"))
            assert await registry.reload()
            assert table.routes("trade", "refund") == (Route("audit", False, 0),)
    finally:
        await registry.stop()


async def test_reload_task_picks_up_changes(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    _write(path, BASE)
    registry, table = await _start(path, reload_seconds=0.02)
    changes = Changes(table)
    try:
        _write(path, BASE.replace('"audit"', '"audit2"'))
        await changes.until(lambda: len(changes.log) >= 2, timeout=5)
        assert sorted(changes.log) == [("trade", "audit"), ("trade", "audit2")]
        assert table.groups("trade") == ["acct", "audit2", "ledger"]
    finally:
        await registry.stop()


async def test_a_crashed_reload_task_is_surfaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "r.toml"
    _write(path, BASE)
    registry, _ = await _start(path, reload_seconds=0.01)
    crashed = asyncio.Event()

    async def broken_reload() -> bool:
        crashed.set()
        raise RuntimeError("bug")

    monkeypatch.setattr(registry, "reload", broken_reload)
    with caplog.at_level(logging.ERROR, logger="kiteq.binding.file"):
        await asyncio.wait_for(crashed.wait(), 5)
        for _ in range(3):
            await asyncio.sleep(0)
        assert any("reload task crashed" in r.getMessage() for r in caplog.records)
    with pytest.raises(RegistryError, match="reload task failed") as info:
        await registry.stop()
    assert isinstance(info.value.__cause__, RuntimeError)
    await registry.stop()


@pytest.mark.parametrize(
    ("table", "reason"),
    [
        (
            BindingTable(
                permissions=Permissions(
                    MappingProxyType({"acct": Grant(subscribe=frozenset({"trade"}))})
                )
            ),
            r"entry 1: group 'ledger' may not subscribe to topic 'trade'",
        ),
        (
            BindingTable(limits=BindingLimits(max_pattern_length=5)),
            r"entry 2: regex binding pattern of 6 characters .* \(maxPatternLength\)",
        ),
    ],
    ids=["acl", "pattern-length"],
)
async def test_file_bindings_outside_the_acl_or_limits_reject_the_file(
    tmp_path: Path, table: BindingTable, reason: str
) -> None:
    path = tmp_path / "r.toml"
    _write(path, BASE)
    with pytest.raises(RegistryError, match=reason):
        await FileBindingRegistry(path).start(table)
    assert table.bindings() == []


async def test_file_bindings_beyond_the_count_limit_reject_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    _write(path, BASE.replace('groupIds = ["audit"]', 'groupIds = ["acct"]'))
    table = BindingTable(limits=BindingLimits(max_per_group_topic=1))
    with pytest.raises(RegistryError, match=r"group 'acct': group 'acct' declares 2 bindings"):
        await FileBindingRegistry(path).start(table)
    assert table.bindings() == []
