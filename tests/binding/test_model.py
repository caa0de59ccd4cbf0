from __future__ import annotations

import json

import pytest

from kiteq.binding.model import (
    BIND_VERSION,
    Binding,
    BindType,
    bind_type_from_name,
    dumps,
    loads,
)

KITEQ_CLIENT_JSON = (
    b'[{"groupId":"s-mts-test","topic":"trade","messageType":"pay-succ","bindType":0,'
    b'"version":"1.0.0","watermark":1000,"persistent":true}]'
)


def test_parses_a_binding_written_by_a_kiteq_client() -> None:
    assert loads(KITEQ_CLIENT_JSON) == [
        Binding(
            topic="trade",
            message_type="pay-succ",
            bind_type=BindType.DIRECT,
            group_id="s-mts-test",
            watermark=1000,
            persistent=True,
            version="1.0.0",
        )
    ]


def test_dumps_uses_kiteq_keys_and_round_trips() -> None:
    bindings = [
        Binding.direct("trade", "pay-succ", watermark=1000).with_group("g1"),
        Binding.regex("trade", "pay-.*", persistent=False).with_group("g1"),
        Binding.fanout("user-profile").with_group("g2"),
    ]
    data = dumps(bindings)
    assert json.loads(data)[1] == {
        "groupId": "g1",
        "topic": "trade",
        "messageType": "pay-.*",
        "bindType": 1,
        "version": BIND_VERSION,
        "watermark": 0,
        "persistent": False,
    }
    assert loads(data) == bindings
    assert loads(KITEQ_CLIENT_JSON) == loads(dumps(loads(KITEQ_CLIENT_JSON)))


def test_loads_accepts_bind_type_names_and_defaults() -> None:
    [fanout] = loads(b'[{"topic":"t","bindType":"fanout"}]')
    assert fanout == Binding.fanout("t")
    [regex] = loads(b'[{"topic":"t","messageType":"a.*","bindType":"regx"}]')
    assert regex.bind_type is BindType.REGEX
    assert loads(b"") == []
    assert loads(b"[]") == []


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{", "not JSON"),
        (b'{"topic":"t"}', "JSON array"),
        (b'["x"]', "not a JSON object"),
        (b'[{"messageType":"x"}]', "'topic' is missing"),
        (b'[{"topic":"t","messageType":"x","persistent":"false"}]', "'persistent' must be bool"),
        (b'[{"topic":"t","messageType":"x","watermark":true}]', "'watermark' must be int"),
        (b'[{"topic":"t","messageType":"x","watermark":"10"}]', "'watermark' must be int"),
        (b'[{"topic":"t","messageType":"x","bindType":7}]', "BindType"),
        (b'[{"topic":"t","messageType":"x","bindType":"topic"}]', "unknown bind type"),
        (b'[{"topic":"a/b","messageType":"x"}]', "invalid binding topic"),
        (b'[{"topic":"t","messageType":"x","groupId":".."}]', "invalid binding group"),
        (b'[{"topic":"t","messageType":"a b"}]', "invalid message type"),
        (b'[{"topic":"t","messageType":"x","watermark":-1}]', "watermark must be >= 0"),
        (b'[{"topic":"t","messageType":"","bindType":1}]', "1..256 characters"),
    ],
)
def test_loads_rejects_malformed_data(data: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        loads(data)


def test_malformed_binding_error_is_short() -> None:
    data = json.dumps([{"topic": "a/b", "messageType": "x" * 10_000}]).encode()
    with pytest.raises(ValueError, match="malformed binding") as info:
        loads(data)
    assert len(str(info.value)) < 400


def test_unset_watermark_means_no_cap_and_a_set_one_is_honoured() -> None:
    assert Binding.direct("t", "x").effective_watermark == 0
    assert Binding.direct("t", "x", watermark=100).effective_watermark == 100
    assert Binding.direct("t", "x", watermark=10**9).effective_watermark == 10**9


def test_bind_type_from_name() -> None:
    assert bind_type_from_name("DIRECT") is BindType.DIRECT
    assert bind_type_from_name("regx") is BindType.REGEX
    assert bind_type_from_name("regex") is BindType.REGEX
    assert bind_type_from_name("fanout") is BindType.FANOUT
    with pytest.raises(ValueError, match="unknown bind type"):
        bind_type_from_name("topic")
