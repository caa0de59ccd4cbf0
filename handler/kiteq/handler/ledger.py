"""One connection's pushes awaiting an ack, and when each times out.

The ledger is the only place a push is looked up by the ack that names it, so an ack can
settle only a push to its own connection. Deadlines are kept in push order: a timeout
restarted by an extend is appended with the later deadline, and the stale entry is skipped
when it comes up, so the head of the queue always expires first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from kiteq.handler.flight import Flight, Pending

__all__ = ["Ledger"]


class Ledger:
    __slots__ = ("_entries", "_expiry")

    def __init__(self) -> None:
        self._entries: dict[str, Pending] = {}
        # (deadline, message_id) in push order; deadlines only grow
        self._expiry: deque[tuple[float, str]] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._entries

    def __iter__(self) -> Iterator[Pending]:
        return iter(self._entries.values())

    def add(self, flight: Flight, deadline: float, attempt: int) -> None:
        message_id = flight.record.message_id
        self._entries[message_id] = Pending(flight, deadline, attempt)
        self._expiry.append((deadline, message_id))

    def take(self, message_id: str) -> Pending | None:
        """The push of *message_id* is answered: remove and return it (None: not here)."""
        return self._entries.pop(message_id, None)

    def extend(self, message_id: str, deadline: float) -> bool:
        """Restart the push's timeout at *deadline*; False when it is not in flight here."""
        pending = self._entries.get(message_id)
        if pending is None:
            return False
        pending.deadline = deadline
        self._expiry.append((deadline, message_id))
        return True

    def expired(self, now: float) -> list[Pending]:
        """Remove and return the pushes whose deadline is *now* or earlier."""
        queue = self._expiry
        if not queue or queue[0][0] > now:
            return []
        entries = self._entries
        out = []
        while queue and queue[0][0] <= now:
            deadline, message_id = queue.popleft()
            pending = entries.get(message_id)
            if pending is not None and pending.deadline == deadline:
                del entries[message_id]
                out.append(pending)
        return out

    def clear(self) -> list[Pending]:
        """The connection is gone: remove and return every push still unanswered."""
        lost = list(self._entries.values())
        self._entries.clear()
        self._expiry.clear()
        return lost
