"""What a bench run does, and the stamp every message body carries.

The same ``Workload`` goes to every child process as JSON. Each message body starts with a
16-byte stamp: the intended send time (nanoseconds, ``time.time_ns``: the one clock every
process on the host shares), the producer's index and the message's sequence number. The
consumer reads the delivery latency and the message's identity from it; the rest of the
body is filler.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import struct
import time
from typing import Any, Final

from kiteq.core.errors import ConfigError

__all__ = ["STAMP_BYTES", "Pacer", "Publish", "Workload", "filler", "read_stamp", "stamped_body"]

_STAMP: Final = struct.Struct("<qII")
STAMP_BYTES: Final = _STAMP.size


class Publish(enum.Enum):
    """How a producer waits for its store-acks."""

    # send_async in a loop, at most max_pending unacked: the producer's best rate
    PIPELINED = "pipelined"
    # one send at a time, each waiting for its store-ack: a synchronous publisher's latency
    SYNC = "sync"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """One run's load; *count* and *duration* are totals over all producers.

    Attributes:
        producers: Producer processes.
        consumers: Consumer processes (one consumer group: each message is consumed once).
        size: Body bytes, at least ``STAMP_BYTES``.
        count: Messages in all, split evenly among producers; 0 = bounded by *duration*.
        duration: Seconds producers keep sending; 0 = bounded by *count*.
        rate: Target messages per second over all producers (open loop: latency counts
            from each message's scheduled time, so a stalled broker is not hidden);
            0 = as fast as each producer can.
        publish: Pipelined or synchronous sends.
        window: Unacknowledged sends per pipelined producer (KiteQ's ``max_pending``, the
            peers' unconfirmed publishes): equal for every system, so that latencies at the
            maximum rate (the window's queueing time, by Little's law) compare.
        tx_share: Share of messages (0..1) sent as transactional and committed at once.
        topic: Topic (and queue, stream) name.
        keys: Ordering keys (issue #16) the messages cycle through (message *n* of a
            producer gets key ``k{n % keys}``); 0 = no key.
    """

    producers: int = 1
    consumers: int = 1
    size: int = 1024
    count: int = 100_000
    duration: float = 0.0
    rate: float = 0.0
    publish: Publish = Publish.PIPELINED
    window: int = 1000
    tx_share: float = 0.0
    topic: str = "bench"
    keys: int = 0

    def __post_init__(self) -> None:
        if self.producers < 1 or self.consumers < 0:
            raise ConfigError("producers must be >= 1 and consumers >= 0")
        if self.size < STAMP_BYTES:
            raise ConfigError(f"size must be >= {STAMP_BYTES} bytes (the stamp), got {self.size}")
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if self.count < 0 or self.duration < 0 or self.rate < 0:
            raise ConfigError("count, duration and rate must be >= 0")
        if self.count == 0 and self.duration == 0:
            raise ConfigError("give a count or a duration")
        if not 0.0 <= self.tx_share <= 1.0:
            raise ConfigError(f"tx share must be within 0..1, got {self.tx_share}")
        if self.keys < 0:
            raise ConfigError(f"keys must be >= 0, got {self.keys}")

    def share(self, producer: int) -> int:
        """Messages producer number *producer* sends (0 = until the duration ends)."""
        base, extra = divmod(self.count, self.producers)
        return base + (1 if producer < extra else 0)

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "publish": self.publish.value})

    @classmethod
    def from_json(cls, text: str) -> Workload:
        fields: dict[str, Any] = json.loads(text)
        fields["publish"] = Publish(fields["publish"])
        return cls(**fields)


def stamped_body(filler: bytes, intended_ns: int, producer: int, seq: int) -> bytes:
    """*filler* (``size`` bytes) with its first ``STAMP_BYTES`` replaced by the stamp."""
    return _STAMP.pack(intended_ns, producer, seq) + filler[STAMP_BYTES:]


def read_stamp(body: bytes) -> tuple[int, int, int]:
    """(intended send time in ns, producer index, sequence number) of a stamped body."""
    intended_ns, producer, seq = _STAMP.unpack_from(body)
    return intended_ns, producer, seq


def filler(size: int) -> bytes:
    """Random bytes, so no store or transport compresses them away."""
    return os.urandom(size)


class Pacer:
    """Intended send times of one producer: at once (no rate) or on an open-loop schedule.

    Behind schedule, the next message is due at once with its scheduled time, so the
    lateness shows up in the latencies instead of quietly lowering the rate.
    """

    def __init__(self, rate: float, started_ns: int) -> None:
        self._interval_ns = int(1e9 / rate) if rate > 0 else 0
        self._next_ns = started_ns

    def take(self) -> tuple[int, float]:
        """(the next message's scheduled time in ns, seconds to wait before sending it)."""
        if self._interval_ns == 0:
            return time.time_ns(), 0.0
        due = self._next_ns
        self._next_ns += self._interval_ns
        wait = due - time.time_ns()
        # sleeping shorter than ~0.2 ms overshoots more than it saves
        return due, wait / 1e9 if wait > 200_000 else 0.0

    def next(self) -> int:
        """``take``, sleeping the calling thread until the message is due."""
        due, wait = self.take()
        if wait:
            time.sleep(wait)
        return due
