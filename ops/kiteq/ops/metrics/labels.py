"""Label values of the broker's metrics: the bounded sets, and caps on open-ended ones.

Topic and group labels are open-ended (a development cluster accepts any valid topic), so a
``LabelCap`` admits the first *limit* distinct values and maps later ones to ``"_other"``;
a value that is not a valid name (a rejected message may carry anything) is ``"_invalid"``.
"""

from __future__ import annotations

import logging
import threading
from typing import Final

from prometheus_client import Counter

from kiteq.core.limits import is_name

__all__ = [
    "BINDING_REFUSAL_REASONS",
    "CONNECTION_ROLES",
    "DEAD_LETTER_REASONS",
    "DELIVERY_RESULTS",
    "FRAME_REJECT_REASONS",
    "HTTP_CODES",
    "HTTP_ENDPOINTS",
    "INVALID_LABEL",
    "NO_GROUP_LABEL",
    "OTHER_LABEL",
    "REJECT_REASONS",
    "SESSION_CLOSE_REASONS",
    "TX_CHECK_RESULTS",
    "WEBHOOK_OUTCOMES",
    "ZK_STATES",
    "LabelCap",
    "check",
]

logger = logging.getLogger("kiteq.ops.metrics")

OTHER_LABEL: Final = "_other"
INVALID_LABEL: Final = "_invalid"
NO_GROUP_LABEL: Final = "_none"
"""The ``group`` label of dead letters that name no group (``no_binding``)."""

REJECT_REASONS: Final = frozenset(
    {
        "invalid",
        "unknown_topic",
        "expired",
        "too_large",
        "overflow",
        "store_full",
        "store_unavailable",
        "not_serving",
        "unauthenticated",
        "permission_denied",
    }
)
# Client input refused before it reaches a message: whole frames (undecodable, not allowed
# at that point, a bad open, a wrong secret) and items of a frame (acks naming no delivery
# of the session, TxAck items with a bad id or status or for another group's message).
FRAME_REJECT_REASONS: Final = frozenset(
    {
        "undecodable",
        "unexpected",
        "invalid_open",
        "unauthenticated",
        "stray_ack",
        "invalid_tx",
        "denied_tx",
        "invalid_request",
    }
)
# why a group's bindings were refused (kiteq.binding.match.RefusalReason)
BINDING_REFUSAL_REASONS: Final = frozenset({"permission", "limit", "webhook"})
# kiteq.handler.webhook: how one webhook call ended (2xx is an ack, the rest a nack)
WEBHOOK_OUTCOMES: Final = frozenset({"2xx", "3xx", "4xx", "5xx", "timeout", "error"})
DELIVERY_RESULTS: Final = frozenset({"ack", "nack", "timeout", "disconnected"})
CONNECTION_ROLES: Final = frozenset({"producer", "consumer"})
# kiteq.handler.dispatch: why a (message, group) went to the dead-letter queue
DEAD_LETTER_REASONS: Final = frozenset({"deliver_limit", "expired", "no_binding"})
# what a transaction check ended in: the producer's answer, or none (sent, unanswered)
TX_CHECK_RESULTS: Final = frozenset({"commit", "rollback", "unknown", "unresolved"})
ZK_STATES: Final = frozenset({"connected", "suspended", "lost"})
# kiteq.broker.http_publish: the endpoints of the HTTP publish API ("other": no route), and
# the statuses it answers with (any other counts as "other")
HTTP_ENDPOINTS: Final = frozenset({"publish", "batch", "commit", "rollback", "other"})
HTTP_CODES: Final = frozenset(
    {"200", "400", "401", "403", "404", "405", "408", "409", "413", "415", "429", "500", "503"}
)
# kiteq.broker.service: how a client stream ended
SESSION_CLOSE_REASONS: Final = frozenset({"client_closed", "cancelled", "refused", "error"})


class LabelCap:
    """Admits at most *limit* distinct label values; later ones map to ``OTHER_LABEL``."""

    def __init__(self, label: str, limit: int, overflow: Counter) -> None:
        if limit < 1:
            raise ValueError(f"label limit for {label} must be >= 1, got {limit}")
        self._label = label
        self._limit = limit
        self._seen: set[str] = set()
        self._warned = False
        # Store backends report from their own threads.
        self._lock = threading.Lock()
        self._overflow = overflow.labels(label)

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if not is_name(value):
            self._overflow.inc()
            return INVALID_LABEL
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self._limit:
                self._seen.add(value)
                return value
            warn, self._warned = not self._warned, True
        if warn:
            logger.warning(
                "metrics label cap reached label=%s limit=%d; further values count as %s",
                self._label,
                self._limit,
                OTHER_LABEL,
            )
        self._overflow.inc()
        return OTHER_LABEL


def check(kind: str, value: str, allowed: frozenset[str]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {', '.join(sorted(allowed))}")
    return value
