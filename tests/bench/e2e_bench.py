"""End-to-end throughput: publish -> store -> push -> ack -> delete, real processes.

A thin matrix over ``kiteq.bench`` (``kiteq-bench``): per store and size, one broker
process of the bench's own on a fresh store, one producer process (``Producer.send_async``
in a loop) and one consumer process (``Consumer`` with a plain handler), on loopback.
Publish runs from the first send to the last store-ack, end to end to the last delivery.
Each run is bounded by ``--count`` messages and ``--limit`` seconds of sending.

    python tests/bench/e2e_bench.py                       # full matrix
    python tests/bench/e2e_bench.py --stores rocksdb --sizes 1024 --count 100000
    python tests/bench/e2e_bench.py --stores mysql        # the local MariaDB (--mysql-url)

``mysql`` runs on fresh databases (``kqbench_<random>``, created by the broker's store
with ``autoCreate=true`` and dropped afterwards) on the server of ``--mysql-url``.
``kiteq-bench`` does the same with more shapes (P x C processes, rates, latencies).
"""

from __future__ import annotations

import argparse

from kiteq.bench.target import bench_kiteq
from kiteq.bench.workload import Workload

DEFAULT_MYSQL_URL = "mysql://root@127.0.0.1:3306?shardnum=4"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stores", default="rocksdb,memory")
    parser.add_argument("--sizes", default="100,1024")
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--limit", type=float, default=60.0, help="seconds of sending per run")
    parser.add_argument(
        "--mysql-url",
        default=DEFAULT_MYSQL_URL,
        help="server and parameters for --stores mysql (db= is added per run)",
    )
    options = parser.parse_args()
    header = (
        f"{'store':<20} {'size':>6} {'sent':>8} {'recv':>8} {'fail':>5} {'lost':>5} "
        f"{'publish/s':>10} {'e2e/s':>8} {'secs':>6} {'broker us/msg':>13}"
    )
    print(header)
    for store in options.stores.split(","):
        for size in (int(s) for s in options.sizes.split(",")):
            workload = Workload(size=size, count=options.count, duration=options.limit)
            outcome = bench_kiteq(workload, store=options.mysql_url if store == "mysql" else store)
            r = outcome.result
            print(
                f"{outcome.store:<20} {size:>6} {r.sent:>8} {r.unique:>8} {r.failed:>5} "
                f"{r.lost:>5} {r.publish_rate:>10.0f} {r.e2e_rate:>8.0f} {r.e2e_seconds:>6} "
                f"{r.broker_cpu_us_per_message or '-':>13}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
