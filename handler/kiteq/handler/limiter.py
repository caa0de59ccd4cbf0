"""Token bucket for the broker-wide receive rate (KiteQ's ``recievePermitsPerSecond``)."""

from __future__ import annotations

from kiteq.core.clock import Clock


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst`` (KiteQ: burst = rate / 2)."""

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        self._rate = rate
        self._burst = max(burst, 1.0)
        self._clock = clock
        self._tokens = self._burst
        self._last = clock.monotonic()

    @property
    def rate(self) -> float:
        return self._rate

    def take(self, wanted: int) -> int:
        """Take up to *wanted* tokens; return how many were granted (never waits)."""
        now = self._clock.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        granted = min(wanted, int(self._tokens))
        self._tokens -= granted
        return granted
