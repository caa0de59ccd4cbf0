"""A producer process for the crash tests: publishes until told to stop, and appends the
id of every message whose store-ack it received to a file.

    python tests/chaos/publisher.py ADDRESS ACKED_FILE STOP_FILE MAX_SECONDS [DELIVER_LIMIT]

Exits after the stop file appears (or MAX_SECONDS), once every send has an outcome; the
last line of the file is then ``# sent=N acked=N failed=N``.
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading
import time
from pathlib import Path

from kiteq.client import KiteQError, Message, Producer, SendResult

BODY = b"x" * 512


def main() -> None:
    address, acked_path, stop_path, max_seconds = sys.argv[1:5]
    # 0: the broker's default
    deliver_limit = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    stop = Path(stop_path)
    deadline = time.monotonic() + float(max_seconds)
    lock = threading.Lock()
    counts = {"sent": 0, "acked": 0, "failed": 0}
    with Path(acked_path).open("w", buffering=1) as acked:

        def settled(future: concurrent.futures.Future[SendResult]) -> None:
            try:
                result = future.result()
            except KiteQError:
                with lock:
                    counts["failed"] += 1
                return
            with lock:
                counts["acked"] += 1
                acked.write(result.message_id + "\n")

        # retries and a timeout long enough to ride out the broker's restart
        with Producer(
            brokers=[address],
            group_id="pay-svc",
            secret_key="s3cret",
            timeout=20.0,
            retries=10,
            max_pending=2000,
            reconnect_max_delay=0.5,
        ) as producer:
            while not stop.exists() and time.monotonic() < deadline:
                for _ in range(50):
                    try:
                        future = producer.send_async(
                            Message(
                                topic="trade",
                                message_type="pay-succ",
                                body=BODY,
                                deliver_limit=deliver_limit,
                            )
                        )
                    except KiteQError:
                        with lock:
                            counts["failed"] += 1
                        continue
                    with lock:
                        counts["sent"] += 1
                    future.add_done_callback(settled)
                time.sleep(0.005)
            producer.close(timeout=30.0)
        with lock:
            acked.write(
                f"# sent={counts['sent']} acked={counts['acked']} failed={counts['failed']}\n"
            )


if __name__ == "__main__":
    main()
