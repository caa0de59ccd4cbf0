"""What TLS costs: publish and end-to-end rates against a broker in plaintext, TLS and mTLS.

One broker process per mode (memory store, so the transport is what differs), certificates
from a CA made on the spot (trustme); in this process a ``Producer`` (``send_async`` in a
loop, then every store-ack awaited) and a ``Consumer`` on loopback. Bounded by count and
time.

    python tests/bench/tls_bench.py                     # 20,000 messages of 1 KiB per mode
    python tests/bench/tls_bench.py --count 50000 --size 4096
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO)]

from kiteq.client import (  # noqa: E402
    Binding,
    Consumer,
    Message,
    Producer,
    ReceivedMessage,
    TlsOptions,
)
from tests.e2e.broker_process import BrokerProcess, write_config  # noqa: E402
from tests.e2e.tls_files import TlsFiles, make_tls_files  # noqa: E402

MODES = ("off", "tls", "mtls")


def run_mode(
    mode: str, files: TlsFiles, directory: Path, count: int, size: int, limit: float
) -> dict[str, object]:
    keys = {} if mode == "off" else files.broker_keys(mtls=mode == "mtls")
    directory.mkdir()
    config = write_config(directory, db="memory://?maxcap=1000000", extra=keys)
    broker = BrokerProcess(config)
    broker.start()
    tls: TlsOptions | None = None if mode == "off" else files.client(cert=mode == "mtls")
    received = 0
    everything = threading.Event()

    def handle(message: ReceivedMessage) -> bool:
        nonlocal received
        received += 1
        if received >= count:
            everything.set()
        return True

    body = b"x" * size
    try:
        with (
            Consumer(
                brokers=[broker.address],
                group_id="bench-consumer",
                bindings=[Binding.direct("bench", "tick")],
                handler=handle,
                tls=tls,
            ),
            Producer(brokers=[broker.address], group_id="bench-producer", tls=tls) as producer,
        ):
            deadline = time.monotonic() + limit
            started = time.monotonic()
            futures = []
            for _ in range(count):
                futures.append(
                    producer.send_async(Message(topic="bench", message_type="tick", body=body))
                )
                if time.monotonic() > deadline:
                    break
            failed = 0
            for future in futures:
                try:
                    future.result(max(1.0, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - counted and reported
                    failed += 1
            acked = time.monotonic() - started
            everything.wait(max(0.0, deadline - time.monotonic()))
            delivered = time.monotonic() - started
    finally:
        broker.stop_quietly()
    sent = len(futures)
    return {
        "mode": mode,
        "sent": sent,
        "failed": failed,
        "received": received,
        "publish_msgs_per_s": round(sent / acked),
        "end_to_end_msgs_per_s": round(received / delivered),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--limit", type=float, default=120.0, help="seconds per mode at most")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiteq-tls-bench-") as tmp:
        files = make_tls_files(Path(tmp) / "certs")
        results = [
            run_mode(mode, files, Path(tmp) / mode, options.count, options.size, options.limit)
            for mode in options.modes
        ]
    for result in results:
        print(json.dumps(result))
    return 0 if all(r["failed"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
