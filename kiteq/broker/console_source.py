"""The broker's side of the management console (``kiteq.ops.console.ConsoleSource``).

Reads the broker's live state and its cached store figures; DLQ, transaction and message
operations go through ``kiteq.broker.operator``, as the gRPC admin service's do. Times are
Unix seconds (the page formats them).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from kiteq.binding.base import BindingRegistry
from kiteq.broker.operator import MAX_PAGE, Operator
from kiteq.core.admin import DEAD_LETTER_REASONS
from kiteq.core.errors import RegistryError
from kiteq.core.ids import canonical_message_id, is_message_id
from kiteq.core.message import StoredMessage, TxStatus
from kiteq.handler.core import BrokerCore
from kiteq.handler.gauges import GroupGauges
from kiteq.ops.console import ConsoleConflictError, ConsoleInputError, Redrive, Resolution
from kiteq.store.base import DeadLetter, DlqFilter, HistoryEvent

logger = logging.getLogger(__name__)

Json = dict[str, Any]
PREVIEW = 20  # letters a redrive preview lists (the count covers all of them)
_RESOLUTIONS = {Resolution.COMMIT: TxStatus.COMMIT, Resolution.ROLLBACK: TxStatus.ROLLBACK}


class BrokerConsole:
    def __init__(
        self,
        *,
        core: BrokerCore,
        advertised: str,
        registry: BindingRegistry,
        uptime: Callable[[], float],
        backlog: Callable[[], Mapping[str, int]],
        dead_letters: Callable[[], Mapping[tuple[str, str], int]],
    ) -> None:
        self._config = core.config
        self._advertised = advertised
        self._registry = registry
        self._store_description = core.store.description
        self._bindings = core.bindings
        self._connections = core.connections
        self._dispatcher = core.dispatcher
        self._intake = core.intake
        self._transactions = core.transactions
        self._operator = Operator(core)
        self._clock = core.clock
        self._uptime = uptime
        self._backlog = backlog
        self._dead = dead_letters

    async def overview(self) -> Json:
        return {
            "time": self._clock.now(),
            "brokers": await self._brokers(),
            "totals": {
                "received": self._intake.received,
                "rejected": self._intake.rejected,
                "delivered": self._dispatcher.tally.delivered,
                "redelivered": self._dispatcher.tally.redelivered,
                "deadLettered": self._dispatcher.tally.dead_lettered,
                "flowLimited": self._dispatcher.tally.flow_limited,
                "inFlight": self._dispatcher.inflight,
                "backlog": sum(self._backlog().values()),
                "deadLetters": sum(self._dead().values()),
                "connections": len(self._connections),
                "pendingTransactions": self._transactions.pending,
                "unresolvedTransactions": self._transactions.unresolved,
            },
        }

    async def _brokers(self) -> list[Json]:
        """This broker, then the cluster's other live brokers the registry knows."""
        own = {
            "address": self._advertised,
            "self": True,
            "cluster": self._config.name,
            "store": self._store_description,
            "uptime": self._uptime(),
            "threads": threading.active_count(),
        }
        try:
            others = [a for a in await self._registry.brokers() if a != self._advertised]
        except RegistryError as exc:
            # the page still shows this broker; the registry's state is on /readyz
            logger.warning("console: cannot list the cluster's brokers: %s", exc)
            others = []
        return [own, *({"address": a, "self": False, "cluster": self._config.name} for a in others)]

    async def groups(self) -> Json:
        # the figures of the per-group metrics, from memory: no store read per refresh
        gauges = self._dispatcher.group_gauges()
        consumers = {g: sum(c.consumer for c in m) for g, m in self._connections.groups().items()}
        dead = self._dead()
        rows: dict[tuple[str, str], Json] = {}
        for binding in self._bindings.bindings():
            key = (binding.topic, binding.group_id)
            row = rows.setdefault(key, _group_row(key, consumers, gauges, dead))
            row["bindings"].append(
                {
                    "type": binding.bind_type.name.lower(),
                    "messageType": binding.message_type,
                    "watermark": binding.effective_watermark,
                    "persistent": binding.persistent,
                }
            )
        for key in dead.keys() | gauges.backlog.keys() | gauges.unacked.keys():
            rows.setdefault(key, _group_row(key, consumers, gauges, dead))
        backlog = self._backlog()
        # "*" in the config's topics admits any topic: list the ones seen instead
        named = {t for t in self._config.topics if t != "*"}
        seen = named | backlog.keys() | {topic for topic, _ in rows}
        return {
            "topics": [{"topic": t, "backlog": backlog.get(t, 0)} for t in sorted(seen)],
            "groups": [rows[key] for key in sorted(rows)],
        }

    async def group(self, group: str) -> Json | None:
        members = self._connections.groups().get(group, [])
        bindings = [b for b in self._bindings.bindings() if b.group_id == group]
        if not members and not bindings:
            return None
        return {
            "group": group,
            "topics": sorted({b.topic for b in bindings}),
            "consumers": [
                {
                    "client": conn.client_id,
                    "peer": conn.peer,
                    "since": conn.opened_at,
                    "unacked": len(conn.inflight),
                    "maxInFlight": conn.max_in_flight,
                    "consumer": conn.consumer,
                }
                for conn in sorted(members, key=lambda c: c.opened_at)
            ],
        }

    async def dead_letters(
        self, where: Mapping[str, str], limit: int, after: tuple[str, str] | None
    ) -> Json:
        limit = max(1, min(limit, MAX_PAGE))
        letters = await self._operator.dead_letters(_filter(where), limit, after)
        more = len(letters) == limit
        return {
            "deadLetters": [_letter(letter) for letter in letters],
            "next": list(letters[-1].key) if more else None,
        }

    async def redrive(self, request: Redrive) -> Json:
        expect = request.expect
        if request.message_ids:
            ids = [_message_id(m) for m in request.message_ids]
            keys = await self._operator.letters_of(ids, request.group)
            if request.dry_run:
                return {"redriven": len(keys), "dryRun": True, "preview": keys[:PREVIEW]}
            _check_expected(len(keys), expect)
            return {"redriven": await self._operator.redrive(keys), "dryRun": False}
        selected = _filter(request.where)
        if expect is not None and not request.dry_run:
            # a count, then the redrive: letters arriving in between still move (rare,
            # and they match what the operator asked for)
            _check_expected(await self._operator.count(selected), expect)
        if request.dry_run:
            preview = await self._operator.dead_letters(selected, PREVIEW)
            return {
                "redriven": await self._operator.count(selected),
                "dryRun": True,
                "preview": [list(letter.key) for letter in preview],
            }
        return {"redriven": await self._operator.redrive_where(selected), "dryRun": False}

    async def transactions(self, *, unresolved_only: bool, limit: int, after: str) -> Json:
        limit = max(1, min(limit, MAX_PAGE))
        found = await self._operator.transactions(
            limit, after or None, unresolved_only=unresolved_only
        )
        return {
            "pending": self._transactions.pending,
            "unresolved": self._transactions.unresolved,
            "transactions": [
                {**_message(record), "unresolved": unresolved, "checks": record.deliver_count}
                for record, unresolved in found
            ],
            "next": found[-1][0].message_id if len(found) == limit else None,
        }

    async def resolve(self, message_id: str, resolution: Resolution) -> Json:
        changed = await self._operator.resolve(_message_id(message_id), _RESOLUTIONS[resolution])
        return {"changed": changed}

    async def message(self, message_id: str) -> Json | None:
        found = await self._operator.lookup(_message_id(message_id))
        if not found.known:
            return None
        state = "live" if found.live else "dead_letter" if found.letters else "gone"
        return {
            "state": state,
            "message": _message(found.record) if found.record is not None else None,
            "groups": {
                group: {"state": d.state.name.lower(), "attempts": d.attempts}
                for group, d in (found.record.groups.items() if found.record else ())
            },
            "deadLetters": [_letter(letter) for letter in found.letters],
            "history": [_event(event) for event in found.history],
        }


