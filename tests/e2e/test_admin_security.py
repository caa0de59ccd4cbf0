"""The admin service's protection, end to end with real broker processes.

A production-shaped cluster (one that checks group secrets, name not ``*_dev``) does not
start without an admin secret unless ``adminOpen = true``; the secret comes from the
config, ``KITEQ_ADMIN_SECRET`` or a file; gRPC admin calls, ``kiteq-admin`` and the ops
pages that reveal clients refuse requests without it (``/metrics`` and ``/healthz`` stay
open); every failed authentication and every admin mutation is one ``kiteq.audit`` line.
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Final

import grpc
import pytest

from kiteq.client import Message, Producer
from kiteq.core.admin import ADMIN_SECRET_HEADER
from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc
from tests.e2e import helpers
from tests.e2e.broker_process import BrokerProcess, run_kiteq, write_config
from tests.e2e.fixtures import StartBroker
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

ADMIN_SECRET: Final = "admin-s3cret"
GROUP_SECRETS: Final = {"pay-svc": "pay-secret", "acct-svc": "acct-secret"}
# what makes a test cluster production-shaped: group secrets checked, admin not opened
PRODUCTION: Final[dict[str, object]] = {"acceptAnySecret": False, "adminOpen": False}


def environment(**extra: str) -> dict[str, str]:
    """This process's environment without an admin secret, plus *extra*."""
    env = {k: v for k, v in os.environ.items() if k != "KITEQ_ADMIN_SECRET"}
    env.update(extra)
    return env


