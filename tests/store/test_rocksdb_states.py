"""The store thread's memory of the states it wrote (``kiteq.store._rocksdb_states``)."""

from __future__ import annotations

import pytest

from kiteq.store._rocksdb_states import StateCache
from kiteq.store.codec import NO_GROUPS, State


def state(due: float) -> State:
    return State("trade", True, 0, NO_GROUPS, (), due)


def test_split_answers_what_it_holds_and_names_the_rest() -> None:
    cache = StateCache()
    cache.written({b"a": state(1.0), b"b": state(2.0)})
    known, unknown = cache.split([b"a", b"c", b"b", b"d"])
    assert known == {b"a": state(1.0), b"b": state(2.0)}
    assert unknown == [b"c", b"d"]


def test_a_gone_record_is_forgotten_and_a_new_state_replaces_the_old() -> None:
    cache = StateCache()
    cache.written({b"a": state(1.0), b"b": state(2.0)})
    cache.written({b"a": None, b"b": state(3.0), b"never-cached": None})
    assert cache.split([b"a", b"b"]) == ({b"b": state(3.0)}, [b"a"])
    assert len(cache) == 1


def test_the_oldest_written_go_first_beyond_the_capacity() -> None:
    cache = StateCache(capacity=3)
    cache.written({b"1": state(1.0), b"2": state(2.0), b"3": state(3.0)})
    cache.written({b"2": state(20.0), b"4": state(4.0), b"5": state(5.0)})
    assert len(cache) == 3
    # 1 was written first; 2 was rewritten in place and keeps its turn, so it goes next
    assert cache.split([b"1", b"2", b"3", b"4", b"5"]) == (
        {b"3": state(3.0), b"4": state(4.0), b"5": state(5.0)},
        [b"1", b"2"],
    )


def test_clear_and_a_cache_of_nothing() -> None:
    cache = StateCache()
    cache.written({b"a": state(1.0)})
    cache.clear()
    assert cache.split([b"a"]) == ({}, [b"a"])
    empty = StateCache(capacity=0)
    empty.written({b"a": state(1.0)})
    assert len(empty) == 0
    with pytest.raises(ValueError, match="capacity"):
        StateCache(capacity=-1)
