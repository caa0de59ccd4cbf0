"""kiteq-admin against a real broker process: views, exit codes, dry run, --json."""

from __future__ import annotations

import datetime
import json
import time

import grpc
import pytest

from kiteq.client import Binding, Message, Producer
from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc
from tests.broker._dead_letters import dead_letter, dead_letter_count
from tests.e2e.broker_process import BrokerProcess
from tests.e2e.helpers import admin_cli, admin_json

pytestmark = pytest.mark.e2e

UNKNOWN_ID = "0" * 31 + "1"


@pytest.fixture
def three_dead_letters(broker: BrokerProcess) -> list[str]:
    """Three messages dead-lettered for group acct (deliver limit 1, the handler nacks)."""
    return dead_letter(broker, 3, producer="pay", group="acct", binding=Binding.fanout("trade"))


def test_stats_json_has_numbers_and_the_tables_name_the_group(
    broker: BrokerProcess, three_dead_letters: list[str]
) -> None:
    stats = admin_json(broker, "stats")
    assert stats["received"] == 3  # a number, not "3"
    assert stats["deadLettered"] == 3
    assert stats["deadLetterGroups"] == [{"topic": "trade", "groupId": "acct", "count": 3}]
    assert isinstance(stats["uptimeSeconds"], float)
    human = admin_cli(broker, "stats")
    assert human.returncode == 0, human.stderr
    assert ["received", "3"] in [line.split() for line in human.stdout.splitlines()]
    groups = admin_cli(broker, "groups")
    assert groups.returncode == 0, groups.stderr
    assert ["acct", "0", "0", "0", "3"] in [line.split() for line in groups.stdout.splitlines()]
    backlog = admin_cli(broker, "backlog")
    assert backlog.returncode == 0, backlog.stderr
    # topic, group, backlog, unacked, oldest, dead letters: all dead, nothing left to settle
    rows = [line.split() for line in backlog.stdout.splitlines()]
    assert ["trade", "acct", "0", "0", "-", "3"] in rows


def test_dlq_lists_with_iso_times_and_caps_the_limit_out_loud(
    broker: BrokerProcess, three_dead_letters: list[str]
) -> None:
    listed = admin_json(broker, "dlq", "-reason", "deliver_limit")
    letters = listed["deadLetters"]
    assert sorted(d["header"]["messageId"] for d in letters) == sorted(three_dead_letters)
    for letter in letters:
        dead = datetime.datetime.fromisoformat(letter["deadTime"])
        assert dead.tzinfo is not None
        assert abs(dead.timestamp() - time.time()) < 600
        assert letter["deliverCount"] == 1
    capped = admin_cli(broker, "dlq", "-limit", "5000")
    assert capped.returncode == 0, capped.stderr
    assert "-limit 5000 capped to 1000" in capped.stderr
    rows = capped.stdout.splitlines()
    assert rows[0].split()[:3] == ["MESSAGE-ID", "GROUP", "TOPIC"]
    assert len(rows) == 4
    unknown = admin_cli(broker, "dlq", "-reason", "timeout")
    assert unknown.returncode == 2
    assert "unknown dead-letter reason 'timeout'" in unknown.stderr


def test_redrive_dry_run_moves_nothing_then_the_redrive_moves_them(
    broker: BrokerProcess, three_dead_letters: list[str]
) -> None:
    dry = admin_cli(broker, "redrive", "-group", "acct", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == "would redrive 3 dead letters (dry run: nothing moved)"
    one = admin_json(broker, "redrive", three_dead_letters[0], "-group", "acct", "--dry-run")
    assert one == {"redriven": 1, "dryRun": True}
    assert dead_letter_count(broker) == 3  # still every one of them
    nobody = admin_cli(broker, "redrive", "-group", "nobody")
    assert nobody.returncode == 4
    assert "nothing changed" in nobody.stderr
    done = admin_cli(broker, "redrive", "-group", "acct")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "redrove 3 dead letters"
    assert admin_json(broker, "dlq")["deadLetters"] == []  # no consumer: not dead again yet


def test_not_found_and_nothing_changed_exit_codes(broker: BrokerProcess) -> None:
    missing = admin_cli(broker, "message", UNKNOWN_ID)
    assert missing.returncode == 3
    assert f"message {UNKNOWN_ID} not found" in missing.stderr
    commit = admin_cli(broker, "commit", UNKNOWN_ID)
    assert commit.returncode == 4
    assert "nothing changed" in commit.stderr
    rollback = admin_cli(broker, "--json", "rollback", UNKNOWN_ID)
    assert rollback.returncode == 4
    assert json.loads(rollback.stdout) == {"changed": False}  # scripts still get the reply
    with Producer(brokers=[broker.address], group_id="pay", secret_key="s") as producer:
        message_id = producer.send(
            Message(topic="trade", message_type="pay-succ", body=b"hello")
        ).message_id
    found = admin_cli(broker, "message", message_id, "-body")
    assert found.returncode == 0, found.stderr
    assert f"id          {message_id}" in found.stdout
    assert "published" in found.stdout
    assert "body: hello" in found.stdout


def test_the_broker_refuses_an_unknown_reason_from_any_client(broker: BrokerProcess) -> None:
    # kiteq-admin refuses it before calling; other admin clients get INVALID_ARGUMENT
    unknown = admin_pb2.DeadLetterFilter(reason="x")
    with grpc.insecure_channel(broker.address) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        with pytest.raises(grpc.RpcError) as listing:
            stub.ListDeadLetters(admin_pb2.ListDeadLettersRequest(filter=unknown), timeout=10)
        with pytest.raises(grpc.RpcError) as dry_run:
            stub.Redrive(admin_pb2.RedriveRequest(filter=unknown, dryRun=True), timeout=10)
    for refused in (listing, dry_run):
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown dead-letter reason 'x'" in (refused.value.details() or "")
