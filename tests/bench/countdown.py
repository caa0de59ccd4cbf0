"""A consumer handler for the benchmarks: acks every message, tells when *count* have come."""

from __future__ import annotations

import threading


class Countdown:
    """Acks every message; ``done`` is set once *count* messages have been handled."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.seen = 0
        self.done = threading.Event()

    def __call__(self, message: object) -> bool:
        self.seen += 1
        if self.seen >= self.count:
            self.done.set()
        return True
