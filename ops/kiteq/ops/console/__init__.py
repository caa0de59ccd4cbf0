"""The management console on the ops port: its data seam and its static files.

The page (``static/``: plain HTML, JavaScript and CSS, no build step) is served as is and
reads everything through ``/api/...`` JSON (``kiteq.ops.http``). The broker implements
``ConsoleSource`` on top of the same operator functions as the gRPC admin service.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from importlib import resources
from importlib.abc import Traversable
from typing import Any, Protocol

__all__ = [
    "ConsoleConflictError",
    "ConsoleInputError",
    "ConsoleSource",
    "Redrive",
    "Resolution",
    "static_files",
]

Json = dict[str, Any]


class Resolution(enum.Enum):
    """An operator's decision on a pending transaction."""

    COMMIT = "commit"
    ROLLBACK = "rollback"


@dataclasses.dataclass(frozen=True, slots=True)
class Redrive:
    """What an operator redrives: the letters of *message_ids*, or else those *where* matches.

    Attributes:
        where: The filter, used when *message_ids* is empty (see ``ConsoleSource``).
        message_ids: Each id's letters (every group's, or only *group*'s).
        group: With *message_ids*: only this group's letters (empty: every group's).
        dry_run: Count and preview only; nothing moves.
        expect: The count a preview showed: nothing moves unless that many letters match.
    """

    where: Mapping[str, str]
    message_ids: Sequence[str] = ()
    group: str = ""
    dry_run: bool = False
    expect: int | None = None


class ConsoleInputError(ValueError):
    """A request the source refuses (bad id, unknown filter value); answered ``400``."""


class ConsoleConflictError(ConsoleInputError):
    """What the operator confirmed is no longer so (the DLQ changed); answered ``409``."""


class ConsoleSource(Protocol):
    """What the console shows and does. Every call runs on the event loop.

    ``where`` filters hold the keys ``topic``, ``type``, ``group`` and ``reason`` (empty
    or absent: any). Unknown values raise ``ConsoleInputError``.
    """

    async def overview(self) -> Json:
        """The brokers (this one, then the cluster's others) and counter totals."""
        ...

    async def groups(self) -> Json:
        """Per topic and per (topic, group): backlog, unacked, consumers, ages, bindings."""
        ...

    async def group(self, group: str) -> Json | None:
        """One group's bindings and consumers; None if the broker knows no such group."""
        ...

    async def dead_letters(
        self, where: Mapping[str, str], limit: int, after: tuple[str, str] | None
    ) -> Json:
        """One page of dead letters matching *where*, after the (id, group) key *after*."""
        ...

    async def redrive(self, request: Redrive) -> Json:
        """Redrive by ids (each id's letters, or only the group's) or else by the filter.

        Returns ``redriven`` (moved, or that would move in a dry run) and, for a dry run,
        ``preview``: the first letters that would move. With ``expect`` (the count a preview
        showed), nothing moves unless that many letters match: ``ConsoleConflictError``.
        """
        ...

    async def transactions(self, *, unresolved_only: bool, limit: int, after: str) -> Json:
        """Pending (uncommitted) messages, with whether each is unresolved."""
        ...

    async def resolve(self, message_id: str, resolution: Resolution) -> Json:
        """Commit or roll back *message_id*; ``changed`` says whether anything changed."""
        ...

    async def message(self, message_id: str) -> Json | None:
        """A message, its dead letters and its history; None if never seen."""
        ...


def static_files() -> Traversable:
    """The console's page, script and style sheet (package data)."""
    return resources.files(__name__) / "static"
