"""The static file registry (KiteQ's registry_demo): bindings and broker discovery from a file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kiteq.client import Binding, Consumer, Message, Producer
from tests._servers import free_port
from tests.e2e.broker_process import BrokerProcess, write_config, write_registry_file
from tests.e2e.collector import Collector

BINDING = """
[[bindings]]
groupIds = ["acct-svc"]
topic = "trade"
messageType = "pay-.*"
bindType = "regx"
persistent = true
"""


def test_bindings_and_brokers_come_from_the_registry_file(
    tmp_path: Path, launch: Callable[..., BrokerProcess]
) -> None:
    # the file names the broker's address before it starts, as an operator writes it:
    # clients find the broker only there, so this port cannot be one the broker picks
    port = free_port()
    uri = write_registry_file(tmp_path, BINDING, brokers=[f"127.0.0.1:{port}"])
    config = write_config(
        tmp_path, db=f"rocksdb://{tmp_path / 'db'}", registry=uri, extra={"topics": ["trade"]}
    )
    launch(config, port=port)
    got = Collector()
    # the consumer asks for a direct binding; the file (regex pay-.*) is authoritative
    with (
        Consumer(
            registry=uri,
            group_id="acct-svc",
            secret_key="s",
            bindings=[Binding.direct("trade", "pay-succ")],
            handler=got,
        ),
        Producer(registry=uri, group_id="pay-svc", secret_key="s") as p,
    ):
        sent = [
            p.send(Message(topic="trade", message_type=t, body=b"x")).message_id
            for t in ("pay-succ", "pay-fail")
        ]
        got.wait_count(2)
    assert sorted(got.ids()) == sorted(sent)
