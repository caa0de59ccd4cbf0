"""Issue #9: 20,000 random and mutated frames against a real broker process.

The broker answers each bad call with INVALID_ARGUMENT (or UNAUTHENTICATED) and a short
reason, never UNKNOWN; a normal producer and consumer keep working during and after;
the log grows by lines per session, not per frame; ``kiteq_rejected_frames_total``
counts every refused call. Traffic goes to 127.0.0.1 only, in a bounded loop with a
fixed seed.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiteq.client import Binding, Consumer, Message, Producer
from kiteq.core.ids import new_message_id
from kiteq.proto.v1 import broker_pb2, common_pb2
from tests.e2e.broker_process import BrokerProcess, write_config
from tests.e2e.collector import Collector

FRAMES: Final = 20_000
SEED: Final = 20261202
CONCURRENCY: Final = 32
MAX_FRAME: Final = 2048
SESSION: Final = "/kiteq.proto.v1.Broker/Session"
PUBLISH: Final = "/kiteq.proto.v1.Broker/Publish"
# reasons that end a whole call (the others count items inside a frame)
CALL_REASONS: Final = ("undecodable", "unexpected", "invalid_open", "unauthenticated")
# the broker logs refusals once per peer host every 10 s
REJECTION_INTERVAL: Final = 10.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    config = write_config(
        tmp_path,
        db=f"rocksdb://{tmp_path / 'db'}?fsync=batch",
        extra={"acceptAnySecret": False, "adminOpen": True},
        secrets={"pay": "right", "acct": "right"},
    )
    process = BrokerProcess(config, pport=0)
    process.start()
    yield process
    process.stop_quietly()


def rejected_frames(broker: BrokerProcess) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(broker.metrics()):
        if family.name == "kiteq_rejected_frames":
            for sample in family.samples:
                if sample.name == "kiteq_rejected_frames_total":
                    counts[sample.labels["reason"]] = sample.value
    return counts


def _message(rng: random.Random) -> common_pb2.Message:
    header = common_pb2.Header(
        messageId=new_message_id(),
        topic=rng.choice(["trade", "fuzz", "bad/topic", ""]),
        messageType="pay-succ",
        groupId=rng.choice(["", "pay", "acct"]),
        commit=rng.random() < 0.8,
    )
    return common_pb2.Message(header=header, body=rng.randbytes(rng.randrange(64)))


def corpus(rng: random.Random) -> list[bytes]:
    """Valid encodings of every kind of client frame, the material mutations start from."""
    opens = [
        broker_pb2.Open(groupId="pay", secretKey="right", clientId="fuzz", protocolVersion=1),
        broker_pb2.Open(groupId="pay", secretKey="wrong"),
        broker_pb2.Open(groupId="bad/group", secretKey="right"),
        broker_pb2.Open(
            groupId="pay",
            secretKey="right",
            maxInFlight=10,
            protocolVersion=1,
            bindings=[
                common_pb2.Binding(
                    topic="fuzz", messageType="*", bindType=common_pb2.BIND_TYPE_FANOUT
                )
            ],
        ),
    ]
    frames = [broker_pb2.ClientFrame(open=o) for o in opens]
    frames.append(
        broker_pb2.ClientFrame(
            publish=broker_pb2.PublishBatch(messages=[_message(rng) for _ in range(3)])
        )
    )
    frames.append(
        broker_pb2.ClientFrame(
            acks=broker_pb2.DeliverAckBatch(
                acks=[broker_pb2.DeliverAck(messageId=new_message_id(), status=True)]
            )
        )
    )
    frames.append(
        broker_pb2.ClientFrame(
            tx=broker_pb2.TxAckBatch(
                acks=[
                    broker_pb2.TxAck(
                        messageId=new_message_id(),
                        topic="trade",
                        status=broker_pb2.TX_STATUS_COMMIT,
                    )
                ]
            )
        )
    )
    return [f.SerializeToString() for f in frames]


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        at = rng.randrange(len(out) + 1)
        if op == 0 and out:  # flip a bit
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and out:  # replace a byte
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif op == 2:  # truncate
            del out[at:]
        elif op == 3:  # insert random bytes
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        else:  # repeat a slice
            out[at:at] = out[rng.randrange(len(out) + 1) :][: rng.randint(1, 16)]
    return bytes(out[:MAX_FRAME])


class Fuzzer:
    """Sends *FRAMES* frames: each call is one bad frame, alone or after a valid open."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.rng = random.Random(SEED)
        self.seeds = corpus(self.rng)
        self.valid_open = self.seeds[0]
        self.codes: Counter[grpc.StatusCode] = Counter()
        self.details: Counter[str] = Counter()
        self.opened = 0  # calls whose session opened (they log two lines)
        self.sent = 0

    def frame(self) -> bytes:
        roll = self.rng.random()
        if roll < 0.3:
            return self.rng.randbytes(self.rng.randrange(MAX_FRAME // 4))
        return mutate(self.rng, self.rng.choice(self.seeds))

    def calls(self) -> Iterator[tuple[str, list[bytes]]]:
        while self.sent < FRAMES:
            roll = self.rng.random()
            if roll < 0.1:
                self.sent += 1
                yield PUBLISH, [self.frame()]
            elif roll < 0.15:  # a bad frame inside an open session
                self.sent += 1
                yield SESSION, [self.valid_open, self.frame()]
            else:
                self.sent += 1
                yield SESSION, [self.frame()]

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            # no serializers: bytes in, bytes out
            session: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
                SESSION
            )
            publish: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(PUBLISH)
            queue: asyncio.Queue[tuple[str, list[bytes]] | None] = asyncio.Queue(CONCURRENCY)

            async def worker() -> None:
                while (item := await queue.get()) is not None:
                    method, frames = item
                    if method == PUBLISH:
                        code = await self._unary(publish(frames[0], timeout=10))
                    else:
                        code = await self._session(session(timeout=10), frames)
                    self.codes[code] += 1

            workers = [asyncio.create_task(worker()) for _ in range(CONCURRENCY)]
            for item in self.calls():
                await queue.put(item)
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)

    async def _unary(self, call: grpc.aio.UnaryUnaryCall[bytes, bytes]) -> grpc.StatusCode:
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            self.details[(exc.details() or "")[:60]] += 1
            return exc.code()
        return grpc.StatusCode.OK

    async def _session(
        self, call: grpc.aio.StreamStreamCall[bytes, bytes], frames: list[bytes]
    ) -> grpc.StatusCode:
        try:
            for data in frames:
                await call.write(data)
            await call.done_writing()
            async for reply in call:
                frame = broker_pb2.ServerFrame.FromString(reply)
                if frame.WhichOneof("kind") == "opened":
                    self.opened += 1
        except grpc.aio.AioRpcError:
            pass  # the call ended (refused) before all was written or read
        code = await call.code()
        if code is not grpc.StatusCode.OK:
            self.details[(await call.details() or "")[:60]] += 1
        return code


