"""KiteQ-compatible ``/stat`` and ``/binds`` JSON (kiteq-ops reads these keys)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from kiteq.handler.core import BrokerCore


class StatsView:
    def __init__(
        self,
        *,
        core: BrokerCore,
        backlog: Callable[[], Mapping[str, int]],
        dead_letters: Callable[[], Mapping[tuple[str, str], int]] = dict,
    ) -> None:
        self._core = core
        self._backlog = backlog
        self._dead_letters = dead_letters

    def stat_snapshot(self) -> dict[str, Any]:
        core = self._core
        groups: dict[str, list[str]] = {}
        for conn in core.connections:
            groups.setdefault(conn.group, []).append(conn.peer)
        # ours, beside KiteQ's keys: topic -> group -> dead letters ("" = no group bound)
        dead: dict[str, dict[str, int]] = {}
        for (topic, group), n in self._dead_letters().items():
            dead.setdefault(topic, {})[group] = n
        return {
            "kiteq": {
                "goroutine": threading.active_count(),
                "deliver_go": core.dispatcher.inflight,
                "deliver_count": core.dispatcher.tally.delivered,
                "recieve_count": core.intake.received,
                "message_count": dict(self._backlog()),
                "topics_deliver": {},
                "topics_recieve": {},
                "groups": groups,
                "accept_limiter": [0, 0],
                "dead_letters": dead,
            },
            "network": {"connections": len(core.connections)},
        }

    def binds_snapshot(self) -> dict[str, Any]:
        topic_groups: dict[str, list[str]] = {}
        limiters: dict[str, dict[str, list[int]]] = {}
        for binding in self._core.bindings.bindings():
            members = topic_groups.setdefault(binding.topic, [])
            if binding.group_id not in members:
                members.append(binding.group_id)
            limiters.setdefault(binding.topic, {})[binding.group_id] = [
                0,
                binding.effective_watermark,
            ]
        return {"topic_2_groups": topic_groups, "topic_limiters": limiters}
