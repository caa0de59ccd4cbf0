"""A broker on a real ZooKeeper: its session state and losses in /metrics, and /readyz."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kiteq.ops.metrics.labels import ZK_STATES
from tests._servers import free_port
from tests._servers.zookeeper import ManagedZooKeeper, owner
from tests.e2e.broker_process import BrokerProcess
from tests.e2e.test_zookeeper import write_zk_config
from tests.waiting import wait_until


def samples(pport: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{pport}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def zk_state(pport: int) -> dict[str, float]:
    found = samples(pport)
    return {state: found[("kiteq_zookeeper_state", (("state", state),))] for state in ZK_STATES}


def expirations(pport: int) -> float:
    return samples(pport)[("kiteq_zookeeper_session_expirations_total", ())]


def readyz(pport: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{pport}/readyz", timeout=5) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_session_loss_is_counted_and_the_state_is_connected_again(
    zookeeper: ManagedZooKeeper, zk: Any, tmp_path: Path
) -> None:
    pport = free_port()
    broker = BrokerProcess(
        write_zk_config(tmp_path, zookeeper.hosts + zk.chroot, ["trade"]), pport=pport
    )
    broker.start()
    try:
        assert broker.proc is not None
        # the gauges are refreshed every 5 s: wait for the first refresh
        wait_until(lambda: zk_state(pport)["connected"] == 1, 20, "connected state")
        assert expirations(pport) == 0
        assert readyz(pport)[0] == 200
        alive = f"/kiteq/alive_servers/{broker.address}"
        old = owner(zk, alive)
        # frozen past its 4 s session timeout: ZooKeeper expires the session
        os.kill(broker.proc.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: owner(zk, alive) is None, 20, "the session to expire")
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        wait_until(lambda: owner(zk, alive) not in (None, old), 20, "re-registration")
        wait_until(lambda: expirations(pport) >= 1, 20, "the loss in the metrics")
        wait_until(lambda: zk_state(pport)["connected"] == 1, 20, "connected again")
        assert zk_state(pport) == {"connected": 1, "suspended": 0, "lost": 0}
        status, body = readyz(pport)
        assert (status, body["checks"]["registry"]) == (200, "up")
    finally:
        broker.stop_quietly()
