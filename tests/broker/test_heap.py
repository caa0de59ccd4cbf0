"""HeapTrimmer: one malloc_trim after each busy spell, none while busy or with nothing done."""

from __future__ import annotations

import asyncio

import pytest

from kiteq.broker.heap import QUIET_MESSAGES, HeapTrimmer


def test_it_trims_once_after_a_busy_spell_and_not_while_busy() -> None:
    work = [0]
    trimmer = HeapTrimmer(lambda: work[0])
    if not trimmer.available:
        pytest.fail("no malloc_trim in this process: the broker runs on glibc here")

    async def periods() -> list[bool]:
        decisions = []
        for added in (0, QUIET_MESSAGES * 5, QUIET_MESSAGES * 2, 10, 0, 3, QUIET_MESSAGES, 0):
            work[0] += added
            decisions.append(await trimmer.step())
        return decisions

    # nothing / busy / busy / quiet after the spell: trim / idle / a trickle / busy / quiet
    assert asyncio.run(periods()) == [False, False, False, True, False, False, False, True]
    assert trimmer.trims == 2
