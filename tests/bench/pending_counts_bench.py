"""What a broker's start costs for a backlog waiting for one group (issue #14).

A store holds ``--count`` messages (1 KiB) parked for an offline group; the broker reads
their pending groups once when it starts (``MessageStore.pending_counts``, for the
per-group backlog gauges). Prints the store's open time and that read's time.

    python tests/bench/pending_counts_bench.py --store rocksdb --count 300000
    python tests/bench/pending_counts_bench.py --store mysql --count 100000   # MariaDB on :3306
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO)]

from kiteq.core.message import GroupDelivery, GroupState, Message, StoredMessage  # noqa: E402
from kiteq.store.base import Rescheduled  # noqa: E402
from kiteq.store.url import open_store  # noqa: E402
from tests.store import mariadb  # noqa: E402

OWNER = "bench"
CHUNK = 5000


async def fill(url: str, count: int) -> None:
    store = open_store(url)
    await store.open()
    now = time.time()
    try:
        for _ in range(0, count, CHUNK):
            records = [
                StoredMessage(
                    Message(topic="trade", message_type="t", body=b"x" * 1024),
                    publish_time=now,
                    next_deliver_time=now,
                    kite_server=OWNER,
                )
                for _ in range(CHUNK)
            ]
            await store.save(records)
            parked = [
                Rescheduled(
                    dataclasses.replace(
                        r,
                        groups={
                            "away": GroupDelivery(GroupState.PENDING, 0, r.message.expired_time)
                        },
                        next_deliver_time=float(r.message.expired_time),
                    ),
                    now,
                )
                for r in records
            ]
            await store.reschedule(parked)
    finally:
        await store.close()


async def measure(url: str) -> dict[str, float]:
    store = open_store(url)
    started = time.perf_counter()
    await store.open()
    opened = time.perf_counter() - started
    try:
        started = time.perf_counter()
        counts = await store.pending_counts()
        counted = time.perf_counter() - started
    finally:
        await store.close()
    return {
        "open_s": round(opened, 2),
        "pending_counts_s": round(counted, 2),
        "counted": sum(counts.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", choices=("rocksdb", "mysql"), default="rocksdb")
    parser.add_argument("--count", type=int, default=300_000)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if options.store == "rocksdb":
            url = f"rocksdb://{tmp}/db?fsync=never"
            asyncio.run(fill(url, options.count))
            result = asyncio.run(measure(url))
        else:
            with mariadb.databases(1) as prefix:
                url = mariadb.url(prefix, shardnum=1, kiteServer=OWNER)
                asyncio.run(fill(url, options.count))
                result = asyncio.run(measure(url))
    print({"store": options.store, "count": options.count, **result}, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
