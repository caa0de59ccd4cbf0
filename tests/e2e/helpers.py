"""What several end-to-end tests do against a broker process: clients, kiteq-admin, stats."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Mapping
from typing import Any, Final, TypedDict

import grpc

from kiteq.client import (
    AsyncConsumer,
    AsyncProducer,
    Binding,
    Consumer,
    Message,
    Producer,
)
from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc
from tests.e2e.broker_process import REPO, BrokerProcess
from tests.waiting import wait_until

SECRET: Final = "s3cret"
PAY_SUCC: Final = [Binding.direct("trade", "pay-succ")]


def pay_succ(body: bytes) -> Message:
    """A trade/pay-succ message with *body* (what PAY_SUCC binds)."""
    return Message(topic="trade", message_type="pay-succ", body=body)


def consumer(
    broker: BrokerProcess,
    group: str,
    bindings: list[Binding],
    handler: Any,
    **options: Any,
) -> Consumer:
    """A consumer of *group* on *broker* with the shared secret (and Consumer *options*)."""
    return Consumer(**_client(broker, group), bindings=bindings, handler=handler, **options)


def producer(broker: BrokerProcess, **options: Any) -> Producer:
    """A producer of group pay-svc on *broker* with the shared secret (and Producer *options*)."""
    return Producer(**_client(broker, "pay-svc"), **options)


def async_consumer(broker: BrokerProcess, group: str = "acct-svc", **options: Any) -> AsyncConsumer:
    """An asyncio consumer of *group* on *broker* bound to PAY_SUCC, with the shared secret
    (and AsyncConsumer *options*)."""
    return AsyncConsumer(**_client(broker, group), bindings=PAY_SUCC, **options)


def async_producer(broker: BrokerProcess, **options: Any) -> AsyncProducer:
    """An asyncio producer of group pay-svc on *broker* with the shared secret (and
    AsyncProducer *options*)."""
    return AsyncProducer(**_client(broker, "pay-svc"), **options)


class _Identity(TypedDict):
    brokers: list[str]
    group_id: str
    secret_key: str


def _client(broker: BrokerProcess, group: str) -> _Identity:
    """The options every test client of *group* on *broker* shares."""
    return {"brokers": [broker.address], "group_id": group, "secret_key": SECRET}


def run_readme_example(section: str, broker: BrokerProcess) -> subprocess.CompletedProcess[str]:
    """Run the one Python example of the README's ``## <section>`` against *broker* (for
    the README's 127.0.0.1:13800); the run, to its exit."""
    readme = (REPO / "README.md").read_text()
    text = readme.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    (example,) = re.findall(r"```python\n(.*?)```", text, re.S)
    script = example.replace("127.0.0.1:13800", broker.address)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def wait_idle(broker: BrokerProcess, timeout: float = 10.0) -> None:
    """Until every stored message has been deleted (all groups acked)."""
    wait_until(lambda: not any(broker.stats().backlog.values()), timeout, "an empty backlog")


def in_flight(broker: BrokerProcess, group: str) -> int:
    return sum(g.inFlight for g in broker.stats().groups if g.groupId == group)


def dead_letters(broker: BrokerProcess) -> list[admin_pb2.DeadLetterInfo]:
    with grpc.insecure_channel(broker.address) as channel:
        reply = admin_pb2_grpc.AdminStub(channel).ListDeadLetters(
            admin_pb2.ListDeadLettersRequest(), timeout=5
        )
    return list(reply.deadLetters)


def admin_cli(
    broker: BrokerProcess, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """This checkout's ``kiteq-admin -broker <broker> *args*`` (*env*: the whole environment,
    None: this process's)."""
    return subprocess.run(
        [sys.executable, "-m", "kiteq.admin.cli", "-broker", broker.address, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def admin_json(broker: BrokerProcess, *args: str, exit_code: int = 0) -> dict[str, Any]:
    """``kiteq-admin --json`` against *broker*; *exit_code* is the one expected (4: nothing
    changed, 3: not found)."""
    run = admin_cli(broker, "--json", *args)
    assert run.returncode == exit_code, run.stderr
    result: dict[str, Any] = json.loads(run.stdout)
    return result
