"""The embedded registry: consumers declare their bindings when their stream opens.

Persistent bindings are kept in the broker's store under ``bind/{topic}/{group}`` (KiteQ's
JSON array, as in a ZooKeeper ``{group}-bind`` node) so that messages for an offline
persistent group keep waiting across a broker restart. Non-persistent bindings live only
in memory, until the group declares again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from kiteq.binding.base import StandaloneRegistry
from kiteq.binding.model import Binding, dumps, loads
from kiteq.core.errors import PermissionDeniedError, RegistryError

if TYPE_CHECKING:
    from kiteq.binding.base import MetaStore
    from kiteq.binding.match import BindingTable

__all__ = ["META_PREFIX", "EmbeddedRegistry"]

logger = logging.getLogger(__name__)

META_PREFIX: Final = "bind/"


def _meta_key(topic: str, group: str) -> str:
    return f"{META_PREFIX}{topic}/{group}"


def _decode(
    table: BindingTable, topic: str, group: str, value: bytes
) -> tuple[Binding, ...] | ValueError:
    """A stored entry's bindings, or why it is unreadable or refused (no traceback).

    Stored bindings are judged by today's limits and permissions: a configuration that
    has since revoked a group's topic does not bring its old bindings back.
    """
    try:
        return table.validate(topic, group, loads(value))
    except ValueError as exc:
        return exc
    except PermissionDeniedError as exc:
        return ValueError(exc.reason)


class EmbeddedRegistry(StandaloneRegistry):
    """Bindings declared by connections, persistent ones saved in a ``MetaStore``."""

    kind: Final = "embedded"

    def __init__(self, meta: MetaStore) -> None:
        self._meta = meta
        self._table: BindingTable | None = None
        # what the store holds: (topic, group) -> persistent bindings
        self._stored: dict[tuple[str, str], tuple[Binding, ...]] = {}
        # entries found unreadable at start: rewritten (or deleted) by the next declaration
        # of that (topic, group); a key that is not bind/<topic>/<group> is never declared
        self._corrupt: set[tuple[str, str]] = set()
        # declarations of one group may arrive on several streams at once
        self._lock = asyncio.Lock()

    async def start(self, table: BindingTable) -> None:
        """Load every stored persistent binding into *table*.

        A corrupt entry is logged and skipped; the group's next declaration rewrites it.
        """
        if self._table is not None:
            raise RegistryError("embedded registry already started")
        entries = await self._meta.get_meta(META_PREFIX)
        for key, value in sorted(entries.items()):
            topic, _, group = key.removeprefix(META_PREFIX).partition("/")
            stored = _decode(table, topic, group, value)
            if isinstance(stored, ValueError):
                logger.error("skipping stored bindings key=%s: %s", key, stored)
                self._corrupt.add((topic, group))
                continue
            table.replace(topic, group, stored)
            self._stored[(topic, group)] = stored
        self._table = table
        logger.info("embedded registry started stored_bindings=%d", len(self._stored))

    async def declare(self, group: str, bindings: Sequence[Binding]) -> bool:
        """Apply *group*'s bindings, one full list per declared topic; always True.

        Topics the group does not mention keep their bindings. Persistent bindings are
        written to the store only when they differ from what it holds.

        Raises:
            ValueError: A binding is invalid or beyond the table's limits; nothing was
                stored or applied.
            PermissionDeniedError: *group* may not bind a declared topic; nothing was
                stored or applied.
            RegistryError: The registry is not started.
            StoreError: The store failed; the table is unchanged.
        """
        table = self._table
        if table is None:
            raise RegistryError("embedded registry not started")
        by_topic: dict[str, list[Binding]] = {}
        for binding in bindings:
            by_topic.setdefault(binding.topic, []).append(binding.with_group(group))
        # validate and compile everything before storing or applying anything; off the loop,
        # as a declaration may hold a thousand patterns
        declared = await asyncio.to_thread(
            lambda: [table.build(topic, group, items) for topic, items in by_topic.items()]
        )
        async with self._lock:
            for prepared in declared:
                persistent = tuple(b for b in prepared.bindings if b.persistent)
                await self._save(prepared.topic, group, persistent)
            for prepared in declared:
                table.install(prepared)
        return True

    async def unbind(self, topic: str, group: str) -> bool:
        """Forget *group*'s bindings for *topic*, stored ones included (an admin action).

        Returns:
            True if the group had bindings for the topic.
        """
        table = self._table
        if table is None:
            raise RegistryError("embedded registry not started")
        async with self._lock:
            stored = await self._save(topic, group, ())
            removed = table.remove_group(topic, group)
        return stored or removed

    async def stop(self) -> None:
        """Nothing runs in the background; stored bindings stay for the next start."""

    async def _save(self, topic: str, group: str, persistent: tuple[Binding, ...]) -> bool:
        key = (topic, group)
        if key not in self._corrupt and self._stored.get(key, ()) == persistent:
            return False
        await self._meta.put_meta(
            _meta_key(topic, group), dumps(persistent) if persistent else None
        )
        self._corrupt.discard(key)
        if persistent:
            self._stored[key] = persistent
        else:
            self._stored.pop(key, None)
        logger.info(
            "stored persistent bindings topic=%s group=%s bindings=%d",
            topic,
            group,
            len(persistent),
        )
        return True
