"""Webhook groups against a real broker process and a real HTTP endpoint on loopback."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kiteq.client import Message
from kiteq.core.config import load_cluster
from kiteq.core.webhook import decode_property_name, verify_signature
from tests.e2e.broker_process import (
    REPO,
    BrokerProcess,
    run_kiteq,
    write_config,
    write_registry_file,
)
from tests.e2e.fixtures import ZkConfig
from tests.e2e.helpers import admin_cli, admin_json, dead_letters, producer, wait_idle
from tests.e2e.hook_server import Call, HookServer
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

SECRET = "hook-s3cret"
# a webhook URL outside the clusters' webhookAllow
BAD_URL = "http://127.0.0.1:1/admin"
README = (REPO / "README.md").read_text()
SECTION = README[README.index("## Webhook consumers") : README.index("## Security")]


def readme_verify() -> Callable[[str, dict[str, str], bytes], bool]:
    """The README's signature check, as written."""
    [snippet] = re.findall(r"```python\n(.*?)```", SECTION, re.S)
    namespace: dict[str, Any] = {}
    exec(snippet, namespace)
    verify: Callable[[str, dict[str, str], bytes], bool] = namespace["verify"]
    return verify


def hook_config(
    tmp_path: Path,
    url: str,
    *,
    allow: str = "http://127.0.0.1:*/hooks",
    options: str = "",
) -> Path:
    """A cluster e2e whose group mail-hook calls *url* for trade/pay-succ."""
    config = write_config(
        tmp_path,
        db=f"rocksdb://{tmp_path / 'db'}?fsync=batch",
        extra={"webhookAllow": [allow]},
        secrets={"mail-hook": SECRET},
    )
    with config.open("a") as fh:
        fh.write(
            "[[clusters.e2e.webhooks]]\n"
            'group = "mail-hook"\n'
            f'url = "{url}"\n'
            'topic = "trade"\n'
            'messageType = "pay-succ"\n'
            f"{options}\n"
        )
    return config


def valid(call: Call) -> bool:
    return verify_signature(
        SECRET.encode(),
        call.headers["X-KiteQ-Signature"],
        call.message_id,
        call.body,
        now=time.time(),
    )


