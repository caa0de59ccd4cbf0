"""Store throughput: save / reschedule / delete rates per backend, batch size and callers.

Not a test: run it by hand to see what group commit buys and what a call costs the event
loop. Every phase is bounded by a record count and a time limit::

    python tests/bench/store_bench.py                       # memory and rocksdb (fsync=batch)
    python tests/bench/store_bench.py --fsync batch,never --callers 1,16 --max-seconds 2
    python tests/bench/store_bench.py --backends mysql      # the local MariaDB (--mysql-url)
    python tests/bench/store_bench.py --groups 1            # reschedules carry group state

MySQL runs use fresh databases (``kqbench_<random>``, created with ``autoCreate=true`` and
dropped afterwards) on the server of ``--mysql-url``, whose parameters apply
(``flushSeconds=0`` there by default: each phase measures one kind of write alone, with
nothing for bookkeeping to ride along with).

Columns: records/s per phase; ``loop us/call`` is the CPU the calling (event loop) thread
spent per ``save`` call, encoding included, measured with ``time.thread_time``;
``cpu us/rec`` is the whole process's CPU per saved record (writer thread included);
``batches`` is how many WriteBatches (RocksDB) or transactions (MySQL) the saves took.

Records are saved with no per-group state (no group has had an attempt yet, the common
case); a reschedule sets deliver_count 1 and, with ``--groups N``, N pending groups with
one attempt each (issue #10's per-group state; 0 by default, the workload of the
benchmark before it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from kiteq.core.message import GroupDelivery, GroupState, Message, StoredMessage
from kiteq.store.base import MessageStore, Rescheduled, Saved
from kiteq.store.url import open_store

sys.path[:0] = [str(Path(__file__).resolve().parents[2])]
from tests.store.mariadb import drop_store  # noqa: E402

DEFAULT_MYSQL_URL = "mysql://root@127.0.0.1:3306?shardnum=4&flushSeconds=0"


@dataclasses.dataclass
class Phase:
    records: int = 0
    calls: int = 0
    seconds: float = 0.0
    loop_cpu: float = 0.0
    process_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0


def build(count: int, body: bytes) -> list[StoredMessage]:
    now = time.time()
    return [
        StoredMessage(
            message=Message(
                topic="bench",
                message_type="pay-succ",
                body=body,
                group_id="ps-bench",
                expired_time=int(now) + 3600,
                deliver_limit=100,
                create_time=int(now),
            ),
            publish_time=now,
            next_deliver_time=now,
        )
        for _ in range(count)
    ]


async def run_phase(
    batches: Sequence[Sequence[StoredMessage]],
    callers: int,
    max_seconds: float,
    call: Callable[[Sequence[StoredMessage]], Awaitable[int]],
) -> Phase:
    """Feed *batches* to *call* from *callers* concurrent tasks until done or out of time."""
    phase = Phase()
    queue = iter(batches)
    deadline = time.perf_counter() + max_seconds

    async def caller() -> None:
        for batch in queue:
            done = await call(batch)  # not "+= await": that would read the total before awaiting
            phase.records += done
            phase.calls += 1
            if time.perf_counter() > deadline:
                return

    started, loop_cpu, process_cpu = time.perf_counter(), time.thread_time(), time.process_time()
    await asyncio.gather(*(caller() for _ in range(callers)))
    phase.seconds = time.perf_counter() - started
    phase.loop_cpu = time.thread_time() - loop_cpu
    phase.process_cpu = time.process_time() - process_cpu
    return phase


async def bench_one(
    url: str,
    batch_size: int,
    callers: int,
    records: int,
    body: bytes,
    max_seconds: float,
    groups: int = 0,
) -> tuple[Phase, Phase, Phase, int | None]:
    store: MessageStore = open_store(url)
    await store.open()
    try:
        data = build(records, body)
        batches = [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
        before = _writes(store)

        async def save(batch: Sequence[StoredMessage]) -> int:
            outcomes = await store.save(batch)
            if any(o is not Saved.STORED for o in outcomes):
                raise RuntimeError(f"save failed: {outcomes[0]!r}")
            return len(batch)

        saved = await run_phase(batches, callers, max_seconds, save)
        after = _writes(store)
        done = batches[: saved.calls]

        def with_groups(r: StoredMessage) -> StoredMessage:
            due = r.next_deliver_time + 5
            state = {f"group-{i}": GroupDelivery(GroupState.PENDING, 1, due) for i in range(groups)}
            return dataclasses.replace(r, deliver_count=1, groups=state, next_deliver_time=due)

        async def reschedule(batch: Sequence[StoredMessage]) -> int:
            if groups:
                changes = [Rescheduled(with_groups(r), r.next_deliver_time) for r in batch]
            else:
                # the workload of the benchmark before per-group state, as it was
                changes = [
                    Rescheduled(
                        dataclasses.replace(
                            r, deliver_count=1, next_deliver_time=r.next_deliver_time + 5
                        ),
                        r.next_deliver_time,
                    )
                    for r in batch
                ]
            await store.reschedule(changes)
            return len(batch)

        async def delete(batch: Sequence[StoredMessage]) -> int:
            await store.delete(batch)
            return len(batch)

        rescheduled = await run_phase(done, callers, max_seconds, reschedule)
        deleted = await run_phase(done, callers, max_seconds, delete)
        batches_used = None if before is None or after is None else after - before
        return saved, rescheduled, deleted, batches_used
    finally:
        await store.close()


def _writes(store: MessageStore) -> int | None:
    """WriteBatches (RocksDB) or transactions (MySQL) so far; None for memory."""
    count = getattr(store, "write_batches", getattr(store, "write_transactions", None))
    return None if count is None else int(count)


def urls(
    backends: list[str], fsyncs: list[str], directory: str, mysql_url: str = DEFAULT_MYSQL_URL
) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for backend in backends:
        if backend == "mysql":
            separator = "&" if "?" in mysql_url else "?"
            # {run}: fresh databases per run, created at open
            found.append(
                ("mysql", f"{mysql_url}{separator}db=kqbench_{{run}}&autoCreate=true&kiteServer=")
            )
        elif backend == "memory":
            found.append(("memory", "memory://?maxcap=10000000"))
        elif backend == "rocksdb":
            found += [
                (f"rocksdb/{mode}", f"rocksdb://{directory}/{mode}-{{run}}?fsync={mode}")
                for mode in fsyncs
            ]
        else:
            raise SystemExit(f"unknown backend {backend!r}")
    return found


async def main(args: argparse.Namespace) -> None:
    body = os.urandom(args.body)
    print(
        f"{'backend':<16}{'batch':>6}{'callers':>8}{'save/s':>10}{'loop us/call':>13}"
        f"{'cpu us/rec':>11}{'batches':>8}{'resched/s':>11}{'delete/s':>10}"
    )
    with tempfile.TemporaryDirectory(prefix="kiteq-store-bench-") as directory:
        run = 0
        session = uuid.uuid4().hex[:8]
        for name, template in urls(args.backends, args.fsync, directory, args.mysql_url):
            for batch_size in args.batch_sizes:
                for callers in args.callers:
                    run += 1
                    url = template.format(run=f"{session}_{run}")
                    try:
                        saved, rescheduled, deleted, batches = await bench_one(
                            url,
                            batch_size,
                            callers,
                            args.records,
                            body,
                            args.max_seconds,
                            args.groups,
                        )
                    finally:
                        if url.startswith("mysql://"):
                            drop_store(url)
                    loop_us = saved.loop_cpu / max(saved.calls, 1) * 1e6
                    cpu_us = saved.process_cpu / max(saved.records, 1) * 1e6
                    print(
                        f"{name:<16}{batch_size:>6}{callers:>8}{saved.rate:>10.0f}{loop_us:>13.0f}"
                        f"{cpu_us:>11.1f}{'-' if batches is None else batches:>8}"
                        f"{rescheduled.rate:>11.0f}{deleted.rate:>10.0f}",
                        flush=True,
                    )


def _csv(kind: Callable[[str], object]) -> Callable[[str], list[object]]:
    return lambda text: [kind(part) for part in text.split(",") if part]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", type=_csv(str), default=["memory", "rocksdb"])
    parser.add_argument("--fsync", type=_csv(str), default=["batch"])
    parser.add_argument("--batch-sizes", type=_csv(int), default=[1, 10, 100, 1000])
    parser.add_argument("--callers", type=_csv(int), default=[1, 16])
    parser.add_argument("--records", type=int, default=20_000, help="per run, at most")
    parser.add_argument("--body", type=int, default=1024, help="body bytes")
    parser.add_argument("--max-seconds", type=float, default=2.0, help="per phase, at most")
    parser.add_argument(
        "--groups", type=int, default=0, help="pending groups set by each reschedule"
    )
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument(
        "--mysql-url",
        default=DEFAULT_MYSQL_URL,
        help="server and parameters of the mysql backend (db= is added per run)",
    )
    parsed = parser.parse_args()
    if parsed.uvloop:
        import uvloop

        uvloop.run(main(parsed))
    else:
        asyncio.run(main(parsed))