def run_broker(config: Path, *flags: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_kiteq(["-clusterName=e2e", f"-configPath={config}", *flags], env=env)


def admin_cli(
    broker: BrokerProcess, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = env if env is not None else environment()
    return helpers.admin_cli(broker, "--json", *args, env=env)


def wait_for_line(broker: BrokerProcess, pattern: str, timeout: float = 10.0) -> str:
    """The first broker output line matching *pattern* (a regex); waits for it to appear."""
    regex = re.compile(pattern)

    def first() -> str | None:
        return next((line for line in list(broker.output) if regex.search(line)), None)

    wait_until(lambda: first() is not None, timeout, f"a broker log line matching {pattern!r}")
    line = first()  # the output only grows: the first match stays the first
    assert line is not None
    return line


def audit_lines(broker: BrokerProcess, word: str) -> list[str]:
    return [line for line in list(broker.output) if " kiteq.audit " in line and word in line]


@pytest.fixture
def start_broker(start_broker: StartBroker) -> StartBroker:
    """The shared fixture's broker, on RocksDB and with the groups' secrets."""
    return functools.partial(start_broker, store="rocksdb", secrets=GROUP_SECRETS)


# -- start-up rule -----------------------------------------------------------------------


def test_production_shaped_cluster_without_admin_secret_does_not_start(tmp_path: Path) -> None:
    config = write_config(tmp_path, db="memory://", extra=PRODUCTION, secrets=GROUP_SECRETS)
    refused = run_broker(config, env=environment())
    assert refused.returncode == 1
    assert "kiteq ready" not in refused.stdout
    assert "clusters.e2e.adminSecret" in refused.stderr
    assert "KITEQ_ADMIN_SECRET" in refused.stderr
    assert "adminOpen = true" in refused.stderr


def test_shipped_zk_online_cluster_needs_an_admin_secret() -> None:
    shipped = run_kiteq(["-clusterName=zk_online", "-bind=127.0.0.1:0"], env=environment())
    assert shipped.returncode == 1
    assert "clusters.zk_online.adminSecret" in shipped.stderr


def test_admin_open_lets_it_start_and_dev_clusters_stay_open(
    start_broker: Callable[..., BrokerProcess],
) -> None:
    opened = start_broker({**PRODUCTION, "adminOpen": True})
    assert opened.stats().cluster == "e2e"
    wait_for_line(opened, r"admin service and ops pages open: no admin secret \(adminOpen")
    dev = start_broker({"acceptAnySecret": True, "adminOpen": False})
    assert dev.stats().cluster == "e2e"
    wait_for_line(dev, r"admin service and ops pages open: no admin secret \(dev cluster")


def test_unreadable_admin_secret_file_names_the_key(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        db="memory://",
        extra={**PRODUCTION, "adminSecretFile": str(tmp_path / "missing")},
        secrets=GROUP_SECRETS,
    )
    refused = run_broker(config, env=environment())
    assert refused.returncode == 1
    assert "clusters.e2e.adminSecretFile" in refused.stderr
    plain = write_config(tmp_path, db="memory://", extra=PRODUCTION, secrets=GROUP_SECRETS)
    flag = run_broker(plain, f"-adminSecretFile={tmp_path / 'also-missing'}", env=environment())
    assert flag.returncode == 1
    assert "kiteq: -adminSecretFile: cannot read" in flag.stderr


# -- gRPC admin and kiteq-admin ----------------------------------------------------------


def stats(broker: BrokerProcess, secret: str | None) -> admin_pb2.StatsResponse:
    metadata = ((ADMIN_SECRET_HEADER, secret),) if secret is not None else ()
    with grpc.insecure_channel(broker.address) as channel:
        return admin_pb2_grpc.AdminStub(channel).Stats(
            admin_pb2.StatsRequest(), metadata=metadata, timeout=5
        )


def test_secret_from_the_environment_guards_every_admin_call(
    start_broker: Callable[..., BrokerProcess],
) -> None:
    broker = start_broker(PRODUCTION, env={"KITEQ_ADMIN_SECRET": ADMIN_SECRET})
    assert stats(broker, ADMIN_SECRET).cluster == "e2e"
    for secret in (None, "", "wrong", ADMIN_SECRET + "x"):
        with pytest.raises(grpc.RpcError) as raised:
            stats(broker, secret)
        assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(broker.address) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        for call in (
            lambda: stub.ListBindings(admin_pb2.ListBindingsRequest(), timeout=5),
            lambda: stub.ListDeadLetters(admin_pb2.ListDeadLettersRequest(), timeout=5),
            lambda: stub.Redrive(admin_pb2.RedriveRequest(messageIds=["0" * 32]), timeout=5),
            lambda: stub.ResolveTransaction(
                admin_pb2.ResolveTransactionRequest(messageId="0" * 32, commit=True), timeout=5
            ),
            lambda: stub.ListScheduled(admin_pb2.ListScheduledRequest(), timeout=5),
            lambda: stub.CancelScheduled(
                admin_pb2.CancelScheduledRequest(messageId="0" * 32), timeout=5
            ),
        ):
            with pytest.raises(grpc.RpcError) as raised:
                call()
            assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    wait_for_line(
        broker, r"kiteq\.audit admin auth failed peer=ipv4:127\.0\.0\.1:\d+ reason=no secret"
    )
    wait_for_line(broker, r"kiteq\.audit admin auth failed peer=\S+ reason=wrong secret")
    # one more refused call: once its line is read, every line the broker logged before it
    # has been read too (the output is read by a thread, in order)
    with pytest.raises(grpc.RpcError):
        stats(broker, "marker")
    wait_until(lambda: len(audit_lines(broker, "admin auth failed")) >= 11, 10, "11 audit lines")
    # 11 refused calls, one line each, and a refused mutation changed nothing
    assert len(audit_lines(broker, "admin auth failed")) == 11
    assert audit_lines(broker, "admin commit") == []
    assert audit_lines(broker, "admin redrive") == []
    assert audit_lines(broker, "admin cancel") == []


def test_kiteq_admin_takes_the_secret_from_env_or_file(
    start_broker: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    broker = start_broker(PRODUCTION, env={"KITEQ_ADMIN_SECRET": ADMIN_SECRET})
    refused = admin_cli(broker, "stats")
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr
    assert "KITEQ_ADMIN_SECRET" in refused.stderr  # the hint
    from_env = admin_cli(broker, "stats", env=environment(KITEQ_ADMIN_SECRET=ADMIN_SECRET))
    assert from_env.returncode == 0, from_env.stderr
    assert json.loads(from_env.stdout)["cluster"] == "e2e"
    secret_file = tmp_path / "admin.secret"
    secret_file.write_text(ADMIN_SECRET + "\n")
    from_file = admin_cli(broker, f"-secretFile={secret_file}", "stats")
    assert from_file.returncode == 0, from_file.stderr
    wrong = admin_cli(broker, "-secret=nope", "stats")
    assert wrong.returncode == 1
    missing = admin_cli(broker, f"-secretFile={tmp_path / 'none'}", "stats")
    assert missing.returncode == 1
    assert "-secretFile" in missing.stderr


def test_secret_file_in_the_config_and_the_flag_overriding_the_environment(
    start_broker: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    in_config = tmp_path / "config.secret"
    in_config.write_text("from-the-config\n")
    broker = start_broker({**PRODUCTION, "adminSecretFile": str(in_config)})
    assert stats(broker, "from-the-config").cluster == "e2e"
    from_flag = tmp_path / "flag.secret"
    from_flag.write_text("from-the-flag\n")
    flagged = start_broker(
        PRODUCTION,
        args=[f"-adminSecretFile={from_flag}"],
        env={"KITEQ_ADMIN_SECRET": "from-the-environment"},
    )
    assert stats(flagged, "from-the-flag").cluster == "e2e"
    with pytest.raises(grpc.RpcError):
        stats(flagged, "from-the-environment")
    # the secret is on no command line
    assert "from-the-flag" not in " ".join(flagged.args)


def test_admin_mutations_are_audit_logged_with_peer_and_filter(
    start_broker: Callable[..., BrokerProcess],
) -> None:
    broker = start_broker(
        {**PRODUCTION, "txCheckDelaySeconds": 600},
        env={"KITEQ_ADMIN_SECRET": ADMIN_SECRET},
        args=["-logLevel=WARNING"],  # the audit trail survives a quiet log level
    )
    env = environment(KITEQ_ADMIN_SECRET=ADMIN_SECRET)
    with Producer(
        brokers=[broker.address], group_id="pay-svc", secret_key=GROUP_SECRETS["pay-svc"]
    ) as producer:
        # a local transaction that decides nothing: the messages stay uncommitted
        pending = [
            producer.send_transactional(
                Message(topic="trade", message_type="pay-succ", body=b"x"), lambda m: None
            ).message_id
            for _ in range(2)
        ]
    commit = admin_cli(broker, "commit", pending[0], env=env)
    assert json.loads(commit.stdout) == {"changed": True}, commit.stderr
    rollback = admin_cli(broker, "rollback", pending[1], env=env)
    assert json.loads(rollback.stdout) == {"changed": True}, rollback.stderr
    # nothing to move: exit 4 (nothing changed), the call still made and audited
    by_filter = admin_cli(broker, "redrive", "-topic", "trade", "-reason", "expired", env=env)
    assert by_filter.returncode == 4, by_filter.stderr
    by_id = admin_cli(broker, "redrive", pending[0], env=env)
    assert by_id.returncode == 4, by_id.stderr
    peer = r"peer=ipv4:127\.0\.0\.1:\d+"
    wait_for_line(broker, rf"kiteq\.audit admin commit {peer} id={pending[0]} changed=True")
    wait_for_line(broker, rf"kiteq\.audit admin rollback {peer} id={pending[1]} changed=True")
    wait_for_line(
        broker,
        rf"kiteq\.audit admin redrive {peer} filter=topic:trade,type:\*,group:\*,reason:expired "
        r"redriven=0",
    )
    wait_for_line(broker, rf"kiteq\.audit admin redrive {peer} ids=1 group=\* redriven=0")
    assert len(audit_lines(broker, "admin ")) == 4
    assert audit_lines(broker, "auth failed") == []


# -- the ops HTTP port -------------------------------------------------------------------


def get(
    broker: BrokerProcess, path: str, authorization: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """GET *path* on *broker*'s ops port: (status, headers, body), whatever the status."""
    assert broker.pport, "no ops port"
    connection = http.client.HTTPConnection("127.0.0.1", broker.pport, timeout=5)
    try:
        headers = {"Authorization": authorization} if authorization is not None else {}
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"operator:{password}".encode()).decode()


def test_ops_pages_require_the_secret_and_metrics_stay_open(
    start_broker: Callable[..., BrokerProcess],
) -> None:
    broker = start_broker(PRODUCTION, pport=0, env={"KITEQ_ADMIN_SECRET": ADMIN_SECRET})
    wait_for_line(broker, rf"ops http listening host=127\.0\.0\.1 port={broker.pport}")
    # the console's page itself holds no data (issue #14): its /api/... reads are guarded
    assert get(broker, "/")[0] == 200
    for path in ("/stat", "/binds", "/api/overview"):
        status, headers, _ = get(broker, path)
        assert status == 401, path
        if not path.startswith("/api/"):  # the console has its own login form
            assert headers["WWW-Authenticate"].startswith("Basic ")
        for wrong in (f"Bearer {ADMIN_SECRET}x", basic("nope"), "Bearer ", "Basic !!!"):
            assert get(broker, path, wrong)[0] == 401, (path, wrong)
        assert get(broker, path, f"Bearer {ADMIN_SECRET}")[0] == 200, path
        assert get(broker, path, basic(ADMIN_SECRET))[0] == 200, path
    status, _, body = get(broker, "/stat", f"Bearer {ADMIN_SECRET}")
    assert "kiteq" in json.loads(body)
    status, _, body = get(broker, "/metrics")
    assert status == 200
    assert b"kiteq_" in body
    assert get(broker, "/healthz")[0] == 200
    wait_for_line(
        broker, r"kiteq\.audit admin auth failed peer=127\.0\.0\.1:\d+ path=/stat reason=no secret"
    )
    wait_for_line(
        broker, r"kiteq\.audit admin auth failed peer=\S+ path=/binds reason=wrong secret"
    )
    # 3 paths x (1 without + 4 wrong) refused requests, one line each
    assert len(audit_lines(broker, "path=")) == 15


def test_ops_pages_stay_open_on_a_dev_cluster(start_broker: Callable[..., BrokerProcess]) -> None:
    broker = start_broker({"acceptAnySecret": True}, pport=0)
    wait_for_line(broker, rf"ops http listening host=127\.0\.0\.1 port={broker.pport}")
    assert get(broker, "/stat")[0] == 200
    assert get(broker, "/binds")[0] == 200
