"""The parent side of a bench run: start the children, show progress, add up results.

Consumers start first, then the producers once every consumer says ``ready``; producers
connect, say ``ready`` and start sending together on the parent's ``go``. When every
producer has finished, the parent waits until the consumers have received as many
messages as were store-acked (at most ``drain_timeout``), then closes their stdin, which
tells them to write their results. Rates are counted from the first send of any producer:
publish to the last store-ack, end to end to the last delivery.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TextIO

from kiteq.bench.histogram import Latency, Percentiles
from kiteq.bench.tally import merge_bitmaps
from kiteq.bench.workload import Workload
from kiteq.core.errors import KiteQError

__all__ = ["BenchError", "ChildCommand", "ChildSpec", "ProgressLine", "Role", "RunResult", "run"]

_STDERR_LINES: Final = 40
_POLL_SECONDS: Final = 0.1


class BenchError(KiteQError):
    """A bench run could not complete (a child failed or timed out)."""


class Role(enum.Enum):
    PRODUCER = "producer"
    CONSUMER = "consumer"


@dataclasses.dataclass(frozen=True, slots=True)
class ChildSpec:
    """What one child process does; the parent passes it as the last argument (JSON)."""

    role: Role
    index: int
    workload: Workload
    # producers stop sending at this wall-clock time (ns), whatever count and duration say
    deadline_ns: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "role": self.role.value,
                "index": self.index,
                "workload": self.workload.to_json(),
                "deadline_ns": self.deadline_ns,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ChildSpec:
        fields = json.loads(text)
        return cls(
            Role(fields["role"]),
            int(fields["index"]),
            Workload.from_json(fields["workload"]),
            int(fields["deadline_ns"]),
        )


# (role, index) -> the command line of that child, without the spec argument
ChildCommand = Callable[[Role, int], Sequence[str]]


@dataclasses.dataclass(frozen=True, slots=True)
class RunResult:
    """One run's figures; rates in messages per second, latencies in milliseconds."""

    workload: Workload
    sent: int
    acked: int
    failed: int
    received: int
    unique: int
    duplicates: int
    lost: int
    publish_seconds: float
    e2e_seconds: float
    publish_rate: float
    e2e_rate: float
    store_ack: Percentiles
    delivery: Percentiles
    producer_cpu_seconds: float
    consumer_cpu_seconds: float
    # the broker's, from the go to the end of the drain (None: no meter given or readable)
    broker_cpu_seconds: float | None
    errors: Mapping[str, int]

    @property
    def broker_cpu_us_per_message(self) -> float | None:
        if self.broker_cpu_seconds is None or not self.acked:
            return None
        return round(self.broker_cpu_seconds / self.acked * 1e6, 1)

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["workload"] = json.loads(self.workload.to_json())
        data["store_ack"] = self.store_ack.as_dict()
        data["delivery"] = self.delivery.as_dict()
        data["errors"] = dict(self.errors)
        data["broker_cpu_us_per_message"] = self.broker_cpu_us_per_message
        return data


class ProgressLine:
    """The live progress line on *stream*: rewritten in place on a terminal, else every 5 s."""

    def __init__(self, stream: TextIO = sys.stderr, *, label: str = "") -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._label = f"{label}: " if label else ""
        self._last = 0.0
        self._width = 0

    def update(self, elapsed: float, sent: int, acked: int, received: int) -> None:
        now = time.monotonic()
        if now - self._last < (0.25 if self._tty else 5.0):
            return
        self._last = now
        rate = acked / elapsed if elapsed > 0 else 0.0
        text = (
            f"{self._label}{elapsed:6.1f}s sent {sent:,} acked {acked:,} "
            f"received {received:,} ({rate:,.0f} acked/s)"
        )
        if self._tty:
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def done(self) -> None:
        if self._tty and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()


