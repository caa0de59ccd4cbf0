"""The recover scan's cost with many scheduled messages waiting (issue #15).

In-process: a RocksDB store, the broker's own ``BrokerCore`` (no network). A constant
``--due`` messages are due at every scan (no binding: they stay due, so every periodic
scan reads them again); then ``--steps`` scheduled messages (due an hour or more ahead)
are added, and at each step it prints the time of one periodic scan (median and max of
``--scans``), and of one full scan (what a start, a consumer's arrival or a binding
change costs: it reads every stored message, the scheduled ones included).

    python tests/bench/scheduled_scan.py                       # 0, 100k, 1M scheduled
    python tests/bench/scheduled_scan.py --steps 0 10000 --scans 10
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO)]

from kiteq.binding.match import BindingTable  # noqa: E402
from kiteq.core.clock import SystemClock  # noqa: E402
from kiteq.core.config import load_cluster  # noqa: E402
from kiteq.core.message import Message, StoredMessage  # noqa: E402
from kiteq.handler.core import BrokerCore  # noqa: E402
from kiteq.store.base import MessageStore  # noqa: E402
from kiteq.store.url import open_store  # noqa: E402

BATCH = 10_000


def _records(n: int, now: float, *, ahead: float) -> list[StoredMessage]:
    out = []
    for i in range(n):
        deliver_at = now + ahead + i * 0.001 if ahead else 0.0
        message = Message(
            topic="bench",
            message_type="remind",
            body=b"x" * 100,
            deliver_at=deliver_at,
            expired_time=int(max(now, deliver_at)) + 7 * 86400,
            deliver_limit=100,
            group_id="pay",
            create_time=int(now),
        )
        out.append(StoredMessage(message, publish_time=now, next_deliver_time=max(now, deliver_at)))
    return out


async def _fill(store: MessageStore, n: int, now: float, ahead: float) -> float:
    started = time.perf_counter()
    for first in range(0, n, BATCH):
        await store.save(_records(min(BATCH, n - first), now, ahead=ahead))
    return time.perf_counter() - started


async def _timed(core: BrokerCore) -> tuple[float, int]:
    started = time.perf_counter()
    offered = await core.recover.scan()
    return time.perf_counter() - started, offered


async def main(steps: list[int], scans: int, due: int) -> None:
    config = dataclasses.replace(
        load_cluster(REPO / "conf" / "cluster.toml", "memory_dev"), recover_seconds=10
    )
    with tempfile.TemporaryDirectory(prefix="kiteq-sched-bench-") as tmp:
        store = open_store(f"rocksdb://{tmp}/db?fsync=batch")
        await store.open()
        core = BrokerCore(
            config=config,
            store=store,
            bindings=BindingTable(),
            clock=SystemClock(),
            server_name="bench",
        )
        now = time.time()
        await _fill(store, due, now - 1, ahead=0.0)
        print(f"{due} messages due at every scan (no binding: they stay due)")
        print(
            f"{'scheduled':>10} {'fill s':>8} {'periodic median ms':>19} {'max ms':>8} "
            f"{'read/scan':>10} {'full scan ms':>13} {'gauge':>8}"
        )
        stored = 0
        try:
            for target in steps:
                fill = await _fill(store, target - stored, now, ahead=3600.0 + stored * 0.001)
                stored = target
                core.recover.wake()
                full, _ = await _timed(core)  # full: through the whole index, census included
                times = []
                offered = 0
                for _ in range(scans):
                    took, offered = await _timed(core)
                    times.append(took)
                gauge = sum(core.scheduled.counts(time.time()).values())
                print(
                    f"{target:>10} {fill:>8.1f} {statistics.median(times) * 1e3:>19.2f} "
                    f"{max(times) * 1e3:>8.2f} {offered:>10} {full * 1e3:>13.1f} {gauge:>8}"
                )
        finally:
            await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 100_000, 1_000_000])
    parser.add_argument("--scans", type=int, default=20)
    parser.add_argument("--due", type=int, default=500)
    options = parser.parse_args()
    asyncio.run(main(sorted(options.steps), options.scans, options.due))
