"""Ordered delivery (issue #16): end-to-end throughput with 1, 100 and 10,000 ordering keys
next to unkeyed delivery, on one broker process of ``kiteq-bench``'s own (one producer
process pipelining ``send_async``, one consumer process).

A key has one message in flight at a time, so 1 key runs at one consumer round trip plus
one store write per message; many keys run in parallel up to the consumer's window.

    python tests/bench/ordering_bench.py
    python tests/bench/ordering_bench.py --store memory --keys 0,1,100 --count 50000
"""

from __future__ import annotations

import argparse

from kiteq.bench.target import bench_kiteq
from kiteq.bench.workload import Workload


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", default="rocksdb")
    parser.add_argument("--keys", default="0,1,100,10000", help="0: unkeyed")
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--limit", type=float, default=20.0, help="seconds of sending per run")
    options = parser.parse_args()
    print(
        f"{'store':<10} {'keys':>6} {'sent':>8} {'recv':>8} {'lost':>5} "
        f"{'publish/s':>10} {'e2e/s':>8} {'secs':>6} {'p50 ms':>8} {'p99 ms':>8}"
    )
    for keys in (int(k) for k in options.keys.split(",")):
        workload = Workload(
            size=options.size, count=options.count, duration=options.limit, keys=keys
        )
        outcome = bench_kiteq(workload, store=options.store, drain_timeout=120.0)
        r = outcome.result
        print(
            f"{options.store:<10} {keys or 'none':>6} {r.sent:>8} {r.unique:>8} {r.lost:>5} "
            f"{r.publish_rate:>10.0f} {r.e2e_rate:>8.0f} {r.e2e_seconds:>6} "
            f"{r.delivery.p50:>8.1f} {r.delivery.p99:>8.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
