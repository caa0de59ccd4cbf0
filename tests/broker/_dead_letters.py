"""Dead letters made the ordinary way on a broker process: a consumer that nacks them."""

from __future__ import annotations

from kiteq.client import Binding, Consumer, Message, Producer
from tests.e2e.broker_process import BrokerProcess
from tests.e2e.collector import Collector
from tests.waiting import wait_until

__all__ = ["dead_letter", "dead_letter_count"]


def dead_letter_count(broker: BrokerProcess) -> int:
    return sum(d.count for d in broker.stats().deadLetterGroups)


def dead_letter(
    broker: BrokerProcess, count: int, *, producer: str, group: str, binding: Binding
) -> list[str]:
    """The ids of *count* ``trade``/``pay-succ`` messages *producer* sends that end
    dead-lettered for *group* (deliver limit 1, and *group*'s handler nacks)."""
    nacking = Collector(lambda _: False)
    with (
        Producer(brokers=[broker.address], group_id=producer, secret_key="s") as sender,
        Consumer(
            brokers=[broker.address],
            group_id=group,
            secret_key="s",
            bindings=[binding],
            handler=nacking,
        ),
    ):
        ids = [
            sender.send(
                Message(topic="trade", message_type="pay-succ", body=b"x", deliver_limit=1)
            ).message_id
            for _ in range(count)
        ]
        wait_until(lambda: dead_letter_count(broker) >= count, 30, f"{count} dead letters")
    return ids
