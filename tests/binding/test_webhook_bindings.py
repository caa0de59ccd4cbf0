"""Webhook bindings: their JSON, the registry file key, and the table's refusals."""

from __future__ import annotations

import json

import pytest

from kiteq.binding.file import parse_registry
from kiteq.binding.match import BindingTable, RefusalReason
from kiteq.binding.model import Binding, BindType, dumps, loads
from kiteq.core.webhook import AllowList, WebhookEndpoint, WebhookPolicy

HOOK = WebhookEndpoint("http://127.0.0.1:8080/hooks/mail", concurrency=4, timeout_seconds=2.5)
POLICY = WebhookPolicy(AllowList.parse(["http://127.0.0.1:*/hooks"]), {"mail-hook": "s3cret"})


def hooked(topic: str = "trade", endpoint: WebhookEndpoint = HOOK) -> Binding:
    return Binding(topic, "pay-succ", BindType.DIRECT, "mail-hook", webhook=endpoint)


def test_json_round_trip_keeps_the_webhook_and_kiteq_keys() -> None:
    data = dumps([hooked(), Binding.fanout("trade").with_group("acct")])
    items = json.loads(data)
    assert items[0]["webhook"] == {
        "url": HOOK.url,
        "concurrency": 4,
        "timeoutSeconds": 2.5,
    }
    assert "webhook" not in items[1]  # a plain binding stays KiteQ's JSON exactly
    assert loads(data) == [hooked(), Binding.fanout("trade").with_group("acct")]


@pytest.mark.parametrize(
    ("webhook", "reason"),
    [
        ('"http://x/"', "must be an object"),
        ('{"concurrency": 2}', "'url' is missing"),
        ('{"url": "http://x/", "bogus": 1}', "unknown key 'bogus'"),
        ('{"url": "ftp://x/"}', "scheme"),
        ('{"url": "http://x/", "concurrency": 0}', "concurrency"),
        ('{"url": "http://x/", "timeoutSeconds": "5"}', "must be a number"),
    ],
)
def test_malformed_webhook_json_is_refused(webhook: str, reason: str) -> None:
    node = f'[{{"groupId":"g","topic":"t","messageType":"m","webhook":{webhook}}}]'
    with pytest.raises(ValueError, match=reason):
        loads(node.encode())


def test_registry_file_reads_a_webhook_table() -> None:
    registry = parse_registry(
        b"""
[[bindings]]
groupIds = ["mail-hook"]
topic = "trade"
messageType = "pay-succ"
webhook = { url = "http://127.0.0.1:8080/hooks/mail", concurrency = 4, timeoutSeconds = 2.5 }
""",
        source="t.toml",
    )
    assert registry.bindings == (hooked(),)


def test_table_applies_an_allowed_webhook() -> None:
    table = BindingTable(webhooks=POLICY)
    assert table.replace("trade", "mail-hook", [hooked()])
    assert table.bindings("trade")[0].webhook == HOOK


def test_table_refuses_a_url_outside_the_allow_list_and_counts_it() -> None:
    refused: list[RefusalReason] = []
    table = BindingTable(webhooks=POLICY, on_refused=refused.append)
    outside = WebhookEndpoint("http://10.0.0.1:8080/hooks/mail")
    with pytest.raises(ValueError, match="not in webhookAllow"):
        table.replace("trade", "mail-hook", [hooked(endpoint=outside)])
    assert refused == [RefusalReason.WEBHOOK]
    assert table.bindings() == []


def test_table_without_a_policy_refuses_every_webhook() -> None:
    with pytest.raises(ValueError, match="webhookAllow is empty"):
        BindingTable().replace("trade", "mail-hook", [hooked()])


def test_table_refuses_a_group_without_a_signing_secret() -> None:
    binding = Binding("trade", "x", BindType.DIRECT, "other", webhook=HOOK)
    with pytest.raises(ValueError, match="no secret to sign with"):
        BindingTable(webhooks=POLICY).replace("trade", "other", [binding])


def test_table_refuses_bindings_of_one_group_naming_different_webhooks() -> None:
    other = WebhookEndpoint("http://127.0.0.1:8080/hooks/other")
    plain = Binding("trade", "b", BindType.DIRECT, "mail-hook")
    for second in (Binding("trade", "b", BindType.DIRECT, "mail-hook", webhook=other), plain):
        with pytest.raises(ValueError, match="different webhooks"):
            BindingTable(webhooks=POLICY).replace("trade", "mail-hook", [hooked(), second])
