"""Refused client input: counted always, logged at most once per peer host per interval.

A hostile or broken peer can send garbage as fast as the network allows; a log line (or a
traceback) per frame would let it fill the disk and drown every other line. So each
refusal increments ``kiteq_rejected_frames_total{reason}``, and the log gets one line per
peer host per ``interval``, carrying how many refusals the previous line stood for.

Peers are keyed by host, not ``host:port``: a new stream from the same host has a new
port, and per-port lines would be unbounded again. At most ``max_peers`` hosts are
remembered; further hosts share one entry (``OTHER_PEERS``), so memory and lines stay
bounded even for input from many addresses.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import TYPE_CHECKING, Final

from kiteq.core.clock import Clock

if TYPE_CHECKING:
    from kiteq.ops.metrics import BrokerMetrics

__all__ = ["OTHER_PEERS", "Rejection", "RejectionLog", "peer_host"]

logger = logging.getLogger(__name__)

OTHER_PEERS: Final = "other-peers"
DEFAULT_INTERVAL_SECONDS: Final = 10.0
DEFAULT_MAX_PEERS: Final = 1024
# what a log line quotes of a peer's input at most
_DETAIL_CHARS: Final = 120


class Rejection(enum.Enum):
    """Why client input was refused; the values are the metric's ``reason`` labels."""

    UNDECODABLE = "undecodable"  # not a ClientFrame / PublishRequest
    UNEXPECTED = "unexpected"  # a frame not allowed at that point (no open first, a 2nd open)
    INVALID_OPEN = "invalid_open"  # a bad group name or binding in the open
    UNAUTHENTICATED = "unauthenticated"  # wrong or missing group secret
    STRAY_ACK = "stray_ack"  # an ack naming no delivery in flight on the session
    INVALID_TX = "invalid_tx"  # a TxAck item with a bad id or status
    DENIED_TX = "denied_tx"  # a TxAck item for a message another group published
    # an HTTP publish request refused before any message: unparsable, oversized, too slow
    INVALID_REQUEST = "invalid_request"


def peer_host(peer: str) -> str:
    """``ipv4:10.0.0.1:5555`` -> ``ipv4:10.0.0.1`` (``ipv6:[::1]:5555`` -> ``ipv6:[::1]``)."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() and host not in ("ipv4", "ipv6") else peer


@dataclasses.dataclass(slots=True)
class _Window:
    started: float
    suppressed: int = 0


class RejectionLog:
    """Counts every refusal and logs at most one line per peer host and interval."""

    def __init__(
        self,
        clock: Clock,
        metrics: BrokerMetrics | None = None,
        *,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        max_peers: int = DEFAULT_MAX_PEERS,
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self._interval = interval
        self._max_peers = max_peers
        self._windows: dict[str, _Window] = {}
        self.lines = 0

    def note(self, peer: str, reason: Rejection, detail: str, n: int = 1) -> None:
        """*n* refusals of *reason* from *peer*; *detail* says what (quoted, shortened)."""
        if self._metrics is not None:
            self._metrics.rejected_frames(reason.value, n)
        host = peer_host(peer)
        window = self._windows.get(host)
        if window is None and len(self._windows) >= self._max_peers:
            host = OTHER_PEERS
            window = self._windows.get(host)
        now = self._clock.monotonic()
        if window is not None and now - window.started < self._interval:
            window.suppressed += n
            return
        suppressed = window.suppressed if window is not None else 0
        self._windows.pop(host, None)
        self._windows[host] = _Window(now, n - 1)
        self._evict(now)
        self.lines += 1
        logger.warning(
            "refused client input peer=%s reason=%s detail=%s suppressed=%d "
            "(at most one line per peer every %gs; kiteq_rejected_frames_total counts all)",
            host,
            reason.value,
            detail[:_DETAIL_CHARS],
            suppressed,
            self._interval,
        )

    def _evict(self, now: float) -> None:
        """Forget hosts quiet for a whole interval (the oldest windows come first)."""
        for host, window in list(self._windows.items()):
            if now - window.started < self._interval:
                break
            if window.suppressed:
                # their count was never logged; it stays in the metric, the line says so
                continue
            del self._windows[host]
