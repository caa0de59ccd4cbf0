"""The broker's periodic chores beside the pipeline: log summaries and store pruning.

Each is a loop the broker runs under supervision (``Broker._spawn``): the summaries of
per-message events (dead letters, refused messages, messages left to the recover scan),
the pruning of stored history past its retention, and the forgetting of ids past the
idempotency window.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from kiteq.broker.logs import EventSummary
from kiteq.handler.core import BrokerCore
from kiteq.ops.metrics import BrokerMetrics
from kiteq.store.base import MessageStore

__all__ = ["prune_history", "prune_remembered", "summarize"]

logger = logging.getLogger(__name__)

HISTORY_PRUNE_PERIOD: Final = 3600.0
# the idempotency window is pruned at least this often (more often for a shorter window),
# so it holds at most (window + this) seconds of deleted ids
DEDUP_PRUNE_PERIOD: Final = 60.0
# per-message events (dead letters, refused messages) are logged as one summary per period
SUMMARY_PERIOD: Final = 10.0


async def summarize(core: BrokerCore) -> None:
    dead = EventSummary(logger, "dead letters", "topic/group/reason")
    refused = EventSummary(logger, "refused messages", "reason")
    deferred = EventSummary(logger, "stored messages left to the recover scan", "topic")
    tally, intake = core.dispatcher.tally, core.intake
    while True:
        await asyncio.sleep(SUMMARY_PERIOD)
        for summary, counts in (
            (dead, tally.dead_letter_summary),
            (refused, intake.refusals),
            (deferred, intake.left_to_scan),
        ):
            summary.add(counts)
            counts.clear()
            summary.flush(SUMMARY_PERIOD)


async def prune_history(core: BrokerCore, store: Callable[[], MessageStore]) -> None:
    while True:
        await asyncio.sleep(HISTORY_PRUNE_PERIOD)
        before = core.clock.now() - core.config.history_retention_seconds
        pruned = await store().prune_history(before)
        if pruned:
            logger.info("pruned %d history events older than the retention", pruned)


async def prune_remembered(
    core: BrokerCore, store: Callable[[], MessageStore], metrics: BrokerMetrics
) -> None:
    # also with the window off: ids a run with a window remembered are still forgotten
    period = min(DEDUP_PRUNE_PERIOD, max(1.0, core.config.dedup_window_seconds))
    while True:
        await asyncio.sleep(period)
        pruned = await store().prune_remembered(core.clock.now())
        if pruned:
            logger.debug("forgot %d ids past the idempotency window", pruned)
        metrics.set_remembered(await store().remembered_estimate())
