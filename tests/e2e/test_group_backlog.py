"""An offline persistent group's backlog is visible per (topic, group), across a SIGKILL.

Issue #14: "an offline persistent group holding thousands of messages shows in neither
stats nor /metrics". Here a broker process on RocksDB holds messages for a group that
declared a persistent binding and went away; ``kiteq-admin``, the admin service and
``/metrics`` count them for that group, a killed and restarted broker counts them again
from the store, and they drain to zero when the group comes back.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from kiteq.client import Binding, Message
from tests.e2e.broker_process import BrokerProcess, write_config
from tests.e2e.collector import Collector
from tests.e2e.helpers import admin_cli, admin_json, consumer, producer
from tests.waiting import wait_until

N = 300
BINDING = Binding.fanout("trade", persistent=True)


def group_backlog(broker: BrokerProcess, group: str) -> int:
    return sum(g.backlog for g in broker.stats().groupBacklogs if g.groupId == group)


def metric(broker: BrokerProcess, name: str, group: str) -> float | None:
    pattern = rf'^{name}{{group="{group}",topic="trade"}} (\S+)$'
    found = re.search(pattern, broker.metrics(), re.MULTILINE)
    return None if found is None else float(found.group(1))


def test_an_offline_groups_backlog_is_counted_for_it_and_survives_a_kill(
    tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    broker = launch(write_config(tmp_path, db=f"rocksdb://{tmp_path / 'db'}?fsync=batch"), pport=0)
    with consumer(broker, "away", [BINDING], Collector()):
        pass  # declares its persistent binding, then goes offline
    with producer(broker) as p:
        ids = [
            p.send(Message(topic="trade", message_type="pay-succ", body=b"x")).message_id
            for _ in range(N)
        ]
    wait_until(lambda: group_backlog(broker, "away") == N, 20, f"{N} stored for 'away'")
    wait_until(lambda: metric(broker, "kiteq_group_backlog_messages", "away") == N, 20, "the gauge")
    age = metric(broker, "kiteq_group_oldest_message_age_seconds", "away")
    assert age is not None
    assert age >= 0

    broker.kill()
    broker.start()
    # counted from the store at start, before any scan or consumer
    assert group_backlog(broker, "away") == N
    rows = admin_json(broker, "backlog")
    assert {"topic": "trade", "groupId": "away"}.items() <= rows["groupBacklogs"][0].items()
    assert rows["groupBacklogs"][0]["backlog"] == N
    table = admin_cli(broker, "backlog").stdout
    assert re.search(rf"^trade\s+away\s+{N}\s", table, re.MULTILINE), table

    got = Collector()
    with consumer(broker, "away", [BINDING], got):
        got.wait_count(N)
        wait_until(lambda: group_backlog(broker, "away") == 0, 20, "'away' drained")
    assert set(got.ids()) == set(ids)
    assert not any(broker.stats().backlog.values())
