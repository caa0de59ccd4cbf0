"""The HTTP publish API (issue #15) against real broker processes, published with curl."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from kiteq.broker.http_request import idempotent_id
from kiteq.client import Binding, Consumer
from kiteq.core.limits import MAX_BODY_BYTES
from tests.e2e.broker_process import BrokerProcess, write_config
from tests.e2e.collector import Collector
from tests.e2e.tls_files import make_tls_files
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


@dataclasses.dataclass
class HttpBroker:
    process: BrokerProcess
    base: str

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


def curl(args: Sequence[str], tmp_path: Path) -> Reply:
    """Run ``curl -s <args>``; the final status, headers (lower-cased) and JSON body."""
    headers_file = tmp_path / "curl-headers"
    body_file = tmp_path / "curl-body"
    run = subprocess.run(
        ["curl", "-s", "-D", str(headers_file), "-o", str(body_file), "-w", "%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    # the last header block (after a 100 Continue, if any)
    block = headers_file.read_text().strip().split("\r\n\r\n")[-1]
    headers = {}
    for line in block.splitlines()[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    raw = body_file.read_bytes()
    return Reply(int(run.stdout), headers, json.loads(raw) if raw else None)


@pytest.fixture
def start(tmp_path: Path, launch: Callable[..., BrokerProcess]) -> Callable[..., HttpBroker]:
    def run(
        extra: Mapping[str, object] | None = None,
        secrets: Mapping[str, str] | None = None,
        pport: int | None = None,
    ) -> HttpBroker:
        config = write_config(
            tmp_path, db=f"rocksdb://{tmp_path / 'db'}?fsync=batch", extra=extra, secrets=secrets
        )
        process = launch(config, hport=0, pport=pport)
        return HttpBroker(process, process.http_url)

    return run


def consumer(broker: HttpBroker, collector: Collector, group: str = "acct-svc") -> Consumer:
    return Consumer(
        brokers=[broker.process.address],
        group_id=group,
        secret_key="s",
        bindings=[Binding.direct("trade", "pay-succ")],
        handler=collector,
    )


AUTH = ["-u", "pay-svc:s"]
JSON = ["-H", "Content-Type: application/json"]


def test_raw_publish_with_curl_is_delivered_to_a_grpc_consumer(
    start: Callable[..., HttpBroker], tmp_path: Path
) -> None:
    broker = start(pport=0)
    binary = tmp_path / "body.bin"
    binary.write_bytes(b"\x00binary\xff")
    got = Collector()
    with consumer(broker, got):
        reply = curl(
            [
                "-H", "X-KiteQ-Group: pay-svc",
                "-H", "X-KiteQ-Secret: s",
                "-H", "X-KiteQ-Message-Type: pay-succ",
                "-H", "X-KiteQ-Property-orderId: 42",
                "-H", "Content-Type: application/octet-stream",
                "--data-binary", f"@{binary}",
                broker.url("/v1/topics/trade/messages"),
            ],
            tmp_path,
        )  # fmt: skip
        assert reply.status == 200, reply.body
        assert reply.body["status"] == "stored"
        got.wait_count(1)
        json_reply = curl(
            [
                *AUTH,
                *JSON,
                "-d",
                '{"messageType": "pay-succ", "bodyBase64": "AAEC", "properties": {"k": "v"}}',
                broker.url("/v1/topics/trade/messages"),
            ],
            tmp_path,
        )
        assert json_reply.status == 200, json_reply.body
        got.wait_count(2)
    first, second = got.received
    assert first.message_id == reply.body["id"]
    assert (first.topic, first.message_type, first.group_id) == ("trade", "pay-succ", "pay-svc")
    assert first.body == b"\x00binary\xff"
    assert first.properties == {"orderId": "42"}
    assert (second.message_id, second.body) == (json_reply.body["id"], b"\x00\x01\x02")
    assert second.properties == {"k": "v"}
    metrics = broker.process.metrics()
    assert 'kiteq_http_requests_total{code="200",endpoint="publish"} 2.0' in metrics
    assert 'kiteq_messages_received_total{topic="trade"} 2.0' in metrics


def test_a_delayed_publish_is_scheduled_and_never_delivered_early(
    start: Callable[..., HttpBroker], tmp_path: Path
) -> None:
    broker = start()
    came: dict[bytes, float] = {}
    got = Collector(lambda m: came.setdefault(m.body, time.time()) > 0)
    with consumer(broker, got):
        sent = time.time()
        delayed = curl(
            [*AUTH, "-H", "X-KiteQ-Message-Type: pay-succ", "-H", "X-KiteQ-Delay-Seconds: 2",
             "-d", "later", broker.url("/v1/topics/trade/messages")],
            tmp_path,
        )  # fmt: skip
        assert (delayed.status, delayed.body["status"]) == (200, "scheduled"), delayed.body
        batch = curl(
            [*AUTH, *JSON, "-d",
             '[{"messageType": "pay-succ", "body": "b", "delaySeconds": 2},'
             ' {"messageType": "pay-succ", "body": "now"}]',
             broker.url("/v1/topics/trade/messages:batch")],
            tmp_path,
        )  # fmt: skip
        assert (batch.body["scheduled"], batch.body["stored"]) == (1, 1), batch.body
        got.wait_count(3, timeout=30)
    shown = {m.body: m.deliver_at for m in got.received}
    assert shown[b"now"] == 0.0
    for body in (b"later", b"b"):
        assert shown[body] >= sent + 2
        assert came[body] >= shown[body], f"{body!r} came {shown[body] - came[body]:.3f} s early"
    assert got.received[0].body == b"now"


def test_keyed_http_publishes_are_delivered_in_order_with_their_key(
    start: Callable[..., HttpBroker], tmp_path: Path
) -> None:
    broker = start()
    got = Collector()
    with consumer(broker, got):
        batch = curl(
            [*AUTH, *JSON, "-d",
             json.dumps([{"messageType": "pay-succ", "body": str(i), "orderingKey": "o-1"}
                         for i in range(5)]),
             broker.url("/v1/topics/trade/messages:batch")],
            tmp_path,
        )  # fmt: skip
        assert (batch.status, batch.body["stored"]) == (200, 5), batch.body
        raw = curl(
            [*AUTH, "-H", "X-KiteQ-Message-Type: pay-succ", "-H", "X-KiteQ-Ordering-Key: o-1",
             "-d", "5", broker.url("/v1/topics/trade/messages")],
            tmp_path,
        )  # fmt: skip
        assert raw.status == 200, raw.body
        got.wait_count(6)
    assert [m.body for m in got.received] == [str(i).encode() for i in range(6)]
    assert {m.ordering_key for m in got.received} == {"o-1"}


def test_wrong_secret_is_401_and_nothing_is_stored(
    start: Callable[..., HttpBroker], tmp_path: Path
) -> None:
    broker = start(secrets={"pay-svc": "right", "acct-svc": "s"})
    url = broker.url("/v1/topics/trade/messages")
    message = ["-H", "X-KiteQ-Message-Type: pay-succ", "--data-binary", "wrong"]
    for credentials in (["-u", "pay-svc:wrong"], ["-H", "X-KiteQ-Group: pay-svc"], []):
        refused = curl([*credentials, *message, url], tmp_path)
        assert refused.status == 401, refused.body
        assert refused.body["error"]["code"] == "UNAUTHENTICATED"
        assert refused.headers["www-authenticate"].startswith("Basic ")
    ok = curl(
        ["-u", "pay-svc:right", "-H", "X-KiteQ-Message-Type: pay-succ", "-d", "right", url],
        tmp_path,
    )
    assert ok.status == 200, ok.body
    got = Collector()
    with consumer(broker, got):
        got.wait_count(1)
        broker.process.passed_recover_scan()
    assert [m.body for m in got.received] == [b"right"]
    stats = broker.process.stats()
    assert (stats.received, stats.rejected) == (1, 0)


def test_same_idempotency_key_twice_is_one_message_delivered_once(
    start: Callable[..., HttpBroker], tmp_path: Path
) -> None:
    broker = start()
    url = broker.url("/v1/topics/trade/messages")
    args = [*AUTH, "-H", "X-KiteQ-Message-Type: pay-succ", "-H", "Idempotency-Key: order-42"]
    first = curl([*args, "-d", "once", url], tmp_path)
    second = curl([*args, "-d", "once", url], tmp_path)
    assert (first.status, first.body["status"]) == (200, "stored")
    assert (second.status, second.body["status"]) == (200, "duplicate")
    assert first.body["id"] == second.body["id"] == idempotent_id("pay-svc", "order-42")
    got = Collector()
    with consumer(broker, got):
        got.wait_count(1)
        broker.process.passed_recover_scan()
    assert [m.message_id for m in got.received] == [first.body["id"]]


def test_batch_of_1000_in_one_request(start: Callable[..., HttpBroker], tmp_path: Path) -> None:
    broker = start()
    items = [
        {"messageType": "pay-succ", "body": f"m{i}", "idempotencyKey": f"k{i}"} for i in range(1000)
    ]
    items[7] = {"messageType": "bad type", "body": "refused"}
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps(items))
    got = Collector()
    with consumer(broker, got):
        reply = curl(
            [
                *AUTH,
                *JSON,
                "--data-binary",
                f"@{batch}",
                broker.url("/v1/topics/trade/messages:batch"),
            ],
            tmp_path,
        )
        assert reply.status == 200, reply.body
        assert (reply.body["stored"], reply.body["duplicate"], reply.body["failed"]) == (999, 0, 1)
        results = reply.body["results"]
        assert len(results) == 1000
        assert results[7]["httpStatus"] == 400
        assert results[7]["error"]["code"] == "INVALID_ARGUMENT"
        assert results[0] == {"id": idempotent_id("pay-svc", "k0"), "status": "stored"}
        got.wait_count(999)
    assert {m.body for m in got.received} == {f"m{i}".encode() for i in range(1000) if i != 7}


def test_oversized_bodies_are_413_and_nothing_is_stored(
    start: Callable[..., HttpBroker], tmp_path: Path
) -> None:
    broker = start()
    big = tmp_path / "big"
    big.write_bytes(b"x" * (MAX_BODY_BYTES + 1))
    url = broker.url("/v1/topics/trade/messages")
    raw = curl(
        [*AUTH, "-H", "X-KiteQ-Message-Type: pay-succ", "--data-binary", f"@{big}", url], tmp_path
    )
    assert raw.status == 413, raw.body
    assert raw.body["error"]["code"] == "TOO_LARGE"
    # without Expect: 100-continue the body is sent, and read only up to the limit
    no_expect = curl(
        [
            *AUTH,
            "-H",
            "Expect:",
            "-H",
            "X-KiteQ-Message-Type: pay-succ",
            "--data-binary",
            f"@{big}",
            url,
        ],
        tmp_path,
    )
    assert no_expect.status == 413, no_expect.body
    # a JSON body within the request limit whose message body is too large: the broker's
    # own body limit (the same as a gRPC publish's)
    document = tmp_path / "big.json"
    document.write_text(json.dumps({"messageType": "pay-succ", "body": "x" * (MAX_BODY_BYTES + 1)}))
    in_json = curl([*AUTH, *JSON, "--data-binary", f"@{document}", url], tmp_path)
    assert in_json.status == 413, in_json.body
    assert in_json.body["error"]["code"] == "TOO_LARGE"
    ok = curl([*AUTH, "-H", "X-KiteQ-Message-Type: pay-succ", "-d", "small", url], tmp_path)
    assert ok.status == 200
    stats = broker.process.stats()
    assert (stats.received, stats.rejected) == (1, 1)  # the JSON one reached the intake


def test_flow_limited_is_429_with_retry_after(
    start: Callable[..., HttpBroker], tmp_path: Path
) -> None:
    broker = start(extra={"recievePermitsPerSecond": 1})
    url = broker.url("/v1/topics/trade/messages")
    args = [*AUTH, "-H", "X-KiteQ-Message-Type: pay-succ", "-d", "x", url]
    replies = [curl(args, tmp_path) for _ in range(5)]
    limited = [r for r in replies if r.status == 429]
    assert limited, [r.status for r in replies]
    assert limited[0].body["error"]["code"] == "OVERFLOW"
    assert limited[0].body["error"]["retriable"] is True
    assert int(limited[0].headers["retry-after"]) >= 1
    batch = json.dumps([{"messageType": "pay-succ", "body": str(i)} for i in range(10)])
    reply = curl([*AUTH, *JSON, "-d", batch, f"{url}:batch"], tmp_path)
    assert reply.status == 200
    assert reply.body["failed"] >= 9
    assert int(reply.headers["retry-after"]) >= 9  # 9 messages at 1 per second
    assert {r["httpStatus"] for r in reply.body["results"] if "error" in r} == {429}


def test_transactional_publish_commit_and_rollback(
    start: Callable[..., HttpBroker], tmp_path: Path
) -> None:
    broker = start()
    url = broker.url("/v1/topics/trade/messages")

    def publish(body: str) -> str:
        reply = curl(
            [
                *AUTH,
                *JSON,
                "-d",
                json.dumps({"messageType": "pay-succ", "body": body, "transactional": True}),
                url,
            ],
            tmp_path,
        )
        assert reply.status == 200, reply.body
        assert reply.body["committed"] is False
        return str(reply.body["id"])

    to_commit, to_roll_back = publish("commit me"), publish("roll me back")
    got = Collector()
    with consumer(broker, got):
        plain = curl([*AUTH, "-H", "X-KiteQ-Message-Type: pay-succ", "-d", "plain", url], tmp_path)
        got.wait_count(1)
        broker.process.passed_recover_scan()
        assert [m.body for m in got.received] == [b"plain"]
        assert broker.process.stats().pendingTransactions == 2

        other = curl(["-u", "other-svc:s", "-X", "POST", f"{url}/{to_commit}:commit"], tmp_path)
        assert other.status == 403, other.body
        wrong_topic = curl(
            [*AUTH, "-X", "POST", broker.url(f"/v1/topics/other/messages/{to_commit}:commit")],
            tmp_path,
        )
        assert wrong_topic.status == 404
        committed = curl([*AUTH, "-X", "POST", f"{url}/{to_commit}:commit"], tmp_path)
        assert committed.status == 200, committed.body
        assert committed.body == {"id": to_commit, "status": "committed"}
        got.wait_count(2)
        rolled = curl([*AUTH, "-X", "POST", f"{url}/{to_roll_back}:rollback"], tmp_path)
        assert rolled.body == {"id": to_roll_back, "status": "rolled_back"}
        late = curl([*AUTH, "-X", "POST", f"{url}/{to_roll_back}:commit"], tmp_path)
        assert late.status == 404, late.body
        bad = curl([*AUTH, "-X", "POST", f"{url}/{plain.body['id']}:undo"], tmp_path)
        assert bad.status == 404
        broker.process.passed_recover_scan()
    assert [m.body for m in got.received] == [b"plain", b"commit me"]
    assert broker.process.stats().pendingTransactions == 0


def test_undecided_http_transaction_becomes_unresolved_and_can_still_be_committed(
    start: Callable[..., HttpBroker], tmp_path: Path
) -> None:
    broker = start(
        extra={"txCheckDelaySeconds": 0.2, "txCheckIntervalSeconds": 0.2, "txCheckMax": 2}
    )
    url = broker.url("/v1/topics/trade/messages")
    reply = curl(
        [
            *AUTH,
            "-H",
            "X-KiteQ-Message-Type: pay-succ",
            "-H",
            "X-KiteQ-Transactional: true",
            "-d",
            "tx",
            url,
        ],
        tmp_path,
    )
    assert reply.status == 200, reply.body
    # no session of pay-svc answers the checks: they run out and the message is parked
    wait_until(lambda: broker.process.stats().unresolvedTransactions == 1, 20, "unresolved")
    got = Collector()
    with consumer(broker, got):
        committed = curl([*AUTH, "-X", "POST", f"{url}/{reply.body['id']}:commit"], tmp_path)
        assert committed.status == 200, committed.body
        got.wait_count(1)
    assert got.received[0].body == b"tx"
    assert broker.process.stats().unresolvedTransactions == 0


def test_errors_are_json_with_clear_statuses(
    start: Callable[..., HttpBroker], tmp_path: Path
) -> None:
    broker = start(extra={"topics": ["trade"]})
    url = broker.url("/v1/topics/trade/messages")
    cases = [
        ([*AUTH, "-d", "no type", url], 400, "INVALID_ARGUMENT"),
        ([*AUTH, *JSON, "-d", '{"messageType": "t", "body": "x", "delaySeconds": -1}', url], 400, "INVALID_ARGUMENT"),
        ([*AUTH, *JSON, "-d", '{"messageType": "t", "body": "x", "delaySeconds": 1e9}', url], 400, "INVALID_ARGUMENT"),
        ([*AUTH, "-H", "X-KiteQ-Message-Type: t", "-d", "x", broker.url("/v1/topics/nope/messages")], 404, "UNKNOWN_TOPIC"),
        (["-u", "bad/group:s", "-H", "X-KiteQ-Message-Type: t", "-d", "x", url], 400, "INVALID_ARGUMENT"),
        ([*AUTH, "-X", "GET", url], 405, "METHOD_NOT_ALLOWED"),
        ([*AUTH, "-d", "x", broker.url("/v2/whatever")], 404, "NOT_FOUND"),
        ([*AUTH, "-d", "[]", f"{url}:batch"], 415, "INVALID_ARGUMENT"),
    ]  # fmt: skip
    for args, status, code in cases:
        reply = curl(args, tmp_path)
        assert (reply.status, reply.body["error"]["code"]) == (status, code), (args, reply.body)


def test_acl_decides_what_a_group_may_publish(
    tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    config = write_config(tmp_path, db="memory://")
    config.write_text(
        config.read_text() + '[clusters.e2e.acl.pay-svc]\npublish = ["trade"]\nsubscribe = []\n'
    )
    base = f"{launch(config, hport=0).http_url}/v1/topics"
    allowed = curl(
        [*AUTH, "-H", "X-KiteQ-Message-Type: t", "-d", "x", f"{base}/trade/messages"], tmp_path
    )
    assert allowed.status == 200, allowed.body
    denied = curl(
        [*AUTH, "-H", "X-KiteQ-Message-Type: t", "-d", "x", f"{base}/user/messages"], tmp_path
    )
    assert (denied.status, denied.body["error"]["code"]) == (403, "PERMISSION_DENIED")


def test_https_with_the_grpc_ports_certificate_and_mtls(
    tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    files = make_tls_files(tmp_path / "tls")
    broker = launch(
        write_config(tmp_path, db="memory://", extra=files.broker_keys(mtls=True)),
        hport=0,
        tls=files.admin(cert=True),
    )
    url = f"{broker.http_url}/v1/topics/trade/messages"
    assert url.startswith("https://")
    message = [*AUTH, "-H", "X-KiteQ-Message-Type: pay-succ", "-d", "x"]
    client = ["--cert", str(files.client_cert), "--key", str(files.client_key)]
    reply = curl([*message, "--cacert", str(files.ca), *client, url], tmp_path)
    assert (reply.status, reply.body["status"]) == (200, "stored")
    # no client certificate, or plain HTTP: no answer at all (curl reports status 000)
    for args in (["--cacert", str(files.ca), url], [url.replace("https", "http")]):
        run = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *message, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert run.stdout in ("000", ""), run.stdout
