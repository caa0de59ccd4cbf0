"""What every backend does the same way: open/close state, counts, failures translated.

A backend's driver failures become ``StoreUnavailableError`` through ``translated``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

from kiteq.core.errors import StoreUnavailableError

__all__ = [
    "CountedStore",
    "Lifecycle",
    "Status",
    "add_counts",
    "settle",
    "translated",
    "unavailable",
]

_T = TypeVar("_T")
_K = TypeVar("_K", str, tuple[str, str], tuple[str, str, int])


class Status(enum.Enum):
    NEW = "not open"
    OPENING = "still opening"
    OPEN = "open"
    CLOSED = "closed"


class Lifecycle:
    """A store's status: new, opening, open, closed; closed for good once closing.

    ``open`` may be retried after it failed or was cancelled (the status goes back to
    new), unless ``close`` ran meanwhile.
    """

    __slots__ = ("_closing", "description", "status")

    def __init__(self, description: str) -> None:
        self.description = description
        self.status = Status.NEW
        self._closing: asyncio.Future[None] | None = None

    def not_open(self) -> StoreUnavailableError:
        state = "not open" if self.status is Status.OPEN else self.status.value
        return StoreUnavailableError(f"{self.description} is {state}")

    def check_open(self) -> None:
        if self.status is not Status.OPEN:
            raise self.not_open()

    def begin_open(self) -> bool:
        """Start opening; False when already open."""
        if self.status is Status.OPEN:
            return False
        if self.status is not Status.NEW:
            raise self.not_open()
        self.status = Status.OPENING
        return True

    async def opened(self, job: asyncio.Future[_T]) -> _T:
        """The result of the open *job*; the store is open when this returns."""
        try:
            result = await asyncio.shield(job)
        except BaseException:
            if self._closing is None:
                self.status = Status.NEW
            raise
        if self._closing is not None:
            # close() ran meanwhile; it closes what the job opened.
            raise self.not_open()
        self.status = Status.OPEN
        return result

    async def close(self, close: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run *close* once, whoever calls (idempotent, and not cancelled by a caller)."""
        if self._closing is None:
            self.status = Status.CLOSED
            self._closing = asyncio.ensure_future(close())
        await asyncio.shield(self._closing)


class CountedStore:
    """What a durable backend answers from its state and the counts it keeps in memory."""

    _state: Lifecycle
    _backlog: dict[str, int]
    _dlq: dict[tuple[str, str], int]

    @property
    def durable(self) -> bool:
        return True

    @property
    def description(self) -> str:
        return self._state.description

    async def backlog(self) -> dict[str, int]:
        self._state.check_open()
        return dict(self._backlog)

    async def dlq_size(self) -> dict[tuple[str, str], int]:
        self._state.check_open()
        return dict(self._dlq)


def add_counts(counts: dict[_K, int], deltas: Mapping[_K, int]) -> None:
    """Add count changes; a count that reaches 0 is dropped."""
    for key, delta in deltas.items():
        if not delta:
            continue
        count = counts.get(key, 0) + delta
        if count > 0:
            counts[key] = count
        else:
            counts.pop(key, None)


def settle(future: asyncio.Future[None] | None, error: BaseException | None) -> None:
    """Answer a write call's *future*: done, or *error* raised (a cancelled one is left)."""
    if future is None or future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def unavailable(description: str, action: str, why: str) -> StoreUnavailableError:
    return StoreUnavailableError(f"{description}: {action} failed: {why}")


@contextlib.contextmanager
def translated(
    description: str,
    action: str,
    errors: type[Exception] | tuple[type[Exception], ...],
    why: Callable[[Exception], str] = str,
) -> Iterator[None]:
    """The block's *errors* become ``StoreUnavailableError`` (*why* words the failure)."""
    try:
        yield
    except StoreUnavailableError:
        raise
    except errors as exc:
        raise unavailable(description, action, why(exc)) from exc
