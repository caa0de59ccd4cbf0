"""Rendezvous ranking of a key's brokers (issue #16): stable, shared, minimal movement."""

from __future__ import annotations

from kiteq.client._affinity import rank

BROKERS = [f"127.0.0.1:{13800 + i}" for i in range(4)]


def test_every_producer_ranks_a_keys_brokers_alike_whatever_their_order() -> None:
    for key in ("order-1", "ключ", ""):
        first = rank(key, BROKERS)
        assert sorted(first) == sorted(BROKERS)
        assert rank(key, reversed(BROKERS)) == first


def test_keys_spread_and_a_leaving_broker_moves_only_its_own_keys() -> None:
    keys = [f"k{i}" for i in range(2000)]
    owner = {k: rank(k, BROKERS)[0] for k in keys}
    counts = {b: sum(1 for o in owner.values() if o == b) for b in BROKERS}
    assert all(350 < n < 650 for n in counts.values()), counts
    gone = BROKERS[1]
    rest = [b for b in BROKERS if b != gone]
    for k in keys:
        after = rank(k, rest)[0]
        # a key of a surviving broker stays; a key of the one gone goes to its second choice
        assert after == (owner[k] if owner[k] != gone else rank(k, BROKERS)[1])
    joined = [*BROKERS, "127.0.0.1:13900"]
    moved = [k for k in keys if rank(k, joined)[0] != owner[k]]
    assert all(rank(k, joined)[0] == "127.0.0.1:13900" for k in moved)
    assert 250 < len(moved) < 550
