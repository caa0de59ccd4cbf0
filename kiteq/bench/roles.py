"""Producer and consumer processes for a KiteQ broker: ``python -m kiteq.bench.roles``.

Argument 1 is the target (``host:port[,host:port]`` or a ``zk://`` / ``file://``
registry), argument 2 the ``ChildSpec`` JSON; the group secret comes from the
``KITEQ_BENCH_SECRET`` environment variable (a command line is visible to every user).
Producers use ``Producer.send_async`` (pipelined) or ``send`` (synchronous) and send the
transactional share with ``send_transactional`` from a small pool of threads, committing
each at once; consumers ack every message from a plain handler.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Final

from kiteq.bench.run import ChildSpec, Role
from kiteq.bench.tally import ConsumerTally, ProducerTally, Reporter
from kiteq.bench.workload import Pacer, Publish, filler, stamped_body
from kiteq.client import Binding, Consumer, KiteQError, Message, Producer, ReceivedMessage

__all__ = ["CONSUMER_GROUP", "PRODUCER_GROUP", "SECRET_ENV", "main"]

PRODUCER_GROUP: Final = "kiteq-bench-producer"
CONSUMER_GROUP: Final = "kiteq-bench-consumer"
SECRET_ENV: Final = "KITEQ_BENCH_SECRET"  # noqa: S105 - a variable name
MESSAGE_TYPE: Final = "bench"
# transactional sends in flight per producer (each blocks a thread until its store-ack)
_TX_THREADS: Final = 32
_SETTLE_SECONDS: Final = 60.0


def _where(target: str) -> dict[str, Any]:
    if "://" in target:
        return {"registry": target}
    return {"brokers": [b.strip() for b in target.split(",") if b.strip()]}


def _is_tx(seq: int, share: float) -> bool:
    # spread evenly: message seq is transactional when the running share crosses an integer
    return share > 0 and int((seq + 1) * share) > int(seq * share)


def produce(target: str, spec: ChildSpec) -> None:
    workload = spec.workload
    tally = ProducerTally()
    reporter = Reporter(tally)
    body = filler(workload.size)
    share = workload.share(spec.index)
    tx_slots = threading.BoundedSemaphore(_TX_THREADS)

    def on_done(intended_ns: int, future: concurrent.futures.Future[Any]) -> None:
        error = future.exception()
        if error is None:
            tally.acked(intended_ns)
        else:
            tally.failed_one(error)

    with (
        Producer(
            **_where(target),
            group_id=PRODUCER_GROUP,
            secret_key=os.environ.get(SECRET_ENV, ""),
            max_pending=workload.window,
        ) as producer,
        concurrent.futures.ThreadPoolExecutor(_TX_THREADS, "bench-tx") as tx_pool,
    ):

        def send_tx(message: Message, intended_ns: int) -> None:
            try:
                producer.send_transactional(message, lambda _: True)
            except KiteQError as exc:
                tally.failed_one(exc)
            else:
                tally.acked(intended_ns)
            finally:
                tx_slots.release()

        reporter.ready_then_go()
        started_ns = time.time_ns()
        end_ns = spec.deadline_ns
        if workload.duration:
            end_ns = min(end_ns, started_ns + int(workload.duration * 1e9))
        pacer = Pacer(workload.rate / workload.producers, started_ns)
        seq = 0
        while share == 0 or seq < share:
            intended_ns = pacer.next()
            if intended_ns >= end_ns:
                break
            message = Message(
                topic=workload.topic,
                message_type=MESSAGE_TYPE,
                body=stamped_body(body, intended_ns, spec.index, seq),
                ordering_key=f"k{seq % workload.keys}" if workload.keys else "",
            )
            tally.sending(intended_ns)
            if _is_tx(seq, workload.tx_share):
                tx_slots.acquire()
                tx_pool.submit(send_tx, message, intended_ns)
            elif workload.publish is Publish.SYNC:
                try:
                    producer.send(message)
                except KiteQError as exc:
                    tally.failed_one(exc)
                else:
                    tally.acked(intended_ns)
            else:
                try:
                    future = producer.send_async(message)
                except KiteQError as exc:
                    tally.failed_one(exc)
                else:
                    future.add_done_callback(functools.partial(on_done, intended_ns))
            seq += 1
        tally.wait_settled(_SETTLE_SECONDS)
    reporter.finish()


def consume(target: str, spec: ChildSpec) -> None:
    tally = ConsumerTally()
    reporter = Reporter(tally)

    def handle(message: ReceivedMessage) -> bool:
        tally.record(message.body)
        return True

    with Consumer(
        **_where(target),
        group_id=CONSUMER_GROUP,
        secret_key=os.environ.get(SECRET_ENV, ""),
        bindings=[Binding.direct(spec.workload.topic, MESSAGE_TYPE)],
        handler=handle,
        max_in_flight=2000,
    ):
        reporter.ready()
        sys.stdin.read()  # the parent closes stdin once everything is in (or it gives up)
    reporter.finish()


def main(argv: Sequence[str] | None = None) -> int:
    target, spec_json = sys.argv[1:] if argv is None else argv
    spec = ChildSpec.from_json(spec_json)
    if spec.role is Role.PRODUCER:
        produce(target, spec)
    else:
        consume(target, spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
