"""``kiteq-bench`` smoke runs (a few hundred messages, real broker and client processes).

They check the output's shape and that the counts match, never timing: the figures
themselves come from running the tool by hand.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from kiteq.bench.broker import OwnBroker
from kiteq.bench.cli import build_parser
from kiteq.bench.histogram import Latency
from kiteq.bench.roles import _is_tx
from kiteq.bench.run import ProgressLine
from kiteq.bench.tally import ConsumerTally, merge_bitmaps
from kiteq.bench.workload import STAMP_BYTES, Pacer, Workload, read_stamp, stamped_body
from kiteq.core.errors import ConfigError
from tests._servers.zookeeper import ManagedZooKeeper

pytestmark = pytest.mark.bench

LATENCY_KEYS = {"count", "p50", "p99", "p999", "max"}


def bench(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "kiteq.bench", "-json", "-quiet", *args],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def assert_ordered(latency: dict[str, Any], count: int) -> None:
    assert set(latency) == LATENCY_KEYS
    assert latency["count"] == count
    assert 0 < latency["p50"] <= latency["p99"] <= latency["p999"] <= latency["max"]


def test_two_by_two_with_transactions_counts_match() -> None:
    result = bench(
        "-producers", "2", "-consumers", "2", "-count", "300", "-size", "100",
        "-tx", "0.1", "-store", "memory",
    )  # fmt: skip
    assert result["workload"]["producers"] == 2
    assert result["store"] == "memory"
    assert (result["sent"], result["acked"], result["failed"]) == (300, 300, 0)
    assert result["unique"] == 300
    assert result["lost"] == 0
    assert result["received"] == 300 + result["duplicates"]
    assert result["errors"] == {}
    assert_ordered(result["store_ack"], 300)
    assert_ordered(result["delivery"], result["received"])
    assert result["publish_rate"] > 0
    assert result["e2e_rate"] > 0
    assert result["broker_cpu_us_per_message"] > 0


def test_open_loop_rate_sends_exactly_its_schedule() -> None:
    # 400 msg/s for 0.5 s: messages are scheduled every 2.5 ms from the start, so exactly
    # 200 fall inside the duration, however fast or slow the machine is
    result = bench("-duration", "0.5", "-rate", "400", "-consumers", "1")
    assert (result["sent"], result["acked"], result["unique"]) == (200, 200, 200)
    assert result["store"] == "rocksdb fsync=batch"


def test_sync_publisher_against_a_running_broker_text_report() -> None:
    with OwnBroker("rocksdb") as broker:
        done = subprocess.run(
            [
                sys.executable, "-m", "kiteq.bench", "-broker", broker.address, "-sync",
                "-count", "200", "-consumers", "0",
            ],
            capture_output=True, text=True, timeout=100, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("kiteq-bench: 1 producer(s) x 0 consumer(s), 200 messages")
    assert f"broker {broker.address}" in lines[0]
    assert "(200 acked of 200 sent, 0 failed" in lines[1]
    assert lines[2].split() == ["latency", "(ms)", "p50", "p99", "p99.9", "max", "count"]
    assert lines[3].split()[0] == "publish->store-ack"
    assert lines[3].split()[-1] == "200"
    assert not any("end to end" in line for line in lines)


def test_brokers_found_in_zookeeper(zookeeper: ManagedZooKeeper) -> None:
    registry = f"zk://{zookeeper.hosts}/kiteq-bench-{uuid.uuid4().hex}"
    with OwnBroker("memory", registry=registry):
        result = bench("-broker", registry, "-count", "200", "-producers", "2")
    assert result["target"] == registry
    assert (result["acked"], result["unique"], result["lost"]) == (200, 200, 0)


def test_usage_and_config_errors_exit_with_their_codes() -> None:
    usage = subprocess.run(
        [sys.executable, "-m", "kiteq.bench", "-producers", "x"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert usage.returncode == 2
    config = subprocess.run(
        [sys.executable, "-m", "kiteq.bench", "-size", "8"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert config.returncode == 1
    assert "size must be >= 16" in config.stderr
    # -set reaches the own broker's cluster file: a bad value stops the broker, named
    bad_key = subprocess.run(
        [sys.executable, "-m", "kiteq.bench", "-count", "10", "-set", "dedupWindowSeconds=-1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad_key.returncode == 1
    assert "dedupWindowSeconds: must be >= 0" in bad_key.stderr


# --- the pieces -----------------------------------------------------------------------


def test_workload_splits_the_count_and_round_trips() -> None:
    workload = Workload(producers=3, count=10, tx_share=0.25)
    assert [workload.share(i) for i in range(3)] == [4, 3, 3]
    assert Workload.from_json(workload.to_json()) == workload
    with pytest.raises(ConfigError):
        Workload(count=0, duration=0)
    with pytest.raises(ConfigError):
        Workload(tx_share=1.5)


def test_transactional_share_is_spread_exactly() -> None:
    picked = [seq for seq in range(1000) if _is_tx(seq, 0.1)]
    assert len(picked) == 100
    assert picked[:3] == [9, 19, 29]
    assert not any(_is_tx(seq, 0.0) for seq in range(100))
    assert all(_is_tx(seq, 1.0) for seq in range(100))


def test_stamp_round_trips_and_keeps_the_size() -> None:
    body = stamped_body(bytes(64), 123_456_789, 3, 77)
    assert len(body) == 64
    assert read_stamp(body) == (123_456_789, 3, 77)
    assert STAMP_BYTES == 16


def test_bitmaps_count_distinct_messages_across_consumers() -> None:
    first, second = ConsumerTally(), ConsumerTally()
    for seq in (0, 1, 2, 500):
        first.record(stamped_body(bytes(16), 1, 0, seq))
    for seq in (2, 3):  # 2 again: a redelivery to another consumer
        second.record(stamped_body(bytes(16), 1, 0, seq))
    second.record(stamped_body(bytes(16), 1, 1, 0))
    second.record(stamped_body(bytes(16), 1, 0, 3))  # and 3 twice to the same consumer
    results = [first.result(), second.result()]
    assert merge_bitmaps(results) == 6
    assert first.received + second.received == 8
    assert second.progress() == {"received": 4, "distinct": 3}


def test_latency_histograms_add_up_after_encoding() -> None:
    a, b, total = Latency(), Latency(), Latency()
    for micros in range(1, 1001):
        a.record_us(micros)
    b.record_us(5_000)
    b.record_us(-3)  # a wall clock stepping back is clamped, not dropped
    total.add_encoded(a.encode())
    total.add_encoded(b.encode())
    total.add_encoded(Latency().encode())
    summary = total.percentiles()
    assert summary.count == 1002
    assert summary.p50 == pytest.approx(0.5, abs=0.002)
    assert summary.max == pytest.approx(5.0, rel=0.001)
    assert Latency().percentiles().count == 0


def test_pacer_schedules_from_the_start() -> None:
    pacer = Pacer(1000.0, started_ns=0)  # long past: no sleeping
    assert [pacer.next() for _ in range(3)] == [0, 1_000_000, 2_000_000]


def test_progress_line_without_a_terminal_writes_whole_lines() -> None:
    stream = io.StringIO()
    line = ProgressLine(stream, label="kiteq")
    line.update(2.0, sent=10, acked=8, received=6)
    line.update(2.1, sent=11, acked=9, received=7)  # within 5 s: not repeated
    line.done()
    assert stream.getvalue() == "kiteq:    2.0s sent 10 acked 8 received 6 (4 acked/s)\n"


def test_readme_commands_parse() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Performance", 1)[1].split("\n## ", 1)[0]
    commands = [
        line.split("#", 1)[0].split()[1:]
        for line in section.splitlines()
        if line.startswith("kiteq-bench ") or line.strip() == "kiteq-bench"
    ]
    assert len(commands) >= 5
    for args in commands:
        options = build_parser().parse_args(args)
        assert options.size >= STAMP_BYTES
