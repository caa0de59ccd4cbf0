"""HeapTrimmer: after each busy spell, a store release then one malloc_trim; none while busy."""

from __future__ import annotations

import asyncio

import pytest

from kiteq.broker.heap import QUIET_MESSAGES, HeapTrimmer
from kiteq.core.errors import StoreUnavailableError


class _Store:
    def __init__(self, fail: bool = False) -> None:
        self.releases = 0
        self.fail = fail

    async def release_memory(self) -> None:
        self.releases += 1
        if self.fail:
            raise StoreUnavailableError("rocksdb://x: down")


def _periods(trimmer: HeapTrimmer, work: list[int], added: list[int]) -> list[bool]:
    async def run() -> list[bool]:
        decisions = []
        for n in added:
            work[0] += n
            decisions.append(await trimmer.step())
        return decisions

    return asyncio.run(run())


def _trimmer(store: _Store, work: list[int]) -> HeapTrimmer:
    trimmer = HeapTrimmer(lambda: work[0], store.release_memory)
    if not trimmer.available:
        pytest.fail("no malloc_trim in this process: the broker runs on glibc here")
    return trimmer


def test_it_releases_then_trims_once_after_a_busy_spell_and_not_while_busy() -> None:
    work, store = [0], _Store()
    trimmer = _trimmer(store, work)
    busy, trickle = QUIET_MESSAGES * 5, 10
    added = [0, busy, busy, 0, 0, 0, trickle, 3, QUIET_MESSAGES, 0, 0]
    # nothing / busy / busy / quiet: release / quiet: trim / idle / a trickle / a trickle /
    # busy / quiet: release / quiet: trim
    expected = [False, False, False, False, True, False, False, False, False, False, True]
    assert _periods(trimmer, work, added) == expected
    assert (store.releases, trimmer.trims) == (2, 2)


def test_a_busy_spell_between_the_release_and_the_trim_is_released_again() -> None:
    work, store = [0], _Store()
    trimmer = _trimmer(store, work)
    busy = QUIET_MESSAGES * 3
    # busy / quiet: release / busy again / quiet: release / quiet: trim
    assert _periods(trimmer, work, [busy, 0, busy, 0, 0]) == [False, False, False, False, True]
    assert (store.releases, trimmer.trims) == (2, 1)


def test_a_store_that_cannot_release_does_not_stop_the_trim(
    caplog: pytest.LogCaptureFixture,
) -> None:
    work, store = [0], _Store(fail=True)
    trimmer = _trimmer(store, work)
    assert _periods(trimmer, work, [QUIET_MESSAGES * 2, 0, 0]) == [False, False, True]
    assert store.releases == 1
    assert "store did not release its buffers" in caplog.text
