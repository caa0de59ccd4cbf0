"""A consumer process for the ordered-delivery tests (killed by some of them).

argv: comma-separated broker addresses, log path, random seed, nack rate. Each handling
appends one line ``time_ns key seq attempt ok`` to the log before the handler returns
(so before its ack leaves); a nack is chosen at random on attempts 1 and 2 only, so a
head never waits for a backoff window of the recover scan's (attempts >= 4).
"""

from __future__ import annotations

import random
import sys
import threading
import time
from pathlib import Path

from kiteq.client import Binding, Consumer, ReceivedMessage

addresses, log_path = sys.argv[1].split(","), Path(sys.argv[2])
rng = random.Random(int(sys.argv[3]))
nack_rate = float(sys.argv[4])
lock = threading.Lock()
log = log_path.open("a", buffering=1)


def handle(message: ReceivedMessage) -> bool:
    with lock:
        ok = message.attempt >= 3 or rng.random() >= nack_rate
        log.write(
            f"{time.time_ns()} {message.ordering_key} {message.properties['seq']} "
            f"{message.attempt} {int(ok)}\n"
        )
    return ok


with Consumer(
    brokers=addresses,
    group_id="order-svc",
    secret_key="s3cret",
    bindings=[Binding.direct("trade", "ordered")],
    handler=handle,
    concurrency=32,
    max_in_flight=200,
):
    with lock:
        log.write("ready\n")
    threading.Event().wait()
