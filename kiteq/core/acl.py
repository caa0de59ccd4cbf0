"""Per-group publish and subscribe permissions (``[clusters.<name>.acl.<group>]``).

::

    [clusters.zk_online.acl.pay-svc]
    publish = ["trade"]
    subscribe = []

    [clusters.zk_online.acl.acct-svc]
    publish = []
    subscribe = ["trade", "user-profile"]

A cluster without an ``acl`` table (or with an empty one) is **open**: every authenticated
group may publish to and bind every served topic, so development clusters and the README
example work as written. A cluster with one **denies what is not granted**: a group
without an entry may neither publish nor bind anything, and an entry grants exactly the
topics it lists.

An entry is a topic name or ``"*"`` (every topic the cluster serves). Prefix patterns such
as ``"pay.*"`` are deliberately not supported: a prefix grant silently extends to topics
created later, and a cluster's topics are a short, listed set (``topics = [...]``), so
explicit names say exactly what a group may touch.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from kiteq.core.errors import ConfigError, PermissionDeniedError
from kiteq.core.limits import is_name

__all__ = ["ANY_TOPIC", "AclMode", "Grant", "Permissions", "parse_acl"]

ANY_TOPIC: Final = "*"
_ACTIONS: Final = ("publish", "subscribe")


class AclMode(enum.Enum):
    OPEN = "open"  # no acl table: everything is allowed
    ENFORCED = "enforced"  # what is not granted is denied


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    """What one group may do: topic names, or ``"*"`` for every topic."""

    publish: frozenset[str] = frozenset()
    subscribe: frozenset[str] = frozenset()


def _allows(topics: frozenset[str], topic: str) -> bool:
    return ANY_TOPIC in topics or topic in topics


@dataclasses.dataclass(frozen=True, slots=True)
class Permissions:
    """A cluster's permissions; ``Permissions()`` is the open policy.

    Attributes:
        grants: group -> what it may do; empty = open.
    """

    grants: Mapping[str, Grant] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    @property
    def mode(self) -> AclMode:
        return AclMode.ENFORCED if self.grants else AclMode.OPEN

    def may_publish(self, group: str, topic: str) -> bool:
        if not self.grants:
            return True
        grant = self.grants.get(group)
        return grant is not None and _allows(grant.publish, topic)

    def may_subscribe(self, group: str, topic: str) -> bool:
        if not self.grants:
            return True
        grant = self.grants.get(group)
        return grant is not None and _allows(grant.subscribe, topic)

    def check_publish(self, group: str, topic: str, message_id: str) -> None:
        """Raise ``PermissionDeniedError`` unless *group* may publish to *topic*."""
        if not self.may_publish(group, topic):
            raise PermissionDeniedError(
                message_id, f"group {group!r} may not publish to topic {topic!r}"
            )

    def check_subscribe(self, group: str, topic: str) -> None:
        """Raise ``PermissionDeniedError`` unless *group* may bind *topic*."""
        if not self.may_subscribe(group, topic):
            raise PermissionDeniedError("", f"group {group!r} may not subscribe to topic {topic!r}")


def parse_acl(prefix: str, raw: object) -> Permissions:
    """Validate a cluster's ``acl`` table; *prefix* names it in errors.

    Raises:
        ConfigError: Not a table of groups, an unknown action key, or an invalid topic.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a table of groups, got {raw!r}")
    grants: dict[str, Grant] = {}
    for group, entry in raw.items():
        where = f"{prefix}.{group}"
        if not is_name(group):
            raise ConfigError(f"{where}: invalid group name")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table with publish and subscribe lists")
        unknown = sorted(set(entry) - set(_ACTIONS))
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key; known keys: publish, subscribe")
        grants[group] = Grant(
            publish=_topics(f"{where}.publish", entry.get("publish", [])),
            subscribe=_topics(f"{where}.subscribe", entry.get("subscribe", [])),
        )
    return Permissions(MappingProxyType(grants))


def _topics(where: str, raw: Any) -> frozenset[str]:
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: expected an array of topics, got {raw!r}")
    for topic in raw:
        if not isinstance(topic, str) or (topic != ANY_TOPIC and not is_name(topic)):
            hint = " (prefix patterns are not supported)" if isinstance(topic, str) else ""
            raise ConfigError(f'{where}: invalid topic {topic!r}; a topic name or "*"{hint}')
    return frozenset(raw)
