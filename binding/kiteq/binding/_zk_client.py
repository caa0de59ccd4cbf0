"""The kazoo client of a ``zk://`` URI: one recipe for every ZooKeeper session KiteQ opens.

The broker's registry, its takeover nodes and the client library's discovery all open
their sessions here, so they agree on retries, authentication and ACLs. With
``digest=user:password`` a session:

- authenticates with the digest scheme (``auth_data``, which kazoo sends again on every
  connection, so nodes re-created after a lost session are written by the same identity);
- creates every node, the parents ``makepath`` / ``ensure_path`` add included, with
  ``default_acl`` = world READ (anyone discovers brokers and reads bindings) + ALL for
  *user* (only holders of the credentials change or delete them);
- logs through ``kazoo.client.kiteq``, where the password of the ``Auth`` request, which
  kazoo logs with every request it sends at DEBUG, is masked. The logger is a child of
  kazoo's own, so ``logging`` configuration of ``kazoo`` still applies to it.

Only kazoo (a client dependency) is imported: the client library uses this module.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

from kazoo.client import KazooClient
from kazoo.protocol.serialization import Auth
from kazoo.retry import KazooRetry
from kazoo.security import make_acl, make_digest_acl

if TYPE_CHECKING:
    from kiteq.binding.zk import ZkSettings

__all__ = ["KAZOO_LOGGER", "digest_acl", "new_client"]

KAZOO_LOGGER: Final = "kazoo.client.kiteq"
MASK: Final = "***"


def digest_acl(user: str, password: str) -> list[Any]:
    """The ACL of the nodes a session with credentials creates: world READ, ALL for *user*."""
    return [make_digest_acl(user, password, all=True), make_acl("world", "anyone", read=True)]


def new_client(settings: ZkSettings, hosts: str | None = None) -> Any:
    """A kazoo client (not started) for *settings*, connecting to *hosts*.

    Args:
        settings: The parsed ``zk://`` URI.
        hosts: The connect string; default ``settings.connect_string`` (with the chroot).
    """
    acl = None
    auth = None
    if settings.digest is not None:
        user, password = settings.digest
        acl = digest_acl(user, password)
        auth = [("digest", f"{user}:{password}")]
    return KazooClient(
        hosts=settings.connect_string if hosts is None else hosts,
        timeout=settings.session_timeout,
        connection_retry=KazooRetry(max_tries=-1, delay=0.2, max_delay=5.0),
        command_retry=KazooRetry(max_tries=5, delay=0.1, max_delay=2.0),
        default_acl=acl,
        auth_data=auth,
        logger=_logger,
    )


def _masked(auth: Auth) -> Auth:
    user, colon, _ = str(auth.auth).partition(":")
    return auth._replace(auth=f"{user}:{MASK}" if colon else MASK)


class _MaskAuth(logging.Filter):
    """Masks the credential of kazoo's ``Auth`` requests in its records' arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(arg, Auth) for arg in args):
            record.args = tuple(_masked(arg) if isinstance(arg, Auth) else arg for arg in args)
        return True


# A logger's filters see only the records logged on that logger, not those propagated to
# it: the filter sits on the logger the sessions are given, never on kazoo's global one.
_logger = logging.getLogger(KAZOO_LOGGER)
_logger.addFilter(_MaskAuth())
