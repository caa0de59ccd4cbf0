"""Run a real ``kiteq`` broker process for end-to-end tests."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

from kiteq.core.admin import ADMIN_SECRET_HEADER
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
        # test clusters with secrets are production-shaped: their admin service is open
        # only because the tests say so (tests/e2e/test_admin_security.py checks the rule)
        "adminOpen": True,
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


@dataclasses.dataclass(frozen=True)
class ClientTls:
    """PEM files of a TLS test broker's CA, and of a client certificate for mTLS."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.ca.read_bytes(),
            self.key.read_bytes() if self.key else None,
            self.cert.read_bytes() if self.cert else None,
        )


class BrokerProcess:
    """One broker process; ``start`` waits for its ready line.

    *args* are extra command-line flags and *env* extra environment variables; *tls* is
    what ``stats``/``lookup`` connect with (a TLS broker), *admin_secret* what they send.
    """

    def __init__(
        self,
        config: Path,
        *,
        cluster: str = "e2e",
        port: int | None = None,
        cwd: Path | None = None,
        pport: int = 0,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        tls: ClientTls | None = None,
        admin_secret: str = "",
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.port = port or free_port()
        # the ops HTTP port (/metrics, /stat); 0: off
        self.pport = pport
        self.cwd = cwd or config.parent
        self.args = tuple(args)
        self.env = dict(env or {})
        self.tls = tls
        self.admin_secret = admin_secret
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
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
                *self.args,
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

    def admin_channel(self) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, self.tls.channel_credentials())

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return ((ADMIN_SECRET_HEADER, self.admin_secret),) if self.admin_secret else ()

    def stats(self) -> admin_pb2.StatsResponse:
        with self.admin_channel() as channel:
            return admin_pb2_grpc.AdminStub(channel).Stats(
                admin_pb2.StatsRequest(), metadata=self._metadata(), timeout=5
            )

    def lookup(self, message_id: str) -> admin_pb2.GetMessageResponse:
        with self.admin_channel() as channel:
            return admin_pb2_grpc.AdminStub(channel).GetMessage(
                admin_pb2.GetMessageRequest(messageId=message_id),
                metadata=self._metadata(),
                timeout=5,
            )