class _Child:
    """One child process and what it has said so far (reader threads fill it in)."""

    def __init__(self, role: Role, index: int, argv: Sequence[str], env: Mapping[str, str]):
        self.role = role
        self.index = index
        self.ready = threading.Event()
        self.progress: dict[str, Any] = {}
        self.result: dict[str, Any] | None = None
        self.stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self.proc = subprocess.Popen(  # noqa: S603 - the caller's command for its own children
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env),
        )
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def name(self) -> str:
        return f"{self.role.value} {self.index}"

    def _read_stdout(self) -> None:
        for line in self.proc.stdout or ():
            try:
                event = json.loads(line)
            except ValueError:
                self.stderr.append(line.rstrip())
                continue
            kind = event.pop("event", "")
            if kind == "ready":
                self.ready.set()
            elif kind == "progress":
                self.progress = event
            elif kind == "result":
                self.progress = event
                self.result = event

    def _read_stderr(self) -> None:
        for line in self.proc.stderr or ():
            self.stderr.append(line.rstrip())

    def exited_early(self) -> bool:
        return self.proc.poll() is not None and self.result is None

    def failure(self, what: str) -> BenchError:
        tail = "\n".join(self.stderr)
        return BenchError(f"{self.name} {what} (exit code {self.proc.poll()}):\n{tail}")

    def go(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):  # gone: the next wait reports it
                self.proc.stdin.write("go\n")
                self.proc.stdin.flush()

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):  # the child is gone: nothing to tell
                self.proc.stdin.close()

    def finish(self, timeout: float) -> None:
        """Wait for the process (killing it after *timeout*) and its reader threads."""
        self.close_stdin()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for thread in self._threads:
            thread.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _wait(children: Sequence[_Child], until: Callable[[], bool], deadline: float) -> bool:
    while not until():
        for child in children:
            if child.exited_early():
                raise child.failure("exited")
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_SECONDS)
    return True


def _send_budget(workload: Workload) -> float:
    """Seconds producers may send: the duration, or a count at the target rate, or 10 min."""
    if workload.duration:
        return workload.duration
    if workload.rate:
        return workload.count / workload.rate * 1.5 + 10
    return 600.0


def run(
    workload: Workload,
    command: ChildCommand,
    *,
    progress: ProgressLine | None = None,
    drain_timeout: float = 30.0,
    start_timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
    broker_cpu: Callable[[], float | None] | None = None,
) -> RunResult:
    """Run *workload* with children started by *command*; bounded in time throughout.

    *broker_cpu* reads the broker's CPU seconds so far; it is read at the go and again when
    the consumers have everything.

    Raises:
        BenchError: A child exited without a result, or did not start or finish in time.
    """
    bench = _Run(workload, command, progress, start_timeout, env)
    try:
        bench.start_children()
        cpu_before = broker_cpu() if broker_cpu else None
        bench.send()
        bench.drain(drain_timeout)
        cpu_after = broker_cpu() if broker_cpu else None
        bench.collect()
    finally:
        bench.finish()
    cpu = None if cpu_before is None or cpu_after is None else round(cpu_after - cpu_before, 3)
    return _combine(
        workload,
        [p.result for p in bench.producers if p.result],
        [c.result for c in bench.consumers if c.result],
        cpu,
    )


