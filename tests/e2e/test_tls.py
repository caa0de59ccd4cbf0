"""TLS and mTLS on the gRPC port, end to end: real broker processes, certificates of a CA
made by the test (trustme), the client library, the admin CLI and ZooKeeper discovery.

A client whose transport does not match the broker's fails with ``TlsError`` within a
couple of seconds, far below its ``connect_timeout`` (a retried "Socket closed" would
hang until then).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiteq.client import (
    Binding,
    Consumer,
    Message,
    Producer,
    ReceivedMessage,
    TlsError,
    TlsOptions,
)
from tests._servers.zookeeper import ManagedZooKeeper
from tests.e2e import helpers
from tests.e2e.broker_process import (
    REPO,
    BrokerProcess,
    run_kiteq,
    write_config,
    write_zk_config,
    zk_registry,
)
from tests.e2e.collector import Collector
from tests.e2e.fixtures import StartBroker
from tests.e2e.helpers import admin_cli
from tests.e2e.tls_files import TlsFiles, make_tls_files

pytestmark = pytest.mark.timeout(120)

# long on purpose: a TLS mismatch must fail far sooner than this
CONNECT_TIMEOUT: Final = 10.0
QUICK: Final = 3.0
TRADE: Final = Binding.direct("trade", "pay-succ")


def trade(body: bytes = b"42") -> Message:
    return Message(topic="trade", message_type="pay-succ", body=body)


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path / "tls")


def ready_line(broker: BrokerProcess) -> str:
    return next(line for line in broker.output if line.startswith("kiteq ready"))


def publish_and_consume(
    broker: BrokerProcess, producer_tls: TlsOptions | None, consumer_tls: TlsOptions | None
) -> None:
    got = Collector()
    with (
        helpers.consumer(broker, "acct-svc", [TRADE], got, tls=consumer_tls),
        helpers.producer(broker, tls=producer_tls) as producer,
    ):
        sent = [producer.send(trade(str(i).encode())).message_id for i in range(20)]
        got.wait_count(len(sent))
    assert sorted(set(got.ids())) == sorted(sent)


def test_tls_publish_and_consume(
    start_broker: Callable[..., BrokerProcess], tls_files: TlsFiles
) -> None:
    broker = start_broker(tls_files.broker_keys(), tls=tls_files.admin())
    assert "tls=tls" in ready_line(broker)
    publish_and_consume(broker, tls_files.client(), tls_files.client())
    assert broker.stats().received >= 20  # the admin service is on the TLS port too


def test_mtls_publish_and_consume_with_client_certificates(
    start_broker: Callable[..., BrokerProcess], tls_files: TlsFiles
) -> None:
    broker = start_broker(tls_files.broker_keys(mtls=True), tls=tls_files.admin(cert=True))
    assert "tls=mtls" in ready_line(broker)
    publish_and_consume(broker, tls_files.client(cert=True), tls_files.client(cert=True))


async def test_mtls_async_clients(
    start_broker: Callable[..., BrokerProcess], tls_files: TlsFiles
) -> None:
    broker = start_broker(tls_files.broker_keys(mtls=True))
    tls = tls_files.client(cert=True)
    received: asyncio.Queue[ReceivedMessage] = asyncio.Queue()

    async def handle(message: ReceivedMessage) -> bool:
        await received.put(message)
        return True

    async with (
        helpers.async_consumer(broker, handler=handle, tls=tls),
        helpers.async_producer(broker, tls=tls) as producer,
    ):
        result = await producer.send(trade())
        message = await asyncio.wait_for(received.get(), 20)
    assert message.message_id == result.message_id


def expect_quick_tls_error(action: Callable[[], object]) -> TlsError:
    started = time.monotonic()
    with pytest.raises(TlsError) as raised:
        action()
    assert time.monotonic() - started < QUICK
    assert not raised.value.retriable
    return raised.value


def send_once(broker: BrokerProcess, tls: TlsOptions | None) -> None:
    with Producer(
        brokers=[broker.address],
        group_id="pay-svc",
        tls=tls,
        timeout=CONNECT_TIMEOUT * 2,
        connect_timeout=CONNECT_TIMEOUT,
    ) as producer:
        producer.send(trade())


def start_consumer(broker: BrokerProcess, tls: TlsOptions | None) -> None:
    with Consumer(
        brokers=[broker.address],
        group_id="acct-svc",
        bindings=[TRADE],
        handler=Collector(),
        tls=tls,
        connect_timeout=CONNECT_TIMEOUT,
    ):
        pass


def test_plaintext_client_against_tls_broker_fails_quickly_and_says_tls(
    start_broker: Callable[..., BrokerProcess], tls_files: TlsFiles
) -> None:
    broker = start_broker(tls_files.broker_keys())
    error = expect_quick_tls_error(lambda: send_once(broker, None))
    assert "serves TLS" in str(error)
    assert "plaintext" in str(error)
    error = expect_quick_tls_error(lambda: start_consumer(broker, None))
    assert "serves TLS" in str(error)


def test_mtls_refuses_a_client_without_a_certificate(
    start_broker: Callable[..., BrokerProcess], tls_files: TlsFiles
) -> None:
    broker = start_broker(tls_files.broker_keys(mtls=True), tls=tls_files.admin(cert=True))
    error = expect_quick_tls_error(lambda: send_once(broker, tls_files.client()))
    assert "requires a client certificate" in str(error)
    error = expect_quick_tls_error(lambda: start_consumer(broker, tls_files.client()))
    assert "requires a client certificate" in str(error)
    error = expect_quick_tls_error(lambda: send_once(broker, None))
    assert "serves TLS" in str(error)
    # nothing got in: the broker stored nothing and counts no connection
    stats = broker.stats()
    assert stats.received == 0
    assert [g.groupId for g in stats.groups] == []


def test_mtls_refuses_a_certificate_of_another_ca(
    start_broker: Callable[..., BrokerProcess], tls_files: TlsFiles
) -> None:
    broker = start_broker(tls_files.broker_keys(mtls=True))
    rogue = TlsOptions(ca=tls_files.ca, cert=tls_files.rogue_cert, key=tls_files.rogue_key)
    error = expect_quick_tls_error(lambda: send_once(broker, rogue))
    assert "refused this client's TLS certificate" in str(error)


def test_untrusted_broker_certificate_and_tls_to_plaintext_fail_clearly(
    start_broker: Callable[..., BrokerProcess], tls_files: TlsFiles
) -> None:
    tls_broker = start_broker(tls_files.broker_keys())
    error = expect_quick_tls_error(lambda: send_once(tls_broker, TlsOptions(ca=tls_files.other_ca)))
    assert "not trusted" in str(error)
    plain_broker = start_broker({})
    assert "tls=off" in ready_line(plain_broker)
    error = expect_quick_tls_error(lambda: send_once(plain_broker, tls_files.client()))
    assert "does not speak TLS" in str(error)


def test_server_name_override_reaches_a_broker_by_another_name(
    start_broker: Callable[..., BrokerProcess], tls_files: TlsFiles
) -> None:
    broker = start_broker(tls_files.broker_keys())
    # the certificate names 127.0.0.1 and localhost; dialled as 127.0.0.1, checked as localhost
    tls = TlsOptions(ca=tls_files.ca, server_name="localhost")
    send_once(broker, tls)
    wrong = TlsOptions(ca=tls_files.ca, server_name="elsewhere.example")
    error = expect_quick_tls_error(lambda: send_once(broker, wrong))
    assert "does not name the host dialled" in str(error)


def test_broker_refuses_bad_tls_settings(tmp_path: Path, tls_files: TlsFiles) -> None:
    def run(keys: dict[str, object], *flags: str) -> subprocess.CompletedProcess[str]:
        config = write_config(tmp_path, db="memory://", extra=keys)
        return run_kiteq(["-clusterName=e2e", f"-configPath={config}", *flags])

    only_cert = run({"tlsCert": str(tls_files.server_cert)})
    assert only_cert.returncode == 1
    assert "clusters.e2e.tlsKey" in only_cert.stderr
    mismatched = run({"tlsCert": str(tls_files.server_cert), "tlsKey": str(tls_files.client_key)})
    assert mismatched.returncode == 1
    assert "clusters.e2e.tlsCert/clusters.e2e.tlsKey" in mismatched.stderr
    missing_ca = run({**tls_files.broker_keys(), "tlsClientCa": str(tmp_path / "nope.pem")})
    assert missing_ca.returncode == 1
    assert "clusters.e2e.tlsClientCa" in missing_ca.stderr
    not_pem = run({}, f"-tlsCert={tls_files.server_key}.txt", f"-tlsKey={tls_files.server_key}")
    assert not_pem.returncode == 1
    assert "tlsCert" in not_pem.stderr


def test_tls_from_flags_overrides_the_config(
    start_broker: Callable[..., BrokerProcess], tls_files: TlsFiles
) -> None:
    broker = start_broker(
        {},
        args=[
            f"-tlsCert={tls_files.server_cert}",
            f"-tlsKey={tls_files.server_key}",
            f"--tlsClientCa={tls_files.ca}",
        ],
        tls=tls_files.admin(cert=True),
    )
    assert "tls=mtls" in ready_line(broker)
    send_once(broker, tls_files.client(cert=True))


def test_admin_cli_over_tls_and_mtls(
    start_broker: Callable[..., BrokerProcess], tls_files: TlsFiles
) -> None:
    broker = start_broker(tls_files.broker_keys(mtls=True))
    ok = admin_cli(
        broker,
        "--json",
        f"-tlsCa={tls_files.ca}",
        f"-tlsCert={tls_files.client_cert}",
        f"-tlsKey={tls_files.client_key}",
        "stats",
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["cluster"] == "e2e"
    plaintext = admin_cli(broker, "--json", "stats")
    assert plaintext.returncode == 1
    assert "the broker serves TLS" in plaintext.stderr
    no_cert = admin_cli(broker, "--json", f"-tlsCa={tls_files.ca}", "stats")
    assert no_cert.returncode == 1
    assert "requires a client certificate" in no_cert.stderr


def test_health_service_answers_over_tls_only(
    start_broker: Callable[..., BrokerProcess], tls_files: TlsFiles
) -> None:
    broker = start_broker(tls_files.broker_keys(), tls=tls_files.admin())
    with broker.admin_channel() as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    with (
        grpc.insecure_channel(broker.address) as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE


def test_tls_brokers_found_through_zookeeper(
    zookeeper: ManagedZooKeeper, zk: Any, tmp_path: Path, tls_files: TlsFiles
) -> None:
    hosts = zookeeper.hosts + zk.chroot
    config = write_zk_config(
        tmp_path,
        zk_registry(hosts),
        db="memory://",
        extra={
            "tlsCert": str(tls_files.server_cert),
            "tlsKey": str(tls_files.server_key),
            "tlsClientCa": str(tls_files.ca),
        },
    )
    broker = BrokerProcess(config)
    broker.start()
    try:
        registry = f"zk://{hosts}"
        tls = tls_files.client(cert=True)
        got = Collector()
        with (
            Consumer(
                registry=registry, group_id="acct-svc", bindings=[TRADE], handler=got, tls=tls
            ),
            Producer(registry=registry, group_id="pay-svc", tls=tls) as producer,
        ):
            message_id = producer.send(trade()).message_id
            got.wait_count(1)
        assert got.ids() == [message_id]
        with Producer(registry=registry, group_id="pay-svc", timeout=20) as plaintext:
            started = time.monotonic()
            with pytest.raises(TlsError):
                plaintext.send(trade())
            assert time.monotonic() - started < QUICK + 2  # the ZooKeeper look-up included
    finally:
        broker.stop_quietly()


def readme_production_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("### A production-shaped example", 1)[1]
    return section.split("```toml\n", 1)[1].split("```", 1)[0]


def test_readme_production_example_runs(
    zookeeper: ManagedZooKeeper, zk: Any, tmp_path: Path, tls_files: TlsFiles
) -> None:
    secret_file = tmp_path / "admin.secret"
    secret_file.write_text("readme-admin-secret\n")
    example = readme_production_example()
    for placeholder, real in (
        ("zk1:2181,zk2:2181,zk3:2181", zookeeper.hosts + zk.chroot),
        ("/var/lib/kiteq/db", str(tmp_path / "db")),
        ("/etc/kiteq/admin.secret", str(secret_file)),
        ("/etc/kiteq/tls/broker.pem", str(tls_files.server_cert)),
        ("/etc/kiteq/tls/broker.key", str(tls_files.server_key)),
        ("/etc/kiteq/tls/clients-ca.pem", str(tls_files.ca)),
    ):
        assert placeholder in example, placeholder
        example = example.replace(placeholder, real)
    config = tmp_path / "cluster.toml"
    config.write_text(example)
    broker = BrokerProcess(
        config,
        cluster="prod",
        tls=tls_files.admin(cert=True),
        admin_secret="readme-admin-secret",
    )
    broker.start()
    try:
        assert "tls=mtls" in ready_line(broker)
        tls = tls_files.client(cert=True)
        got = Collector()
        with (
            Consumer(
                brokers=[broker.address],
                group_id="acct-svc",
                secret_key="123",
                bindings=[TRADE],
                handler=got,
                tls=tls,
            ),
            Producer(
                brokers=[broker.address], group_id="pay-svc", secret_key="password", tls=tls
            ) as producer,
        ):
            message_id = producer.send(trade()).message_id
            got.wait_count(1)
        assert got.ids() == [message_id]
        assert broker.stats().cluster == "prod"
    finally:
        broker.stop_quietly()
        # the broker's nodes carry the example's digest ACL: only its credentials delete them
        zk.add_auth("digest", "kiteq:zk-password")
        zk.delete("/kiteq", recursive=True)
    without_secret = config.read_text().replace(f'adminSecretFile = "{secret_file}"\n', "")
    config.write_text(without_secret)
    refused = run_kiteq(
        ["-clusterName=prod", f"-configPath={config}"],
        env={k: v for k, v in os.environ.items() if k != "KITEQ_ADMIN_SECRET"},
    )
    assert refused.returncode == 1
    assert "clusters.prod.adminSecret" in refused.stderr


def test_mtls_clients_reconnect_after_a_broker_restart(
    start_broker: StartBroker, tls_files: TlsFiles
) -> None:
    # a lost connection is retried as usual: only a TLS refusal is final
    broker = start_broker(tls_files.broker_keys(mtls=True), store="rocksdb")
    tls = tls_files.client(cert=True)
    got = Collector()
    with (
        helpers.consumer(
            broker,
            "acct-svc",
            [Binding.direct("trade", "pay-succ", persistent=True)],
            got,
            tls=tls,
            reconnect_max_delay=0.5,
        ) as consumer,
        helpers.producer(broker, tls=tls, timeout=30, reconnect_max_delay=0.5) as producer,
    ):
        first = producer.send(trade(b"before")).message_id
        got.wait_count(1)
        broker.kill()
        broker.start()
        second = producer.send(trade(b"after")).message_id
        got.wait_for(lambda received: second in {m.message_id for m in received}, 30)
        assert consumer.error is None
    assert {first, second} <= set(got.ids())
