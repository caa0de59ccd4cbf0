"""The static file registry (KiteQ's registry_demo): bindings and broker discovery from a file."""

from __future__ import annotations

from pathlib import Path

from kiteq.client import Binding, Consumer, Message, Producer
from tests._servers import free_port
from tests.e2e.broker_process import BrokerProcess
from tests.e2e.collector import Collector


def test_bindings_and_brokers_come_from_the_registry_file(tmp_path: Path) -> None:
    port = free_port()
    registry = tmp_path / "registry.toml"
    registry.write_text(
        f"""
[[brokers]]
address = "127.0.0.1:{port}"
topics = ["trade"]

[[bindings]]
groupIds = ["acct-svc"]
topic = "trade"
messageType = "pay-.*"
bindType = "regx"
persistent = true
"""
    )
    config = tmp_path / "cluster.toml"
    config.write_text(
        f"""
[registry.demo]
hosts = "file://{registry}"

[clusters.e2e]
env = "demo"
topics = ["trade"]
db = "rocksdb://{tmp_path / "db"}"
acceptAnySecret = true
"""
    )
    broker = BrokerProcess(config, port=port)
    broker.start()
    try:
        got = Collector()
        uri = f"file://{registry}"
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
    finally:
        broker.stop_quietly()
