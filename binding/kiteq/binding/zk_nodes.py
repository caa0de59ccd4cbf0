"""KiteQ's ZooKeeper paths, and the blocking node operations of the ``zk://`` registry.

Every function here blocks on ZooKeeper: call them from a worker thread
(``asyncio.to_thread``), never from the event loop or from a kazoo callback. They take a
started ``KazooClient``, may raise any ``KazooException``, and are idempotent, so callers
simply retry them.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
from collections.abc import Sequence
from typing import Any, Final

from kazoo.exceptions import (
    BadVersionError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
)

from kiteq.binding.model import Binding, dumps, loads

__all__ = [
    "ALIVE_ROOT",
    "ALL_ROOT",
    "BIND_SUFFIX",
    "PUB_ROOT",
    "ROOT",
    "SERVER_ROOT",
    "SUB_ROOT",
    "NodeContendedError",
    "Outcome",
    "alive_path",
    "all_path",
    "bind_path",
    "delete_own",
    "ensure_ephemeral",
    "ensure_persistent",
    "ensure_unless_held",
    "node_data",
    "server_path",
    "session_id",
    "write_bindings",
]

# the ZooKeeper modules of kiteq.binding log as one component, the registry's logger
logger = logging.getLogger("kiteq.binding.zk")

ROOT: Final = "/kiteq"
SERVER_ROOT: Final = "/kiteq/server"  # /{topic}/{host:port}: ephemeral, one per served topic
ALIVE_ROOT: Final = "/kiteq/alive_servers"  # /{host:port}: ephemeral
ALL_ROOT: Final = "/kiteq/all_servers"  # /{host:port}: persistent inventory
PUB_ROOT: Final = "/kiteq/pub"  # /{topic}/{group}/{host}: written by producers
SUB_ROOT: Final = "/kiteq/sub"  # /{topic}/{group}-bind: persistent, JSON array of bindings
BIND_SUFFIX: Final = "-bind"

# compare-and-set rounds against concurrent writers before giving up (the caller retries)
_ROUNDS: Final = 8


class NodeContendedError(KazooException):  # type: ignore[misc]  # kazoo is untyped
    """Other writers kept changing a node while it was being written; try again."""


class Outcome(enum.Enum):
    """What ``ensure_ephemeral`` / ``ensure_persistent`` / ``ensure_unless_held`` did."""

    KEPT = "kept"
    CREATED = "created"
    UPDATED = "updated"
    REPLACED = "replaced"  # a stale node (another session's) was deleted and re-created
    HELD = "held"  # the node exists (maybe another process's): left alone
    DENIED = "denied"  # the ZooKeeper ACLs do not let this identity create it


def server_path(topic: str, address: str) -> str:
    return f"{SERVER_ROOT}/{topic}/{address}"


def alive_path(address: str) -> str:
    return f"{ALIVE_ROOT}/{address}"


def all_path(address: str) -> str:
    return f"{ALL_ROOT}/{address}"


def bind_path(topic: str, group: str) -> str:
    return f"{SUB_ROOT}/{topic}/{group}{BIND_SUFFIX}"


def node_data(address: str, protocol_version: int, proto: str) -> bytes:
    """The data of a broker's nodes: where to dial it and what it speaks."""
    return json.dumps(
        {"grpc": address, "protocolVersion": protocol_version, "proto": proto},
        separators=(",", ":"),
    ).encode()


def session_id(zk: Any) -> int:
    """The id of the client's current session; ``ConnectionLoss`` when there is none."""
    client_id = zk.client_id
    if client_id is None:
        raise ConnectionLoss("not connected to ZooKeeper")
    return int(client_id[0])


