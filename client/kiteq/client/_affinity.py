"""Which broker a keyed message goes to: rendezvous hashing of its ordering key (issue #16).

Every producer ranks a topic's brokers for a key the same way (highest random weight:
a hash of key and address per broker), so one key goes to one broker while the set of
brokers stays the same, and a broker that joins or leaves moves only the keys it wins or
held (about 1/n of them). The ranking is also the failover order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["rank"]


def _weight(key: bytes, address: str) -> bytes:
    return hashlib.blake2b(key + b"\0" + address.encode(), digest_size=8).digest()


def rank(key: str, addresses: Iterable[str]) -> list[str]:
    """*addresses* from the key's first choice to its last."""
    raw = key.encode()
    return sorted(addresses, key=lambda a: _weight(raw, a), reverse=True)
