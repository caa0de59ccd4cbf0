"""A thread-safe consumer handler that records what it receives."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kiteq.client import ReceivedMessage


class Collector:
    def __init__(self, decide: Callable[[ReceivedMessage], bool] | None = None) -> None:
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._decide = decide
        self.received: list[ReceivedMessage] = []

    def __call__(self, message: ReceivedMessage) -> bool:
        with self._changed:
            self.received.append(message)
            self._changed.notify_all()
        return True if self._decide is None else self._decide(message)

    def ids(self) -> list[str]:
        with self._lock:
            return [m.message_id for m in self.received]

    def wait_for(
        self, predicate: Callable[[list[ReceivedMessage]], bool], timeout: float = 20.0
    ) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.received):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; received {len(self.received)} messages")
                self._changed.wait(min(left, 0.05))  # predicates may watch other collectors

    def wait_count(self, n: int, timeout: float = 20.0) -> None:
        self.wait_for(lambda got: len({m.message_id for m in got}) >= n, timeout)
