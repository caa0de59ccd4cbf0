"""The child side of a bench run: counters, histograms and the JSON lines to the parent.

A child process (producer or consumer, of any system) writes one JSON object per line on
stdout: ``{"event": "ready"}`` once it is connected, ``progress`` lines twice a second,
and one ``result`` line at the end. ``kiteq.bench.run`` reads them; it writes ``go`` to
the producers' stdin once all of them are ready, and closes the consumers' stdin when they
have everything.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
import zlib
from typing import Any, Final

from kiteq.bench.cpu import cpu_seconds
from kiteq.bench.histogram import Latency
from kiteq.bench.workload import read_stamp

__all__ = ["ConsumerTally", "ProducerTally", "Reporter", "merge_bitmaps"]

PROGRESS_SECONDS: Final = 0.5


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class ProducerTally:
    """A producer's sends, store-acks, failures and publish→store-ack latencies.

    ``sent`` is counted by the sending thread; ``acked``/``failed`` may be called from any
    thread (a client's loop thread, a pool of transactional senders).
    """

    def __init__(self) -> None:
        self.sent = 0
        self.acked_count = 0
        self.failed = 0
        self.first_send_ns = 0
        self.last_ack_ns = 0
        self.errors: dict[str, int] = {}
        self.latency = Latency()
        self._settled = threading.Condition()

    def sending(self, intended_ns: int) -> None:
        if self.sent == 0:
            self.first_send_ns = intended_ns
        self.sent += 1

    def acked(self, intended_ns: int) -> None:
        now = time.time_ns()
        with self._settled:
            self.acked_count += 1
            self.last_ack_ns = max(self.last_ack_ns, now)
            self.latency.record_us((now - intended_ns) // 1000)
            self._settled.notify_all()

    def failed_one(self, error: BaseException) -> None:
        with self._settled:
            self.failed += 1
            name = type(error).__name__
            self.errors[name] = self.errors.get(name, 0) + 1
            self._settled.notify_all()

    def wait_settled(self, timeout: float) -> bool:
        """Wait until every send has an outcome; False if *timeout* ran out first."""
        with self._settled:
            return self._settled.wait_for(
                lambda: self.acked_count + self.failed >= self.sent, timeout
            )

    def progress(self) -> dict[str, Any]:
        return {"sent": self.sent, "acked": self.acked_count, "failed": self.failed}

    def result(self) -> dict[str, Any]:
        with self._settled:
            return {
                **self.progress(),
                "first_send_ns": self.first_send_ns,
                "last_ack_ns": self.last_ack_ns,
                "errors": dict(self.errors),
                "store_ack": self.latency.encode(),
            }


class ConsumerTally:
    """A consumer's receipts: count, publish→delivery latency, which messages (bitmaps).

    Called from one thread (the consumer's handler thread).
    """

    def __init__(self) -> None:
        self.received = 0
        self.repeated = 0  # received again by this consumer (a redelivery)
        self.first_ns = 0
        self.last_ns = 0
        self.latency = Latency()
        self._seen: dict[int, bytearray] = {}

    def record(self, body: bytes) -> None:
        now = time.time_ns()
        intended_ns, producer, seq = read_stamp(body)
        bitmap = self._seen.get(producer)
        if bitmap is None:
            bitmap = self._seen[producer] = bytearray()
        byte = seq >> 3
        if byte >= len(bitmap):
            bitmap.extend(bytes(max(byte + 1 - len(bitmap), len(bitmap))))
        bit = 1 << (seq & 7)
        if bitmap[byte] & bit:
            self.repeated += 1
        bitmap[byte] |= bit
        if self.received == 0:
            self.first_ns = now
        self.received += 1
        self.last_ns = now
        self.latency.record_us((now - intended_ns) // 1000)

    def progress(self) -> dict[str, Any]:
        return {"received": self.received, "distinct": self.received - self.repeated}

    def result(self) -> dict[str, Any]:
        return {
            **self.progress(),
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "delivery": self.latency.encode(),
            "seen": {
                str(p): base64.b64encode(zlib.compress(bytes(b))).decode("ascii")
                for p, b in self._seen.items()
            },
        }


def merge_bitmaps(results: list[dict[str, Any]]) -> int:
    """Distinct messages the consumers' ``seen`` bitmaps name together."""
    merged: dict[str, int] = {}
    for result in results:
        for producer, encoded in result["seen"].items():
            bits = int.from_bytes(zlib.decompress(base64.b64decode(encoded)), "little")
            merged[producer] = merged.get(producer, 0) | bits
    return sum(bits.bit_count() for bits in merged.values())


class Reporter:
    """Writes a tally's progress lines from a daemon thread, then its result line."""

    def __init__(self, tally: ProducerTally | ConsumerTally) -> None:
        self._tally = tally
        self._stop = threading.Event()
        self._cpu0 = cpu_seconds()
        self._thread = threading.Thread(target=self._loop, name="bench-progress", daemon=True)
        self._thread.start()

    def ready(self) -> None:
        _emit("ready")

    def ready_then_go(self) -> None:
        """Say ready, then wait for the parent's ``go`` line: producers start together."""
        self.ready()
        sys.stdin.readline()

    def _loop(self) -> None:
        while not self._stop.wait(PROGRESS_SECONDS):
            _emit("progress", **self._tally.progress())

    def finish(self, **extra: Any) -> None:
        """Stop the progress lines and write the result (with this process's CPU seconds)."""
        self._stop.set()
        self._thread.join(5)
        _emit("result", **self._tally.result(), cpu=round(cpu_seconds() - self._cpu0, 3), **extra)
