"""Transitional: what ``kiteq.client`` imports from here is in ``zk_nodes`` and ``zk_session``.

Delete this module once ``kiteq.client._zk_directory`` uses the public modules.
"""

from __future__ import annotations

from kiteq.binding.zk_nodes import (
    ALIVE_ROOT,
    ALL_ROOT,
    PUB_ROOT,
    SERVER_ROOT,
    SUB_ROOT,
    bind_path,
    write_bindings,
)
from kiteq.binding.zk_session import hop

__all__ = [
    "ALIVE_ROOT",
    "ALL_ROOT",
    "PUB_ROOT",
    "SERVER_ROOT",
    "SUB_ROOT",
    "bind_path",
    "hop",
    "write_bindings",
]