@pytest.mark.timeout(180)  # ~20 s here; 20,000 calls on a loaded CI machine take longer
def test_random_and_mutated_frames_are_refused_and_the_broker_keeps_serving(
    broker: BrokerProcess,
) -> None:
    got = Collector()
    before = rejected_frames(broker)
    assert set(CALL_REASONS) <= before.keys(), "the reasons exist as zero series"
    with (
        Consumer(
            brokers=[broker.address],
            group_id="acct",
            secret_key="right",
            bindings=[Binding.fanout("trade")],
            handler=got,
        ) as consumer,
        Producer(brokers=[broker.address], group_id="pay", secret_key="right") as producer,
    ):
        consumer.wait(10)
        lines_before = len(broker.output)
        done = threading.Event()
        during: list[str] = []

        def publish_while_fuzzing() -> None:
            # bounded: one message per 20 ms while the fuzzer runs, at most 5,000
            while len(during) < 5000 and not done.wait(0.02):
                message = Message(topic="trade", message_type="pay-succ", body=b"during")
                during.append(producer.send(message, timeout=10).message_id)

        normal = threading.Thread(target=publish_while_fuzzing)
        normal.start()
        fuzzer = Fuzzer(broker.address)
        started = time.monotonic()
        try:
            asyncio.run(fuzzer.run())
            fuzz_seconds = time.monotonic() - started
        finally:
            done.set()
            normal.join(30)
        after = producer.send(
            Message(topic="trade", message_type="pay-succ", body=b"after"), timeout=10
        ).message_id
        got.wait_for(lambda received: after in {m.message_id for m in received})
        assert set(during) <= set(got.ids()), "every message published during the fuzz arrived"
    assert fuzzer.sent == FRAMES
    assert len(during) > 10, "the normal producer ran during the fuzz"
    codes = dict(fuzzer.codes)
    assert set(codes) <= {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
    }, (codes, fuzzer.details.most_common(5))
    refused = codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) + codes.get(
        grpc.StatusCode.UNAUTHENTICATED, 0
    )
    assert refused > FRAMES * 0.8, codes
    counts = rejected_frames(broker)
    counted = sum(counts[r] - before[r] for r in CALL_REASONS)
    assert counted == refused, (counts, codes)
    # the log: what authenticated sessions log (two lines each, and their bindings), one
    # refusal line per interval, and no line, let alone a traceback, per refused frame
    new_lines = broker.output[lines_before:]
    sessions = [
        line for line in new_lines if " session opened " in line or " session closed " in line
    ]
    # (plus the normal producer's and consumer's own lines: open during, close after)
    assert 2 * fuzzer.opened <= len(sessions) <= 2 * fuzzer.opened + 4
    refusals = [line for line in new_lines if "refused client input" in line]
    assert 1 <= len(refusals) <= fuzz_seconds / REJECTION_INTERVAL + 1, refusals
    others = [line for line in new_lines if line not in sessions and line not in refusals]
    assert len(others) <= 50, others[:20]
    assert not [line for line in new_lines if "Traceback" in line]


