"""The states the RocksDB store thread wrote last, so the next write need not read them.

Every write that changes a record (a delete after the ack, a reschedule, a commit) first
reads the record's stored state to know its due key: a multi-get and a ``decode_state``
per id. The store thread is RocksDB's only writer, so what it wrote is what is stored,
and it can remember it. Measured with ``python tests/bench/store_bench.py --backends
rocksdb --batch-sizes 500 --callers 4 --records 40000`` (two interleaved runs each):
deletes 84,500 / 88,200 -> 130,500 / 117,300 per second.

Only the store thread uses a ``StateCache``. Every state write goes through a ``_Batch``,
which tells the cache what it left once RocksDB took the batch (``written``). A failed
write forgets everything (``clear``): a WriteBatch may reach the memtable and still fail
its WAL sync, and the cache must never claim a state RocksDB does not hold.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Final

from kiteq.store.codec import State

__all__ = ["STATE_CACHE_ENTRIES", "StateCache"]

# ~200 bytes each (the id, the State, the dict's slot): ~3 MB at most. A broker that
# keeps up deletes a message well within this many saves; a backlog fills it once and
# the records beyond it are read as before.
STATE_CACHE_ENTRIES: Final = 16_384


class StateCache:
    """Stored states by message id (the key bytes), the oldest written first out."""

    def __init__(self, capacity: int = STATE_CACHE_ENTRIES) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self._capacity = capacity
        self._states: dict[bytes, State] = {}

    def __len__(self) -> int:
        return len(self._states)

    def split(self, keys: Iterable[bytes]) -> tuple[dict[bytes, State | None], list[bytes]]:
        """The states of *keys* known here, and the keys that must be read from RocksDB."""
        known: dict[bytes, State | None] = {}
        unknown: list[bytes] = []
        states = self._states
        for key in keys:
            state = states.get(key)
            if state is None:
                unknown.append(key)
            else:
                known[key] = state
        return known, unknown

    def written(self, states: Mapping[bytes, State | None]) -> None:
        """RocksDB holds *states* now (None: the record is gone)."""
        cache = self._states
        for key, state in states.items():
            if state is None:
                cache.pop(key, None)
            else:
                cache[key] = state
        excess = len(cache) - self._capacity
        if excess > 0:
            for key in list(itertools.islice(cache, excess)):
                del cache[key]

    def clear(self) -> None:
        self._states.clear()