def _group_row(
    key: tuple[str, str],
    consumers: Mapping[str, int],
    gauges: GroupGauges,
    dead: Mapping[tuple[str, str], int],
) -> Json:
    topic, group = key
    return {
        "topic": topic,
        "group": group,
        "consumers": consumers.get(group, 0),
        # everything the group has still to settle, in memory or in the store
        "backlog": gauges.backlog.get(key, 0),
        "unacked": gauges.unacked.get(key, 0),
        "waiting": gauges.waiting.get(key, 0),
        # since publish, of the oldest message the group has still to settle
        "oldestAge": gauges.oldest.get(key),
        "deadLetters": dead.get(key, 0),
        "bindings": [],
    }


def _check_expected(matching: int, expect: int | None) -> None:
    if expect is not None and matching != expect:
        raise ConsoleConflictError(
            f"the dead-letter queue changed since the preview: {matching} letters match now,"
            f" {expect} were previewed; nothing was redriven, preview again"
        )


def _message_id(raw: str) -> str:
    message_id = canonical_message_id(raw)
    if not is_message_id(message_id):
        raise ConsoleInputError(f"invalid message id {raw!r}: 32 hex characters")
    return message_id


def _filter(where: Mapping[str, str]) -> DlqFilter:
    reason = where.get("reason", "")
    if reason and reason not in DEAD_LETTER_REASONS:
        known = ", ".join(DEAD_LETTER_REASONS)
        raise ConsoleInputError(f"unknown dead-letter reason {reason!r}; known: {known}")
    return DlqFilter(
        topic=where.get("topic", ""),
        message_type=where.get("type", ""),
        group=where.get("group", ""),
        reason=reason,
    )


def _message(record: StoredMessage) -> Json:
    message = record.message
    return {
        "id": record.message_id,
        "topic": message.topic,
        "type": message.message_type,
        "group": message.group_id,
        "published": record.publish_time,
        "expires": message.expired_time or None,
        "size": len(message.body),
        "commit": message.commit,
    }


def _letter(letter: DeadLetter) -> Json:
    state = letter.record.groups.get(letter.group)
    return {
        **_message(letter.record),
        "group": letter.group,
        "reason": letter.reason,
        "deadTime": letter.dead_time,
        "attempts": state.attempts if state is not None else 0,
    }


def _event(event: HistoryEvent) -> Json:
    return {
        "time": event.time,
        "kind": event.kind,
        "group": event.group,
        "connection": event.connection,
        "attempt": event.attempt,
        "detail": event.detail,
    }