async def read_all(
    call: grpc.aio.StreamStreamCall[bytes, bytes], into: list[broker_pb2.ServerFrame]
) -> None:
    # a loop, not extend(): the frames read before the call fails must stay in *into*
    async for reply in call:
        into.append(broker_pb2.ServerFrame.FromString(reply))  # noqa: PERF401


async def test_garbage_inside_a_session_ends_it_after_the_acks_of_what_came_before(
    broker: BrokerProcess,
) -> None:
    good = broker_pb2.ClientFrame(
        publish=broker_pb2.PublishBatch(
            messages=[
                common_pb2.Message(
                    header=common_pb2.Header(
                        messageId=new_message_id(), topic="trade", messageType="t", commit=True
                    ),
                    body=b"x",
                )
            ]
        )
    )
    open_frame = broker_pb2.ClientFrame(
        open=broker_pb2.Open(groupId="pay", secretKey="right", protocolVersion=1)
    )
    async with grpc.aio.insecure_channel(broker.address) as channel:
        session: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(SESSION)
        call = session(timeout=10)
        for data in (open_frame.SerializeToString(), good.SerializeToString(), b"\xff\xff\xff"):
            await call.write(data)
        frames: list[broker_pb2.ServerFrame] = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await read_all(call, frames)
        kinds = [f.WhichOneof("kind") for f in frames]
        assert kinds == ["opened", "storeAcks"], "the publish read first is answered first"
        assert [a.status for a in frames[1].storeAcks.acks] == [True]
        assert ended.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert ended.value.details() == "the frame is not a ClientFrame"
        publish: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(PUBLISH)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await publish(b"\x0a\xff", timeout=10)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == "the request is not a PublishRequest"
    assert broker.lookup(good.publish.messages[0].header.messageId).found
    counts = rejected_frames(broker)
    assert counts["undecodable"] == 2
