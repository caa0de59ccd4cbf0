"""Is a slow run the broker's doing or the machine's? (issue #12: the "bimodal" rate)

The same ``kiteq-bench`` run on the same code has been measured at 22.8k and 16.4k msg/s.
This script repeats one run ``--runs`` times and, around each, times a fixed pure-Python
loop in this process (CPU seconds, so waiting does not count). It prints, per run, the
end-to-end rate, the broker's and the producer's CPU per message, and the loop's CPU
seconds; then the spread (max / min) of each and the correlation of the broker's cost with
the loop's and with the producer's.

If the broker's cost per message moved with its own state (a cache, a compaction, a
pause), it would move alone. If it moves with the producer's cost (the producer does the
same work in every run) and with the loop's, the machine ran slower for everyone: the
CPU this virtual machine gets is what changed.

    python tests/bench/drift.py --runs 10 --count 50000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO)]

from kiteq.bench.target import bench_kiteq  # noqa: E402
from kiteq.bench.workload import Workload  # noqa: E402

_LOOP_ITERATIONS = 3_000_000


def loop_seconds() -> float:
    """CPU seconds of a fixed pure-Python loop: how fast this machine runs Python now."""
    started = time.process_time()
    total = 0
    for i in range(_LOOP_ITERATIONS):
        total += i * i % 7
    return time.process_time() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--store", default="rocksdb")
    parser.add_argument("--loops", type=int, default=20, help="loop timings before the runs")
    options = parser.parse_args()
    alone = [loop_seconds() for _ in range(options.loops)]
    if alone:
        print("loop alone (CPU s):", " ".join(f"{s:.3f}" for s in alone))
        print(
            f"loop alone: min {min(alone):.3f}  median {statistics.median(alone):.3f}  "
            f"max {max(alone):.3f}  (spread {max(alone) / min(alone):.2f}x)"
        )
    print(f"{'run':>3} {'e2e/s':>8} {'broker us/msg':>13} {'producer us/msg':>15} {'loop s':>7}")
    rates: list[float] = []
    broker: list[float] = []
    producer: list[float] = []
    loops: list[float] = []
    for n in range(1, options.runs + 1):
        before = loop_seconds()
        workload = Workload(size=options.size, count=options.count)
        r = bench_kiteq(workload, store=options.store).result
        after = loop_seconds()
        if not r.acked or r.broker_cpu_us_per_message is None:
            print(f"{n:>3} run failed: {r.errors}", flush=True)
            continue
        rates.append(r.e2e_rate)
        broker.append(r.broker_cpu_us_per_message)
        producer.append(r.producer_cpu_seconds / r.acked * 1e6)
        loops.append((before + after) / 2)
        print(
            f"{n:>3} {rates[-1]:>8.0f} {broker[-1]:>13.1f} {producer[-1]:>15.1f} {loops[-1]:>7.3f}",
            flush=True,
        )
    if len(rates) < 3:
        print("fewer than 3 runs completed: no statistics")
        return 1
    for name, values in (("e2e rate", rates), ("broker us/msg", broker)):
        print(f"spread {name}: {max(values) / min(values):.2f}x")
    print(f"spread producer us/msg: {max(producer) / min(producer):.2f}x")
    print(f"spread loop s: {max(loops) / min(loops):.2f}x")
    print(
        f"correlation broker us/msg ~ producer us/msg: {statistics.correlation(broker, producer):.2f}"
    )
    print(f"correlation broker us/msg ~ loop s: {statistics.correlation(broker, loops):.2f}")
    ratios = [b / p for b, p in zip(broker, producer, strict=True)]
    print(
        f"broker / producer cost: {min(ratios):.2f}-{max(ratios):.2f} "
        f"(spread {max(ratios) / min(ratios):.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
