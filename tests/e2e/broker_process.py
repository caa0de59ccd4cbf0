"""Run a real ``kiteq`` broker process for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import grpc

from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    directory: Path,
    *,
    db: str,
    name: str = "e2e",
    extra: Mapping[str, object] | None = None,
    secrets: Mapping[str, str] | None = None,
) -> Path:
    lines = [
        "[registry.local]",
        'hosts = "embedded://"',
        f"[clusters.{name}]",
        'env = "local"',
        f'db = "{db}"',
    ]
    settings: dict[str, object] = {
        "deliverySeconds": 2,
        "recoverSeconds": 1,
        "acceptAnySecret": True,
    }
    settings.update(extra or {})
    for key, value in settings.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, list):
            lines.append(f"{key} = [{', '.join(repr(v).replace(chr(39), chr(34)) for v in value)}]")
        else:
            lines.append(f"{key} = {value}")
    if secrets:
        lines.append(f"[clusters.{name}.secrets]")
        lines.extend(f'{group} = "{secret}"' for group, secret in secrets.items())
    path = directory / "cluster.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class BrokerProcess:
    """One broker process; ``start`` waits for its ready line."""

    def __init__(
        self,
        config: Path,
        *,
        cluster: str = "e2e",
        port: int | None = None,
        cwd: Path | None = None,
        pport: int = 0,
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.port = port or free_port()
        # the ops HTTP port (/metrics, /stat); 0: off
        self.pport = pport
        self.cwd = cwd or config.parent
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.output = []
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kiteq",
                f"-clusterName={self.cluster}",
                f"-configPath={self.config}",
                f"-bind=127.0.0.1:{self.port}",
                "-grace=5",
                f"-pport={self.pport}",
            ],
            cwd=self.cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = threading.Event()
        stream = self.proc.stdout
        assert stream is not None

        def pump() -> None:
            with stream:
                for line in stream:
                    self.output.append(line.rstrip())
                    if line.startswith("kiteq ready"):
                        ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()

        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("broker did not start:\n" + "\n".join(self.output[-40:]))

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._pump.join(10)
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._pump.join(10)

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None:
            self._pump.join(10)

    def stats(self) -> admin_pb2.StatsResponse:
        with grpc.insecure_channel(self.address) as channel:
            return admin_pb2_grpc.AdminStub(channel).Stats(admin_pb2.StatsRequest(), timeout=5)

    def lookup(self, message_id: str) -> admin_pb2.GetMessageResponse:
        with grpc.insecure_channel(self.address) as channel:
            return admin_pb2_grpc.AdminStub(channel).GetMessage(
                admin_pb2.GetMessageRequest(messageId=message_id), timeout=5
            )
