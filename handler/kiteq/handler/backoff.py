"""KiteQ's redelivery schedule (kiteq/server/kiteq_server.go redelivery windows).

The first deliveries are retried at once, in process; after that the recover scan
redelivers a message to a group once ``redelivery_delay(attempts)`` has passed, where
*attempts* are that group's own (issue #10: counted per (message, group)).
"""

from __future__ import annotations

from typing import Final

IMMEDIATE_ATTEMPTS: Final = 3
# (deliver_count at least, delay in seconds)
WINDOWS: Final = ((4, 5.0), (10, 10.0), (20, 20.0), (30, 40.0), (40, 80.0), (50, 160.0))


def redelivery_delay(deliver_count: int) -> float:
    """Seconds to wait before the next attempt, after *deliver_count* attempts."""
    delay = 0.0
    for lower, seconds in WINDOWS:
        if deliver_count >= lower:
            delay = seconds
    return delay
