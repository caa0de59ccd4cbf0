"""Run a real ``kiteq`` broker process for end-to-end tests."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

from kiteq.bench.process import KiteqProcess
from kiteq.core.admin import ADMIN_SECRET_HEADER
from kiteq.core.errors import KiteQError
from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]


def write_config(
    directory: Path,
    *,
    db: str,
    name: str = "e2e",
    registry: str = "embedded://",
    extra: Mapping[str, object] | None = None,
    secrets: Mapping[str, str] | None = None,
) -> Path:
    lines = [
        "[registry.local]",
        f'hosts = "{registry}"',
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
    lines.extend(_setting_lines(settings))
    if secrets:
        lines.append(f"[clusters.{name}.secrets]")
        lines.extend(f'{group} = "{secret}"' for group, secret in secrets.items())
    path = directory / "cluster.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def strict_config(directory: Path, secrets: Mapping[str, str]) -> Path:
    """A cluster e2e on RocksDB that serves only topic trade and checks the groups'
    *secrets* (no acceptAnySecret)."""
    return write_config(
        directory,
        db=f"rocksdb://{directory / 'db'}",
        extra={"acceptAnySecret": False, "topics": ["trade"]},
        secrets=secrets,
    )


def write_registry_file(directory: Path, bindings: str, *, brokers: Sequence[str] = ()) -> str:
    """A static registry file (KiteQ's registry_demo) with *brokers* (addresses) serving
    topic trade, and the ``[[bindings]]`` tables *bindings*; its ``file://`` URI."""
    path = directory / "registry.toml"
    entries = "".join(f'[[brokers]]\naddress = "{b}"\ntopics = ["trade"]\n' for b in brokers)
    path.write_text(entries + bindings)
    return f"file://{path}"


def zk_registry(hosts: str, timeout: int = 4) -> str:
    """The zk:// URI of the test's ZooKeeper (*hosts* with its chroot), session *timeout* s."""
    return f"zk://{hosts}?timeout={timeout}"


def write_zk_config(
    directory: Path,
    registry: str,
    *,
    db: str,
    topics: Sequence[str] = ("trade",),
    extra: Mapping[str, object] | None = None,
) -> Path:
    """A cluster ``e2e`` registered in ZooKeeper at *registry* (a zk:// URI).

    Unlike ``write_config`` it sets no delivery or recover windows (the broker's defaults
    unless *extra* says otherwise): the ZooKeeper tests time the broker as deployed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["[registry.zk]", f'hosts = "{registry}"', "[clusters.e2e]", 'env = "zk"']
    settings: dict[str, object] = {"topics": list(topics), "db": db, "acceptAnySecret": True}
    settings.update(extra or {})
    lines.extend(_setting_lines(settings))
    path = directory / "cluster.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _setting_lines(settings: Mapping[str, object]) -> list[str]:
    """TOML ``key = value`` lines for booleans, strings, lists and numbers."""
    lines = []
    for key, value in settings.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, list):
            lines.append(f"{key} = [{', '.join(repr(v).replace(chr(39), chr(34)) for v in value)}]")
        else:
            lines.append(f"{key} = {value}")
    return lines


def run_kiteq(
    args: Sequence[str],
    *,
    cwd: Path = REPO,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """``python -m kiteq *args*`` run to its exit (for a broker that must not start);
    *env* is the whole environment (None: this process's)."""
    return subprocess.run(
        [sys.executable, "-m", "kiteq", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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

    *port* None: the first start binds a port the OS picks (read from the ready line) and
    restarts bind the same one. *pport* (the ops port: /metrics, /stat, console) and
    *hport* (the HTTP publish API) likewise, where 0 is a port the OS picks and None
    leaves them off (``ops_url``/``http_url`` once started). *args* are extra command-line
    flags and *env* extra environment variables; *tls* is what ``stats``/``lookup``
    connect with (a TLS broker), *admin_secret* what they send.
    """

    def __init__(
        self,
        config: Path,
        *,
        cluster: str = "e2e",
        port: int | None = None,
        cwd: Path | None = None,
        pport: int | None = None,
        hport: int | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        tls: ClientTls | None = None,
        admin_secret: str = "",
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.port = port or 0
        self.pport = pport
        self.hport = hport
        self.cwd = cwd or config.parent
        self.args = tuple(args)
        self.env = dict(env or {})
        self.tls = tls
        self.admin_secret = admin_secret
        self._process: KiteqProcess | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ops_url(self) -> str:
        """``http://127.0.0.1:<pport>`` of the started broker's ops port."""
        assert self.pport, "no ops port (pport) or not started"
        return f"http://127.0.0.1:{self.pport}"

    @property
    def http_url(self) -> str:
        """``http(s)://127.0.0.1:<hport>`` of the started broker's HTTP publish API."""
        assert self.hport, "no HTTP publish port (hport) or not started"
        assert self._process is not None
        return self._process.ready["http"]

    @property
    def proc(self) -> subprocess.Popen[str] | None:
        return self._process.popen if self._process is not None else None

    @property
    def output(self) -> list[str]:
        return self._process.output if self._process is not None else []

    def start(self, timeout: float = 30.0) -> None:
        listeners = (("pport", self.pport), ("hport", self.hport))
        self._process = KiteqProcess(
            [
                f"-clusterName={self.cluster}",
                f"-configPath={self.config}",
                f"-bind=127.0.0.1:{self.port}",
                "-grace=5",
                *(f"-{flag}={port}" for flag, port in listeners if port is not None),
                *self.args,
            ],
            cwd=self.cwd,
            env=self.env,
        )
        try:
            self._process.start(timeout)
        except KiteQError as exc:
            raise RuntimeError(str(exc)) from exc
        self.port = self._process.port
        ready = self._process.ready
        if self.pport is not None:
            self.pport = _port(ready["ops"])
        if self.hport is not None:
            self.hport = _port(ready["http"])

    def terminate(self, timeout: float = 20.0) -> int:
        assert self._process is not None, "not started"
        return self._process.terminate(timeout)

    def kill(self) -> None:
        assert self._process is not None, "not started"
        self._process.kill()

    def stop_quietly(self) -> None:
        if self._process is not None:
            self._process.kill()

    def passed_recover_scan(self, timeout: float = 30.0) -> None:
        """Until a recover scan that started after this call has completed.

        The positive event behind "nothing more is delivered": whatever was still due
        would have been offered by that scan. (The scan running now may have started
        before: the second completion from now is one that started after.)
        """
        start = self.stats().recoverScans
        wait_until(
            lambda: self.stats().recoverScans >= start + 2, timeout, "a recover scan from now"
        )

    def ops_page(self, path: str) -> str:
        """The ops port's page at *path* (``/stat``, ``/binds``, ...), as text."""
        with urllib.request.urlopen(f"{self.ops_url}{path}", timeout=5) as reply:
            return str(reply.read().decode())

    def metrics(self) -> str:
        """The ops port's ``/metrics`` page (Prometheus text)."""
        return self.ops_page("/metrics")

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

    def bindings(self, topic: str) -> list[tuple[str, str]]:
        """(group, message type) of the broker's bindings for *topic* (admin ListBindings)."""
        with self.admin_channel() as channel:
            reply = admin_pb2_grpc.AdminStub(channel).ListBindings(
                admin_pb2.ListBindingsRequest(topic=topic), metadata=self._metadata(), timeout=5
            )
        return sorted((b.groupId, b.messageType) for b in reply.bindings)

    def lookup(self, message_id: str) -> admin_pb2.GetMessageResponse:
        with self.admin_channel() as channel:
            return admin_pb2_grpc.AdminStub(channel).GetMessage(
                admin_pb2.GetMessageRequest(messageId=message_id),
                metadata=self._metadata(),
                timeout=5,
            )


def _port(url: str) -> int:
    """The port of a ready-line address such as ``http://127.0.0.1:8080``."""
    return int(url.rpartition(":")[2])
