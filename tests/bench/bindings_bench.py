"""Many regex bindings must not slow down the broker (issue #9): real processes on loopback.

One broker process per run; producers and the consumer are separate processes.

1. **Unrelated topic.** A producer publishes to ``other`` (no bindings) as fast as it can
   while a second producer publishes messages of a fresh type each (``n00042-<seq>``) to
   ``trade`` at a fixed rate, so that every one of them misses the route cache. Measured
   twice: *without* any binding on ``trade``, then *with* one consumer holding the maximum
   allowed regex bindings there (``maxBindingsPerGroupTopic`` distinct patterns
   ``^n00000-`` ... each matching some of the new types; it receives and acks them).
   Printed: both publish rates of ``other``, their ratio (must be >= 50%), and that no
   publish timed out or failed.
2. **New types on the bound topic.** Fresh-type messages published to ``trade`` as fast as
   possible, consumed by one group holding one regex binding, then the maximum.
3. **Expensive patterns.** Part 1's unrelated topic again, now beside a consumer whose
   maximum of patterns make RE2's DFA build a state per character (``[ab]{40}a[ab]{10}``,
   unanchored) fed random new types at ``--hostile-rate``: their matching runs in the
   broker's route thread, so the unrelated rate is printed against part 1's baseline,
   with the hostile producer's own (slow) store-acks. Informational: not in the verdict.

    python tests/bench/bindings_bench.py                 # defaults: 10 s per run
    python tests/bench/bindings_bench.py --seconds 20 --bindings 1000 --db memory

Loops are bounded by time; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO)]

from tests.e2e.broker_process import BrokerProcess, write_config  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

BOUND = "trade"
UNRELATED = "other"
SECRET = "bench"
# outstanding sends per producer; beyond it the producer waits for the oldest store-ack
WINDOW = 2000
SEND_TIMEOUT = 10.0


def pattern(i: int, style: str) -> str:
    if style == "hostile":
        # unanchored counted repetitions: RE2's DFA builds a new state for nearly every
        # character of a random a/b type; (?:q<i>)? only makes each pattern distinct
        return f"[ab]{{{40 + i % 40}}}a[ab]{{{10 + i % 20}}}(?:q{i})?"
    return f"^n{i:05d}-"


def message_type(seq: int, fresh: int, style: str, rng: random.Random) -> str:
    if style == "hostile":
        return "".join(rng.choice("ab") for _ in range(200)) + f"-{seq}"
    return f"n{seq % fresh:05d}-{seq}" if fresh else "tick"


def run_producer(
    address: str, topic: str, fresh: int, rate: float, seconds: float, style: str
) -> None:
    """Publish for *seconds*; *fresh* > 0: each message a new type ``n<seq % fresh>-<seq>``."""
    from kiteq.client import Message, Producer
    from kiteq.core.errors import PublishTimeoutError

    sent = acked = failed = timeouts = 0
    worst = 0.0
    rng = random.Random(seconds)
    pending: collections.deque[tuple[float, Any]] = collections.deque()

    def settle(item: tuple[float, Any]) -> None:
        nonlocal acked, failed, timeouts, worst
        started, future = item
        try:
            future.result(SEND_TIMEOUT + 5)
            acked += 1
        except PublishTimeoutError:
            timeouts += 1
        except Exception:  # noqa: BLE001 - counted and reported
            failed += 1
        worst = max(worst, time.monotonic() - started)

    with Producer(
        brokers=[address], group_id=f"{topic}-producer", secret_key=SECRET, timeout=SEND_TIMEOUT
    ) as producer:
        begin = time.monotonic()
        end = begin + seconds
        while (now := time.monotonic()) < end:
            if rate > 0 and sent >= (now - begin) * rate:
                time.sleep(min(0.001, end - now))
                continue
            kind = message_type(sent, fresh, style, rng) if fresh else "tick"
            message = Message(topic=topic, message_type=kind, body=b"x" * 100)
            pending.append((time.monotonic(), producer.send_async(message)))
            sent += 1
            while len(pending) >= WINDOW:
                settle(pending.popleft())
        while pending:
            settle(pending.popleft())
        elapsed = time.monotonic() - begin
    result = {
        "sent": sent,
        "acked": acked,
        "failed": failed,
        "timeouts": timeouts,
        "seconds": elapsed,
        "rate": acked / elapsed,
        "worst_ack_seconds": worst,
    }
    print(json.dumps(result), flush=True)


def run_consumer(address: str, bindings: int, seconds: float, style: str) -> None:
    from kiteq.client import Binding, Consumer, ReceivedMessage

    received = 0

    def handle(message: ReceivedMessage) -> bool:
        nonlocal received
        received += 1
        return True

    with Consumer(
        brokers=[address],
        group_id="bench-consumer",
        secret_key=SECRET,
        bindings=[Binding.regex(BOUND, pattern(i, style)) for i in range(bindings)],
        handler=handle,
        max_in_flight=2000,
    ):
        print(json.dumps({"ready": True}), flush=True)
        time.sleep(seconds)  # a benchmark phase's length, not synchronisation
    print(json.dumps({"received": received}), flush=True)


def child(role: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, *args], stdout=subprocess.PIPE, text=True
    )


def read_json(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    result: dict[str, dict[str, Any]] = {}

    def reader() -> None:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line:
            result["value"] = json.loads(line)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    if "value" not in result:
        raise RuntimeError(f"no result from {proc.args!r}")
    return result["value"]


def bound_patterns(broker: BrokerProcess) -> int:
    import grpc

    from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc

    with grpc.insecure_channel(broker.address) as channel:
        reply = admin_pb2_grpc.AdminStub(channel).ListBindings(
            admin_pb2.ListBindingsRequest(topic=BOUND), timeout=10
        )
    return len(reply.bindings)


def run(
    db: str,
    *,
    seconds: float,
    bindings: int,
    max_bindings: int,
    producers: Sequence[tuple[str, int, float]],
    style: str = "plain",
) -> list[dict[str, Any]]:
    """One broker; a consumer with *bindings* regex bindings (0: none); *producers*."""
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(
            Path(tmp),
            db=db.replace("{tmp}", tmp),
            extra={
                "deliverySeconds": 30,
                "recoverSeconds": 5,
                "maxBindingsPerGroupTopic": max_bindings,
                "recievePermitsPerSecond": 1_000_000,
            },
        )
        broker = BrokerProcess(config)
        broker.start()
        procs: list[subprocess.Popen[str]] = []
        try:
            if bindings:
                consumer = child(
                    "consumer", broker.address, str(bindings), str(seconds + 60), style
                )
                procs.append(consumer)
                read_json(consumer, 60)
                wait_until(
                    lambda: bound_patterns(broker) >= bindings, 30, "the consumer's bindings"
                )
            started = [
                child("producer", broker.address, topic, str(fresh), str(rate), str(seconds), style)
                for topic, fresh, rate in producers
            ]
            procs.extend(started)
            return [read_json(p, seconds + 60) for p in started]
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(10)
                if proc.stdout is not None:
                    proc.stdout.close()
            broker.stop_quietly()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--role", choices=["producer", "consumer"])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument(
        "--bindings", type=int, default=1000, help="regex bindings (maxBindingsPerGroupTopic)"
    )
    parser.add_argument(
        "--fresh-rate", type=float, default=2000.0, help="new-type messages/s during part 1"
    )
    parser.add_argument(
        "--hostile-rate", type=float, default=50.0, help="expensive new types/s in part 3"
    )
    parser.add_argument("--db", choices=["rocksdb", "memory"], default="rocksdb")
    options, rest = parser.parse_known_args()
    if options.role == "producer":
        address, topic, types, rate, seconds, style = rest
        run_producer(address, topic, int(types), float(rate), float(seconds), style)
        return 0
    if options.role == "consumer":
        address, count, seconds, style = rest
        run_consumer(address, int(count), float(seconds), style)
        return 0

    db = "rocksdb://{tmp}/db?fsync=batch" if options.db == "rocksdb" else "memory://"
    n, seconds = options.bindings, options.seconds
    background = (BOUND, n, options.fresh_rate)
    print(
        f"# {options.db}, {seconds:g} s per run; {n} regex bindings; fresh types on "
        f"{BOUND!r} at {options.fresh_rate:g}/s during part 1",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {}
    for label, bindings in (("without", 0), ("with", n)):
        runs[label] = run(
            db,
            seconds=seconds,
            bindings=bindings,
            max_bindings=n,
            producers=[(UNRELATED, 0, 0.0), background],
        )
        other, fresh = runs[label]
        print(
            f"unrelated topic, {label} the bindings: {other['rate']:,.0f} msg/s "
            f"(worst store-ack {other['worst_ack_seconds']:.3f} s); fresh types on {BOUND!r}: "
            f"{fresh['rate']:,.0f} msg/s",
            flush=True,
        )
    ratio = runs["with"][0]["rate"] / runs["without"][0]["rate"]
    results = [r for rs in runs.values() for r in rs]
    timeouts = sum(r["timeouts"] for r in results)
    failed = sum(r["failed"] for r in results)
    print(f"ratio with/without: {ratio:.0%} (must be >= 50%)")
    print(f"publishes timed out: {timeouts}, failed: {failed}")

    for bindings in (1, n):
        # with one binding (^n00000-) every type is n00000-<seq>: as fresh, and all matched
        (fresh,) = run(
            db,
            seconds=seconds,
            bindings=bindings,
            max_bindings=n,
            producers=[(BOUND, bindings, 0.0)],
        )
        timeouts += fresh["timeouts"]
        failed += fresh["failed"]
        print(
            f"fresh types on {BOUND!r}, consumer with {bindings} regex binding(s): "
            f"{fresh['rate']:,.0f} msg/s (worst store-ack {fresh['worst_ack_seconds']:.3f} s, "
            f"timed out {fresh['timeouts']}, failed {fresh['failed']})",
            flush=True,
        )

    # 3. expensive patterns: their matching runs in the broker's route thread; the
    # unrelated topic must not notice much (the hostile group's own publishes may wait)
    other, hostile = run(
        db,
        seconds=seconds,
        bindings=n,
        max_bindings=n,
        producers=[(UNRELATED, 0, 0.0), (BOUND, n, options.hostile_rate)],
        style="hostile",
    )
    timeouts += other["timeouts"]
    failed += other["failed"]
    hostile_ratio = other["rate"] / runs["without"][0]["rate"]
    print(
        f"unrelated topic beside {n} DFA-expensive patterns fed new types at "
        f"{options.hostile_rate:g}/s: {other['rate']:,.0f} msg/s = {hostile_ratio:.0%} "
        f"(worst store-ack {other['worst_ack_seconds']:.3f} s); the expensive types: "
        f"{hostile['rate']:,.1f} msg/s, worst store-ack {hostile['worst_ack_seconds']:.1f} s, "
        f"timed out {hostile['timeouts']}",
        flush=True,
    )
    ok = ratio >= 0.5 and timeouts == 0 and failed == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
