"""A real standalone ZooKeeper for tests, from Debian's ``zookeeper`` package.

Started as ``java -cp CONFDIR:/usr/share/java/zookeeper.jar ...QuorumPeerMain zoo.cfg`` on
a free loopback port with its data in a temporary directory; ready when it answers the
``ruok`` four-letter word with ``imok`` and ``srvr`` reports it serving.

Also here: ``expire_session`` (a session expired for real, the way ZooKeeper expires it)
and ``TcpProxy`` (cut a client's connection without touching the server: SUSPENDED, and
LOST when the cut outlasts the session timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Final

from kazoo.client import KazooClient

from tests._servers import free_port

__all__ = [
    "ZOOKEEPER_JAR",
    "ManagedZooKeeper",
    "TcpProxy",
    "ZooKeeperStartError",
    "expire_session",
    "missing_zookeeper",
    "owner",
    "wait_owner",
]

logger = logging.getLogger(__name__)

ZOOKEEPER_JAR: Final = Path("/usr/share/java/zookeeper.jar")
# slf4j-simple ships with Debian's zookeeper (libslf4j-java); without a binding it logs nothing.
SLF4J_SIMPLE_JAR: Final = Path("/usr/share/java/slf4j-simple.jar")
MAIN_CLASS: Final = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
HOST: Final = "127.0.0.1"
PORT_ATTEMPTS: Final = 3


class ZooKeeperStartError(RuntimeError):
    """ZooKeeper did not come up; the message ends with the tail of its log."""


def missing_zookeeper() -> str | None:
    """What is missing to run ZooKeeper here, or None when everything is installed."""
    if shutil.which("java") is None:
        return "java (apt-get install zookeeper)"
    if not ZOOKEEPER_JAR.is_file():
        return f"{ZOOKEEPER_JAR} (apt-get install zookeeper)"
    return None


class ManagedZooKeeper:
    """One standalone ZooKeeper process with its data and log under *workdir*."""

    def __init__(self, workdir: Path, *, start_timeout: float = 30.0) -> None:
        self._workdir = workdir
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.port = 0

    @property
    def hosts(self) -> str:
        """The kazoo connection string, ``127.0.0.1:<port>``."""
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self._workdir / "zookeeper.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers ``ruok`` and serves.

        Raises:
            ZooKeeperStartError: It exited or did not answer within the start timeout.
        """
        if self._process is not None:
            raise RuntimeError("ZooKeeper already started")
        for _ in range(PORT_ATTEMPTS):
            self.port = free_port(HOST)
            self._launch()
            if self._wait_ready():
                logger.info("zookeeper ready hosts=%s pid=%s", self.hosts, self.pid)
                return
            exited = not self.running
            self.stop()
            if not exited:
                break
            # Most likely lost the race for the port to another process: try another one.
        raise ZooKeeperStartError(f"ZooKeeper did not start; log tail:\n{self.log_tail()}")

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def four_letter(self, word: str, timeout: float = 1.0) -> str:
        """Send a whitelisted four-letter word (``ruok``, ``srvr``, ``stat``); return the reply."""
        with socket.create_connection((HOST, self.port), timeout=timeout) as sock:
            sock.sendall(word.encode("ascii"))
            chunks: list[bytes] = []
            while chunk := sock.recv(4096):
                chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    def stop(self) -> None:
        """Stop the process (TERM, then KILL after 10 s); idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _launch(self) -> None:
        conf = self._workdir / "conf"
        data = self._workdir / "data"
        conf.mkdir(parents=True, exist_ok=True)
        data.mkdir(parents=True, exist_ok=True)
        (conf / "zoo.cfg").write_text(
            "\n".join(
                [
                    "tickTime=2000",
                    f"dataDir={data}",
                    f"clientPort={self.port}",
                    f"clientPortAddress={HOST}",
                    "admin.enableServer=false",
                    "4lw.commands.whitelist=ruok,srvr,stat",
                    "",
                ]
            )
        )
        classpath = [str(conf), str(ZOOKEEPER_JAR)]
        if SLF4J_SIMPLE_JAR.is_file():
            classpath.append(str(SLF4J_SIMPLE_JAR))
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [
                "java",
                "-Xmx256m",
                "-XX:+UseSerialGC",
                "-cp",
                ":".join(classpath),
                MAIN_CLASS,
                str(conf / "zoo.cfg"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self._workdir,
        )

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if not self.running:
                return False
            with contextlib.suppress(OSError):
                # "imok" comes before the server takes sessions; srvr then reports its Mode.
                if self.four_letter("ruok") == "imok" and "Mode:" in self.four_letter("srvr"):
                    return True
            time.sleep(0.1)
        return False


def expire_session(hosts: str, session_id: int, password: bytes, *, timeout: float = 10.0) -> None:
    """Expire a session for real, as ZooKeeper does when its owner goes silent.

    A second client joins the session with its id and password (the server moves the
    session to it and drops the first client's connection), then closes it: the server
    ends the session and deletes its ephemeral nodes. The first client, reconnecting, is
    told its session expired (kazoo: LOST, then CONNECTED with a new session).
    """
    thief = KazooClient(hosts=hosts, client_id=(session_id, password), timeout=timeout)
    thief.start(timeout=timeout)
    try:
        if thief.client_id is None or thief.client_id[0] != session_id:
            raise RuntimeError(f"could not join session 0x{session_id:x}")
    finally:
        thief.stop()
        thief.close()


class TcpProxy:
    """A loopback TCP proxy to *port*; ``cut()`` drops every connection and refuses new ones
    until ``restore()``."""

    def __init__(self, port: int, host: str = HOST) -> None:
        self._target = (host, port)
        self._listener = socket.create_server((HOST, 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._cut = False
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    @property
    def hosts(self) -> str:
        return f"{HOST}:{self.port}"

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.cut()
        _shut(self._listener)
        for thread in self._threads:
            thread.join(5)
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()
        self._listener.close()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refuse = self._cut or self._closed
            if refuse:
                _shut(client)
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            _shut(sink)
            _shut(source)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def owner(zk: Any, path: str) -> int | None:
    """The session owning the ephemeral node *path*; 0 if persistent, None if absent."""
    stat = zk.exists(path)
    return None if stat is None else int(stat.ephemeralOwner)


async def wait_owner(
    zk: Any, path: str, accept: Callable[[int | None], bool], timeout: float = 20.0
) -> int | None:
    """Poll *path*'s owner (off the loop) until *accept* takes it; return it."""
    async with asyncio.timeout(timeout):
        while True:
            current = await asyncio.to_thread(owner, zk, path)
            if accept(current):
                return current
            await asyncio.sleep(0.05)
