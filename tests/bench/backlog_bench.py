"""An idle broker's cost of a backlog waiting for an offline persistent group (issue #12).

One broker process (RocksDB, ``fsync=batch``): a consumer of group ``away`` declares a
persistent binding and leaves, a producer publishes ``--count`` messages for it, then
nothing happens for ``--idle`` seconds. Prints the broker's CPU over the idle time (% of
a core), its RSS when it started empty, after the publishes, after the idle time, right
after the drain and ``--settle`` seconds later (the broker gives memory back after two
quiet periods of ``kiteq.broker.heap``), and how long the group needs to drain the
backlog when it returns.

    python tests/bench/backlog_bench.py --count 300000 --idle 30
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO)]

from kiteq.bench.cpu import process_cpu  # noqa: E402
from kiteq.broker.heap import PERIOD  # noqa: E402
from kiteq.client import Binding, Consumer, Message, Producer, ReceivedMessage  # noqa: E402
from tests.bench.countdown import Countdown  # noqa: E402
from tests.e2e.broker_process import BrokerProcess, write_config  # noqa: E402

TOPIC = "bench"


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _consumer(address: str, handle: Callable[[ReceivedMessage], bool]) -> Consumer:
    return Consumer(
        brokers=[address],
        group_id="away",
        secret_key="s",
        bindings=[Binding.direct(TOPIC, "tick", persistent=True)],
        handler=handle,
        max_in_flight=2000,
    )


def run(
    count: int,
    idle: float,
    recover: float,
    max_flights: int,
    settle: float,
    history_messages: int = 100_000,
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(
            Path(tmp),
            db=f"rocksdb://{tmp}/db?fsync=batch",
            extra={
                "recoverSeconds": recover,
                "deliverySeconds": 30,
                "maxFlights": max_flights,
                "historyMessages": history_messages,
            },
        )
        broker = BrokerProcess(config)
        broker.start()
        try:
            assert broker.proc is not None
            pid = broker.proc.pid
            started_rss = _rss_mb(pid)
            with _consumer(broker.address, lambda m: True):
                pass  # declared and gone: the backlog waits for it
            body = os.urandom(1024)
            with Producer(brokers=[broker.address], group_id="pay", secret_key="s") as p:
                futures = [
                    p.send_async(Message(topic=TOPIC, message_type="tick", body=body))
                    for _ in range(count)
                ]
                for future in futures:
                    future.result(60)
            # the bookkeeping of the publish settles: a recover scan from now has completed
            broker.passed_recover_scan(timeout=max(30.0, 4 * recover))
            published_rss = _rss_mb(pid)
            before = process_cpu(pid) or 0.0
            started = time.monotonic()
            time.sleep(idle)
            cpu = (process_cpu(pid) or 0.0) - before
            elapsed = time.monotonic() - started
            rss = _rss_mb(pid)
            countdown = Countdown(count)
            returned = time.monotonic()
            with _consumer(broker.address, countdown):
                countdown.done.wait(120)
            drained = time.monotonic() - returned
            seen = countdown.seen
            broker.passed_recover_scan(timeout=max(30.0, 4 * recover))
            drained_rss = _rss_mb(pid)
            time.sleep(settle)
            settled_rss = _rss_mb(pid)
            return {
                "count": count,
                "idle_cpu_pct": round(100 * cpu / elapsed, 2),
                "rss_empty_mb": round(started_rss, 1),
                "rss_after_publish_mb": round(published_rss, 1),
                "rss_idle_mb": round(rss, 1),
                "rss_drained_mb": round(drained_rss, 1),
                "rss_drained_quiet_mb": round(settled_rss, 1),
                "received": seen,
                "drain_s": round(drained, 2),
                "drain_msgs_s": round(seen / drained) if drained else 0,
            }
        finally:
            broker.stop_quietly()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=300_000)
    parser.add_argument("--idle", type=float, default=30.0)
    parser.add_argument("--recover", type=float, default=5.0, help="recoverSeconds")
    parser.add_argument("--max-flights", type=int, default=200_000, help="maxFlights")
    parser.add_argument("--settle", type=float, default=2.5 * PERIOD, help="quiet seconds")
    parser.add_argument("--history-messages", type=int, default=100_000, help="historyMessages")
    options = parser.parse_args()
    figures = run(
        options.count,
        options.idle,
        options.recover,
        options.max_flights,
        options.settle,
        options.history_messages,
    )
    print(figures, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
