"""The transport's floor for one synchronous publisher, beside the broker's figure (issue #12).

A bare grpc.aio stream-stream echo (uvloop server, as the broker runs; no store, no
logic) answers one ~1 KiB frame at a time, driven two ways: by a coroutine on the
client's loop, and by a plain thread waiting on a loop running in another thread (the
model of ``kiteq.client``'s blocking ``send()``). Then ``kiteq-bench -sync`` on the memory
store and on RocksDB (``fsync=batch``) in the same run. The difference between the echo
and the broker is what the broker and client add; the echo itself is what no code above
grpc.aio can remove.

    python tests/bench/grpc_floor.py --count 3000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO)]

from kiteq.bench.cpu import process_cpu  # noqa: E402
from kiteq.bench.target import bench_kiteq  # noqa: E402
from kiteq.bench.workload import Publish, Workload  # noqa: E402

_METHOD = "/floor.Echo/Session"
_WARMUP = 200
_PAYLOAD = 1100  # a 1 KiB body with its header, about


def _same(data: bytes) -> bytes:
    return data


async def _serve() -> None:
    async def session(frames: object, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        async for data in frames:  # type: ignore[attr-defined]
            await context.write(data)

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "floor.Echo",
        {
            "Session": grpc.stream_stream_rpc_method_handler(
                session, request_deserializer=_same, response_serializer=_same
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


class _Echo:
    """One open echo call; ``once`` sends a frame and waits for it to come back."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.call = self.channel.stream_stream(
            _METHOD, request_serializer=_same, response_deserializer=_same
        )()
        self.payload = os.urandom(_PAYLOAD)

    async def once(self) -> None:
        await self.call.write(self.payload)
        await self.call.read()

    async def close(self) -> None:
        await self.call.done_writing()
        await self.channel.close()


def _timed(count: int, once: Callable[[], None]) -> tuple[list[float], float]:
    for _ in range(_WARMUP):
        once()
    latencies = []
    cpu = time.process_time()
    for _ in range(count):
        started = time.perf_counter()
        once()
        latencies.append(time.perf_counter() - started)
    return latencies, (time.process_time() - cpu) / count


async def _on_loop(port: int, count: int) -> tuple[list[float], float]:
    echo = _Echo(port)
    for _ in range(_WARMUP):
        await echo.once()
    latencies = []
    cpu = time.process_time()
    for _ in range(count):
        started = time.perf_counter()
        await echo.once()
        latencies.append(time.perf_counter() - started)
    spent = (time.process_time() - cpu) / count
    await echo.close()
    return latencies, spent


def _from_thread(port: int, count: int) -> tuple[list[float], float]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(work: Awaitable[None]) -> None:
        asyncio.run_coroutine_threadsafe(work, loop).result()  # type: ignore[arg-type]

    async def make() -> _Echo:
        return _Echo(port)

    echo = asyncio.run_coroutine_threadsafe(make(), loop).result()
    try:
        return _timed(count, lambda: run(echo.once()))
    finally:
        run(echo.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join()


def _row(name: str, latencies: list[float], client_us: float, server_us: float | None) -> str:
    ordered = sorted(latencies)

    def ms(q: float) -> str:
        return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3:.3f}"

    server = "-" if server_us is None else f"{server_us:.0f}"
    return f"{name:<44} {ms(0.5):>8} {ms(0.99):>8} {client_us:>10.0f} {server:>10}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        import uvloop

        uvloop.run(_serve())
        return 0
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True
    )
    assert server.stdout is not None
    print(
        f"{'one message at a time':<44} {'p50 ms':>8} {'p99 ms':>8} {'client us':>10} {'server us':>10}"
    )
    try:
        port = int(server.stdout.readline())
        count = options.count
        drives: list[tuple[str, Callable[[], tuple[list[float], float]]]] = [
            ("grpc.aio echo, caller on the loop", lambda: asyncio.run(_on_loop(port, count))),
            ("grpc.aio echo, caller thread + loop thread", lambda: _from_thread(port, count)),
        ]
        for name, drive in drives:
            before = process_cpu(server.pid) or 0.0
            latencies, client_us = drive()
            server_us = ((process_cpu(server.pid) or 0.0) - before) / count * 1e6
            print(_row(name, latencies, client_us * 1e6, server_us), flush=True)
    finally:
        server.kill()
        server.wait()
    for store in ("memory", "rocksdb"):
        workload = Workload(count=options.count, consumers=0, publish=Publish.SYNC)
        result = bench_kiteq(workload, store=store).result
        p = result.store_ack
        print(
            f"{'kiteq-bench -sync -consumers 0, ' + store:<44} {p.p50:>8.3f} {p.p99:>8.3f} "
            f"{result.producer_cpu_seconds / max(1, result.acked) * 1e6:>10.0f} "
            f"{result.broker_cpu_us_per_message or 0:>10.0f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