class _Run:
    """The children of one run and its phases: start, send, drain, collect."""

    def __init__(
        self,
        workload: Workload,
        command: ChildCommand,
        progress: ProgressLine | None,
        start_timeout: float,
        env: Mapping[str, str] | None,
    ) -> None:
        self._workload = workload
        self._command = command
        self._progress = progress
        self._start_timeout = start_timeout
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._budget = _send_budget(workload)
        self._started = 0.0
        self.consumers: list[_Child] = []
        self.producers: list[_Child] = []

    def _start(self, role: Role, index: int, deadline_ns: int) -> _Child:
        spec = ChildSpec(role, index, self._workload, deadline_ns)
        return _Child(role, index, [*self._command(role, index), spec.to_json()], self._env)

    def _ready(self, children: list[_Child], among: list[_Child]) -> None:
        ready_by = time.monotonic() + self._start_timeout
        if not _wait(among, lambda: all(c.ready.is_set() for c in children), ready_by):
            late = next(c for c in children if not c.ready.is_set())
            raise late.failure(f"not ready within {self._start_timeout:.0f}s")

    def start_children(self) -> None:
        """Consumers first (they must be subscribed before anything is sent), then producers."""
        workload, timeout = self._workload, self._start_timeout
        far_ns = time.time_ns() + int((self._budget + timeout + 3600) * 1e9)
        self.consumers = [self._start(Role.CONSUMER, i, far_ns) for i in range(workload.consumers)]
        self._ready(self.consumers, self.consumers)
        send_deadline_ns = time.time_ns() + int((self._budget + 2 * timeout) * 1e9)
        self.producers = [
            self._start(Role.PRODUCER, i, send_deadline_ns) for i in range(workload.producers)
        ]
        self._ready(self.producers, [*self.producers, *self.consumers])

    def totals(self) -> tuple[int, int, int]:
        """(sent, acked, distinct received) so far; updates the progress line."""
        sent = sum(p.progress.get("sent", 0) for p in self.producers)
        acked = sum(p.progress.get("acked", 0) for p in self.producers)
        # distinct per consumer: a redelivery must not end the drain early
        distinct = sum(c.progress.get("distinct", 0) for c in self.consumers)
        if self._progress is not None:
            self._progress.update(time.monotonic() - self._started, sent, acked, distinct)
        return sent, acked, distinct

    def send(self) -> None:
        """Let the producers go and wait until each has its result."""
        for producer in self.producers:
            producer.go()
        self._started = time.monotonic()

        def produced() -> bool:
            self.totals()
            return all(p.result for p in self.producers)

        everyone = [*self.producers, *self.consumers]
        if not _wait(everyone, produced, self._started + self._start_timeout + self._budget + 60):
            late = next(p for p in self.producers if p.result is None)
            raise late.failure("did not finish in time")

    def drain(self, timeout: float) -> None:
        """Until the consumers received every acked message, at most *timeout* seconds."""
        if not self.consumers:
            return
        acked_total = self.totals()[1]
        everyone = [*self.producers, *self.consumers]
        _wait(everyone, lambda: self.totals()[2] >= acked_total, time.monotonic() + timeout)

    def collect(self) -> None:
        """Ask the consumers for their results and wait for them."""
        for consumer in self.consumers:
            consumer.close_stdin()
        consumers = self.consumers
        if not _wait(consumers, lambda: all(c.result for c in consumers), time.monotonic() + 30):
            late = next(c for c in consumers if c.result is None)
            raise late.failure("wrote no result")

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.done()
        for child in [*self.producers, *self.consumers]:
            child.finish(10)


def _combine(
    workload: Workload,
    produced: list[dict[str, Any]],
    consumed: list[dict[str, Any]],
    broker_cpu_seconds: float | None,
) -> RunResult:
    store_ack, delivery = Latency(), Latency()
    errors: dict[str, int] = {}
    for result in produced:
        store_ack.add_encoded(result["store_ack"])
        for name, count in result["errors"].items():
            errors[name] = errors.get(name, 0) + count
    for result in consumed:
        delivery.add_encoded(result["delivery"])
    starts = [r["first_send_ns"] for r in produced if r["sent"]]
    first_ns = min(starts) if starts else 0
    last_ack_ns = max((r["last_ack_ns"] for r in produced), default=0)
    last_receipt_ns = max((r["last_ns"] for r in consumed), default=0)
    acked = sum(r["acked"] for r in produced)
    received = sum(r["received"] for r in consumed)
    unique = merge_bitmaps(consumed)
    publish_seconds = max(last_ack_ns - first_ns, 0) / 1e9
    e2e_seconds = max(last_receipt_ns - first_ns, 0) / 1e9
    return RunResult(
        workload=workload,
        sent=sum(r["sent"] for r in produced),
        acked=acked,
        failed=sum(r["failed"] for r in produced),
        received=received,
        unique=unique,
        duplicates=received - unique,
        lost=max(acked - unique, 0) if workload.consumers else 0,
        publish_seconds=round(publish_seconds, 3),
        e2e_seconds=round(e2e_seconds, 3),
        publish_rate=round(acked / publish_seconds) if publish_seconds else 0.0,
        e2e_rate=round(unique / e2e_seconds) if e2e_seconds else 0.0,
        store_ack=store_ack.percentiles(),
        delivery=delivery.percentiles(),
        producer_cpu_seconds=round(sum(r["cpu"] for r in produced), 3),
        consumer_cpu_seconds=round(sum(r["cpu"] for r in consumed), 3),
        broker_cpu_seconds=broker_cpu_seconds,
        errors=errors,
    )
