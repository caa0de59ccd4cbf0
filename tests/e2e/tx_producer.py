"""A producer process that publishes one transactional message and never decides.

Usage: ``python tx_producer.py <broker address> <group> <order>``. After the store-ack
its local transaction writes the message id to stdout and blocks forever, so the test
can SIGKILL the process between the store-ack and the decision.
"""

from __future__ import annotations

import sys
import threading

from kiteq.client import Message, Producer

address, group, order = sys.argv[1], sys.argv[2], sys.argv[3]
forever = threading.Event()


def local_tx(message: Message) -> bool:
    sys.stdout.write(f"{message.message_id}\n")
    sys.stdout.flush()
    forever.wait()
    return True


with Producer(brokers=[address], group_id=group, secret_key="s") as producer:
    producer.send_transactional(
        Message(topic="trade", message_type="pay-succ", body=b"tx", properties={"order": order}),
        local_tx,
    )
