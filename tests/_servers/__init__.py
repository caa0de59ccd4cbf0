"""Helpers for tests that need real servers: CI policy, free ports, server processes.

Under ``CI=true`` a missing component fails the test; elsewhere it skips, so a laptop
without Java still runs the rest of the suite.
"""

from __future__ import annotations

import os
import socket
from typing import Final, NoReturn

import pytest

__all__ = ["CI", "free_port", "unavailable"]

CI: Final = os.environ.get("CI") == "true"


def unavailable(what: str) -> NoReturn:
    """Fail under CI, skip elsewhere: *what* (a component) is missing."""
    if CI:
        pytest.fail(f"{what} is required under CI=true but is not available", pytrace=False)
    pytest.skip(f"{what} is not available")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller must tolerate a rare race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
