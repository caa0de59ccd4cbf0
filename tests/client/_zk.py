"""ZooKeeper helpers of the client discovery tests: a directory, and its session expired."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from kiteq.client._discovery import resolve
from kiteq.client._zk_directory import ZkDirectory
from tests._servers.zookeeper import expire_session
from tests.waiting import eventually

__all__ = ["expire_directory_session", "opened_directory", "wait_for_new_owner"]


@contextlib.asynccontextmanager
async def opened_directory(uri: str) -> AsyncIterator[ZkDirectory]:
    """The client's directory for the ``zk://`` registry *uri*, closed at the end."""
    found = resolve(None, uri)
    assert isinstance(found, ZkDirectory)
    try:
        yield found
    finally:
        await found.close()


async def expire_directory_session(directory: ZkDirectory, hosts: str) -> int:
    """Expire *directory*'s ZooKeeper session from outside; return the expired session's id."""
    old_session, password = directory.session.client.client_id
    await asyncio.to_thread(expire_session, hosts, old_session, password)
    return int(old_session)


async def wait_for_new_owner(zk: Any, path: str, old_session: int) -> int:
    """Wait until the ephemeral *path* exists in a session other than *old_session*; its id."""
    await eventually(
        lambda: (stat := zk.exists(path)) is not None and stat.ephemeralOwner != old_session,
        timeout=15,
        what=f"{path} re-created in a new session",
    )
    return int(zk.exists(path).ephemeralOwner)
