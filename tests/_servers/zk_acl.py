"""Digest credentials and ACL probes shared by the ZooKeeper ACL tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Final

from kazoo.client import KazooClient
from kazoo.exceptions import NoNodeError
from kazoo.security import make_digest_acl_credential

__all__ = ["EXPECTED", "PASSWORD", "USER", "acl_of", "authed_session", "walk"]

USER: Final = "kiteq"
# distinctive, so that a search of every log record for it cannot match by chance
PASSWORD: Final = "pw-7Qz3-never-logged"
# the ACL of a node created with the credentials, as its owner reads it: (scheme, id,
# perms); 31 = ALL, 1 = READ
EXPECTED: Final = {
    ("digest", make_digest_acl_credential(USER, PASSWORD), 31),
    ("world", "anyone", 1),
}


def acl_of(zk: Any, path: str) -> set[tuple[str, str, int]]:
    """*path*'s ACL. ZooKeeper shows a digest id only to a session with ADMIN on the node
    (``user:x`` to others): read it with ``authed_session``."""
    acl, _ = zk.get_acls(path)
    return {(entry.id.scheme, entry.id.id, entry.perms) for entry in acl}


def walk(zk: Any, path: str) -> Iterator[str]:
    """*path* and every node below it."""
    yield path
    for child in sorted(zk.get_children(path)):
        yield from walk(zk, f"{path}/{child}")


@contextlib.contextmanager
def authed_session(hosts: str) -> Iterator[Any]:
    """A started kazoo session on *hosts* (with its chroot) holding the credentials.

    On exit it deletes every node under its root: the ACLs keep an unauthenticated
    cleanup (the ``zk`` fixture's) from doing it.
    """
    client = KazooClient(hosts=hosts, auth_data=[("digest", f"{USER}:{PASSWORD}")], timeout=5)
    client.start(timeout=10)
    try:
        yield client
    finally:
        for top in client.get_children("/"):
            if top != "zookeeper":
                with contextlib.suppress(NoNodeError):
                    client.delete(f"/{top}", recursive=True)
        client.stop()
        client.close()
