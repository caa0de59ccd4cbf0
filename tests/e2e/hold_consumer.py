"""A consumer process that receives and never acks (killed by the test)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from kiteq.client import Binding, Consumer, ReceivedMessage

address, log_path = sys.argv[1], Path(sys.argv[2])
forever = threading.Event()
log = log_path.open("a", buffering=1)


def hold(message: ReceivedMessage) -> bool:
    forever.wait()
    return True


with Consumer(
    brokers=[address],
    group_id="acct-svc",
    secret_key="s3cret",
    bindings=[Binding.fanout("trade")],
    handler=hold,
    concurrency=64,
    max_in_flight=100,
):
    log.write("ready\n")
    forever.wait()
