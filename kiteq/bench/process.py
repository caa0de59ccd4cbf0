"""A ``python -m kiteq`` child process: started, watched until ready, stopped.

The broker binds the port it is given (``-bind=127.0.0.1:0``: one the OS picks) and prints
``kiteq ready ... bind=<address> ...`` once it serves (with ``ops=<url>`` and ``http=<url>``
when ``-pport``/``-hport`` are on, 0 there too being a port the OS picks); the addresses are
read from that line, so no port is chosen before the broker binds it (a free-port probe
races other processes).
Shared by the bench's own broker and the end-to-end tests.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from kiteq.core.errors import KiteQError

__all__ = ["KiteqProcess"]

_READY: Final = "kiteq ready"
_FIELD: Final = re.compile(r" (\w+)=(\S+)")
# lines of output shown when the broker does not start
_SHOWN_LINES: Final = 60


class KiteqProcess:
    def __init__(
        self, args: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.args = tuple(args)
        self.cwd = cwd
        self.env = dict(env or {})
        # every line the process printed (stdout and stderr), newest last
        self.output: list[str] = []
        # the ready line's key=value fields (bind, ops, http, ...); empty before it came
        self.ready: dict[str, str] = {}
        self._proc: subprocess.Popen[str] | None = None
        self._pump: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self._process().pid

    @property
    def popen(self) -> subprocess.Popen[str] | None:
        """The running or exited process (None before the first start), for signals."""
        return self._proc

    @property
    def address(self) -> str:
        """The gRPC address from the ready line (empty before the broker got ready)."""
        return self.ready.get("bind", "")

    @property
    def port(self) -> int:
        """The gRPC port from the ready line (0 before the broker got ready)."""
        return int(self.address.rpartition(":")[2]) if self.address else 0

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        """Start the process and wait for its ready line.

        Raises:
            KiteQError: It exited, or was not ready within *timeout* (then it is killed);
                the message holds its last lines of output.
        """
        ready = threading.Event()
        self.output = []
        self.ready = {}
        self._proc = proc = subprocess.Popen(  # noqa: S603 - our interpreter, our arguments
            [sys.executable, "-m", "kiteq", *self.args],
            cwd=self.cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        stream = proc.stdout

        def pump() -> None:
            if stream is None:  # never: stdout=PIPE
                return
            with stream:
                for line in stream:
                    self.output.append(line.rstrip())
                    if not ready.is_set() and line.startswith(_READY):
                        self.ready = dict(_FIELD.findall(line))
                        ready.set()

        self._pump = threading.Thread(target=pump, name=f"kiteq-{proc.pid}-log", daemon=True)
        self._pump.start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                shown = "\n".join(self.output[-_SHOWN_LINES:])
                raise KiteQError(f"broker did not start:\n{shown}")

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for the exit; its code (raises TimeoutExpired after *timeout*)."""
        proc = self._process()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout)
        self._join()
        return code

    def kill(self) -> None:
        """SIGKILL (when still running) and reap."""
        proc = self._process()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        self._join()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, SIGKILL after *timeout*; nothing when it never started or has exited."""
        if not self.running():
            if self._proc is not None:
                self._join()
            return
        try:
            self.terminate(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def _process(self) -> subprocess.Popen[str]:
        if self._proc is None:
            raise KiteQError("the broker process has not been started")
        return self._proc

    def _join(self) -> None:
        if self._pump is not None:
            self._pump.join(10)
