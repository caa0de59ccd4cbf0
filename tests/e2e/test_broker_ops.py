"""Broker process behaviour: health, reflection, port conflicts, persistent bindings."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kiteq.client import Binding, Consumer
from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc
from tests.e2e.broker_process import BrokerProcess, run_kiteq, write_config
from tests.e2e.collector import Collector


def test_health_and_reflection_are_served(broker: BrokerProcess) -> None:
    with grpc.insecure_channel(broker.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="kiteq.proto.v1.Broker"), timeout=5
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"kiteq.proto.v1.Broker", "kiteq.proto.v1.Admin", "grpc.health.v1.Health"} <= names


def test_a_second_broker_on_the_same_port_fails_loudly(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    other = tmp_path / "second"
    other.mkdir()
    config = write_config(other, db="memory://")
    second = run_kiteq(
        [
            "--cluster-name=e2e",
            f"--configPath={config}",
            f"--bind={broker.address}",
        ]
    )
    assert second.returncode == 1
    assert "-bind: cannot listen on" in second.stderr


def test_a_second_broker_on_the_same_store_fails_loudly(broker: BrokerProcess) -> None:
    second = run_kiteq(
        [
            "-clusterName=e2e",
            f"-configPath={broker.config}",
            "-bind=127.0.0.1:0",
        ]
    )
    assert second.returncode == 1
    assert "LOCK" in second.stderr


def test_persistent_bindings_survive_a_restart_and_non_persistent_ones_do_not(
    broker: BrokerProcess,
) -> None:
    with (
        Consumer(
            brokers=[broker.address],
            group_id="keep",
            secret_key="s",
            bindings=[Binding.fanout("trade", persistent=True)],
            handler=Collector(),
        ),
        Consumer(
            brokers=[broker.address],
            group_id="drop",
            secret_key="s",
            bindings=[Binding.fanout("trade", persistent=False)],
            handler=Collector(),
        ),
    ):
        pass
    assert broker.terminate() == 0
    broker.start()
    with grpc.insecure_channel(broker.address) as channel:
        listed = admin_pb2_grpc.AdminStub(channel).ListBindings(
            admin_pb2.ListBindingsRequest(topic="trade"), timeout=5
        )
    assert [(b.groupId, b.persistent) for b in listed.bindings] == [("keep", True)]
