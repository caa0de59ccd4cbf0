"""Client-only throughput and CPU cost: the client library against a minimal fake broker.

Not a test: run it by hand before and after a change to the client's hot path. A fake
broker runs in its own process (grpc.aio; it store-acks every publish at once and pushes
deliveries to consumers with ``maxInFlight`` credit, counting acks); every case runs in a
fresh client process that measures its own CPU (all threads) with ``getrusage``::

    python tests/bench/client_bench.py                          # every case, 100 B and 1 KiB
    python tests/bench/client_bench.py --cases producer --sizes 1024 --count 200000 --repeat 5

Cases: ``producer`` (``Producer.send_async`` in a loop, then wait for every future, as
``e2e_bench.py`` does), ``async_producer`` (``await AsyncProducer.send_async`` in a
loop, then gather) and ``consumer`` (``Consumer`` with a plain sync handler). Columns:
messages/s (wall clock of the measured part) and CPU microseconds per message of the
client process; min and median over ``--repeat`` runs. Every run is bounded by
``--count`` messages and ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
for _part in ("", "binding", "store", "handler", "client", "ops", "proto"):
    sys.path.insert(0, str(REPO / _part))

from kiteq.bench.cpu import cpu_seconds, thread_cpu, thread_delta  # noqa: E402
from tests.bench.countdown import Countdown  # noqa: E402

TOPIC = "bench"
MESSAGE_TYPE = "tick"
CASES = ("producer", "async_producer", "consumer")


# -- the fake broker (its own process) ---------------------------------------------------


def run_broker(push_batch: int) -> None:
    import grpc

    from kiteq.proto.v1 import broker_pb2, common_pb2

    async def session(
        requests: AsyncIterator[broker_pb2.ClientFrame], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        frames = aiter(requests)
        try:
            first = await anext(frames)
        except StopAsyncIteration:
            return
        opened = broker_pb2.ServerFrame(
            opened=broker_pb2.Opened(
                broker="bench",
                protocolVersion=1,
                maxBatchMessages=1000,
                maxBatchBytes=8 * 1024 * 1024,
                maxBodyBytes=4 * 1024 * 1024,
            )
        )
        await context.write(opened.SerializeToString())
        if first.open.maxInFlight > 0:
            await consume_session(first.open, frames, context)
        else:
            await produce_session(frames, context)

    async def produce_session(
        frames: AsyncIterator[broker_pb2.ClientFrame], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        store_ack = broker_pb2.StoreAck
        async for frame in frames:
            if frame.WhichOneof("kind") != "publish":
                continue
            acks = [
                store_ack(messageId=m.header.messageId, status=True) for m in frame.publish.messages
            ]
            reply = broker_pb2.ServerFrame(storeAcks=broker_pb2.StoreAckBatch(acks=acks))
            await context.write(reply.SerializeToString())

    async def consume_session(
        open_frame: broker_pb2.Open,
        frames: AsyncIterator[broker_pb2.ClientFrame],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        # clientId "bench:<count>:<size>" says what to push
        _, count_text, size_text = open_frame.clientId.split(":")[:3]
        count, size = int(count_text), int(size_text)
        credit_limit = open_frame.maxInFlight
        batch = min(push_batch, credit_limit)
        body = os.urandom(size)
        now = int(time.time())
        templates = []
        for t in range(8):  # a few distinct frames, cycled: ids unique within a frame
            deliveries = [
                broker_pb2.Delivery(
                    message=common_pb2.Message(
                        header=common_pb2.Header(
                            messageId=f"{t:08x}{i:024x}",
                            topic=TOPIC,
                            messageType=MESSAGE_TYPE,
                            expiredTime=now + 3600,
                            deliverLimit=100,
                            groupId="bench-producer",
                            commit=True,
                            createTime=now,
                        ),
                        body=body,
                    ),
                    attempt=1,
                )
                for i in range(batch)
            ]
            frame = broker_pb2.ServerFrame(
                deliveries=broker_pb2.DeliveryBatch(deliveries=deliveries)
            )
            templates.append(frame.SerializeToString())
        pushed = acked = 0
        wake = asyncio.Event()
        done = False

        async def reader() -> None:
            nonlocal acked, done
            try:
                async for frame in frames:
                    if frame.WhichOneof("kind") == "acks":
                        acked += len(frame.acks.acks)
                        wake.set()
            finally:
                done = True
                wake.set()

        task = asyncio.create_task(reader())
        try:
            turn = 0
            while not done:
                while pushed < count and pushed - acked + batch <= credit_limit:
                    n = min(batch, count - pushed)
                    if n == batch:
                        payload = templates[turn % len(templates)]
                        turn += 1
                    else:
                        partial = broker_pb2.ServerFrame()
                        partial.ParseFromString(templates[0])
                        del partial.deliveries.deliveries[n:]
                        payload = partial.SerializeToString()
                    await context.write(payload)
                    pushed += n
                await wake.wait()
                wake.clear()
        finally:
            task.cancel()

    async def main() -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ]
        )
        handler = grpc.method_handlers_generic_handler(
            "kiteq.proto.v1.Broker",
            {
                "Session": grpc.stream_stream_rpc_method_handler(
                    session,
                    request_deserializer=broker_pb2.ClientFrame.FromString,
                    response_serializer=lambda payload: payload,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(json.dumps({"port": port}), flush=True)
        # parent closes our stdin to stop us
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop(0)

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


# -- the client cases (a fresh process each) ------------------------------------------------


def case_producer(address: str, count: int, size: int, deadline: float) -> dict[str, Any]:
    from kiteq.client import Message, Producer

    body = os.urandom(size)
    with Producer(brokers=[address], group_id="bench-producer", secret_key="") as producer:
        producer.send(Message(topic=TOPIC, message_type=MESSAGE_TYPE, body=body))  # connect
        threads0 = thread_cpu()
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        futures = []
        send_async = producer.send_async
        for i in range(count):
            futures.append(send_async(Message(topic=TOPIC, message_type=MESSAGE_TYPE, body=body)))
            if i & 1023 == 0 and time.time() > deadline:
                break
        failed = 0
        for future in futures:
            if future.exception(max(1.0, deadline + 10 - time.time())) is not None:
                failed += 1
        wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
        threads = thread_delta(threads0, thread_cpu())
    return {
        "messages": len(futures),
        "failed": failed,
        "wall": wall,
        "cpu": cpu,
        "threads": threads,
    }


def case_async_producer(address: str, count: int, size: int, deadline: float) -> dict[str, Any]:
    from kiteq.client import AsyncProducer, Message

    body = os.urandom(size)

    async def main() -> dict[str, Any]:
        async with AsyncProducer(brokers=[address], group_id="bench-producer") as producer:
            await producer.send(Message(topic=TOPIC, message_type=MESSAGE_TYPE, body=body))
            cpu0, wall0 = cpu_seconds(), time.perf_counter()
            futures = []
            send_async = producer.send_async
            for i in range(count):
                message = Message(topic=TOPIC, message_type=MESSAGE_TYPE, body=body)
                futures.append(await send_async(message))
                if i & 1023 == 0 and time.time() > deadline:
                    break
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            failed = sum(isinstance(o, BaseException) for o in outcomes)
            wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
        return {"messages": len(futures), "failed": failed, "wall": wall, "cpu": cpu}

    return asyncio.run(main())


def case_consumer(address: str, count: int, size: int, deadline: float) -> dict[str, Any]:
    from kiteq.client import Binding, Consumer

    countdown = Countdown(count)
    threads0 = thread_cpu()
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    consumer = Consumer(
        brokers=[address],
        group_id="bench-consumer",
        bindings=[Binding.direct(TOPIC, MESSAGE_TYPE)],
        handler=countdown,
        client_id=f"bench:{count}:{size}",
        max_in_flight=2000,
    )
    with consumer:
        countdown.done.wait(max(0.0, deadline - time.time()))
        wall = time.perf_counter() - wall0
        threads = thread_delta(threads0, thread_cpu())
    # closing sends the last acks
    cpu = cpu_seconds() - cpu0
    seen = countdown.seen
    return {"messages": seen, "failed": count - seen, "wall": wall, "cpu": cpu, "threads": threads}


def run_case(case: str, address: str, count: int, size: int, deadline: float) -> None:
    runner = {
        "producer": case_producer,
        "async_producer": case_async_producer,
        "consumer": case_consumer,
    }[case]
    print(json.dumps(runner(address, count, size, deadline)), flush=True)


# -- orchestration --------------------------------------------------------------------------


def child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--sizes", default="100,1024")
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=30.0, help="per run")
    parser.add_argument("--push-batch", type=int, default=250, help="deliveries per frame")
    parser.add_argument("--role", choices=["broker", "case"], help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "broker":
        run_broker(args.push_batch)
        return
    if args.role == "case":
        run_case(args.case, args.address, args.count, int(args.sizes), args.deadline)
        return

    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")
    sizes = [int(s) for s in args.sizes.split(",")]
    broker = child("--role", "broker", "--push-batch", str(args.push_batch))
    assert broker.stdout is not None
    assert broker.stdin is not None
    address = f"127.0.0.1:{json.loads(broker.stdout.readline())['port']}"
    rows = []
    try:
        for case in cases:
            for size in sizes:
                runs = []
                for _ in range(args.repeat):
                    deadline = time.time() + args.max_seconds
                    proc = child(
                        "--role", "case", "--case", case, "--address", address,
                        "--count", str(args.count), "--sizes", str(size),
                        "--deadline", str(deadline),
                    )  # fmt: skip
                    out, _ = proc.communicate(timeout=args.max_seconds + 60)
                    if proc.returncode != 0:
                        raise RuntimeError(f"{case} size={size} failed with {proc.returncode}")
                    runs.append(json.loads(out.strip().splitlines()[-1]))
                rates = [r["messages"] / r["wall"] for r in runs]
                costs = [r["cpu"] / r["messages"] * 1e6 for r in runs]
                row = {
                    "case": case,
                    "size": size,
                    "messages": int(statistics.median(r["messages"] for r in runs)),
                    "failed": int(sum(r["failed"] for r in runs)),
                    "msgs_s_max": round(max(rates)),
                    "msgs_s_median": round(statistics.median(rates)),
                    "cpu_us_min": round(min(costs), 1),
                    "cpu_us_median": round(statistics.median(costs), 1),
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        broker.stdin.close()
        try:
            broker.wait(10)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait(10)
    header = (
        f"{'case':<15} {'size':>5} {'msgs':>7} {'fail':>4} "
        f"{'msg/s max':>10} {'msg/s med':>10} {'cpu us min':>10} {'cpu us med':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['case']:<15} {r['size']:>5} {r['messages']:>7} {r['failed']:>4} "
            f"{r['msgs_s_max']:>10} {r['msgs_s_median']:>10} "
            f"{r['cpu_us_min']:>10} {r['cpu_us_median']:>10}"
        )


if __name__ == "__main__":
    main()
