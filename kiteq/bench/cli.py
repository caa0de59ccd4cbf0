"""``kiteq-bench``: load a KiteQ broker and measure it (flags as ``kiteq``: ``-x`` or ``--x``).

Examples::

    kiteq-bench                                        # own broker on RocksDB, 1 x 1, 100k x 1 KiB
    kiteq-bench -producers 4 -consumers 4 -size 100 -store memory
    kiteq-bench -duration 30 -rate 10000               # open loop: latency at 10k msg/s offered
    kiteq-bench -sync -count 5000 -consumers 0         # one synchronous publisher's latency
    kiteq-bench -broker 127.0.0.1:13800 -tx 0.1 -json  # a running broker, 10% transactional
    kiteq-bench -set dedupWindowSeconds=0              # own broker with a cluster key set

Exit codes: 0 when the run completed (its counts are in the report), 1 when it could not
(a broker or child failed, a timeout), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kiteq.bench.broker import STORES
from kiteq.bench.report import text_report
from kiteq.bench.roles import SECRET_ENV
from kiteq.bench.run import ProgressLine
from kiteq.bench.target import bench_kiteq
from kiteq.bench.workload import Publish, Workload
from kiteq.core.errors import KiteQError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiteq-bench",
        description=(
            "Producer and consumer processes against a KiteQ broker: publish and end-to-end "
            "rates, publish->store-ack and publish->delivery latency (HDR histograms). "
            f"The group secret, if the broker needs one, is read from ${SECRET_ENV}."
        ),
        allow_abbrev=False,
    )

    def flag(name: str, **kwargs: object) -> None:
        parser.add_argument(f"-{name}", f"--{name}", **kwargs)  # type: ignore[arg-type]

    flag("producers", type=int, default=1, help="producer processes (default 1)")
    flag("consumers", type=int, default=1, help="consumer processes, one group (default 1)")
    flag("size", type=int, default=1024, help="body bytes, at least 16 (default 1024)")
    flag("count", type=int, default=None, help="messages in all (default 100000)")
    flag("duration", type=float, default=0.0, help="seconds to send instead of a count")
    flag("rate", type=float, default=0.0, help="target msg/s in all, open loop (default: max)")
    flag("sync", action="store_true", help="each producer waits for every store-ack")
    flag("window", type=int, default=1000, help="unacked sends per producer (default 1000)")
    flag("tx", type=float, default=0.0, help="transactional share 0..1, committed at once")
    flag(
        "store",
        default="rocksdb",
        help=f"own broker's store: {', '.join(STORES)} or a store URL (default rocksdb)",
    )
    flag("broker", default=None, help="a running broker: host:port[,...], zk://... or file://...")
    flag("topic", default="bench", help="topic (default bench)")
    flag("keys", type=int, default=0, help="ordering keys the messages cycle through (0: none)")
    flag(
        "set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a cluster key of the own broker, as TOML (repeatable): -set dedupWindowSeconds=0",
    )
    flag("drainTimeout", dest="drain_timeout", type=float, default=30.0, help="seconds")
    flag("json", action="store_true", help="print the result as JSON")
    flag("quiet", action="store_true", help="no progress line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    try:
        count = options.count
        if count is None:
            count = 0 if options.duration else 100_000
        workload = Workload(
            producers=options.producers,
            consumers=options.consumers,
            size=options.size,
            count=count,
            duration=options.duration,
            rate=options.rate,
            publish=Publish.SYNC if options.sync else Publish.PIPELINED,
            window=options.window,
            tx_share=options.tx,
            topic=options.topic,
            keys=options.keys,
        )
        outcome = bench_kiteq(
            workload,
            store=options.store,
            target=options.broker,
            progress=None if options.quiet else ProgressLine(sys.stderr),
            drain_timeout=options.drain_timeout,
            extra_config="".join(f"{setting}\n" for setting in options.settings),
        )
    except KiteQError as exc:
        print(f"kiteq-bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(json.dumps(outcome.as_dict(), indent=2) if options.json else text_report(outcome))
    return 0