def test_each_message_is_posted_once_signed_with_its_headers(
    tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    with HookServer() as hooks:
        broker = launch(hook_config(tmp_path, hooks.url(), options="concurrency = 4"))
        with producer(broker) as p:
            sent = {
                p.send(
                    Message(
                        topic="trade",
                        message_type="pay-succ",
                        body=b"order %d \x00\xff" % i,
                        properties={"order": str(i), "note": "50% off"},
                    )
                ).message_id: i
                for i in range(20)
            }
        calls = hooks.wait_count(20)
        wait_idle(broker)  # every message acked by the 2xx and deleted
        broker.passed_recover_scan()  # nothing due is left to call again
        calls = hooks.received()
    assert sorted(c.message_id for c in calls) == sorted(sent)  # once each
    verify = readme_verify()
    for call in calls:
        assert verify(SECRET, call.headers, call.body)
        assert not verify(SECRET, call.headers, call.body + b"!")
        assert not verify("wrong", call.headers, call.body)
        i = sent[call.message_id]
        assert valid(call), call.headers
        assert call.path == "/hooks/mail"
        assert call.body == b"order %d \x00\xff" % i
        assert call.attempt == 1
        assert call.headers["X-KiteQ-Topic"] == "trade"
        assert call.headers["X-KiteQ-Message-Type"] == "pay-succ"
        assert call.headers["X-KiteQ-Group"] == "mail-hook"
        assert call.headers["Content-Type"] == "application/octet-stream"
        props = {
            decode_property_name(k): v for k, v in call.headers.items() if decode_property_name(k)
        }
        assert props == {"order": str(i), "note": "50%25 off"}
    # keep-alive: 20 calls over at most the group's 4 concurrent connections
    assert len({c.peer for c in calls}) <= 4


def test_500_answers_are_retried_with_backoff_then_dead_lettered(
    tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    async def fail(_: Call) -> int:
        return 500

    with HookServer(fail) as hooks:
        broker = launch(hook_config(tmp_path, hooks.url()), pport=0)
        with producer(broker) as p:
            message_id = p.send(
                Message(topic="trade", message_type="pay-succ", body=b"x", deliver_limit=5)
            ).message_id
        wait_until(lambda: len(dead_letters(broker)) == 1, 30, "the dead letter")
        calls = hooks.received()
        metrics = broker.metrics()
    [letter] = dead_letters(broker)
    assert (letter.header.messageId, letter.groupId, letter.reason) == (
        message_id,
        "mail-hook",
        "deliver_limit",
    )
    assert [c.attempt for c in calls] == [1, 2, 3, 4, 5]
    assert all(valid(c) for c in calls)
    # three at once, the fourth from the recover scan, the fifth after KiteQ's 5 s window
    # (attempts 4-9)
    assert calls[2].at - calls[0].at < 1.0
    assert calls[4].at - calls[3].at >= 4.5
    history = broker.lookup(message_id).history
    failed = [e for e in history if e.kind == "webhook_failed"]
    assert [(e.attempt, e.detail) for e in failed] == [(a, "HTTP 500") for a in (1, 2, 3, 4, 5)]
    assert any(e.kind == "dead_lettered" for e in history)
    assert 'kiteq_webhook_calls_total{group="mail-hook",outcome="5xx",topic="trade"} 5.0' in metrics


def test_a_timed_out_call_is_a_failed_attempt(
    tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    async def hang(call: Call) -> int:
        if call.attempt < 3:
            await asyncio.sleep(5)
        return 204

    with HookServer(hang) as hooks:
        broker = launch(hook_config(tmp_path, hooks.url(), options="timeoutSeconds = 0.5"))
        with producer(broker) as p:
            message_id = p.send(
                Message(topic="trade", message_type="pay-succ", body=b"x")
            ).message_id
        calls = hooks.wait_count(3)
        wait_idle(broker)  # the third call's 204 acked it
    assert [c.attempt for c in calls] == [1, 2, 3]
    history = broker.lookup(message_id).history
    details = [e.detail for e in history if e.kind == "webhook_failed"]
    assert details == ["no answer within 0.5s"] * 2
    assert [e.attempt for e in history if e.kind == "acked"] == [3]


def test_timeouts_dead_letter_after_deliver_limit(
    tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    async def hang(_: Call) -> int:
        await asyncio.sleep(5)
        return 200

    with HookServer(hang) as hooks:
        broker = launch(hook_config(tmp_path, hooks.url(), options="timeoutSeconds = 0.3"))
        with producer(broker) as p:
            message_id = p.send(
                Message(topic="trade", message_type="pay-succ", body=b"x", deliver_limit=2)
            ).message_id
        wait_until(lambda: len(dead_letters(broker)) == 1, 30, "the dead letter")
        assert [c.attempt for c in hooks.received()] == [1, 2]
    [letter] = dead_letters(broker)
    assert (letter.header.messageId, letter.reason) == (message_id, "deliver_limit")


def test_the_watermark_paces_a_webhook_group(
    tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    with HookServer() as hooks:
        broker = launch(
            hook_config(tmp_path, hooks.url(), options="watermark = 4\nconcurrency = 16")
        )
        with producer(broker) as p:
            futures = [
                p.send_async(Message(topic="trade", message_type="pay-succ", body=b"x"))
                for _ in range(14)
            ]
            for future in futures:
                future.result(10)
        calls = hooks.wait_count(14)
    at = sorted(c.at for c in calls)
    # a burst of 2 (half the rate), then 4/s: the last of 14 comes 3 s after the first
    assert at[-1] - at[0] >= 2.5, at[-1] - at[0]
    assert all(c.attempt == 1 for c in calls), "the limiter must not use up attempts"


def test_a_url_outside_the_allow_list_stops_the_start(tmp_path: Path) -> None:
    config = hook_config(tmp_path, "http://10.1.2.3:8080/hooks/mail")
    run = run_kiteq(["-clusterName=e2e", f"-configPath={config}"])
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "kiteq: clusters.e2e.webhooks[0].url: webhook URL 'http://10.1.2.3:8080/hooks/mail' "
        "is not in webhookAllow (http://127.0.0.1:*/hooks)"
    )


def registry_config(tmp_path: Path, url: str) -> Path:
    """A cluster e2e on a registry file whose group mail-hook calls *url* for trade/pay-succ."""
    binding = (
        '[[bindings]]\ngroupIds = ["mail-hook"]\ntopic = "trade"\nmessageType = "pay-succ"\n'
        f'webhook = {{ url = "{url}", concurrency = 2 }}\n'
    )
    return write_config(
        tmp_path,
        db=f"rocksdb://{tmp_path / 'db'}",
        registry=write_registry_file(tmp_path, binding),
        extra={"topics": ["trade"], "webhookAllow": ["http://127.0.0.1:*/hooks"]},
        secrets={"mail-hook": SECRET},
    )


def test_a_registry_binding_names_the_webhook(
    tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    with HookServer() as hooks:
        broker = launch(registry_config(tmp_path, hooks.url()))
        with producer(broker) as p:
            message_id = p.send(Message(topic="trade", message_type="pay-succ", body=b"x"))
        [call] = hooks.wait_count(1)
    assert call.message_id == message_id.message_id
    assert valid(call)


def test_a_registry_binding_outside_the_allow_list_is_refused(tmp_path: Path) -> None:
    run = run_kiteq(["-clusterName=e2e", f"-configPath={registry_config(tmp_path, BAD_URL)}"])
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("kiteq: registry.local.hosts: "), last
    assert last.endswith(
        f"registry.toml: [[bindings]] entry 1: webhook URL '{BAD_URL}' "
        "is not in webhookAllow (http://127.0.0.1:*/hooks)"
    ), last


def test_the_readme_config_example_loads(tmp_path: Path) -> None:
    [example] = re.findall(r"```toml\n(.*?)```", SECTION, re.S)
    path = tmp_path / "cluster.toml"
    path.write_text(example)
    config = load_cluster(path, "rocksdb_dev")
    [webhook] = config.webhooks
    assert (webhook.group, webhook.endpoint.url, webhook.watermark) == (
        "mail-hook",
        "http://127.0.0.1:8080/hooks/mail",
        100,
    )


def test_the_admin_service_binds_a_webhook_and_refuses_one_outside_the_allow_list(
    tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    config = write_config(
        tmp_path,
        db=f"rocksdb://{tmp_path / 'db'}?fsync=batch",
        extra={"webhookAllow": ["http://127.0.0.1:*/hooks"]},
        secrets={"mail-hook": SECRET},
    )
    with HookServer() as hooks:
        broker = launch(config)
        refused = admin_cli(
            broker, "webhook", "-group", "mail-hook", "-topic", "trade", "-type", "pay-succ",
            "-url", BAD_URL,
        )  # fmt: skip
        assert refused.returncode != 0
        assert "INVALID_ARGUMENT" in refused.stderr, refused.stderr
        assert "is not in webhookAllow (http://127.0.0.1:*/hooks)" in refused.stderr
        assert broker.bindings("trade") == []
        bound = admin_cli(
            broker, "webhook", "-group", "mail-hook", "-topic", "trade", "-type", "pay-succ",
            "-url", hooks.url(), "-concurrency", "2",
        )  # fmt: skip
        assert bound.returncode == 0, bound.stderr
        listed = admin_json(broker, "bindings", "-topic", "trade")
        assert listed["webhooks"] == {
            "mail-hook": {"url": hooks.url(), "concurrency": 2, "timeoutSeconds": 5.0}
        }
        with producer(broker) as p:
            sent = p.send(Message(topic="trade", message_type="pay-succ", body=b"x"))
        [call] = hooks.wait_count(1)
    assert call.message_id == sent.message_id
    assert valid(call)


def test_zookeeper_binding_json_names_the_webhook_and_one_outside_is_skipped(
    zk_config: ZkConfig,
    zk: Any,
    launch: Callable[..., BrokerProcess],
) -> None:
    config = zk_config({"webhookAllow": ["http://127.0.0.1:*/hooks"], "adminOpen": True})
    with config.open("a") as fh:
        fh.write(f'[clusters.e2e.secrets]\nmail-hook = "{SECRET}"\nevil-hook = "{SECRET}"\n')

    def node(group: str, url: str) -> bytes:
        return json.dumps(
            [
                {
                    "groupId": group,
                    "topic": "trade",
                    "messageType": "pay-succ",
                    "bindType": 0,
                    "version": "1.0.0",
                    "watermark": 0,
                    "persistent": True,
                    "webhook": {"url": url, "concurrency": 2},
                }
            ]
        ).encode()

    with HookServer() as hooks:
        broker = launch(config, pport=0)
        zk.create("/kiteq/sub/trade/evil-hook-bind", node("evil-hook", "http://127.0.0.1:1/x"),
                  makepath=True)  # fmt: skip
        zk.create("/kiteq/sub/trade/mail-hook-bind", node("mail-hook", hooks.url()), makepath=True)
        wait_until(lambda: broker.bindings("trade"), 20, "the mail-hook binding")

        wait_until(
            lambda: 'kiteq_bindings_refused_total{reason="webhook"} 1.0' in broker.metrics(),
            20,
            "the refusal of evil-hook's node",
        )
        assert broker.bindings("trade") == [("mail-hook", "pay-succ")]
        with producer(broker) as p:
            sent = p.send(Message(topic="trade", message_type="pay-succ", body=b"x"))
        [call] = hooks.wait_count(1)
    assert call.message_id == sent.message_id
    assert valid(call)