def ensure_ephemeral(zk: Any, path: str, data: bytes) -> Outcome:
    """Make *path* an ephemeral node of this session holding *data*.

    An existing node owned by another session — this broker's own before a crash or an
    expiry, whose session the server has not closed yet, or a persistent node (owner 0) —
    is deleted (version-checked) and re-created, so the node dies with *this* session.

    Raises:
        NodeContendedError: Other writers kept changing the node.
    """
    replaced = False
    for _ in range(_ROUNDS):
        try:
            zk.create(path, data, ephemeral=True, makepath=True)
        except NodeExistsError:
            pass
        else:
            return Outcome.REPLACED if replaced else Outcome.CREATED
        try:
            current, stat = zk.get(path)
        except NoNodeError:
            continue
        owner = int(stat.ephemeralOwner)
        if owner == session_id(zk):
            if current == data:
                return Outcome.REPLACED if replaced else Outcome.KEPT
            try:
                zk.set(path, data, version=stat.version)
            except (BadVersionError, NoNodeError):
                continue
            return Outcome.UPDATED
        logger.warning(
            "replacing a stale node path=%s owner=0x%x (this session is 0x%x)",
            path,
            owner,
            session_id(zk),
        )
        with contextlib.suppress(BadVersionError, NoNodeError):
            zk.delete(path, version=stat.version)
        replaced = True
    raise NodeContendedError(f"{path}: changed concurrently {_ROUNDS} times")


def ensure_unless_held(zk: Any, path: str, data: bytes) -> Outcome:
    """Create *path* as an ephemeral node of this session unless it exists.

    For nodes several processes may want (a client's ``/kiteq/pub/{topic}/{group}/{host}``,
    one per host): an existing node is left to its holder, never replaced.
    """
    try:
        zk.create(path, data, ephemeral=True, makepath=True)
    except NodeExistsError:
        return Outcome.HELD
    except NoAuthError:
        return Outcome.DENIED
    return Outcome.CREATED


def ensure_persistent(zk: Any, path: str, data: bytes) -> Outcome:
    """Make *path* a node holding *data*; an existing node keeps its type and ACL."""
    for _ in range(_ROUNDS):
        try:
            zk.create(path, data, makepath=True)
        except NodeExistsError:
            pass
        else:
            return Outcome.CREATED
        try:
            current, stat = zk.get(path)
            if current == data:
                return Outcome.KEPT
            zk.set(path, data, version=stat.version)
        except (BadVersionError, NoNodeError):
            continue
        return Outcome.UPDATED
    raise NodeContendedError(f"{path}: changed concurrently {_ROUNDS} times")


def delete_own(zk: Any, path: str) -> bool:
    """Delete *path* if it is an ephemeral node of this session; True if deleted."""
    try:
        _, stat = zk.get(path)
        if int(stat.ephemeralOwner) != session_id(zk):
            return False
        zk.delete(path, version=stat.version)
    except (BadVersionError, NoNodeError):
        return False
    return True


def write_bindings(zk: Any, path: str, group: str, bindings: Sequence[Binding]) -> tuple[int, bool]:
    """Make the ``{group}-bind`` node at *path* hold *bindings* (KiteQ's JSON array).

    The node is persistent, as KiteQ's clients create it, and is written only when its
    bindings differ from *bindings* (unreadable data differs from anything).

    Returns:
        The node's ``mzxid`` afterwards, and whether this call wrote it.
    """
    wanted = tuple(bindings)
    data = dumps(wanted)
    for _ in range(_ROUNDS):
        try:
            current, stat = zk.get(path)
        except NoNodeError:
            try:
                zk.create(path, data, makepath=True)
            except NodeExistsError:
                continue
            # create2 (which returns the stat) needs ZooKeeper 3.5; KiteQ runs on 3.4 too
            created = zk.exists(path)
            if created is None:
                continue
            return int(created.mzxid), True
        if _same(current, group, wanted):
            return int(stat.mzxid), False
        try:
            written = zk.set(path, data, version=stat.version)
        except (BadVersionError, NoNodeError):
            continue
        return int(written.mzxid), True
    raise NodeContendedError(f"{path}: changed concurrently {_ROUNDS} times")


def _same(data: bytes, group: str, wanted: tuple[Binding, ...]) -> bool:
    try:
        current = loads(data)
    except ValueError:
        return False
    # normalised as BindingTable.validate does: the node's group, duplicates dropped
    normalised = dict.fromkeys(b if b.group_id else b.with_group(group) for b in current)
    return tuple(normalised) == wanted
