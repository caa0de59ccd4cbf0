"""Backlog takeover end to end: two real brokers, one MySQL database set, one ZooKeeper chroot.

Broker A stores a backlog (the consumer group's binding is persistent, the consumer is
offline) and is SIGKILLed. Once its ZooKeeper session has expired and the grace period
has passed, broker B takes over A's rows, and a consumer connected to B only receives
every message of the backlog exactly once. Restarting A (same address) re-delivers none
of them. Prints the counts.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Final

import pytest

from kiteq.client import Binding, Consumer, Message, Producer
from tests._servers.zookeeper import ManagedZooKeeper
from tests.e2e.broker_process import BrokerProcess, write_zk_config
from tests.e2e.collector import Collector
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(180)

SECRET: Final = "s3cret"
GROUP: Final = "acct-svc"
BINDING: Final = Binding.fanout("trade", persistent=True)
BACKLOG: Final = 300
GRACE: Final = 2
SESSION_TIMEOUT: Final = 4


def write_config(directory: Path, registry: str, db: str) -> Path:
    return write_zk_config(
        directory,
        registry,
        db=db,
        extra={"deliverySeconds": 5, "recoverSeconds": 1, "takeoverGraceSeconds": GRACE},
    )


def consumer(brokers: list[BrokerProcess], handler: Collector) -> Consumer:
    return Consumer(
        brokers=[b.address for b in brokers],
        group_id=GROUP,
        secret_key=SECRET,
        bindings=[BINDING],
        handler=handler,
    )


def test_a_killed_brokers_backlog_is_delivered_by_the_survivor(
    zookeeper: ManagedZooKeeper, zk: Any, mysql_url: str, tmp_path: Path
) -> None:
    registry = f"zk://{zookeeper.hosts}{zk.chroot}?timeout={SESSION_TIMEOUT}"
    a = BrokerProcess(write_config(tmp_path / "a", registry, mysql_url))
    b = BrokerProcess(write_config(tmp_path / "b", registry, mysql_url))
    try:
        a.start()
        b.start()
        # the group declares its persistent binding, then goes offline
        with consumer([a], Collector()):
            pass
        wait_until(lambda: zk.exists(f"/kiteq/sub/trade/{GROUP}-bind") is not None, 10, "bind")
        with Producer(brokers=[a.address], group_id="pay-svc", secret_key=SECRET) as producer:
            sent = {
                producer.send(
                    Message(topic="trade", message_type="pay-succ", body=str(i).encode())
                ).message_id
                for i in range(BACKLOG)
            }
        assert len(sent) == BACKLOG
        wait_until(lambda: sum(a.stats().backlog.values()) == BACKLOG, 10, "A's backlog")
        assert sum(b.stats().backlog.values()) == 0

        a.kill()  # SIGKILL: its ZooKeeper session expires after SESSION_TIMEOUT
        killed = time.monotonic()
        wait_until(
            lambda: zk.exists(f"/kiteq/takeover/{a.address}/done") is not None,
            SESSION_TIMEOUT + GRACE + 30,
            "B's takeover of A",
        )
        taken_after = time.monotonic() - killed
        done = json.loads(zk.get(f"/kiteq/takeover/{a.address}/done")[0])
        assert done["taker"] == b.address
        assert done["moved"] == BACKLOG

        got = Collector()
        with consumer([b], got):
            wait_until(lambda: sent <= set(got.ids()), 60, "the backlog delivered by B")
            wait_until(lambda: sum(b.stats().backlog.values()) == 0, 30, "B's empty backlog")
            b.passed_recover_scan()  # a duplicate would have been offered by now
        received = Counter(got.ids())

        # A comes back on its address: it owns nothing old and re-delivers nothing
        a.start()
        again = Collector()
        with consumer([a, b], again):
            # both brokers scanned their stores with the consumer connected
            a.passed_recover_scan()
            b.passed_recover_scan()
        assert sum(a.stats().backlog.values()) == 0
        redelivered = len(again.ids())
        takeovers = sum("takeover of" in line and " done:" in line for line in b.output)
    finally:
        a.stop_quietly()
        b.stop_quietly()

    lost = sent - set(received)
    duplicated = sum(1 for n in received.values() if n > 1)
    print(
        f"\ntakeover e2e: backlog={BACKLOG} moved={done['moved']} taken_after={taken_after:.1f}s "
        f"(session {SESSION_TIMEOUT}s + grace {GRACE}s) received={len(received)} "
        f"lost={len(lost)} duplicated={duplicated} takeovers={takeovers} "
        f"redelivered_after_restart={redelivered}"
    )
    assert not lost, f"{len(lost)} messages lost, e.g. {sorted(lost)[:5]}"
    assert duplicated == 0
    assert set(received) == sent
    assert takeovers == 1
    assert redelivered == 0
