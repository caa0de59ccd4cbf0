"""End-to-end throughput: publish -> store -> push -> ack -> delete, real processes.

One broker process, one producer process (``Producer.send_async`` in a loop) and one
consumer process (``Consumer`` with a plain handler), on loopback. The clock runs from the
producer's first send until the broker's store is empty again (every message acked by the
consumer and deleted). Loops are bounded by count and time.

    python tests/bench/e2e_bench.py                       # full matrix
    python tests/bench/e2e_bench.py --stores rocksdb --sizes 1024 --count 100000
    python tests/bench/e2e_bench.py --stores mysql        # the local MariaDB (--mysql-url)

``mysql`` runs on fresh databases (``kqbench_<random>``, created by the broker's store
with ``autoCreate=true`` and dropped afterwards) on the server of ``--mysql-url``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO)]

from tests.e2e.broker_process import BrokerProcess, write_config  # noqa: E402

DEFAULT_MYSQL_URL = "mysql://root@127.0.0.1:3306?shardnum=4"

TOPIC = "bench"
GROUP_P = "bench-producer"
GROUP_C = "bench-consumer"
SECRET = "bench"


def run_producer(address: str, count: int, size: int, deadline: float) -> None:
    from kiteq.client import Message, Producer

    body = os.urandom(size)
    with Producer(brokers=[address], group_id=GROUP_P, secret_key=SECRET) as producer:
        started = time.time()
        futures = []
        for _ in range(count):
            futures.append(
                producer.send_async(Message(topic=TOPIC, message_type="tick", body=body))
            )
            if time.time() > deadline:
                break
        failed = 0
        for future in futures:
            try:
                future.result(max(1.0, deadline - time.time()))
            except Exception:  # noqa: BLE001 - counted and reported
                failed += 1
        acked = time.time()
    print(
        json.dumps({"started": started, "acked": acked, "sent": len(futures), "failed": failed}),
        flush=True,
    )


def run_consumer(address: str, count: int, deadline: float) -> None:
    from kiteq.client import Binding, Consumer, ReceivedMessage

    seen = 0
    done = threading.Event()
    first = last = 0.0

    def handle(message: ReceivedMessage) -> bool:
        nonlocal seen, first, last
        seen += 1
        last = time.time()
        if seen == 1:
            first = last
        if seen >= count:
            done.set()
        return True

    with Consumer(
        brokers=[address],
        group_id=GROUP_C,
        secret_key=SECRET,
        bindings=[Binding.direct(TOPIC, "tick")],
        handler=handle,
        max_in_flight=2000,
    ):
        print(json.dumps({"ready": True}), flush=True)
        done.wait(max(0.0, deadline - time.time()))
    print(json.dumps({"received": seen, "first": first, "last": last}), flush=True)


def child(role: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def read_json(proc: subprocess.Popen[str], timeout: float) -> dict[str, float]:
    assert proc.stdout is not None
    result: dict[str, dict[str, float]] = {}

    def reader() -> None:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line:
            result["value"] = json.loads(line)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    if "value" not in result:
        raise RuntimeError(f"no result from {proc.args!r}")
    return result["value"]


def store_url(store: str, tmp: str, mysql_url: str) -> tuple[str, str]:
    """(label, db URL) of a run."""
    if store == "rocksdb":
        return "rocksdb fsync=batch", f"rocksdb://{tmp}/db?fsync=batch"
    if store == "memory":
        return "memory", "memory://?maxcap=2000000"
    if store == "mysql":
        separator = "&" if "?" in mysql_url else "?"
        prefix = f"kqbench_{uuid.uuid4().hex[:12]}"
        return "mysql", f"{mysql_url}{separator}db={prefix}&autoCreate=true"
    raise SystemExit(f"unknown store {store!r}; expected rocksdb, memory or mysql")


def measure(
    store: str, size: int, count: int, limit: float, mysql_url: str = DEFAULT_MYSQL_URL
) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        label, db = store_url(store, tmp, mysql_url)
        try:
            return _measure(label, db, tmp, size, count, limit)
        finally:
            if db.startswith("mysql://"):
                from tests.store.mariadb import drop_store

                drop_store(db)


def _measure(
    label: str, db: str, tmp: str, size: int, count: int, limit: float
) -> dict[str, object]:
    config = write_config(Path(tmp), db=db, extra={"deliverySeconds": 30, "recoverSeconds": 5})
    broker = BrokerProcess(config)
    broker.start()
    consumer = producer = None
    try:
        deadline = time.time() + limit
        consumer = child("consumer", broker.address, str(count), str(deadline))
        read_json(consumer, 30)  # ready
        producer = child("producer", broker.address, str(count), str(size), str(deadline))
        sent = read_json(producer, limit + 30)
        received = read_json(consumer, limit + 30)
        while time.time() < deadline + 30 and any(broker.stats().backlog.values()):
            time.sleep(0.02)
        drained = time.time()
        backlog = sum(broker.stats().backlog.values())
        elapsed = drained - sent["started"]
        return {
            "store": label,
            "size": size,
            "sent": int(sent["sent"]),
            "failed": int(sent["failed"]),
            "received": int(received["received"]),
            "left_in_store": backlog,
            "publish_msgs_s": round(sent["sent"] / (sent["acked"] - sent["started"])),
            "e2e_msgs_s": round(received["received"] / elapsed),
            "seconds": round(elapsed, 2),
        }
    finally:
        for proc in (producer, consumer):
            if proc is not None:
                proc.kill()
                proc.wait(10)
                if proc.stdout is not None:
                    proc.stdout.close()
        broker.stop_quietly()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--role", choices=["producer", "consumer"])
    parser.add_argument("--stores", default="rocksdb,memory")
    parser.add_argument("--sizes", default="100,1024")
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--limit", type=float, default=60.0, help="seconds per run, at most")
    parser.add_argument(
        "--mysql-url",
        default=DEFAULT_MYSQL_URL,
        help="server and parameters for --stores mysql (db= is added per run)",
    )
    parser.add_argument("args", nargs="*")
    options = parser.parse_args()
    if options.role == "producer":
        address, count, size, deadline = options.args
        run_producer(address, int(count), int(size), float(deadline))
        return 0
    if options.role == "consumer":
        address, count, deadline = options.args
        run_consumer(address, int(count), float(deadline))
        return 0
    header = f"{'store':<20} {'size':>6} {'sent':>8} {'recv':>8} {'fail':>5} {'left':>5} {'publish/s':>10} {'e2e/s':>8} {'secs':>6}"
    print(header)
    for store in options.stores.split(","):
        for size in (int(s) for s in options.sizes.split(",")):
            r = measure(store, size, options.count, options.limit, options.mysql_url)
            print(
                f"{r['store']:<20} {r['size']:>6} {r['sent']:>8} {r['received']:>8} {r['failed']:>5} "
                f"{r['left_in_store']:>5} {r['publish_msgs_s']:>10} {r['e2e_msgs_s']:>8} {r['seconds']:>6}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
