"""KiteQ beside RabbitMQ and NATS JetStream: the same workload, one table (issue #12).

Not a test: a benchmark that needs the peers running on this machine (RabbitMQ on
127.0.0.1:5672 as guest/guest, NATS with JetStream on 127.0.0.1:4222, MariaDB on
127.0.0.1:3306 for the MySQL store)::

    python tests/bench/peers.py                  # full matrix, 3 interleaved repetitions
    python tests/bench/peers.py --quick          # 1 repetition, 20,000 messages, 1x1 only
    python tests/bench/peers.py --systems kiteq-rocksdb,nats --sizes 1024 --shapes 4x4

Every system runs the same workload through ``kiteq.bench``: P producer and C consumer
processes, bodies stamped with their send time, the same HDR histograms and counts.

* ``kiteq-rocksdb`` / ``kiteq-memory`` / ``kiteq-mysql``: a fresh broker process on a
  fresh store per run (RocksDB ``fsync=batch``; MySQL on new databases), ``Producer.
  send_async``, ``Consumer`` acking every message (``kiteq.bench.roles``).
* ``rabbitmq``: a durable classic queue (deleted and declared again per run), persistent
  messages, publisher confirms (aio-pika), pika
  consumers with prefetch 1,000 and one ``basic_ack`` per message.
* ``nats``: a JetStream stream with file storage and work-queue retention (acked messages
  are deleted; recreated per run), ``js.publish`` acks, one durable pull consumer shared by the consumer processes, ``fetch(500)``
  and one ``ack()`` per message.

Workloads: 1 KiB and 100 B bodies, 1x1 and 4x4 processes (pipelined, as fast as each
producer can, with at most ``Workload.window`` = 1,000 unacknowledged sends per producer
on every system); ``1x1 1 KiB at 10.0k/s``: an open-loop producer offering 10,000 msg/s for
10 s (latency from each message's scheduled send time); ``sync``: one producer waiting for
every store-ack (its latency is the synchronous publisher's). Repetitions are interleaved (every system once, then again), and
the table shows medians, the e2e range, and KiteQ-on-RocksDB's rate divided by each
system's. Every client runs on the default asyncio loop (or a thread), as KiteQ's own
client does. Broker CPU is read from /proc for the process listening on the port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from kiteq.bench.broker import OwnBroker
from kiteq.bench.cpu import process_cpu
from kiteq.bench.run import ChildSpec, ProgressLine, Role, RunResult, run
from kiteq.bench.tally import ConsumerTally, ProducerTally, Reporter
from kiteq.bench.target import child_command
from kiteq.bench.workload import Pacer, Publish, Workload, filler, stamped_body

RABBIT_URL: Final = "amqp://guest:guest@127.0.0.1:5672/"
RABBIT_PORT: Final = 5672
NATS_URL: Final = "nats://127.0.0.1:4222"
NATS_PORT: Final = 4222
QUEUE: Final = "kiteq_bench"
STREAM: Final = "KITEQ_BENCH"
SUBJECT: Final = "kiteq.bench"
DURABLE: Final = "kiteq-bench"
PREFETCH: Final = 1000
FETCH: Final = 500
SYSTEMS: Final = ("kiteq-rocksdb", "kiteq-memory", "kiteq-mysql", "rabbitmq", "nats")
KITEQ_STORES: Final = {"kiteq-rocksdb": "rocksdb", "kiteq-memory": "memory", "kiteq-mysql": "mysql"}
LABELS: Final = {
    "kiteq-rocksdb": "KiteQ, RocksDB fsync=batch",
    "kiteq-memory": "KiteQ, memory",
    "kiteq-mysql": "KiteQ, MySQL",
    "rabbitmq": "RabbitMQ, durable queue, confirms",
    "nats": "NATS JetStream, file, work queue",
}
BASELINE: Final = "kiteq-rocksdb"


# --- child processes of the peers ------------------------------------------------------


async def produce_async(spec: ChildSpec, publish: Callable[[bytes], Awaitable[None]]) -> None:
    """The producer loop every asyncio peer shares: pipelined (a window) or synchronous."""
    workload = spec.workload
    tally = ProducerTally()
    reporter = Reporter(tally)
    body = filler(workload.size)
    share = workload.share(spec.index)
    await asyncio.to_thread(reporter.ready_then_go)
    started_ns = time.time_ns()
    end_ns = spec.deadline_ns
    if workload.duration:
        end_ns = min(end_ns, started_ns + int(workload.duration * 1e9))
    pacer = Pacer(workload.rate / workload.producers, started_ns)
    window = asyncio.Semaphore(workload.window)
    tasks: set[asyncio.Task[None]] = set()

    async def send(payload: bytes, intended_ns: int) -> None:
        try:
            await publish(payload)
        except Exception as exc:  # noqa: BLE001 - counted and reported by name
            tally.failed_one(exc)
        else:
            tally.acked(intended_ns)

    async def windowed(payload: bytes, intended_ns: int) -> None:
        try:
            await send(payload, intended_ns)
        finally:
            window.release()

    seq = 0
    while share == 0 or seq < share:
        intended_ns, wait = pacer.take()
        if intended_ns >= end_ns:
            break
        if wait:
            await asyncio.sleep(wait)
        payload = stamped_body(body, intended_ns, spec.index, seq)
        tally.sending(intended_ns)
        if workload.publish is Publish.SYNC:
            await send(payload, intended_ns)
        else:
            await window.acquire()
            task = asyncio.create_task(windowed(payload, intended_ns))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        seq += 1
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    reporter.finish()


async def rabbit_produce(spec: ChildSpec) -> None:
    import aio_pika

    connection = await aio_pika.connect(RABBIT_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = channel.default_exchange

        async def publish(payload: bytes) -> None:
            message = aio_pika.Message(payload, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await exchange.publish(message, routing_key=QUEUE)

        await produce_async(spec, publish)


def rabbit_consume(spec: ChildSpec) -> None:
    import pika

    tally = ConsumerTally()
    reporter = Reporter(tally)
    connection = pika.BlockingConnection(pika.URLParameters(RABBIT_URL))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=PREFETCH)

    def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
        tally.record(body)
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(QUEUE, on_message, auto_ack=False)

    def wait_for_parent() -> None:
        sys.stdin.read()
        connection.add_callback_threadsafe(channel.stop_consuming)

    threading.Thread(target=wait_for_parent, daemon=True).start()
    reporter.ready()
    channel.start_consuming()
    connection.close()
    reporter.finish()


def rabbit_reset() -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(RABBIT_URL))
    try:
        channel = connection.channel()
        channel.queue_delete(QUEUE)
        channel.queue_declare(QUEUE, durable=True)
    finally:
        connection.close()


async def nats_produce(spec: ChildSpec) -> None:
    import nats

    connection = await nats.connect(NATS_URL)
    try:
        js = connection.jetstream()

        async def publish(payload: bytes) -> None:
            await js.publish(SUBJECT, payload, stream=STREAM, timeout=30)

        await produce_async(spec, publish)
    finally:
        await connection.close()


async def nats_consume(spec: ChildSpec) -> None:
    import nats
    import nats.errors

    tally = ConsumerTally()
    reporter = Reporter(tally)
    connection = await nats.connect(NATS_URL)
    try:
        js = connection.jetstream()
        subscription = await js.pull_subscribe_bind(durable=DURABLE, stream=STREAM)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        parent = loop.run_in_executor(None, sys.stdin.read)
        parent.add_done_callback(lambda _: done.set())
        reporter.ready()
        while not done.is_set():
            try:
                messages = await subscription.fetch(FETCH, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):  # nothing within 0.5 s
                continue
            for message in messages:
                tally.record(message.data)
                await message.ack()
    finally:
        await connection.close()
    reporter.finish()


async def nats_reset() -> None:
    import nats
    import nats.js.errors
    from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

    connection = await nats.connect(NATS_URL)
    try:
        js = connection.jetstream()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(STREAM)
        await js.add_stream(
            StreamConfig(
                name=STREAM,
                subjects=[SUBJECT],
                storage=StorageType.FILE,
                retention=RetentionPolicy.WORK_QUEUE,
            )
        )
        await js.add_consumer(
            STREAM,
            ConsumerConfig(
                durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=50_000
            ),
        )
    finally:
        await connection.close()


def child(system: str, spec_json: str) -> None:
    spec = ChildSpec.from_json(spec_json)
    if system == "rabbitmq" and spec.role is Role.PRODUCER:
        asyncio.run(rabbit_produce(spec))
    elif system == "rabbitmq":
        rabbit_consume(spec)
    elif spec.role is Role.PRODUCER:
        asyncio.run(nats_produce(spec))
    else:
        asyncio.run(nats_consume(spec))


# --- the matrix ------------------------------------------------------------------------


def listener_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1:*port* (for its CPU time), if visible."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                return int(conn.pid) if conn.pid else None
    return None


def measure(system: str, workload: Workload, label: str, quiet: bool) -> RunResult:
    progress = None if quiet else ProgressLine(sys.stderr, label=label)
    if system in KITEQ_STORES:
        with OwnBroker(KITEQ_STORES[system]) as broker:
            command = child_command(broker.address)
            return run(workload, command, progress=progress, broker_cpu=broker.cpu_seconds)
    if system == "rabbitmq":
        rabbit_reset()
        pid = listener_pid(RABBIT_PORT)
    else:
        asyncio.run(nats_reset())
        pid = listener_pid(NATS_PORT)

    def peer_command(role: Role, index: int) -> list[str]:
        return [sys.executable, __file__, "--child", system]

    def cpu() -> float | None:
        return process_cpu(pid) if pid else None

    return run(workload, peer_command, progress=progress, broker_cpu=cpu)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    workload: Workload


def cases(
    sizes: Sequence[int],
    shapes: Sequence[str],
    count: int,
    sync_count: int,
    open_rate: float,
    open_seconds: float,
) -> list[Case]:
    found: list[Case] = []
    for shape in shapes:
        producers, consumers = (int(n) for n in shape.split("x"))
        for size in sizes:
            workload = Workload(producers=producers, consumers=consumers, size=size, count=count)
            found.append(Case(f"{shape} {_size(size)}", workload))
    if open_rate and open_seconds:
        offered = Workload(size=sizes[0], count=0, duration=open_seconds, rate=open_rate)
        found.append(Case(f"1x1 {_size(sizes[0])} at {_k(open_rate)}/s", offered))
    if sync_count:
        sync = Workload(consumers=0, size=sizes[0], count=sync_count, publish=Publish.SYNC)
        found.append(Case(f"sync {_size(sizes[0])}", sync))
    return found


def _size(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


def _k(rate: float) -> str:
    return f"{rate / 1000:.1f}k" if rate >= 1000 else f"{rate:.0f}"


def table(results: dict[tuple[str, str], list[RunResult]], case_names: list[str]) -> str:
    """The markdown table: medians over the repetitions, KiteQ RocksDB's rate over each."""
    lines = [
        "| workload | system | e2e msg/s (median [min-max]) | KiteQ RocksDB / it "
        "| publish msg/s | store-ack p50 / p99 ms | delivery p50 / p99 ms "
        "| broker CPU µs/msg | lost / dup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in case_names:
        rates = {system: _rate(runs) for (case, system), runs in results.items() if case == name}
        base = rates.get(BASELINE)
        for system in SYSTEMS:
            rs = results.get((name, system), [])
            if rs:
                ratio = f"{base / rates[system]:.2f}x" if base and rates[system] else "-"
                lines.append(_row(name, system, rs, ratio))
    return "\n".join(lines)


def _rate(runs: list[RunResult]) -> float:
    """The median rate a row compares: publish for a sync run (no consumers), else e2e."""
    sync = runs[0].workload.consumers == 0
    return statistics.median(r.publish_rate if sync else r.e2e_rate for r in runs)


def _row(name: str, system: str, rs: list[RunResult], ratio: str) -> str:
    sync = rs[0].workload.consumers == 0
    e2e = [r.e2e_rate for r in rs]
    e2e_cell = "-" if sync else f"{_k(statistics.median(e2e))} [{_k(min(e2e))}-{_k(max(e2e))}]"
    publish = _k(statistics.median(r.publish_rate for r in rs))
    ack = (
        f"{statistics.median(r.store_ack.p50 for r in rs):.2f} / "
        f"{statistics.median(r.store_ack.p99 for r in rs):.2f}"
    )
    delivery = (
        "-"
        if sync
        else f"{statistics.median(r.delivery.p50 for r in rs):.1f} / "
        f"{statistics.median(r.delivery.p99 for r in rs):.1f}"
    )
    cpus = [r.broker_cpu_us_per_message for r in rs if r.broker_cpu_us_per_message]
    cpu = f"{statistics.median(cpus):.0f}" if cpus else "-"
    lost = sum(r.lost for r in rs)
    dup = sum(r.duplicates for r in rs)
    return (
        f"| {name} | {LABELS[system]} | {e2e_cell} | {ratio} | {publish} | {ack} "
        f"| {delivery} | {cpu} | {lost} / {dup} |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--sizes", default="1024,100", help="body bytes")
    parser.add_argument("--shapes", default="1x1,4x4", help="producers x consumers")
    parser.add_argument("--count", type=int, default=100_000, help="messages per run")
    parser.add_argument("--sync-count", type=int, default=2000, help="0: no sync row")
    parser.add_argument(
        "--open-rate",
        type=float,
        default=10_000,
        help="offered msg/s of the open-loop row; 0: none",
    )
    parser.add_argument("--open-seconds", type=float, default=10.0, help="its duration")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--quick", action="store_true", help="1 repetition, 20,000, 1x1")
    parser.add_argument("--json", help="also write every run's figures to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        child(options.child, options.spec)
        return 0
    if options.quick:
        options.repeat, options.count, options.shapes = 1, 20_000, "1x1"
        options.sync_count, options.open_seconds = 500, 3.0
    systems = [s for s in options.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    sizes = [int(s) for s in options.sizes.split(",")]
    plan = cases(
        sizes,
        options.shapes.split(","),
        options.count,
        options.sync_count,
        options.open_rate,
        options.open_seconds,
    )
    results: dict[tuple[str, str], list[RunResult]] = {}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for rep in range(options.repeat):
        for case in plan:
            for system in systems:
                label = f"[{rep + 1}/{options.repeat}] {case.name} {system}"
                r = measure(system, case.workload, label, options.quiet)
                results.setdefault((case.name, system), []).append(r)
                print(
                    f"{label}: e2e {r.e2e_rate:,.0f}/s publish {r.publish_rate:,.0f}/s "
                    f"ack p50 {r.store_ack.p50} ms lost {r.lost} dup {r.duplicates}",
                    file=sys.stderr,
                    flush=True,
                )
    print(f"{started}; {' '.join(['python', 'tests/bench/peers.py', *sys.argv[1:]])}")
    print(table(results, [c.name for c in plan]))
    if options.json:
        with open(options.json, "w") as out:
            rows = [
                {"case": case, "system": system, **r.as_dict()}
                for (case, system), runs in results.items()
                for r in runs
            ]
            json.dump(rows, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
